"""What a research repository's utils promise: the confusion matrix and mean IoU, class maps and the VOC palette;
torchrun's environment and the process group; logging and progress lines. Errors are in errors.py, files
written safely in files.py, checkpoints in checkpoints.py."""
import argparse
import contextlib
import io
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from errors import Interrupted, UserError, first_line, out_of_memory, worker_died

IGNORE_INDEX = 255
# What the models, the data and the published models' configs all read: ImageNet's input normalisation, the
# datasets and their class names.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
VOC_CLASSES = ('background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow',
               'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa', 'train',
               'tvmonitor')
CITYSCAPES_CLASSES = ('road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light', 'traffic sign',
                      'vegetation', 'terrain', 'sky', 'person', 'rider', 'car', 'truck', 'bus', 'train', 'motorcycle',
                      'bicycle')
DATASETS = ('pascal', 'cityscapes')
DEFAULT_ROOTS = {'pascal': 'data/VOCdevkit', 'cityscapes': 'data/cityscapes'}
log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Metrics: the confusion matrix, class maps, the VOC palette


class ConfusionMatrix:
    """Pixel counts of (label, prediction) pairs, accumulated on the device with `torch.bincount`.

    IoU is dataset-level, as in the original: intersections and unions are summed over all images before the
    division, and pixels labelled `ignore_index` are left out.
    """

    def __init__(self, num_classes: int, device: torch.device | None = None, ignore_index: int = IGNORE_INDEX):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)

    def update(self, target: torch.Tensor, pred: torch.Tensor) -> None:
        n = self.num_classes
        keep = target != self.ignore_index
        idx = target[keep].to(torch.int64) * n + pred[keep].to(torch.int64)
        self.mat += torch.bincount(idx, minlength=n * n).reshape(n, n)

    def reduce_from_all_processes(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.mat)

    def iou(self) -> np.ndarray:
        """Per-class IoU in [0, 1], computed as the original did (float64, +1e-10 in the denominator)."""
        mat = self.mat.cpu().numpy()
        inter = np.diag(mat)
        union = mat.sum(0) + mat.sum(1) - inter
        return inter / (union + 1e-10)

    def mean_iou(self) -> float:
        """Mean IoU in percent over all classes, as printed by the original."""
        return float(self.iou().mean() * 100)

    def pixel_accuracy(self) -> float:
        mat = self.mat.cpu().numpy()
        return float(np.diag(mat).sum() / max(mat.sum(), 1) * 100)

    def table(self, class_names: Sequence[str]) -> str:
        """A per-class table with IoU, the class's share of the labelled pixels, and a bar."""
        iou = self.iou() * 100
        counts = self.mat.sum(1).cpu().numpy()
        share = counts / max(counts.sum(), 1) * 100
        width = max(len(n) for n in class_names)
        rows = [f'{"class":<{width}}  {"IoU":>6}  {"pixels":>6}', '-' * (width + 40)]
        for name, value, s in zip(class_names, iou, share):
            rows.append(f'{name:<{width}}  {value:6.2f}  {s:5.1f}%  {"#" * int(round(value / 4))}')
        rows.append('-' * (width + 40))
        rows.append(f'{"mean":<{width}}  {iou.mean():6.2f}  pixel accuracy {self.pixel_accuracy():.2f}')
        return '\n'.join(rows)


def class_map(scores: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """The class of each pixel: the index of the highest score along `dim`, the first one where several tie.

    Same result as `scores.argmax(dim)` (tests/test_metrics.py), but torch.max's kernel: on the CPU, argmax over
    a dimension other than the last is several times slower, most of the evaluation's time outside the model.
    """
    return scores.max(dim).indices


def voc_palette(num_colors: int = 256) -> list[int]:
    """The standard PASCAL VOC colour map as a flat [r, g, b, ...] list for `Image.putpalette`."""
    palette = []
    for i in range(num_colors):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


# ---------------------------------------------------------------------------------------------------------------
# Processes: torchrun's environment and the process group


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # processes on this machine

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


TORCHRUN_VARIABLES = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')


def dist_info() -> DistInfo:
    """This process's rank and the number of processes, as torchrun's environment describes them. A WORLD_SIZE
    above 1 without the rest of torchrun's variables (or with values that are not numbers) is a UserError: a
    process group could not be joined, or would wait for processes that do not exist."""
    values = {}
    for name, default in (('RANK', 0), ('WORLD_SIZE', 1), ('LOCAL_RANK', 0), ('LOCAL_WORLD_SIZE', 1)):
        text = os.environ.get(name)
        try:
            values[name] = default if text is None or not text.strip() else int(text)
        except ValueError:
            raise UserError(f'the environment variable {name}={text!r} is not a number; start the command with '
                            f'torchrun, or unset {name}.') from None
    info = DistInfo(values['RANK'], values['WORLD_SIZE'], values['LOCAL_RANK'], values['LOCAL_WORLD_SIZE'])
    if info.world_size > 1:
        missing = [name for name in TORCHRUN_VARIABLES if not os.environ.get(name)]
        if missing:
            raise UserError(f'WORLD_SIZE={info.world_size} is set, but not {", ".join(missing)}: the processes '
                            f'of a distributed run are started by torchrun (README, "Distributed training"). '
                            f'Start the command with torchrun, or unset WORLD_SIZE.')
    if info.world_size < 1 or not 0 <= info.rank < info.world_size:
        raise UserError(f'RANK={info.rank} and WORLD_SIZE={info.world_size} do not make a process group; start '
                        f'the command with torchrun, or unset them.')
    return info


def from_main_process(value):
    """Rank 0's `value` on every process of the group (`value` itself without one): for choices that must agree,
    such as a seed drawn at random, which shuffles the data that the processes then shard between them."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def init_distributed(device_name: str | None, gpu: int = 0) -> tuple[DistInfo, torch.device]:
    """Pick the device (`device_name` when given, else CUDA when available, else the CPU) and, under torchrun,
    join the process group (nccl on GPUs, gloo on CPU)."""
    info = dist_info()
    if device_name is None:
        device_name = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        device = torch.device(device_name)
    except RuntimeError:
        raise UserError(f'--device {device_name} is not a device; use cpu, cuda or cuda:N.') from None
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise UserError('--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device cpu.')
        index = info.local_rank if info.distributed else (device.index if device.index is not None else gpu)
        if index >= torch.cuda.device_count():
            raise UserError(f'GPU {index} was asked for, but only {torch.cuda.device_count()} are visible; '
                            f'pick another --gpu.')
        device = torch.device('cuda', index)
        torch.cuda.set_device(device)
    elif device.type != 'cpu':
        raise UserError(f'--device {device_name} is not supported; use cpu, cuda or cuda:N.')
    if info.distributed and not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return info, device


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def first_non_finite(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, or None. A tensor whose sum is
    finite holds neither (a NaN or an infinity makes the sum one), and summing reads it once without a mask: a
    tenth of the time of `isfinite` on every value (65 ms for a VoVNet-39 model). Only where the sum is not
    finite (those, or finite values whose sum overflows) is every value looked at."""
    for name, tensor in state_dict.items():
        if (isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor.sum())
                and not torch.isfinite(tensor).all()):
            return name
    return None



# ---------------------------------------------------------------------------------------------------------------
# Logging and progress


PROJECT_LOGGERS = ('main', 'engine', 'deeplab', 'imagenet', 'vovnet', 'pascal', 'utils', 'files', 'checkpoints',
                   'plots', 'predict', 'export', 'benchmark', 'demo', 'hub', 'weights', 'published', 'quantize')


def setup_logging(is_main: bool = True) -> None:
    """The project's messages to stdout from the main process only; warnings from every process to stderr."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(logging.Formatter('%(message)s'))
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err = logging.StreamHandler(sys.stderr)
    err.setFormatter(logging.Formatter('warning: %(message)s'))
    err.setLevel(logging.WARNING)
    root.addHandler(out)
    root.addHandler(err)
    root.setLevel(logging.WARNING)
    for stream in (sys.stdout, sys.stderr):  # file names that are not UTF-8 (surrogates) print escaped, not fail
        if hasattr(stream, 'reconfigure'):
            with contextlib.suppress(ValueError, io.UnsupportedOperation):
                stream.reconfigure(errors='backslashreplace')
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if is_main else logging.WARNING)


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """'1 epoch', '2 epochs'; `nouns` where the plural is not noun + 's'."""
    return f'{count} {noun if count == 1 else nouns or noun + "s"}'


def format_rate(images: int, seconds: float) -> str:
    """Throughput as images/s, or s/image when slower than one a second (where '0.0 img/s' would say nothing)."""
    if images <= 0 or seconds <= 0:
        return '- img/s'
    rate = images / seconds
    return f'{rate:.1f} img/s' if rate >= 1 else f'{seconds / images:.1f} s/img'


def format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f'{h}:{m:02d}:{s:02d}' if h else f'{m}:{s:02d}'


class Pace:
    """When to print the progress of a long loop, and how fast it goes: at its first item, then at most every `every`
    seconds, and at its last; the speed and the time left come from the average so far."""

    def __init__(self, total: int, every: float = 10.0):
        self.total, self.every = total, every
        self.start = self.last = time.time()
        self.done = 0

    def step(self, count: int = 1) -> bool:
        """Count `count` more items done; whether to print now."""
        first = self.done == 0
        self.done += count
        now = time.time()
        if first or self.done >= self.total or now - self.last >= self.every:
            self.last = now
            return True
        return False

    def rate(self) -> str:
        return format_rate(self.done, time.time() - self.start)

    def eta(self) -> str:
        elapsed = time.time() - self.start
        return format_seconds(elapsed / max(self.done, 1) * max(self.total - self.done, 0))


class Progress:
    """A training line every `print_freq` iterations and at the end of each epoch (epoch, iteration, lr, loss and
    its epoch's mean, images/s, time left), and the same numbers in the metrics log. `step` takes the run's
    iteration (1-based, over all epochs), as `engine.Monitor` passes it.

    `batch_size` is the images of a step over all processes, `epoch_images` those of an epoch (default: every step
    a full batch): an epoch's last step holds the rest, which images/s counts as it is."""

    def __init__(self, epochs: int, iterations: int, batch_size: int, print_freq: int, first_iteration: int,
                 metrics, epoch_images: int | None = None):
        self.epochs, self.iterations, self.batch_size, self.print_freq = epochs, iterations, batch_size, print_freq
        self.last_batch = batch_size if epoch_images is None else epoch_images - (iterations - 1) * batch_size
        self.max_iterations, self.metrics = epochs * iterations, metrics
        self.start, self.first_iteration = time.time(), first_iteration
        self.steady_images, self.steady_seconds, self.windows = 0, 0.0, 0
        self.new_epoch()

    def new_epoch(self) -> None:
        self.window_start, self.window_images, self.losses = time.time(), 0, []

    def step(self, iteration: int, lr: float, loss: float) -> None:
        epoch, batch_index = divmod(iteration - 1, self.iterations)
        self.losses.append(loss)
        self.window_images += self.batch_size if batch_index + 1 < self.iterations else self.last_batch
        if iteration % self.print_freq and batch_index + 1 != self.iterations:
            return
        now = time.time()
        speed = self.window_images / max(now - self.window_start, 1e-9)
        self.windows += 1
        if self.windows > 1:  # the first window holds the compilation and the loaders' start
            self.steady_images += self.window_images
            self.steady_seconds += now - self.window_start
        eta = (now - self.start) / max(iteration - self.first_iteration, 1) * (self.max_iterations - iteration)
        log.info('epoch %d/%d  iter %d/%d  lr %.6f  loss %.4f (%.4f)  %.1f img/s  eta %s', epoch + 1, self.epochs,
                 batch_index + 1, self.iterations, lr, loss, sum(self.losses) / len(self.losses), speed,
                 format_seconds(eta))
        self.metrics.write(iteration, epoch=epoch + 1, lr=lr, loss=loss, images_per_s=speed, time=now)
        self.window_start, self.window_images = now, 0

    def sustained(self) -> float | None:
        """Images per second over the run's training steps with their data loading, from the second logged window
        on (the first holds compilation and the loaders' start), validation and checkpoints left out; None
        before two windows."""
        return self.steady_images / self.steady_seconds if self.steady_seconds > 0 else None


# ---------------------------------------------------------------------------------------------------------------
# Exit statuses and command lines


def exit_status(run: Callable[[], object], out_of_memory_advice: str | None = None) -> int:
    """Call `run()` and return the process's exit status: 0, or after a failure the user can fix or an interruption,
    one message on stderr (from rank 0) and 1 or 128 + the signal, instead of a traceback. Memory that ran out
    where no closer handler named the work is a message too, with `out_of_memory_advice` (the flags to lower)."""
    try:
        try:
            run()
        except (RuntimeError, MemoryError) as e:
            stop = _stop_behind(e)
            if stop is not None:
                raise stop from None
            if out_of_memory_advice is None or not out_of_memory(e):
                raise
            raise UserError(f'out of memory ({first_line(e)}): {out_of_memory_advice}.') from None
    except UserError as e:
        if _reports():
            print(f'error: {e.for_user()}', file=sys.stderr)
        return 1
    except Interrupted as e:
        if _reports():
            print(str(e), file=sys.stderr)
        return 128 + (e.signum or signal.SIGINT)
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 128 + signal.SIGINT
    return 0


def _stop_behind(e: BaseException) -> Interrupted | None:
    """The interruption a data-loading worker's death was raised over: a signal to the process group stops the
    run and kills its workers, and PyTorch's SIGCHLD handler may raise that death anywhere while the stop unwinds
    (seen while the loader was being closed)."""
    if not worker_died(e):
        return None
    context = e.__context__
    while context is not None and not isinstance(context, Interrupted):
        context = context.__context__
    return context


def _reports() -> bool:
    """Whether this process prints the failure: rank 0, or any process when the environment cannot tell."""
    try:
        return dist_info().is_main
    except UserError:
        return True


def run_command(parser: argparse.ArgumentParser, run: Callable, argv=None,
                out_of_memory_advice: str | None = None) -> int:
    """A script's command line: parse, log to stdout, run; its exit status as `exit_status` gives it."""
    args = parser.parse_args(argv)
    setup_logging()
    return exit_status(lambda: run(args), out_of_memory_advice)
