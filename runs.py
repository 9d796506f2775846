"""What a run of main.py is made of, shared by training and evaluation: this process and its device (`Runtime`),
the dataset and loaders the flags name, and the run's model."""
import os
from dataclasses import dataclass

import torch
from torch import nn

import deeplab
import inference
import pascal
import utils


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


def model_for(args, num_classes: int, checkpoint: dict | None = None, resume: bool = False) -> deeplab.DeepLabV3:
    """The model of this run, with random weights: the flags' backbone and options, the dataset's classes,
    --output_stride. From a checkpoint, what it recorded, with the flags' options over it when resuming (a
    mismatch is then load_weights' message) and under it when evaluating, but for a --backbone and a --model given,
    which it must then hold."""
    chosen = getattr(args, 'model', None)
    flags = dict(model=chosen or 'deeplabv3', backbone=args.backbone, num_groups=args.groups,
                 weight_std=args.weight_std, beta=args.beta)
    fixed = {'num_classes': num_classes, **({'output_stride': args.output_stride} if args.output_stride else {})}
    if checkpoint is None:
        return deeplab.build_model(**flags, **fixed)
    recorded = deeplab.recorded_args(checkpoint)
    if resume:
        return deeplab.build_model(**{**recorded, **flags, **fixed})
    return deeplab.build_model(**{**flags, **recorded, 'backbone': args.backbone,
                                  **({'model': chosen} if chosen else {}), **fixed})


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
