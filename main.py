"""Train and evaluate DeepLabV3 with VoVNet, ResNet or DenseNet backbones on PASCAL VOC 2012 + SBD or Cityscapes.

    python main.py --train --exp bn_lr7e-3 --epochs 50 --base_lr 0.007 --backbone vovnet39   # train
    python main.py --exp bn_lr7e-3 --epochs 50 --base_lr 0.007 --backbone vovnet39           # evaluate

Checkpoints are data/deeplab_{backbone}_{dataset}_v3_{exp}_epoch{N}.pth, as in the original (`v3plus` with
--model deeplabv3plus); evaluation loads the one of --epochs, prints per-class and mean IoU and writes the
predictions to data/val/.
Several GPUs or machines: torchrun --nproc_per_node=N main.py --train ... (README, "Distributed training").
"""
import argparse
import contextlib
import itertools
import logging
import math
import os
import signal
import sys
import time

import torch
from torch import nn

import checkpoints
import deeplab
import engine
import errors
import evaluation
import files
import imagenet
import inference
import pascal
import plots
import quantize
import runs
import utils
import weights
from checkpoints import epoch_path, log_folder, run_file, run_name
from errors import Interrupted, UserError
from runs import dataset_inputs, dataset_of, eval_loader, loader_of, model_for, unwrap

log = logging.getLogger('main')


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
    o.add_argument('--gpu', type=errors.number(int, 0), default=0,
                   help='CUDA device of a single-process run (default 0)')
    o.add_argument('--backbone', default='resnet101', choices=deeplab.BACKBONES, help='default: %(default)s')
    o.add_argument('--dataset', default='pascal', choices=pascal.DATASETS,
                   help='pascal (VOC 2012 + SBD, or any dataset in its list layout) or cityscapes')
    o.add_argument('--groups', type=errors.number(int, 1), default=None,
                   help='GroupNorm with this many groups instead of BatchNorm')
    o.add_argument('--epochs', type=errors.number(int, 1), default=30,
                   help='epochs to train; for evaluation, the epoch of the checkpoint to load (default 30)')
    o.add_argument('--batch_size', type=errors.number(int, 1), default=16,
                   help='images per iteration in total over all processes: 16 means 16 whatever the number '
                        'of GPUs under torchrun, each taking batch_size / N (default 16)')
    o.add_argument('--base_lr', type=errors.number(float, 0, inclusive=False), default=0.00025,
                   help='initial learning rate of the poly schedule (the published runs use 0.007)')
    o.add_argument('--last_mult', type=errors.number(float, 0), default=1.0, help='LR multiplier of the ASPP head')
    o.add_argument('--scratch', action='store_true', help='train from random initialisation, no ImageNet weights')
    o.add_argument('--freeze_bn', action='store_true', help='keep BatchNorm statistics and affine parameters fixed')
    o.add_argument('--weight_std', action='store_true', help='weight standardisation (ResNet only)')
    o.add_argument('--beta', action='store_true', help='three 3x3 convs as the stem (ResNet only)')
    o.add_argument('--crop_size', type=errors.number(int, 1), default=513,
                   help='training crop and evaluation canvas (default 513)')
    o.add_argument('--resume', default=None, metavar='PATH',
                   help='continue training from a checkpoint: weights, optimizer, epoch, iteration, RNG')
    o.add_argument('--workers', type=errors.number(int, 0), default=None,
                   help='data-loading processes per training process (default 4, fewer where this machine has '
                        'fewer CPUs for each process; training on GPUs, the CPUs of each process but one, up to 16)')

    d = p.add_argument_group('data and output')
    d.add_argument('--data_root', default=None,
                   help='dataset folder (default data/VOCdevkit for pascal, data/cityscapes for cityscapes)')
    d.add_argument('--num_classes', type=errors.number(int, 2), default=None,
                   help='classes of a custom dataset in the VOC layout, background included (default: 21/19)')
    d.add_argument('--class_names', default=None, metavar='FILE', help='file with one class name per line')
    d.add_argument('--output_dir', default='data',
                   help='where checkpoints, predictions (val/) and logs (logs/) go (default: data)')
    d.add_argument('--seed', type=errors.number(int, 0), default=None,
                   help='seed of shuffling, augmentation and initialisation (default: random, logged and saved)')

    m = p.add_argument_group('model')
    m.add_argument('--model', default=None, choices=tuple(deeplab.MODELS),
                   help='deeplabv3 (the original) or deeplabv3plus: DeepLabV3+, whose decoder adds the backbone\'s '
                        'stride-4 features; its checkpoints are named deeplab_..._v3plus_... (default: deeplabv3 for '
                        'training, the checkpoint\'s for evaluation)')
    m.add_argument('--output_stride', type=int, choices=deeplab.OUTPUT_STRIDES, default=None,
                   help='16 (the original) or 8: finer features, ASPP rates 12/24/36, about 3x the compute '
                        '(default: 16 for training, the checkpoint\'s for evaluation)')
    m.add_argument('--init', default=None, metavar='MODEL',
                   help='fine-tune from a trained model instead of ImageNet weights: a checkpoint, '
                        'hf://org/name[@revision] or a folder written by hub.py save; its classifier starts from '
                        'random weights when the dataset has another number of classes')
    m.add_argument('--pretrained_path', default=None, metavar='FILE',
                   help='ImageNet weights to start from instead of the default source, in the original\'s, '
                        'pytorchcv\'s, timm\'s or torchvision\'s format (README, "ImageNet weights")')

    t = p.add_argument_group('training extras')
    t.add_argument('--save_every', type=errors.number(int, 1), default=10,
                   help='write a checkpoint every N epochs; the last epoch is always written (default 10)')
    t.add_argument('--val_every', type=errors.number(int, 0), default=0,
                   help='validate every N epochs and keep the best checkpoint (_best.pth); 0: never (default)')
    t.add_argument('--print_freq', type=errors.number(int, 1), default=10, help='log every N iterations (default 10)')

    s = p.add_argument_group('devices and speed')
    s.add_argument('--device', default=None, help='cpu, cuda or cuda:N (default: CUDA when available, else CPU)')
    s.add_argument('--amp', default='off', choices=tuple(inference.AMP_DTYPES),
                   help='mixed precision: bf16 (CPU and recent GPUs) or fp16 (CUDA, with a gradient scaler)')
    s.add_argument('--channels_last', action='store_true', help='NHWC memory layout (faster convolutions)')
    s.add_argument('--compile', action='store_true',
                   help='torch.compile: in training the forward pass and the loss as one graph with its backward, '
                        'replayed as CUDA graphs on GPUs; in evaluation the model (slow start, faster steps)')
    s.add_argument('--sync_bn', action=argparse.BooleanOptionalAction, default=None,
                   help='SyncBatchNorm across processes (default: on when distributed on GPUs; PyTorch has no '
                        'SyncBatchNorm on the CPU, where each process normalises its own images)')

    e = p.add_argument_group('evaluation')
    e.add_argument('--checkpoint', default=None, metavar='PATH',
                   help='evaluate this checkpoint instead of the one named by --exp/--epochs')
    e.add_argument('--eval_scales', type=_scales, default=None, metavar='S1,S2,...',
                   help='also evaluate with these input scales averaged (e.g. 0.5,0.75,1.0,1.25,1.5,1.75)')
    e.add_argument('--flip', action='store_true', help='also evaluate with horizontal flipping averaged')
    e.add_argument('--json', default=None, metavar='FILE',
                   help='also write the figures (mean and per-class IoU, the protocol) as JSON, e.g. for hub.py save '
                        '--metrics')
    e.add_argument('--quantize', default=None, choices=('int8',),
                   help='int8: quantize the model after training (PT2E through torchao, per-channel weights) and '
                        'compile it, CPU only; faster, its mean IoU differs from the fp32 protocol\'s (README, '
                        '"int8 inference")')
    e.add_argument('--calibration', type=errors.number(int, 1), default=quantize.DEFAULT_CALIBRATION, metavar='N',
                   help='--quantize: images of the training list that calibrate it, drawn with --seed '
                        f'(default {quantize.DEFAULT_CALIBRATION})')
    e.add_argument('--save_predictions', action=argparse.BooleanOptionalAction, default=True,
                   help='write palettised prediction PNGs to <output_dir>/val (default: on)')
    return p


def training_outputs(args, first_epoch: int) -> dict[str, str]:
    """Every file a training run may write, with the options that place it (checked before any work)."""
    epochs = [e for e in range(first_epoch + 1, args.epochs + 1) if e % args.save_every == 0 or e == args.epochs]
    paths = [epoch_path(args, e) for e in epochs] + [run_file(args, 'interrupted')]
    if args.val_every:
        paths.append(run_file(args, 'best'))
    paths += [os.path.join(log_folder(args), 'metrics.jsonl'), os.path.join(log_folder(args), 'curves.png')]
    if args.resume and os.path.abspath(args.resume) == os.path.abspath(run_file(args, 'interrupted')):
        # A run resumed from its interruption checkpoint replaces it at the next one (README), once it has read it.
        paths.remove(run_file(args, 'interrupted'))
    return {path: '--output_dir or --exp' for path in paths}


class TooFewImages(UserError):
    """The training set cannot fill one batch."""


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
    cuda = runs.uses_cuda(args)
    if args.sync_bn and not cuda:
        raise UserError('--sync_bn needs CUDA GPUs: PyTorch\'s SyncBatchNorm does not run on the CPU. Drop it, or '
                        'run on GPUs.')
    if args.train and runs.batchnorm_per_process(args, info, cuda) and args.batch_size // info.world_size < 2:
        groups = '' if deeplab.uses_batchnorm(args.backbone, num_groups=1) else ', --groups'
        raise UserError(f'with BatchNorm each process needs at least 2 images per batch (the ASPP\'s image-pooling '
                        f'branch normalises one value per image): raise --batch_size, or use --freeze_bn{groups}.')
    if args.backbone in deeplab.TIMM_BACKBONES:
        errors.require('timm', f'--backbone {args.backbone}')
    if args.quantize and not args.train:
        quantize.check_device(torch.device(args.device or 'cuda') if cuda else torch.device('cpu'))
        quantize.require()
    if args.train:  # before any folder is made: a name the file system refuses would fail only when written
        for path in (epoch_path(args, args.epochs), run_file(args, 'interrupted'),
                     os.path.join(log_folder(args), 'metrics.jsonl')):
            files.check_name_fits(path, '--exp or --output_dir')
    contradictions = [('--scratch', args.scratch, '--pretrained_path', args.pretrained_path,
                       'one trains from random weights, the other starts from a file'),
                      ('--scratch', args.scratch, '--init', args.init,
                       'one trains from random weights, the other from a trained model'),
                      ('--init', args.init, '--pretrained_path', args.pretrained_path,
                       '--init starts every layer from a trained model, --pretrained_path the backbone from ImageNet'),
                      ('--init', args.init, '--resume', args.resume,
                       '--resume continues a run, --init starts a new one from a trained model'),
                      ('--train', args.train, '--json', args.json,
                       '--json writes the figures of an evaluation run'),
                      ('--train', args.train, '--checkpoint', args.checkpoint,
                       '--checkpoint names a file to evaluate; to continue training from it use --resume'),
                      ('--train', args.train, '--eval_scales', args.eval_scales,
                       'multi-scale evaluation is for evaluation runs; validation during training uses the protocol'),
                      ('--train', args.train, '--quantize', args.quantize,
                       'int8 quantization is for evaluation runs'),
                      ('--quantize', args.quantize, '--amp', args.amp != 'off',
                       'int8 computes in its own precision'),
                      ('--train', args.train, '--flip', args.flip,
                       'flipped evaluation is for evaluation runs; validation during training uses the protocol')]
    for first, a, second, b, why in contradictions:
        if a and b:
            raise UserError(f'{first} and {second} contradict each other ({why}): drop one of them.')
    if args.resume and not args.train:
        raise UserError('--resume continues a training run: add --train, or use --checkpoint to evaluate a file.')
    if args.init and not args.train:
        raise UserError('--init starts a training run from a trained model: add --train, or use --checkpoint to '
                        'evaluate it.')
    if args.resume and weights.is_published(args.resume):
        raise UserError(f'--resume {args.resume} is a published model, which holds no optimizer state or schedule to '
                        f'continue: fine-tune from it with --init instead.')


# ---------------------------------------------------------------------------------------------------------------
# Training


def train(args, rt: runs.Runtime) -> None:
    """Data, model, optimizer, resume, loop."""
    info, execution, device = rt.dist, rt.execution, rt.execution.device
    resume = weights.read(args.resume, what='the checkpoint to resume') if args.resume else None
    init = weights.read(args.init, what='--init') if args.init else None
    if init is not None and args.model is None:  # the model of the one fine-tuned, and its file names
        args.model = weights.recorded_args(init).get('model')
    state = checkpoints.start_state(args, resume, draw_seed=lambda: runs.initial_seed(None))
    torch.manual_seed(state.seed + info.rank)
    outputs = training_outputs(args, state.epoch)

    # Data
    dataset = dataset_of(args, 'train', pascal.train_transforms(args.crop_size), seed=state.seed)
    per_process = args.batch_size // info.world_size
    sampler = pascal.TrainSampler(len(dataset), per_process, state.seed, info.rank, info.world_size,
                                  drop_single=runs.batchnorm_per_process(args, info, device.type == 'cuda'))
    iterations = state.batches_per_epoch = sampler.batches_per_epoch  # this process's batches per epoch
    if iterations == 0:
        smallest = 'two' if sampler.drop_single else 'one'
        raise TooFewImages(f'the training set has {utils.plural(len(dataset), "image")}, too few for a batch of '
                        f'{smallest} in each of {utils.plural(info.world_size, "process", "processes")}; add '
                        f'images or use fewer processes.')
    val_set = None
    if args.val_every:
        val_set = pascal.build_dataset(args.dataset, args.data_root, 'val', pascal.eval_transforms(args.crop_size),
                                       dataset.num_classes, dataset.class_names)
    files.refuse_overwrite(outputs, {**dataset_inputs(dataset, val_set), args.resume: 'the checkpoint to resume',
                                     args.pretrained_path: '--pretrained_path', args.class_names: '--class_names',
                                     **files.inputs_of(args.init, '--init')})
    loader = loader_of(dataset, per_process, sampler, args, device)

    # Model and optimizer
    # Resumed with its random state, the checkpoint replaces every weight and the state the initial draws leave:
    # they are left out (0.2 s for VoVNet-39, 0.6 s for ResNet-101). Without it (an older file), drawn as before.
    model = model_for(args, dataset.num_classes, resume or init, resume=resume is not None,
                      filled=resume is not None and 'rng' in resume)
    if init is not None:
        state.initial_weights = weights.fine_tune_from(model, init, args.init)
    elif resume is None:
        state.initial_weights = (imagenet.SCRATCH if args.scratch
                                 else weights.initialize(model, args.pretrained_path))
    model = execution.prepare(model)
    if runs.sync_batchnorm(args, info, device.type == 'cuda'):
        model = deeplab.convert_sync_batchnorm(model)
    optimizer = engine.make_optimizer(model, args.base_lr, args.freeze_bn)
    scaler = torch.amp.GradScaler(device.type, enabled=runs.scales_gradients(args))
    if resume is not None:
        weights.load_weights(model, resume['state_dict'], args.resume)
        engine.restore_optimizer(optimizer, scaler, resume, args.resume)
        if 'rng' in resume:
            checkpoints.set_rng_state(resume['rng'], device)
        state.iteration = checkpoints.resume_iteration(resume, state, iterations, args.resume)
    net = model
    if info.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    criterion = engine.BatchCrossEntropy(info.world_size)
    step = engine.CompiledStep(net, criterion, execution) if args.compile else None
    schedule = engine.PolySchedule(args.base_lr, args.epochs * iterations, args.last_mult)

    log.info('training %s (%s parameters) on %s of %s: %s x %s, batch %d%s, seed %d, %s%s%s', run_name(args),
             f'{deeplab.count_parameters(model):,}', utils.plural(len(dataset), 'image'), args.dataset,
             utils.plural(args.epochs, 'epoch'), utils.plural(iterations, 'iteration'), args.batch_size,
             f' ({per_process} per process x {info.world_size})' if info.distributed else '', state.seed, device,
             f', amp {args.amp}' if execution.amp else '', ', channels last' if execution.channels_last else '')
    if state.iteration:
        log.info('resuming from %s at epoch %d, iteration %d', args.resume, state.epoch + 1, state.iteration)

    def save(path: str) -> None:
        if info.is_main:
            checkpoints.save(checkpoints.make(state, model, optimizer, scaler, args, dataset.class_names, device),
                             path)
            log.info('saved %s', path)
        state.last_checkpoint = path

    metrics = files.MetricsWriter(log_folder(args), info.is_main, resume=resume is not None)
    progress = utils.Progress(args.epochs, iterations, per_process * info.world_size, args.print_freq,
                              state.iteration, metrics, epoch_images=sampler.per_process * info.world_size)
    try:
        with errors.GracefulStop() as stop:
            # Reading the losses synchronises the host with the device: on GPUs, at the logging rhythm only.
            monitor = engine.Monitor(stop, progress.step, every=1 if device.type == 'cpu' else args.print_freq,
                                     world_size=info.world_size)

            def interrupt(where: str) -> None:
                monitor.read(stops=False)  # a loss not yet read may not be finite: then nothing is saved
                path = run_file(args, 'interrupted')
                save(path)
                raise Interrupted(stop.signal or signal.SIGTERM, f'stopped by signal {stop.signal} {where}; the state '
                                                                 f'is saved in {path}. Resume with the same command '
                                                                 f'plus --resume {path}')

            while state.epoch < args.epochs:
                first = state.iteration - state.epoch * iterations
                sampler.set_epoch(state.epoch, first)
                dataset.set_epoch(state.epoch)
                engine.set_train_mode(net, args.freeze_bn)
                progress.new_epoch()
                try:
                    with contextlib.closing(pascal.Batches(loader, stop)) as batches, training_errors(
                            args, state, stop, monitor, per_process, device):
                        engine.train_one_epoch(net, criterion, optimizer, scaler,
                                               itertools.islice(batches, iterations - first), execution, schedule,
                                               state, monitor, step)
                except errors.Stopped:
                    interrupt(f'at epoch {state.epoch + 1}, iteration '
                              f'{state.iteration - state.epoch * iterations}/{iterations}')
                state.epoch += 1
                if args.val_every and (state.epoch % args.val_every == 0 or state.epoch == args.epochs):
                    try:
                        validate(net, val_set, args, info, execution, state, metrics, stop, save)
                    except errors.Stopped:
                        interrupt(f'while validating epoch {state.epoch} (not validated)')
                if state.epoch % args.save_every == 0 or state.epoch == args.epochs:
                    save(epoch_path(args, state.epoch))
    finally:
        metrics.close()
    if info.is_main and os.path.isfile(metrics.path):
        curves = os.path.join(log_folder(args), 'curves.png')
        plots.training_curves(metrics.path, curves)
        speed = progress.sustained()
        log.info('finished %s in %s%s; curves in %s', utils.plural(args.epochs, 'epoch'),
                 utils.format_seconds(time.time() - progress.start),
                 '' if speed is None else f', {speed:.1f} img/s sustained with data loading (the first '
                                          f'{args.print_freq} iterations left out)', curves)


@contextlib.contextmanager
def training_errors(args, state: checkpoints.TrainState, stop: errors.GracefulStop, monitor: engine.Monitor,
                    per_process: int, device: torch.device):
    """The training loop's failures as messages: a loss that stopped being finite, memory that ran out; and, once
    a stop was requested, whatever the signal broke is that stop (`errors.Stopped`)."""
    try:
        with errors.stops_on(stop, keep=(engine.Diverged,)):
            yield
    except engine.Diverged as e:
        epoch, batch_index = divmod(e.iteration - 1, state.batches_per_epoch)
        cause = ('its batch had no labelled pixel, yet the logits were not finite: the weights diverged'
                 if e.labelled == 0 else f'over the {e.labelled:,} labelled pixels of its batch: the run diverged')
        raise UserError(f'the loss became {e.loss} at epoch {epoch + 1}, iteration {batch_index + 1}/'
                        f'{state.batches_per_epoch} (iteration {e.iteration} of the run), {cause}; training stopped '
                        f'without saving. The last good checkpoint is {state.last_checkpoint or "none"}. Lower '
                        f'--base_lr, check the data, or train without --amp.') from None
    except (RuntimeError, MemoryError) as e:
        if not errors.out_of_memory(e):
            raise
        raise UserError(f'out of memory in a training step (epoch {state.epoch + 1}, {per_process} images of '
                        f'{args.crop_size}x{args.crop_size} per process on {device}: {errors.first_line(e)}). Lower '
                        f'--batch_size or --crop_size, or train with --amp. The last checkpoint is '
                        f'{state.last_checkpoint or "none"}.') from None


def validate(net, val_set, args, info, execution, state: checkpoints.TrainState, metrics, stop, save) -> None:
    """Validation during training: log the mean IoU and keep the best checkpoint (_best.pth)."""
    runner = inference.Runner(unwrap(net), execution, args.crop_size)
    with contextlib.closing(pascal.Batches(eval_loader(val_set, args, info, execution.device), stop)) as batches, \
            errors.stops_on(stop):
        miou = engine.validate(runner, batches, val_set.num_classes, stop)
    metrics.write(state.iteration, epoch=state.epoch, miou=miou)
    improved = state.best_miou is None or miou > state.best_miou
    log.info('epoch %d: validation mean IoU %.2f%s', state.epoch, miou,
             ' (best so far)' if improved else f' (best {state.best_miou:.2f})')
    if improved:
        state.best_miou = miou
        save(run_file(args, 'best'))


# ---------------------------------------------------------------------------------------------------------------


def main(args) -> float | None:
    """Train, or evaluate and return the mean IoU (percent)."""
    info = utils.dist_info()
    utils.setup_logging(info.is_main)
    check_args(args, info)  # before joining a process group, so that a bad flag cannot leave the others waiting
    if args.workers is None:
        args.workers = runs.default_workers(info, gpu=args.train and runs.uses_cuda(args))
    runs.check_memory(args, info)
    with files.output_folder(args.output_dir, '--output_dir'):
        info, device = utils.init_distributed(args.device, args.gpu)
        try:
            rt = runs.make_runtime(args, info, device)
            if args.train:
                train(args, rt)
                return None
            return evaluation.run(args, rt)
        finally:
            utils.cleanup_distributed()


def cli(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    return utils.exit_status(lambda: main(args), 'lower --batch_size or --crop_size')


if __name__ == '__main__':
    sys.exit(cli())
