"""Figures written by training and evaluation: the loss/lr/mIoU curves of a run and a per-class IoU bar chart.
Drawn on matplotlib `Figure`s, which render to PNG without pyplot (no GUI backend, no global figure list, and
0.3 s less to import in every run); saved atomically."""
import json
from collections.abc import Sequence

from files import atomic_write


def _figure(width: float, height: float):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height))


def _save(fig, path: str) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=100, bbox_inches='tight'), '--output_dir')


def read_metrics(path: str) -> list[dict]:
    """The metrics log's records; a line cut short (a run killed while writing it) is skipped."""
    rows = []
    with open(path, encoding='utf-8', errors='replace') as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def training_curves(metrics_path: str, out_path: str) -> None:
    """Loss and learning rate against iteration, and validation mIoU against epoch, from a metrics.jsonl."""
    rows = read_metrics(metrics_path)
    train = [r for r in rows if 'loss' in r]
    val = [r for r in rows if 'miou' in r]
    fig = _figure(15, 4)
    axes = fig.subplots(1, 3)
    axes[0].plot([r['iteration'] for r in train], [r['loss'] for r in train], lw=1)
    axes[0].set(title='training loss', xlabel='iteration', ylabel='cross entropy')
    axes[1].plot([r['iteration'] for r in train], [r['lr'] for r in train], lw=1)
    axes[1].set(title='learning rate (backbone)', xlabel='iteration')
    if val:
        axes[2].plot([r['epoch'] for r in val], [r['miou'] for r in val], marker='o')
    else:
        axes[2].text(0.5, 0.5, 'no validation during training\n(--val_every N)', ha='center', va='center',
                     transform=axes[2].transAxes)
    axes[2].set(title='validation mean IoU (%)', xlabel='epoch')
    for ax in axes:
        ax.grid(alpha=0.3)
    _save(fig, out_path)


def iou_bar_chart(class_names: Sequence[str], ious: Sequence[float], out_path: str, title: str,
                  extra: Sequence[float] | None = None, extra_label: str = '') -> None:
    """Per-class IoU (percent) as horizontal bars; `extra` (e.g. multi-scale IoU) as a second bar per class."""
    n = len(class_names)
    fig = _figure(8, 0.3 * n + 1.5)
    ax = fig.subplots()
    positions = list(range(n))[::-1]
    height = 0.4 if extra is not None else 0.8
    ax.barh([p + (height / 2 if extra is not None else 0) for p in positions], ious, height=height,
            label='single scale')
    if extra is not None:
        ax.barh([p - height / 2 for p in positions], extra, height=height, label=extra_label)
        ax.legend(loc='lower right')
    ax.set_yticks(positions, class_names)
    ax.set_xlim(0, 100)
    ax.set(xlabel='IoU (%)', title=title)
    ax.grid(axis='x', alpha=0.3)
    _save(fig, out_path)
