"""Train and evaluate DeepLabV3 with VoVNet, ResNet or DenseNet backbones on PASCAL VOC 2012 + SBD or Cityscapes.

    python main.py --train --exp bn_lr7e-3 --epochs 50 --base_lr 0.007 --backbone vovnet39   # train
    python main.py --exp bn_lr7e-3 --epochs 50 --base_lr 0.007 --backbone vovnet39           # evaluate

Checkpoints are data/deeplab_{backbone}_{dataset}_v3_{exp}_epoch{N}.pth, as in the original; evaluation loads
the one of --epochs, prints per-class and mean IoU and writes the predictions to data/val/.
Several GPUs or machines: torchrun --nproc_per_node=N main.py --train ... (README, "Distributed training").
"""
import argparse
import contextlib
import glob
import logging
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import deeplab
import imagenet
import inference
import pascal
import plots
import utils
from utils import IGNORE_INDEX, Interrupted, UserError

log = logging.getLogger('main')

MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
CHECKPOINT_VERSION = 1


# ---------------------------------------------------------------------------------------------------------------
# Command line


def _scales(text):
    try:
        scales = [float(s) for s in text.split(',') if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a comma-separated list of numbers') from None
    if not scales or any(s <= 0 or not math.isfinite(s) for s in scales):
        raise argparse.ArgumentTypeError(f'scales must be positive numbers, not {text}')
    return scales


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    o = p.add_argument_group('flags of the original (same names and defaults)')
    o.add_argument('--train', action='store_true', help='train; without it, evaluate')
    o.add_argument('--exp', required=True, help='experiment name, part of the checkpoint file names')
    o.add_argument('--gpu', type=utils.number(int, 0), default=0,
                   help='CUDA device of a single-process run (default 0)')
    o.add_argument('--backbone', default='resnet101', choices=deeplab.BACKBONES, help='default: %(default)s')
    o.add_argument('--dataset', default='pascal', choices=pascal.DATASETS,
                   help='pascal (VOC 2012 + SBD, or any dataset in its list layout) or cityscapes')
    o.add_argument('--groups', type=utils.number(int, 1), default=None,
                   help='GroupNorm with this many groups instead of BatchNorm')
    o.add_argument('--epochs', type=utils.number(int, 1), default=30,
                   help='epochs to train; for evaluation, the epoch of the checkpoint to load (default 30)')
    o.add_argument('--batch_size', type=utils.number(int, 1), default=16,
                   help='images per iteration in total over all processes: 16 means 16 whatever the number '
                        'of GPUs under torchrun, each taking batch_size / N (default 16)')
    o.add_argument('--base_lr', type=utils.number(float, 0, inclusive=False), default=0.00025,
                   help='initial learning rate of the poly schedule (the published runs use 0.007)')
    o.add_argument('--last_mult', type=utils.number(float, 0), default=1.0, help='LR multiplier of the ASPP head')
    o.add_argument('--scratch', action='store_true', help='train from random initialisation, no ImageNet weights')
    o.add_argument('--freeze_bn', action='store_true', help='keep BatchNorm statistics and affine parameters fixed')
    o.add_argument('--weight_std', action='store_true', help='weight standardisation (ResNet only)')
    o.add_argument('--beta', action='store_true', help='three 3x3 convs as the stem (ResNet only)')
    o.add_argument('--crop_size', type=utils.number(int, 1), default=513,
                   help='training crop and evaluation canvas (default 513)')
    o.add_argument('--resume', default=None, metavar='PATH',
                   help='continue training from a checkpoint: weights, optimizer, epoch, iteration, RNG')
    o.add_argument('--workers', type=utils.number(int, 0), default=None,
                   help='data-loading processes per training process (default 4, fewer where this machine has '
                        'fewer CPUs for each process)')

    d = p.add_argument_group('data and output')
    d.add_argument('--data_root', default=None,
                   help='dataset folder (default data/VOCdevkit for pascal, data/cityscapes for cityscapes)')
    d.add_argument('--num_classes', type=utils.number(int, 2), default=None,
                   help='classes of a custom dataset in the VOC layout, background included (default: 21/19)')
    d.add_argument('--class_names', default=None, metavar='FILE', help='file with one class name per line')
    d.add_argument('--output_dir', default='data',
                   help='where checkpoints, predictions (val/) and logs (logs/) go (default: data)')
    d.add_argument('--seed', type=utils.number(int, 0), default=None,
                   help='seed of shuffling, augmentation and initialisation (default: random, logged and saved)')

    m = p.add_argument_group('model')
    m.add_argument('--output_stride', type=int, choices=deeplab.OUTPUT_STRIDES, default=None,
                   help='16 (the original) or 8: finer features, ASPP rates 12/24/36, about 3x the compute '
                        '(default: 16 for training, the checkpoint\'s for evaluation)')
    m.add_argument('--pretrained_path', default=None, metavar='FILE',
                   help='ImageNet weights to start from instead of the default source, in the original\'s, '
                        'pytorchcv\'s, timm\'s or torchvision\'s format (README, "ImageNet weights")')

    t = p.add_argument_group('training extras')
    t.add_argument('--save_every', type=utils.number(int, 1), default=10,
                   help='write a checkpoint every N epochs; the last epoch is always written (default 10)')
    t.add_argument('--val_every', type=utils.number(int, 0), default=0,
                   help='validate every N epochs and keep the best checkpoint (_best.pth); 0: never (default)')
    t.add_argument('--print_freq', type=utils.number(int, 1), default=10, help='log every N iterations (default 10)')

    s = p.add_argument_group('devices and speed')
    s.add_argument('--device', default=None, help='cpu, cuda or cuda:N (default: CUDA when available, else CPU)')
    s.add_argument('--amp', default='off', choices=tuple(inference.AMP_DTYPES),
                   help='mixed precision: bf16 (CPU and recent GPUs) or fp16 (CUDA, with a gradient scaler)')
    s.add_argument('--channels_last', action='store_true', help='NHWC memory layout (faster convolutions)')
    s.add_argument('--compile', action='store_true', help='torch.compile the model (slow start, faster steps)')
    s.add_argument('--sync_bn', action=argparse.BooleanOptionalAction, default=None,
                   help='SyncBatchNorm across processes (default: on when distributed on GPUs; PyTorch has no '
                        'SyncBatchNorm on the CPU, where each process normalises its own images)')

    e = p.add_argument_group('evaluation')
    e.add_argument('--checkpoint', default=None, metavar='PATH',
                   help='evaluate this checkpoint instead of the one named by --exp/--epochs')
    e.add_argument('--eval_scales', type=_scales, default=None, metavar='S1,S2,...',
                   help='also evaluate with these input scales averaged (e.g. 0.5,0.75,1.0,1.25,1.5,1.75)')
    e.add_argument('--flip', action='store_true', help='also evaluate with horizontal flipping averaged')
    e.add_argument('--save_predictions', action=argparse.BooleanOptionalAction, default=True,
                   help='write palettised prediction PNGs to <output_dir>/val (default: on)')
    return p


def run_name(args) -> str:
    return f'deeplab_{args.backbone}_{args.dataset}_v3_{args.exp}'


def checkpoint_path(args, epoch) -> str:
    """The original's file name: data/deeplab_{backbone}_{dataset}_v3_{exp}_epoch{N}.pth."""
    return os.path.join(args.output_dir, f'{run_name(args)}_epoch{epoch}.pth')


def run_file(args, what: str) -> str:
    """The run's `best` or `interrupted` checkpoint, beside the epoch checkpoints."""
    return os.path.join(args.output_dir, f'{run_name(args)}_{what}.pth')


def log_folder(args) -> str:
    return os.path.join(args.output_dir, 'logs', run_name(args))


def dataset_inputs(*datasets) -> dict[str, str]:
    return {path: 'a file of the dataset' for dataset in datasets if dataset is not None
            for pair in dataset.samples for path in pair}


def training_outputs(args, first_epoch: int) -> dict[str, str]:
    """Every file a training run may write, with the options that place it (checked before any work)."""
    epochs = [e for e in range(first_epoch + 1, args.epochs + 1) if e % args.save_every == 0 or e == args.epochs]
    paths = [checkpoint_path(args, e) for e in epochs] + [run_file(args, 'interrupted')]
    if args.val_every:
        paths.append(run_file(args, 'best'))
    paths += [os.path.join(log_folder(args), 'metrics.jsonl'), os.path.join(log_folder(args), 'curves.png')]
    if args.resume and os.path.abspath(args.resume) == os.path.abspath(run_file(args, 'interrupted')):
        # A run resumed from its interruption checkpoint replaces it at the next one (README), once it has read it.
        paths.remove(run_file(args, 'interrupted'))
    return {path: '--output_dir or --exp' for path in paths}


def sync_batchnorm(args, info: utils.DistInfo, cuda: bool) -> bool:
    """SyncBatchNorm: on by default for BatchNorm models trained by several processes on GPUs."""
    return (info.distributed and cuda and args.sync_bn is not False
            and deeplab.uses_batchnorm(args.backbone, args.groups))


def batchnorm_per_process(args, info: utils.DistInfo, cuda: bool) -> bool:
    """Whether training normalises each process's images on their own (BatchNorm, training, not synchronised):
    then each process needs 2 images or more in every batch."""
    return (deeplab.uses_batchnorm(args.backbone, args.groups) and not args.freeze_bn
            and not sync_batchnorm(args, info, cuda))


def default_workers(info: utils.DistInfo) -> int:
    """The original's 4 data-loading processes, or fewer where the CPUs this process may use, shared among the
    processes torchrun started on this machine, are fewer (more would only compete for them)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    return max(1, min(4, cpus // info.local_world_size))


def check_args(args, info: utils.DistInfo) -> None:
    """Flag combinations argparse cannot check alone; each a clear message."""
    output_stride = args.output_stride or 16
    min_crop = 4 * output_stride
    if args.crop_size < min_crop:
        raise UserError(f'--crop_size {args.crop_size} is too small for output stride {output_stride}: the '
                        f'features would be {math.ceil(args.crop_size / output_stride)} pixels wide. '
                        f'Use at least {min_crop}.')
    if args.batch_size % info.world_size:
        raise UserError(f'--batch_size {args.batch_size} is the total over all processes and must divide among '
                        f'the {info.world_size} started by torchrun; use a multiple of {info.world_size}.')
    cuda = (args.device or ('cuda' if torch.cuda.is_available() else 'cpu')).startswith('cuda')
    if args.sync_bn and not cuda:
        raise UserError('--sync_bn needs CUDA GPUs: PyTorch\'s SyncBatchNorm does not run on the CPU. Drop it, or '
                        'run on GPUs.')
    if args.train and batchnorm_per_process(args, info, cuda) and args.batch_size // info.world_size < 2:
        groups = '' if deeplab.uses_batchnorm(args.backbone, num_groups=1) else ', --groups'
        raise UserError(f'with BatchNorm each process needs at least 2 images per batch (the ASPP\'s image-pooling '
                        f'branch normalises one value per image): raise --batch_size, or use --freeze_bn{groups}.')
    if args.backbone in deeplab.TIMM_BACKBONES:
        utils.require('timm', f'--backbone {args.backbone}')
    if args.train:  # before any folder is made: a name the file system refuses would fail only when written
        for path in (checkpoint_path(args, args.epochs), run_file(args, 'interrupted'),
                     os.path.join(log_folder(args), 'metrics.jsonl')):
            utils.check_name_fits(path, '--exp or --output_dir')
    if args.resume and not args.train:
        raise UserError('--resume continues a training run: add --train, or use --checkpoint to evaluate a file.')


# ---------------------------------------------------------------------------------------------------------------
# This process: its place among torchrun's processes, and how models run on it


@dataclass
class Runtime:
    dist: utils.DistInfo
    execution: inference.Execution

    @property
    def device(self) -> torch.device:
        return self.execution.device


def make_runtime(args, info: utils.DistInfo, device: torch.device) -> Runtime:
    """--amp and --channels_last, turned into the run's execution once."""
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    return Runtime(info, inference.Execution(device, inference.amp_dtype(args.amp, device), args.channels_last))


# ---------------------------------------------------------------------------------------------------------------
# Model and data


def flag_model_args(args) -> dict:
    """The model the flags describe (the backbone's options), for `deeplab.rebuild_args`."""
    return dict(backbone=args.backbone, num_groups=args.groups, weight_std=args.weight_std, beta=args.beta)


def model_for(args, num_classes: int, checkpoint: dict | None = None, resume: bool = False) -> deeplab.DeepLabV3:
    """The model of this run: the flags' backbone and the dataset's classes, the output stride of --output_stride.
    From a checkpoint the rest follows `deeplab.rebuild_args`: when evaluating, the norm layers and stem it
    recorded; when resuming, the flags' (a mismatch is then load_weights' message). A new training run starts
    from ImageNet weights unless --scratch."""
    stride = {'output_stride': args.output_stride} if args.output_stride else {}
    if checkpoint is None:
        return deeplab.build_model(args.backbone, pretrained=not args.scratch, num_classes=num_classes,
                                   num_groups=args.groups, weight_std=args.weight_std, beta=args.beta,
                                   output_stride=args.output_stride or 16, pretrained_path=args.pretrained_path)
    flags = flag_model_args(args)
    fixed = {**(flags if resume else {'backbone': args.backbone}), 'num_classes': num_classes, **stride}
    return deeplab.build_model(**deeplab.rebuild_args(checkpoint, fixed=fixed, defaults=flags))


def unwrap(model: nn.Module) -> deeplab.DeepLabV3:
    """The DeepLabV3 inside DistributedDataParallel and/or torch.compile wrappers."""
    while not isinstance(model, deeplab.DeepLabV3):
        model = getattr(model, 'module', None) or model._orig_mod
    return model


def class_names_of(args):
    return pascal.read_class_names(args.class_names) if args.class_names else None


def dataset_of(args, split: str, transforms, **kwargs) -> pascal.SegmentationDataset:
    """The `split` of the dataset the flags name, with its class names file, if any."""
    return pascal.build_dataset(args.dataset, args.data_root, split, transforms, args.num_classes,
                                class_names_of(args), names_source=args.class_names and
                                f'{args.class_names} (--class_names)', **kwargs)


def loader_of(dataset, batch_size: int, sampler, args, rt: Runtime):
    return pascal.make_loader(dataset, batch_size, sampler, args.workers, pin_memory=rt.device.type == 'cuda')


def eval_loader(dataset, args, rt: Runtime):
    """One image per batch: the protocol pads each image on its own canvas; each process takes its share."""
    return loader_of(dataset, 1, pascal.ShardSampler(len(dataset), rt.dist.rank, rt.dist.world_size), args, rt)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class MultiScale:
    """Multi-scale and/or flip evaluation beside the protocol's single scale."""
    scales: list[float]
    flip: bool = False
    save_dir: str | None = None


@torch.inference_mode()
def evaluate(runner: inference.Runner, loader, num_classes: int, save_dir: str | None = None,
             multi_scale: MultiScale | None = None, stop: utils.GracefulStop | None = None):
    """The original's protocol, one image at a time: the image padded bottom/right to the crop size, argmax,
    cropped back to the image; IoU accumulated over the dataset. With `multi_scale`, its prediction is scored
    beside it. Returns (ConfusionMatrix, ConfusionMatrix or None); with several processes each sees its share of
    the images and the matrices are summed over all. A stop requested through `stop` (SIGINT, SIGTERM) ends it
    between images with Interrupted. Progress is logged at least every 10 s."""
    runner.model.eval()
    device = runner.execution.device
    dataset = loader.dataset
    confusion = utils.ConfusionMatrix(num_classes, device)
    confusion_ms = utils.ConfusionMatrix(num_classes, device) if multi_scale else None
    palette = utils.voc_palette()
    pace = utils.Pace(len(loader))

    def stopped():
        return Interrupted(stop.signal, f'evaluation stopped by signal {stop.signal} after {pace.done} of '
                                        f'{len(loader)} images; nothing was published')
    advice = f'use a --crop_size that fits in memory (513 for VOC; the canvas is {runner.crop}x{runner.crop})'
    with contextlib.closing(pascal.batches(loader, stop, advice)) as batches:
        try:
            for image, mask, info in batches:
                if stop is not None and stop.requested:
                    raise stopped()
                h, w = int(info['size'][0]), int(info['size'][1])
                name = dataset.name(int(info['index']))
                target = mask[0, :h, :w].to(device, non_blocking=True)
                try:
                    logits = runner.logits(image, (h, w))
                except (RuntimeError, MemoryError) as e:
                    if not utils.out_of_memory(e):
                        raise
                    raise UserError(f'out of memory evaluating {name} ({w}x{h} on a {image.shape[-1]}x'
                                    f'{image.shape[-2]} canvas) on {device} ({utils.first_line(e)}): evaluate on a '
                                    f'device with more memory, or with --amp (bf16 on a CPU).') from None
                pred = utils.class_map(logits[0], 0)
                confusion.update(target, pred)
                if save_dir:
                    utils.save_mask(pred, os.path.join(save_dir, f'{name}.png'), palette, '--output_dir')
                if multi_scale:
                    probs = runner.multi_scale_probs(image[..., :h, :w], multi_scale.scales, multi_scale.flip, logits)
                    pred_ms = utils.class_map(probs[0], 0)
                    confusion_ms.update(target, pred_ms)
                    if multi_scale.save_dir:
                        utils.save_mask(pred_ms, os.path.join(multi_scale.save_dir, f'{name}.png'), palette,
                                        '--output_dir')
                if pace.step():
                    log.info('evaluating  image %d/%d  %s  eta %s', pace.done, pace.total, pace.rate(), pace.eta())
        except pascal.Stopped:
            raise stopped() from None
        except Exception:
            # A worker killed by the same signal: PyTorch's SIGCHLD handler raises wherever the loop is.
            if stop is not None and stop.requested:
                raise stopped() from None
            raise
    confusion.reduce_from_all_processes()
    if confusion_ms is not None:
        confusion_ms.reduce_from_all_processes()
    return confusion, confusion_ms


def run_evaluation(args, rt: Runtime) -> float:
    path = args.checkpoint or checkpoint_path(args, args.epochs)
    if not os.path.exists(path):
        found = sorted(glob.glob(os.path.join(args.output_dir, f'deeplab_{args.backbone}_*.pth')))
        listing = ('checkpoints there for this backbone: ' + ', '.join(os.path.basename(f) for f in found)
                   if found else f'no checkpoint for {args.backbone} is in {args.output_dir}/')
        raise UserError(f'the checkpoint {path} does not exist ({listing}). Check --exp, --epochs, --backbone and '
                        f'--dataset, download a released checkpoint into {args.output_dir}/ (README), or pass '
                        f'--checkpoint PATH.')
    checkpoint = utils.load_checkpoint(path)
    dataset = dataset_of(args, 'val', pascal.eval_transforms(args.crop_size))
    ms = bool(args.eval_scales or args.flip)
    folders = ['val', 'val_ms'] if ms else ['val']
    outputs = {os.path.join(args.output_dir, folder, f'{dataset.name(i)}.png'): '--output_dir'
               for folder in (folders if args.save_predictions else []) for i in range(len(dataset))}
    outputs[chart_path(args, path)] = '--output_dir'
    utils.refuse_overwrite(outputs, {**dataset_inputs(dataset), path: 'the checkpoint evaluated',
                                     args.class_names: '--class_names'})
    model = model_for(args, dataset.num_classes, checkpoint)
    deeplab.load_weights(model, checkpoint['state_dict'], path)
    model = rt.execution.prepare(model)
    runner = inference.Runner(torch.compile(model) if args.compile else model, rt.execution, args.crop_size)
    loader = eval_loader(dataset, args, rt)

    log.info('evaluating %s on %s of %s (%s, output stride %d)', path, utils.plural(len(dataset), 'image'),
             args.dataset, rt.device, model.output_stride)
    log.info('initial weights of its training: %s', imagenet.describe(checkpoint.get('initial_weights')))
    hint = inference.speed_hint(rt.device)
    if hint and rt.execution.amp is None:
        log.info('%s', hint)
    start = time.time()
    # Predictions go to a staging folder and join <output_dir>/val only when the evaluation succeeds.
    with contextlib.ExitStack() as stack:
        if args.compile:
            # Weights as constants (BN folded into the convolutions, weights prepacked), for this evaluation only:
            # Inductor compiles at the first call and reads the flag then, and a flag left set would freeze the
            # weights of any model compiled later in this process, stale once it trains.
            from torch._inductor import config as inductor_config
            stack.enter_context(inductor_config.patch(freezing=True))
        save_dir, multi_scale = None, None
        if args.save_predictions:
            save_dir = stack.enter_context(utils.staged_folder(os.path.join(args.output_dir, 'val'),
                                                                          '--output_dir'))
        if ms:
            ms_dir = (stack.enter_context(utils.staged_folder(os.path.join(args.output_dir, 'val_ms'), '--output_dir'))
                      if args.save_predictions else None)
            multi_scale = MultiScale(args.eval_scales or [1.0], args.flip, ms_dir)
        stop = stack.enter_context(utils.GracefulStop(repeat_raises=True))
        confusion, confusion_ms = evaluate(runner, loader, dataset.num_classes, save_dir, multi_scale, stop)
    if rt.dist.is_main:
        report(confusion, confusion_ms, dataset.class_names, args, path, time.time() - start, len(dataset))
    return confusion.mean_iou()


def report(confusion, confusion_ms, class_names, args, path, seconds, count) -> None:
    """Print the per-class table, the original's `IoU {class}: x` and `Mean IoU: x` lines, and save a chart."""
    iou = confusion.iou()
    label = ''
    if confusion_ms is not None:
        label = 'scales ' + ','.join(f'{s:g}' for s in (args.eval_scales or [1.0])) + (' + flip' if args.flip else '')
        log.info('per-class IoU (%%): single scale | %s\n%s', label,
                 _side_by_side(class_names, iou, confusion_ms.iou()))
    else:
        log.info('per-class IoU (%%):\n%s', confusion.table(class_names))
    for name, value in zip(class_names, iou):
        log.info('IoU %s: %.2f', name, value * 100)
    log.info('Mean IoU: %.2f', iou.mean() * 100)
    if confusion_ms is not None:
        log.info('Mean IoU (%s): %.2f', label, confusion_ms.mean_iou())
    chart = chart_path(args, path)
    plots.iou_bar_chart(class_names, iou * 100, chart, f'{os.path.basename(path)}: mIoU {iou.mean() * 100:.2f}',
                        extra=None if confusion_ms is None else confusion_ms.iou() * 100, extra_label=label)
    where = f'predictions in {os.path.join(args.output_dir, "val")}/, ' if args.save_predictions else ''
    log.info('%s in %.1f s; %sIoU chart %s', utils.plural(count, 'image'), seconds, where, chart)


def chart_path(args, checkpoint: str) -> str:
    return os.path.join(args.output_dir, os.path.splitext(os.path.basename(checkpoint))[0] + '_iou.png')


def _side_by_side(class_names, iou, iou_ms) -> str:
    width = max(len(n) for n in class_names)
    rows = [f'{name:<{width}}  {a * 100:6.2f}  {b * 100:6.2f}' for name, a, b in zip(class_names, iou, iou_ms)]
    rows.append(f'{"mean":<{width}}  {iou.mean() * 100:6.2f}  {iou_ms.mean() * 100:6.2f}')
    return '\n'.join(rows)


# ---------------------------------------------------------------------------------------------------------------
# Training: optimizer, schedule, loss


def poly_lr(base_lr: float, iteration: int, max_iterations: int, power: float = 0.9) -> float:
    """The original's poly schedule, set every iteration: base_lr * (1 - it / max_it) ** 0.9."""
    return base_lr * (1 - iteration / max_iterations) ** power


FUSED_DEVICES = ('cpu', 'cuda')


def sgd(groups: list[dict], lr: float, momentum: float, weight_decay: float,
        grad_scaler: bool = False) -> torch.optim.SGD:
    """SGD with PyTorch's fused kernel where it has one (CPU, CUDA): the same update as the original's loop over
    tensors (to the last bit's rounding, see tests/test_scale.py) in one kernel per tensor instead of four.

    Not under a gradient scaler (`grad_scaler`, fp16): when the scaler skips the first step for an overflow, as
    it does at its initial scale, PyTorch's fused kernel (2.11 to 2.14 at least) leaves the momentum buffers it
    allocated uninitialised, and the next step adds that memory to the weights (NaN loss within a few steps)."""
    groups = [dict(group, params=list(group['params'])) for group in groups]  # parameters() is an iterator
    fused = not grad_scaler and all(p.device.type in FUSED_DEVICES and p.is_floating_point()
                                    for g in groups for p in g['params'])
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused or None)


def keep_fused(optimizer: torch.optim.Optimizer) -> None:
    """After `load_state_dict`, which restores each group's flags: a state saved by an unfused optimizer (older
    checkpoints, PyTorch 1.1's released ones) would switch the fused kernel off; keep this run's choice."""
    fused = optimizer.defaults.get('fused')
    for group in optimizer.param_groups:
        group['fused'] = fused
        if fused:
            group['foreach'] = None


def frozen_batchnorm(model: nn.Module):
    """The BatchNorm layers --freeze_bn keeps fixed (statistics and affine parameters)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    model.train()
    for m in frozen_batchnorm(model) if freeze_bn else []:
        m.eval()


def scales_gradients(args) -> bool:
    """Whether training runs under a gradient scaler: fp16's small range needs one, bf16 and fp32 none."""
    return args.amp == 'fp16'


def make_optimizer(model: deeplab.DeepLabV3, args) -> torch.optim.SGD:
    """SGD with two parameter groups, as the original: the backbone, and the ASPP at lr x last_mult."""
    for m in frozen_batchnorm(model) if args.freeze_bn else []:
        m.weight.requires_grad_(False)
        m.bias.requires_grad_(False)
    head = [p for p in model.aspp.parameters() if p.requires_grad]
    head_ids = {id(p) for p in model.aspp.parameters()}
    backbone = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    return sgd([{'params': backbone}, {'params': head}], lr=args.base_lr, momentum=MOMENTUM,
               weight_decay=WEIGHT_DECAY, grad_scaler=scales_gradients(args))


class BatchCrossEntropy(nn.Module):
    """Cross entropy ignoring 255, averaged over the labelled pixels of the whole batch as the original's (its
    DataParallel gathered the logits of all GPUs before the loss), also when processes split the batch.

    The mean of each process's own mean would weigh a pixel by how many labelled pixels its process happens to
    have (scale augmentation pads small images with 255). So each process divides its sum by the count over all
    processes, times their number, which DDP's gradient averaging divides out. In one process this is
    `nn.CrossEntropyLoss`'s mean, bit for bit (loss and gradients, tests/test_faults.py), except for a batch
    without a labelled pixel (all 255): its mean is 0 / 0, NaN; here it is 0, with zero gradients.
    `labelled` keeps the last batch's count of labelled pixels (over all processes), for messages.
    """

    def __init__(self, world_size: int = 1):
        super().__init__()
        self.world_size = world_size
        self.labelled = torch.zeros((), dtype=torch.int64)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction='sum')
        count = (target != IGNORE_INDEX).sum()  # int64: exact for any batch
        if self.world_size > 1:
            torch.distributed.all_reduce(count)
            total = total * self.world_size
        self.labelled = count
        return total / count.clamp(min=1)


# ---------------------------------------------------------------------------------------------------------------
# Training: the run


@dataclass
class TrainState:
    epoch: int = 0  # completed epochs
    iteration: int = 0  # completed iterations over all epochs
    batches_per_epoch: int = 0
    seed: int = 0
    best_miou: float | None = None
    last_checkpoint: str | None = None
    initial_weights: dict | None = None  # where the run's weights started (imagenet.describe)


@dataclass
class Run:
    """A training run in one object: what the loop and its helpers read and change."""
    args: argparse.Namespace
    rt: Runtime
    state: TrainState
    dataset: pascal.SegmentationDataset
    sampler: pascal.TrainSampler
    loader: object
    val_loader: object | None
    model: deeplab.DeepLabV3  # as saved
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    net: nn.Module | None = None  # as trained: under DistributedDataParallel and/or torch.compile
    criterion: nn.Module | None = None
    metrics: utils.MetricsWriter | None = None
    progress: 'Progress | None' = field(default=None, repr=False)

    @property
    def iterations(self) -> int:
        """Batches per epoch for this process."""
        return self.sampler.batches_per_epoch

    @property
    def max_iterations(self) -> int:
        return self.args.epochs * self.iterations

    def checkpoint(self, path: str) -> None:
        save(make_checkpoint(self), path, self.state, self.rt)

    def interrupt(self, stop: utils.GracefulStop, where: str) -> None:
        path = run_file(self.args, 'interrupted')
        self.checkpoint(path)
        raise Interrupted(stop.signal or signal.SIGTERM, f'stopped by signal {stop.signal} {where}; the state is '
                                                         f'saved in {path}. Resume with the same command plus '
                                                         f'--resume {path}')


def initial_seed(seed: int | None) -> int:
    """The run's seed: `--seed`, or one drawn at random and the same on every process (each shards the same
    permutation of the training set; seeds of their own would have them see overlapping shards)."""
    return seed if seed is not None else utils.from_main_process(random.SystemRandom().randrange(2 ** 31))


def start_state(args, resume: dict | None) -> TrainState:
    """Where the run starts: from scratch, or where the resumed checkpoint left (its epoch, iteration, seed, best
    validation, initial weights)."""
    state = TrainState(last_checkpoint=args.resume)
    if resume is not None and 'iteration' in resume:
        state.epoch, state.iteration, state.seed = resume['epoch'], resume['iteration'], resume['seed']
        state.best_miou = resume.get('best_miou')
        state.initial_weights = resume.get('initial_weights')
        if args.seed is not None and args.seed != state.seed:
            log.warning('--seed %d differs from the resumed run\'s seed %d; keeping %d so the schedule continues '
                        'as it was', args.seed, state.seed, state.seed)
    else:
        state.seed = initial_seed(args.seed)
        if resume is not None:  # a released checkpoint: only the epoch is known
            state.epoch = int(resume.get('epoch', 0))
    if state.epoch >= args.epochs:
        raise UserError(f'{args.resume} has already trained {utils.plural(state.epoch, "epoch")}; ask for more '
                        f'with --epochs.')
    return state


def restore(run: Run, resume: dict) -> None:
    """What a resumed run takes from its checkpoint, besides where it starts: the weights, the optimizer and
    gradient scaler, the random state, and the iteration on this run's schedule."""
    path = run.args.resume
    deeplab.load_weights(run.model, resume['state_dict'], path)
    restore_optimizer(run.optimizer, run.scaler, resume, path)
    if 'rng' in resume:
        set_rng_state(resume['rng'], run.rt.device)
    run.state.iteration = resume_iteration(resume, run.state, run.iterations, path)


def train(args, rt: Runtime) -> None:
    """Data, model, optimizer, restore (when resuming), loop."""
    info = rt.dist
    resume = utils.load_checkpoint(args.resume, what='the checkpoint to resume') if args.resume else None
    state = start_state(args, resume)
    torch.manual_seed(state.seed + info.rank)
    outputs = training_outputs(args, state.epoch)

    dataset = dataset_of(args, 'train', pascal.train_transforms(args.crop_size), seed=state.seed)
    per_process = args.batch_size // info.world_size
    sampler = pascal.TrainSampler(len(dataset), per_process, state.seed, info.rank, info.world_size,
                                  drop_single=batchnorm_per_process(args, info, rt.device.type == 'cuda'))
    if sampler.batches_per_epoch == 0:
        smallest = 'two' if sampler.drop_single else 'one'
        raise UserError(f'the training set has {utils.plural(len(dataset), "image")}, too few for a batch of '
                        f'{smallest} in each of {utils.plural(info.world_size, "process", "processes")}; add '
                        f'images or use fewer processes.')
    val_set = None
    if args.val_every:
        val_set = pascal.build_dataset(args.dataset, args.data_root, 'val', pascal.eval_transforms(args.crop_size),
                                       dataset.num_classes, dataset.class_names)
    utils.refuse_overwrite(outputs, {**dataset_inputs(dataset, val_set), args.resume: 'the checkpoint to resume',
                                     args.pretrained_path: '--pretrained_path', args.class_names: '--class_names'})

    model = model_for(args, dataset.num_classes, resume, resume=resume is not None)
    if resume is None:
        state.initial_weights = model.initial_weights
    model = rt.execution.prepare(model)
    if sync_batchnorm(args, info, rt.device.type == 'cuda'):
        model = deeplab.convert_sync_batchnorm(model)
    optimizer = make_optimizer(model, args)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=scales_gradients(args))
    run = Run(args, rt, state, dataset, sampler, loader_of(dataset, per_process, sampler, args, rt),
              eval_loader(val_set, args, rt) if val_set is not None else None, model, optimizer, scaler)
    if resume is not None:
        restore(run, resume)
    state.batches_per_epoch = run.iterations

    run.net = model
    if info.distributed:
        run.net = nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == 'cuda' else None)
    if args.compile:
        run.net = torch.compile(run.net)
    run.criterion = BatchCrossEntropy(info.world_size)
    execution = rt.execution
    log.info('training %s (%s parameters) on %s of %s: %s x %s, batch %d%s, seed %d, '
             '%s%s%s', run_name(args), f'{deeplab.count_parameters(model):,}', utils.plural(len(dataset), 'image'),
             args.dataset, utils.plural(args.epochs, 'epoch'), utils.plural(run.iterations, 'iteration'),
             args.batch_size, f' ({per_process} per process x {info.world_size})' if info.distributed else '',
             state.seed, rt.device, f', amp {args.amp}' if execution.amp else '',
             ', channels last' if execution.channels_last else '')
    if state.iteration:
        log.info('resuming from %s at epoch %d, iteration %d', args.resume, state.epoch + 1, state.iteration)
    run.metrics = utils.MetricsWriter(log_folder(args), info.is_main, resume=resume is not None)
    run.progress = Progress(args, run.iterations, run.max_iterations, state.iteration, run.metrics)
    try:
        with utils.GracefulStop() as stop:
            while state.epoch < args.epochs:
                if not train_one_epoch(run, stop):
                    run.interrupt(stop, f'at epoch {state.epoch + 1}, iteration '
                                        f'{state.iteration - state.epoch * run.iterations}/{run.iterations}')
                state.epoch += 1
                if args.val_every and (state.epoch % args.val_every == 0 or state.epoch == args.epochs):
                    try:
                        validate(run, stop)
                    except Interrupted:
                        run.interrupt(stop, f'while validating epoch {state.epoch} (not validated)')
                if state.epoch % args.save_every == 0 or state.epoch == args.epochs:
                    run.checkpoint(checkpoint_path(args, state.epoch))
    finally:
        run.metrics.close()
    if info.is_main and os.path.isfile(run.metrics.path):
        curves = os.path.join(log_folder(args), 'curves.png')
        plots.training_curves(run.metrics.path, curves)
        log.info('finished %s in %s; curves in %s', utils.plural(args.epochs, 'epoch'),
                 utils.format_seconds(time.time() - run.progress.start), curves)


def train_one_epoch(run: Run, stop: utils.GracefulStop) -> bool:
    """Train from the state's iteration to the end of its epoch; False when a stop was requested first."""
    args, rt, state, optimizer = run.args, run.rt, run.state, run.optimizer
    iterations, epoch = run.iterations, state.epoch
    first = state.iteration - epoch * iterations
    run.sampler.set_epoch(epoch, first)
    run.dataset.set_epoch(epoch)
    set_train_mode(run.net, args.freeze_bn)
    run.progress.new_epoch()
    with contextlib.closing(pascal.batches(run.loader, stop)) as batches:
        try:
            for batch_index, (images, masks, _) in zip(range(first, iterations), batches):
                lr = poly_lr(args.base_lr, state.iteration, run.max_iterations)
                optimizer.param_groups[0]['lr'] = lr
                optimizer.param_groups[1]['lr'] = lr * args.last_mult
                with rt.execution.autocast():
                    logits = run.net(rt.execution.input(images))
                loss = run.criterion(logits.float(), masks.to(rt.device, non_blocking=True))
                optimizer.zero_grad(set_to_none=True)
                run.scaler.scale(loss).backward()
                run.scaler.step(optimizer)
                run.scaler.update()
                state.iteration += 1
                loss_value, stop_all = agree(loss.detach(), stop.requested, rt.dist)
                if not math.isfinite(loss_value):
                    labelled = int(run.criterion.labelled)
                    cause = ('its batch had no labelled pixel, yet the logits were not finite: the weights diverged'
                             if labelled == 0 else f'over the {labelled:,} labelled pixels of its batch: the run '
                             f'diverged')
                    raise UserError(f'the loss became {loss_value} at epoch {epoch + 1}, iteration '
                                    f'{batch_index + 1}/{iterations} (iteration {state.iteration} of the run), '
                                    f'{cause}; training stopped without saving. The last good checkpoint is '
                                    f'{state.last_checkpoint or "none"}. Lower --base_lr, check the data, or train '
                                    f'without --amp.')
                run.progress.step(epoch, batch_index, state.iteration, lr, loss_value)
                if stop_all:
                    return False
        except pascal.Stopped:
            return False
        except Exception as e:
            if stop.requested:  # the signal broke what the step waited for (a worker, another process)
                return False
            if utils.out_of_memory(e):
                raise UserError(f'out of memory in a training step (epoch {epoch + 1}, {run.loader.batch_size} '
                                f'images of {args.crop_size}x{args.crop_size} per process on {rt.device}: '
                                f'{utils.first_line(e)}). Lower --batch_size or --crop_size, or train with --amp. '
                                f'The last checkpoint is {state.last_checkpoint or "none"}.') from None
            raise
    return True


def validate(run: Run, stop: utils.GracefulStop | None = None) -> None:
    """Validation during training: log the mean IoU and keep the best checkpoint (_best.pth)."""
    state = run.state
    runner = inference.Runner(unwrap(run.net), run.rt.execution, run.args.crop_size)
    confusion, _ = evaluate(runner, run.val_loader, run.dataset.num_classes, stop=stop)
    miou = confusion.mean_iou()
    run.metrics.write(state.iteration, epoch=state.epoch, miou=miou)
    improved = state.best_miou is None or miou > state.best_miou
    log.info('epoch %d: validation mean IoU %.2f%s', state.epoch, miou,
             ' (best so far)' if improved else f' (best {state.best_miou:.2f})')
    if improved:
        state.best_miou = miou
        run.checkpoint(run_file(run.args, 'best'))


def agree(loss: torch.Tensor, stop: bool, info: utils.DistInfo):
    """The mean loss over all processes and whether any of them was asked to stop, so all act alike."""
    if not info.distributed:
        return loss.item(), stop
    values = torch.stack([loss.float(), torch.tensor(float(stop), device=loss.device)])
    torch.distributed.all_reduce(values)
    loss_sum, stops = values.tolist()
    return loss_sum / info.world_size, stops > 0


# ---------------------------------------------------------------------------------------------------------------
# Training: checkpoints and the log


def rng_state(device: torch.device) -> dict:
    state = {'torch': torch.get_rng_state()}
    if device.type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    if 'torch' in state:
        torch.set_rng_state(state['torch'])
    if 'cuda' in state and device.type == 'cuda':
        torch.cuda.set_rng_state(state['cuda'], device)


def make_checkpoint(run: Run) -> dict:
    state, args = run.state, run.args
    return {
        'format': 'vovnet-deeplabv3', 'version': CHECKPOINT_VERSION,
        'epoch': state.epoch, 'iteration': state.iteration, 'batches_per_epoch': state.batches_per_epoch,
        'seed': state.seed, 'best_miou': state.best_miou,
        'state_dict': unwrap(run.model).state_dict(), 'optimizer': run.optimizer.state_dict(),
        'scaler': run.scaler.state_dict() if run.scaler.is_enabled() else None,
        'model_args': dict(unwrap(run.model).model_args), 'initial_weights': state.initial_weights,
        'dataset': args.dataset,
        'class_names': list(run.dataset.class_names), 'rng': rng_state(run.rt.device),
        'args': {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))},
    }


def save(checkpoint: dict, path: str, state: TrainState, rt: Runtime) -> None:
    if rt.dist.is_main:
        utils.save_checkpoint(checkpoint, path)
        log.info('saved %s', path)
    state.last_checkpoint = path


class Progress:
    """Logs a training line every `print_freq` iterations (epoch, iteration, lr, loss, images/s, time left) and
    the same numbers to the metrics log."""

    def __init__(self, args, iterations: int, max_iterations: int, first_iteration: int, metrics):
        self.args, self.iterations, self.max_iterations, self.metrics = args, iterations, max_iterations, metrics
        self.start, self.first_iteration = time.time(), first_iteration
        self.window_start, self.window_images, self.losses = time.time(), 0, []

    def new_epoch(self) -> None:
        self.window_start, self.window_images, self.losses = time.time(), 0, []

    def step(self, epoch: int, batch_index: int, iteration: int, lr: float, loss: float) -> None:
        self.losses.append(loss)
        self.window_images += self.args.batch_size
        if iteration % self.args.print_freq and batch_index + 1 != self.iterations:
            return
        now = time.time()
        speed = self.window_images / max(now - self.window_start, 1e-9)
        eta = (now - self.start) / max(iteration - self.first_iteration, 1) * (self.max_iterations - iteration)
        log.info('epoch %d/%d  iter %d/%d  lr %.6f  loss %.4f (%.4f)  %.1f img/s  eta %s', epoch + 1,
                 self.args.epochs, batch_index + 1, self.iterations, lr, loss, sum(self.losses) / len(self.losses),
                 speed, utils.format_seconds(eta))
        self.metrics.write(iteration, epoch=epoch + 1, lr=lr, loss=loss, images_per_s=speed, time=now)
        self.window_start, self.window_images = now, 0


def resume_iteration(checkpoint: dict, state: TrainState, iterations: int, path: str) -> int:
    """The iteration to continue from, with `iterations` batches per epoch. A checkpoint of the end of an epoch
    continues with the next one whatever its batches per epoch were (another batch size, dataset or number of
    processes); one written mid-epoch continues only with the batches per epoch it was trained with."""
    if 'iteration' not in checkpoint:  # a released checkpoint: only the epoch is known
        return state.epoch * iterations
    recorded = checkpoint.get('batches_per_epoch')  # absent from checkpoints of before it was recorded
    offset = state.iteration - state.epoch * (recorded or iterations)
    if recorded and offset in (0, recorded):  # at the start or the end of an epoch (stopped after its last batch)
        if recorded != iterations:
            log.warning('%s was trained with %d batches per epoch, this run has %d; the schedule continues from '
                        'epoch %d on this run\'s iterations', path, recorded, iterations,
                        state.epoch + (2 if offset else 1))
        return (state.epoch + (1 if offset else 0)) * iterations
    if recorded in (None, iterations) and 0 <= offset <= iterations:
        return state.iteration
    advice = 'Resume with the --batch_size, dataset and number of processes it was trained with'
    if recorded:
        raise UserError(f'{path} stopped {offset} of {recorded} batches into epoch {state.epoch + 1}, but this run '
                        f'has {iterations} batches per epoch. {advice}, or from the checkpoint of a completed epoch.')
    raise UserError(f'{path} ({utils.plural(state.iteration, "iteration")} in {utils.plural(state.epoch, "epoch")}) '
                    f'was trained with another number of batches per epoch than this run\'s {iterations}. {advice}.')


def restore_optimizer(optimizer, scaler, checkpoint: dict, path: str) -> None:
    if checkpoint.get('optimizer') is None:
        log.warning('%s holds no optimizer state; momentum starts from zero', path)
        return
    momentum = {f'{name} of parameter {index}': value
                for index, state in (checkpoint['optimizer'].get('state') or {}).items()
                for name, value in state.items() if isinstance(value, torch.Tensor)}
    bad = utils.first_non_finite(momentum)
    if bad is not None:
        raise UserError(f'{path} has non-finite values (NaN or infinity) in its optimizer state ({bad}): it was '
                        f'written by a run that diverged, or is damaged. Resume from an earlier checkpoint.')
    try:
        optimizer.load_state_dict(checkpoint['optimizer'])
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(f'the optimizer state in {path} does not fit this run ({e}); it was trained with other '
                        f'options (e.g. --freeze_bn). Resume with the same flags.') from None
    keep_fused(optimizer)
    if checkpoint.get('scaler') and scaler.is_enabled():
        scaler.load_state_dict(checkpoint['scaler'])


# ---------------------------------------------------------------------------------------------------------------


def main(args) -> float | None:
    """Train, or evaluate and return the mean IoU (percent)."""
    info = utils.dist_info()
    utils.setup_logging(info.is_main)
    check_args(args, info)  # before joining a process group, so that a bad flag cannot leave the others waiting
    if args.workers is None:
        args.workers = default_workers(info)
    utils.make_output_folder(args.output_dir, '--output_dir')
    info, device = utils.init_distributed(args.device, args.gpu)
    try:
        rt = make_runtime(args, info, device)
        if args.train:
            train(args, rt)
            return None
        return run_evaluation(args, rt)
    finally:
        utils.cleanup_distributed()


def cli(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    return utils.exit_status(lambda: main(args))


if __name__ == '__main__':
    sys.exit(cli())
