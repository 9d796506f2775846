"""Weights of every kind, through one entry: a reference in, a checked state dict or a built model (and the record of
where its weights came from) out. The models (deeplab.py, vovnet.py) read no file; everything that turns a
reference into weights is here and in its readers:

- this project's checkpoints and the original's released `.pth` files: checkpoints.py;
- published models, a folder written by hub.py save or `hf://org/name[@revision]`: published.py;
- ImageNet weights of a backbone, from a file (`--pretrained_path`) or its library (pytorchcv, timm,
  torchvision): imagenet.py.

`read` is the entry for trained models (main.py --checkpoint, --resume, --init; predict.py, export.py, benchmark.py,
hub.py save), `model` builds and loads what a reference holds, `initialize` loads ImageNet weights,
`fine_tune_from` a trained model's, `from_pretrained` a published model. Every reader checks its tensors with
checkpoints.check_weights (finite, floating point, non-negative variances, whole counters); adding a kind of file
is one reader, called from `read`.
"""
import logging
import os
import re
import zipfile

import torch

import checkpoints
import deployed
import files
import imagenet
import published
import utils
from checkpoints import strip_prefixes
from deeplab import MODELS, SPECS, DeepLabV3, build_model, describe, empty
from errors import UserError, few, short_error

log = logging.getLogger(__name__)


def read(reference: str, what: str = 'checkpoint') -> dict:
    """A trained model's weights and what rebuilds it, checked: a dict with `state_dict` (and, as the file
    records them, `model_args`, `class_names`, `initial_weights`, the training state, a published model's
    `config` and `revision`). `what` names the reference in messages ('--init', 'the checkpoint to resume')."""
    if published.is_reference(reference):
        return published.read(reference)
    exported, ir = deployed.kind(reference), os.path.splitext(reference)[0] + '.xml'
    if exported or (reference.lower().endswith('.bin') and os.path.isfile(ir)
                    and not zipfile.is_zipfile(reference)):  # torch.save writes zips; a checkpoint may be .bin
        which = (f'an exported model ({exported})' if exported else
                 f'the weights file of the exported model {ir} (OpenVINO IR)')
        raise UserError(f'{what} {reference} is {which}, which runs but does not rebuild a PyTorch model. To '
                        f'evaluate, predict with or benchmark it, give {"it" if exported else ir} to main.py, '
                        f'predict.py or benchmark.py --checkpoint; to train from it, export or publish it, give the '
                        f'checkpoint it was exported from (its metadata names it).')
    return checkpoints.load(reference, what)


def is_published(reference: str | None) -> bool:
    """Whether `reference` names a published model (hf://... or a folder written by hub.py save)."""
    return published.is_reference(reference)


def stem(reference: str) -> str:
    """A file-name stem for the outputs made from `reference` (a checkpoint's name, a folder's, a repository's)."""
    return published.stem(reference)


# ---------------------------------------------------------------------------------------------------------------
# Trained models


# A key that only this backbone's state dict holds, tried in order.
_SIGNATURES = (
    ('ese_vovnet57b', 'stages.2.blocks.3.conv_concat.conv.weight'),
    ('ese_vovnet39b', 'stages.0.blocks.0.conv_concat.conv.weight'),
    ('vovnet57', 'stage4.OSA4_4.concat.OSA4_4_concat/conv.weight'),
    ('vovnet39', 'stem.stem_1/conv.weight'),
    ('resnet101', 'layer3.22.conv1.weight'),
    ('resnet50', 'layer4.0.conv1.weight'),
    ('densenet201', 'features.denseblock3.denselayer48.conv1.weight'),
    ('densenet161', 'features.denseblock3.denselayer36.conv1.weight'),
)


_CLASSIFIERS = {'deeplabv3': 'aspp.conv3.weight', 'deeplabv3plus': 'decoder.classifier.weight'}


def identify_model(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The model of a state dict without prefix: 'deeplabv3plus' when it has a decoder, 'deeplabv3' when its ASPP
    has the classifier, None when it has neither (e.g. backbone weights)."""
    if any(k.startswith('decoder.') for k in state_dict):
        return 'deeplabv3plus'
    return 'deeplabv3' if any(k.startswith('aspp.') for k in state_dict) else None


def identify(state_dict: dict[str, torch.Tensor]) -> tuple[str | None, int | None]:
    """(backbone, number of classes) of a DeepLabV3 or DeepLabV3+ state dict without prefix, None where unknown."""
    backbone = next((name for name, key in _SIGNATURES if key in state_dict), None)
    classifier = next((state_dict[k] for k in _CLASSIFIERS.values() if k in state_dict), None)
    return backbone, (int(classifier.shape[0]) if classifier is not None else None)


def model_mismatch(held: str, wanted: str, source: str) -> str:
    """The message for weights of one model asked to load as the other."""
    has = 'has the DeepLabV3+ decoder (decoder.* tensors)' if held == 'deeplabv3plus' else 'has no decoder'
    return (f'{source} holds a {MODELS[held].title} model (it {has}), but a {MODELS[wanted].title} was asked for: '
            f'pass --model {held}, or drop --model (evaluation with --checkpoint, predict.py, export.py and '
            f'benchmark.py --checkpoint take the model from the checkpoint), or pick the matching checkpoint.')


def load_weights(model: DeepLabV3, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load a full DeepLabV3 state dict (prefix `module.` or none) strictly, or explain why it does not fit."""
    state_dict = strip_prefixes(state_dict)
    decoder = [k for k in state_dict if k.startswith('decoder.')]
    if decoder and any(k.startswith(_CLASSIFIER_KEYS['deeplabv3']) for k in state_dict):
        raise UserError(f'{source} holds tensors of two models: the DeepLabV3 classifier (aspp.conv3.*) and '
                        f'{len(decoder)} tensors of a DeepLabV3+ decoder {few(decoder)}, which that model does not '
                        f'have. The file is damaged or was assembled from two models; use another copy of it.')
    backbone, classes = identify(state_dict)
    if backbone is None and classes is None:
        raise UserError(f'{source} holds no DeepLabV3 weights (e.g. {next(iter(state_dict), "(nothing)")}); '
                        f'give a checkpoint written by main.py --train or a released one.')
    held = identify_model(state_dict)
    if held is not None and held != model.name:
        raise UserError(model_mismatch(held, model.name, source))
    if (backbone, classes) != (model.backbone_name, model.num_classes):
        raise UserError(f'{source} holds {describe(backbone, classes, held)}, but the model is '
                        f'{describe(model.backbone_name, model.num_classes, model.name)}. '
                        f'Pass --backbone {backbone or "..."} and --num_classes {classes}, or pick the matching '
                        f'checkpoint.')
    checkpoints.check_weights(state_dict, source)
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise UserError(f'{source} does not fit the model: {short_error(e)}') from None
    if missing or unexpected:
        hint = ''
        if any(k.endswith('running_mean') and not k.startswith('decoder.') for k in list(missing) + list(unexpected)):
            hint = (' Its norm layers differ from the model\'s (BatchNorm vs GroupNorm): '
                    'pass the --groups it was trained with.')
        raise UserError(f'{source} does not fit the model: {len(missing)} missing keys {few(missing)}, '
                        f'{len(unexpected)} unexpected keys {few(unexpected)}.{hint}')


def recorded_args(checkpoint: dict) -> dict:
    """The `build_model` arguments a checkpoint gives: those it recorded (this project's checkpoints), over what its
    keys tell (a released checkpoint: a DeepLabV3, its backbone and classes; the rest are the original's
    defaults)."""
    state_dict = strip_prefixes(checkpoint['state_dict'])
    backbone, classes = identify(state_dict)
    told = {k: v for k, v in dict(model=identify_model(state_dict), backbone=backbone, num_classes=classes).items()
            if v is not None}
    return {**told, **(checkpoint.get('model_args') or {})}


def model_from_checkpoint(path: str, backbone: str | None = None, output_stride: int | None = None,
                          model: str | None = None, checkpoint: dict | None = None) -> DeepLabV3:
    """Rebuild and load the model a checkpoint holds: `build_model(**recorded_args)`, at `output_stride` when given
    (the weights fit either). `backbone` is needed only when nothing tells, and must agree with it when given;
    `model` (deeplabv3 or deeplabv3plus), when given, must agree with it. `checkpoint`: what `read(path)` gave,
    when the caller has read it already."""
    checkpoint = checkpoint if checkpoint is not None else read(path)
    args = recorded_args(checkpoint)
    if model and args.get('model', 'deeplabv3') != model:
        raise UserError(model_mismatch(args.get('model', 'deeplabv3'), model, path))
    held = args.get('backbone')
    if held is None and backbone is None:
        raise UserError(f'cannot tell which backbone {path} was trained with; pass --backbone.')
    if backbone and held and backbone != held:
        raise UserError(f'{path} holds {describe(held, args.get("num_classes"), args.get("model"))}, not a '
                        f'{backbone}; ask for {held} '
                        f'(predict.py and export.py need no --backbone) or pick the matching checkpoint.')
    args['backbone'] = held or backbone
    if output_stride:
        args['output_stride'] = output_stride
    model = empty(**args)
    load_weights(model, checkpoint['state_dict'], path)
    return model


_CLASSIFIER_KEYS = {'deeplabv3': 'aspp.conv3.', 'deeplabv3plus': 'decoder.classifier.'}


def fine_tune_from(model: DeepLabV3, checkpoint: dict, source: str) -> dict:
    """Load a trained model's weights (`main.py --train --init`): all of them, but for the classifier, which keeps
    its random initialisation when the checkpoint has another number of classes. Returns the record checkpoints
    keep as the run's initial weights."""
    state_dict = strip_prefixes(checkpoint['state_dict'])
    backbone, classes = identify(state_dict)
    held = identify_model(state_dict)
    if held is not None and held != model.name:
        raise UserError(model_mismatch(held, model.name, source))
    if backbone is not None and backbone != model.backbone_name:
        raise UserError(f'--init {source} holds {describe(backbone, classes, held)}; pass --backbone {backbone} to '
                        f'fine-tune it.')
    record = {'source': 'trained model', 'file': source, 'classes': classes}
    if checkpoint.get('revision'):
        record['revision'] = checkpoint['revision']
    elif os.path.isfile(source):
        record['sha256'] = files.sha256_file(source)
    prefix = _CLASSIFIER_KEYS[model.name]
    if classes != model.num_classes:
        own = model.state_dict()
        state_dict = {**{k: v for k, v in state_dict.items() if not k.startswith(prefix)},
                      **{k: v for k, v in own.items() if k.startswith(prefix)}}
        log.info('%s has %s classes, this dataset %d: its classifier (%s*) starts from random weights, the rest '
                 'from the model', source, classes, model.num_classes, prefix)
        record['classifier'] = 'reinitialised'
    load_weights(model, state_dict, source)
    log.info('initial weights: %s', imagenet.describe(record))
    model.initial_weights = record
    return record


# ---------------------------------------------------------------------------------------------------------------
# ImageNet weights, and the original's builders with pretrained=True


def initialize(model: DeepLabV3, pretrained_path: str | None = None) -> dict:
    """Load ImageNet weights into the backbone, from `pretrained_path` or the backbone's library (VoVNet: the
    original's file, else pytorchcv); returns the record checkpoints keep, also set as `model.initial_weights`."""
    spec, groups = SPECS[model.backbone_name], model.model_args['num_groups']
    if pretrained_path is not None:
        record = imagenet.load_file(model, spec.family, pretrained_path, groups)
    else:
        if groups is not None and spec.family != 'vovnet':  # load_vovnet says where GroupNorm weights could be
            raise UserError(f'{spec.library} has no GroupNorm ImageNet weights for {model.backbone_name}: pass the '
                            f'path of a GroupNorm state dict with --pretrained_path, or add --scratch.')
        record = imagenet.load_library(model, spec.family)
    log.info('initial weights: %s', imagenet.describe(record))
    model.initial_weights = record
    return record


def build(backbone: str, pretrained: bool = False, pretrained_path: str | None = None, **kwargs) -> DeepLabV3:
    """deeplab.build_model, with `pretrained` its backbone's ImageNet weights (`initialize`; the ASPP and a
    decoder start random)."""
    model = build_model(backbone, **kwargs)
    if pretrained:
        initialize(model, pretrained_path)
    return model


def _builder(backbone: str):
    def builder(pretrained: bool = False, **kwargs) -> DeepLabV3:
        return build(backbone, pretrained=pretrained, **kwargs)
    builder.__name__ = builder.__qualname__ = backbone
    builder.__doc__ = f'deeplab.{backbone}, with pretrained=True its ImageNet weights (pretrained_path= a file).'
    return builder


# The original's API: weights.vovnet39(pretrained=True, num_classes=21), ...
vovnet39, vovnet57 = _builder('vovnet39'), _builder('vovnet57')
resnet50, resnet101 = _builder('resnet50'), _builder('resnet101')
densenet161, densenet201 = _builder('densenet161'), _builder('densenet201')
ese_vovnet39b, ese_vovnet57b = _builder('ese_vovnet39b'), _builder('ese_vovnet57b')


# ---------------------------------------------------------------------------------------------------------------
# Published models


def from_pretrained(reference: str, device: str | torch.device = 'cpu'):
    """The published model `org/name`, `hf://org/name[@revision]` or a local folder, in eval mode, with its
    `class_names`, `mean` and `std` (the input normalisation) as attributes."""
    repo_like = re.fullmatch(r'[\w.-]+/[\w.-]+(@.+)?', reference)
    if not reference.startswith(published.PREFIX) and not os.path.isdir(reference) and repo_like:
        reference = published.PREFIX + reference
    checkpoint = read(reference)
    model = empty(**checkpoint['model_args'])
    load_weights(model, checkpoint['state_dict'], reference)
    config = checkpoint['config']
    model.class_names = checkpoint['class_names']
    model.mean, model.std = utils.MEAN, utils.STD  # the config's, which read_config holds to these
    model.crop_size = config.get('crop_size', published.EVAL_CROP)  # the canvas of its evaluation protocol
    model.config = config
    return model.to(device).eval()
