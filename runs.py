"""What a run of main.py is made of, shared by training and evaluation: this process and its device (`Runtime`),
the dataset and loaders the flags name, and the run's model."""
import os
import random
from dataclasses import dataclass

import torch
from torch import nn

import deeplab
import deployed
import engine
import errors
import inference
import pascal
import utils
import weights
from errors import UserError


def dataset_of(args, split: str, transforms, **kwargs) -> pascal.SegmentationDataset:
    """The `split` of the dataset the flags name, with its class names file, if any."""
    names = pascal.read_class_names(args.class_names) if args.class_names else None
    return pascal.build_dataset(args.dataset, args.data_root, split, transforms, args.num_classes, names,
                                names_source=args.class_names and f'{args.class_names} (--class_names)', **kwargs)


def loader_of(dataset, batch_size: int, sampler, args, device: torch.device):
    return pascal.make_loader(dataset, batch_size, sampler, args.workers, pin_memory=device.type == 'cuda')


def eval_loader(dataset, args, info: utils.DistInfo, device: torch.device):
    """One image per batch: the protocol pads each image on its own canvas; each process takes its share."""
    return loader_of(dataset, 1, pascal.ShardSampler(len(dataset), info.rank, info.world_size), args, device)


def model_for(args, num_classes: int, checkpoint: dict | None = None, resume: bool = False,
              filled: bool = False) -> deeplab.DeepLabV3:
    """The model of this run, with random weights (`filled`: uninitialised, for load_weights to fill with all of a
    checkpoint's): the flags' backbone and options, the dataset's classes, --output_stride. From a checkpoint, what
    it recorded, with the flags' options over it when resuming (a mismatch is then load_weights' message) and under
    it when evaluating, but for a --backbone and a --model given, which it must then hold."""
    chosen = getattr(args, 'model', None)
    flags = dict(model=chosen or 'deeplabv3', backbone=args.backbone, num_groups=args.groups,
                 weight_std=args.weight_std, beta=args.beta)
    fixed = {'num_classes': num_classes, **({'output_stride': args.output_stride} if args.output_stride else {})}
    if checkpoint is None:
        return deeplab.build_model(**flags, **fixed)
    recorded = weights.recorded_args(checkpoint)
    build = deeplab.empty if filled else deeplab.build_model
    if resume:
        return build(**{**recorded, **flags, **fixed})
    return build(**{**flags, **recorded, 'backbone': args.backbone, **({'model': chosen} if chosen else {}), **fixed})


def exported_model(path: str, args, device: torch.device, num_classes: int | None = None,
                   backbone: str | None = None) -> deployed.ExportedModel:
    """An exported file (.onnx, or .xml for OpenVINO) given as --checkpoint: checked, on the CPU, in the precision
    --amp asks of its runtime (auto: the runtime's default for this CPU; off: f32; bf16: OpenVINO's bf16). It holds
    one model, of one backbone, stride and class count: flags that ask for another are refused."""
    if device.type != 'cpu':
        raise UserError(f'{path} is an exported model, which runs on the CPU (ONNX Runtime or OpenVINO); drop '
                        f'--device {device.type}, or give the PyTorch checkpoint.')
    for flag in ('quantize', 'compile'):
        if getattr(args, flag, None):
            raise UserError(f'--{flag} applies to PyTorch checkpoints; {path} is an exported model (export.py '
                            f'--quantize int8 writes its int8 counterpart). Drop --{flag}, or give the checkpoint.')
    amp = getattr(args, 'amp', 'auto')
    if amp == 'fp16':
        raise UserError(f'--amp fp16 runs on CUDA GPUs; {path} runs on the CPU: use --amp off (f32), bf16 or auto.')
    model = deployed.read(path, num_classes, {'auto': None, 'off': 'f32'}.get(amp, amp),
                          'the exported model (--checkpoint)')
    asked = {'--backbone': (backbone, model.backbone_name), '--model': (getattr(args, 'model', None), model.name),
             '--output_stride': (getattr(args, 'output_stride', None), model.output_stride)}
    for flag, (wanted, held) in asked.items():
        if wanted is not None and wanted != held:
            raise UserError(f'{path} holds a {model.title}-{model.backbone_name} at output stride '
                            f'{model.output_stride}, but {flag} {wanted} was asked for: pass {flag} {held} (an '
                            f'exported model is fixed; export the checkpoint again to change it).')
    return model


def unwrap(model: nn.Module) -> deeplab.DeepLabV3:
    """The DeepLabV3 inside DistributedDataParallel and/or torch.compile wrappers."""
    while not isinstance(model, deeplab.DeepLabV3):
        model = getattr(model, 'module', None) or model._orig_mod
    return model


@dataclass
class Runtime:
    """This process: its place among torchrun's processes, and how models run on its device."""
    dist: utils.DistInfo
    execution: inference.Execution


def make_runtime(args, info: utils.DistInfo, device: torch.device) -> Runtime:
    """--amp and --channels_last, turned into the run's execution once."""
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    return Runtime(info, inference.Execution(device, inference.amp_dtype(args.amp, device), args.channels_last))


def dataset_inputs(*datasets) -> dict[str, str]:
    """Every file a dataset reads: its images and masks, and its list file."""
    found = {}
    for dataset in datasets:
        if dataset is None:
            continue
        if dataset.source and os.path.isfile(dataset.source):
            found[dataset.source] = 'the dataset\'s list file'
        found.update({path: 'a file of the dataset' for pair in dataset.samples for path in pair})
    return found


def sync_batchnorm(args, info: utils.DistInfo, cuda: bool) -> bool:
    """SyncBatchNorm: on by default for BatchNorm models trained by several processes on GPUs."""
    return (info.distributed and cuda and args.sync_bn is not False
            and deeplab.uses_batchnorm(args.backbone, args.groups))


def batchnorm_per_process(args, info: utils.DistInfo, cuda: bool) -> bool:
    """Whether training normalises each process's images on their own (BatchNorm, training, not synchronised):
    then each process needs 2 images or more in every batch."""
    return (deeplab.uses_batchnorm(args.backbone, args.groups) and not args.freeze_bn
            and not sync_batchnorm(args, info, cuda))


def scales_gradients(args) -> bool:
    """Whether training runs under a gradient scaler: fp16's small range needs one, bf16 and fp32 none."""
    return args.amp == 'fp16'


def default_workers(info: utils.DistInfo, gpu: bool = False) -> int:
    """The original's 4 data-loading processes, or fewer where the CPUs this process may use, shared among the
    processes torchrun started on this machine, are fewer (more would only compete for them). Training on a GPU,
    where the CPUs do nothing but load data, all of this process's share but one (for the process itself), up to
    16: a GPU step of a few tens of milliseconds outruns 4 loaders."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    share = cpus // info.local_world_size
    return max(1, min(16, share - 1) if gpu else min(4, share))


def initial_seed(seed: int | None) -> int:
    """The run's seed: `--seed`, or one drawn at random and the same on every process (each shards the same
    permutation of the training set; seeds of their own would have them see overlapping shards)."""
    return seed if seed is not None else utils.from_main_process(random.SystemRandom().randrange(2 ** 31))


def uses_cuda(args) -> bool:
    return (args.device or ('cuda' if torch.cuda.is_available() else 'cpu')).startswith('cuda')


def check_memory(args, info: utils.DistInfo) -> None:
    """A --crop_size or --batch_size far beyond the CPU's memory, refused before any work (on GPUs, running out is
    an exception that is turned into a message)."""
    if not (args.device or ('cuda' if torch.cuda.is_available() else 'cpu')).startswith('cpu'):
        return  # an unknown --device is init_distributed's message
    device = torch.device('cpu')
    pixels = args.crop_size ** 2 * (2 if args.output_stride == 8 else 1)  # stride 8: about twice the memory
    size = f'{args.crop_size}x{args.crop_size}'
    if args.train:
        per_process = args.batch_size // info.world_size
        errors.refuse_if_huge(engine.BYTES_PER_PIXEL * pixels * per_process * info.local_world_size, device,
                              f'training on {per_process} crops of {size} per process', '--batch_size or --crop_size')
    else:
        errors.refuse_if_huge(inference.BYTES_PER_PIXEL * pixels * info.local_world_size, device,
                              f'evaluating on a {size} canvas', '--crop_size')
