"""ImageNet initialisation of the backbones: where the weights come from, how they are turned into this project's
names and checked, and the record each checkpoint keeps of them (`describe` prints it).

Sources, in order of preference:

- VoVNet-39/57: the original's file `data/pretrained/{name}_statedict_norm.pth` when it exists (the weights the
  published results were trained from); else pytorchcv's ImageNet weights, fetched by pytorchcv's own model
  store (its URL, its cache `~/.torch/models`, its sha1 check) and mapped onto our names by
  `vovnet.pytorchcv_names`.
- eSE-VoVNet-39/57: timm's ImageNet weights through timm's own pretrained loading (the Hugging Face hub cache).
- ResNet-50/101, DenseNet-161/201: torchvision's ImageNet weights, the original's, through torch's hub cache.
- `--pretrained_path FILE`: a file in any of these formats (told apart by its keys) that fits the backbone.
"""
import contextlib
import inspect
import logging
import os
import re
import zipfile

import torch
from torch import nn

import vovnet
from checkpoints import check_weights, strip_prefixes
from checkpoints import load as load_checkpoint
from errors import UserError, few, first_line, require, short_error
from files import sha256_file

log = logging.getLogger(__name__)

ORIGINAL_FILE = 'data/pretrained/{name}_statedict_norm.pth'
SCRATCH = {'source': 'scratch'}
# Tensors of an ImageNet file that are not the backbone's: classifiers (original, torchvision, pytorchcv, timm).
# A file with the ASPP (or a DeepLabV3+'s decoder) is a trained segmentation model: refused, pointing to --init.
HEAD = ('aspp.', 'decoder.')
WHAT = 'ImageNet weights (--pretrained_path)'
NOT_BACKBONE = ('classifier.', 'fc.', 'output.', 'head.') + HEAD
# The file formats each backbone family starts from, as `weights_format` names them.
FORMATS = {'vovnet': ('original', 'pytorchcv'), 'ese_vovnet': ('timm',), 'resnet': ('torchvision',),
           'densenet': ('torchvision',)}
FORMAT_BACKBONES = {'original': 'vovnet39/vovnet57', 'pytorchcv': 'vovnet39/vovnet57',
                    'timm': 'ese_vovnet39b/ese_vovnet57b'}


def describe(record: dict | None) -> str:
    """One line saying where a model's initial weights came from."""
    if not record:
        return 'not recorded (a released checkpoint, or one written before this project recorded it)'
    source, file = record['source'], record.get('file')
    if source == 'scratch':
        return 'none: trained from random initialisation (--scratch)'
    if source == 'pytorchcv':
        return f'pytorchcv\'s {record["model"]} ImageNet weights ({file}, sha1 {record["sha1"]})'
    if source == 'timm':
        where = file or f'https://huggingface.co/timm/{record["model"]}'
        return f'timm\'s {record["model"]} ImageNet weights ({where}' + (
            f', sha256 {record["sha256"]})' if record.get('sha256') else ')')
    if source == 'torchvision':
        return f'torchvision\'s {record["weights"]} ImageNet weights ({file})'
    if source == 'trained model':  # main.py --init
        where = (f', revision {record["revision"]}' if record.get('revision') else
                 f', sha256 {record["sha256"]}' if record.get('sha256') else '')
        reset = (f'; its classifier ({record["classes"]} classes) re-initialised'
                 if record.get('classifier') == 'reinitialised' else '')
        return f'the trained model {file} (--init{where}){reset}'
    what = 'the original\'s ImageNet file' if source == 'original file' else f'{record.get("format")} weights from'
    return f'{what} {file} (sha256 {record.get("sha256")})'


# ---------------------------------------------------------------------------------------------------------------
# Files


@contextlib.contextmanager
def damaged_cache(what: str, path: str):
    """A library's cached file that cannot be read, or does not fit, is named as damaged (not as a network
    problem), with what to do: delete it so that the library downloads it again, or give a file."""
    try:
        yield
    except UserError as e:
        raise UserError(f'{what} in the cache, {path}, are damaged: {e.for_user()} Delete that file so that it is '
                        f'downloaded again, or pass --pretrained_path FILE.') from None
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        cause = short_error(e) if 'loading state_dict' in first_line(e) else first_line(e)
        raise UserError(f'{what} in the cache, {path}, are damaged ({cause}). Delete that file so that it is '
                        f'downloaded again, or pass --pretrained_path FILE.') from None


def read_weights(path: str, what: str = 'ImageNet weights') -> dict[str, torch.Tensor]:
    """The state dict in a .pth/.pt/.bin file (read with weights_only=True) or a .safetensors file, without a
    `module.` prefix."""
    if os.path.isdir(path):
        raise UserError(f'{what} {path} is a folder; give the weights file (.pth or .safetensors) of the backbone. '
                        f'A trained model (a checkpoint, or a folder written by hub.py save) is fine-tuned with --init '
                        f'instead.')
    if not path.endswith('.safetensors'):
        return strip_prefixes(load_checkpoint(path, what=what)['state_dict'])
    if not os.path.isfile(path):
        raise UserError(f'{what} {path} does not exist.')
    require('safetensors', f'reading {path}')
    from safetensors.torch import load_file
    try:
        return strip_prefixes(load_file(path, device='cpu'))
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError
        raise UserError(f'{what} {path} is not a readable safetensors file ({str(e).splitlines()[0][:200]}); '
                        f'download or copy it again.') from None


def weights_format(state_dict: dict[str, torch.Tensor]) -> str:
    """'pytorchcv', 'original' (the original VoVNet file's names), 'timm' (timm's VoVNet) or 'torchvision' (any
    other, torchvision's ResNet/DenseNet among them), from the keys."""
    keys = list(state_dict)
    if any(k.startswith('features.init_block.') for k in keys):
        return 'pytorchcv'
    if any(k.startswith('stem.stem_1/') for k in keys):
        return 'original'
    if 'stem.0.conv.weight' in state_dict and any(k.startswith('stages.') for k in keys):
        return 'timm'
    return 'torchvision'


def load_file(model: nn.Module, family: str, path: str, num_groups: int | None, source: str = 'file') -> dict:
    """Initialise `model`'s backbone from the ImageNet weights in `path`; returns the record.

    pytorchcv and timm files must hold every backbone tensor with its shape (their names are mapped one by
    one); the original's format and torchvision's load what fits and report the rest, never merging silently.
    """
    state = read_weights(path, WHAT)
    head = sorted({k.split('.')[0] for k in state if k.startswith(HEAD)})
    own = model.state_dict()
    fits = any(k in own and own[k].shape == v.shape for k, v in state.items() if not k.startswith(HEAD))
    if head and fits:  # this backbone's trained model (one of another backbone is "none of the weights" below)
        raise UserError(f'{path} holds a whole trained segmentation model (its {" and ".join(head)} tensors), not '
                        f'ImageNet weights of a backbone: --pretrained_path would keep its backbone and drop the rest. '
                        f'To start from every layer of it, pass --init {path} instead of --pretrained_path.')
    fmt = weights_format(state)
    name = model.backbone_name
    if fmt not in FORMATS[family]:
        if fmt in FORMAT_BACKBONES:
            raise UserError(f'{path} holds {fmt} ImageNet weights, which fit --backbone {FORMAT_BACKBONES[fmt]}, '
                            f'not {name}. Pass the ImageNet weights of {name}, or add --scratch.')
        fmt = 'torchvision'  # unknown names: the lenient loader below reports what does and does not fit
    if num_groups is not None and fmt in ('pytorchcv', 'timm'):
        raise UserError(f'{path} holds {fmt}\'s BatchNorm ImageNet weights, which a --groups (GroupNorm) model '
                        f'cannot start from: drop --groups, or pass GroupNorm weights or --scratch.')
    if fmt == 'pytorchcv':
        _load_strict(model, from_pytorchcv(state, name, own, path), path)
    elif fmt == 'timm':
        _load_strict(model, _backbone_only(state), path)
    else:
        _load_lenient(model, state, path)
    record = {'source': source, 'file': path, 'sha256': sha256_file(path)}
    if source == 'file':
        record['format'] = fmt
    return record


def from_pytorchcv(state_dict: dict, name: str, own: dict, source: str) -> dict[str, torch.Tensor]:
    """pytorchcv's `vovnet39`/`vovnet57` state dict under our backbone's names; every tensor of the mapping must
    be there with our shape (`num_batches_tracked` may be absent), and nothing else but its classifier."""
    names = vovnet.pytorchcv_names(name)
    theirs = {k: v for k, v in state_dict.items() if not k.startswith('output.')}
    converted = {}
    for ours, key in names.items():
        if key not in theirs:
            if key.endswith('num_batches_tracked'):
                continue
            raise UserError(f'{source} lacks {key} (our {ours}), so it is not a complete pytorchcv {name}: '
                            f'download or copy it again, or pass another file.')
        if tuple(theirs[key].shape) != tuple(own[ours].shape):
            raise UserError(f'{source}: {key} has shape {tuple(theirs[key].shape)}, where {name} has '
                            f'{tuple(own[ours].shape)} (our {ours}); is it the weights of another network?')
        converted[ours] = theirs[key]
    extra = [k for k in theirs if k not in set(names.values())]
    if extra:
        raise UserError(f'{source} holds {len(extra)} tensors that pytorchcv\'s {name} does not have '
                        f'{few(extra)}; is it the other depth (vovnet39 / vovnet57)?')
    return converted


def _backbone_only(state_dict: dict) -> dict:
    return {k: v for k, v in state_dict.items() if not k.startswith(NOT_BACKBONE)}


def _load_strict(model: nn.Module, state_dict: dict, source: str) -> None:
    """Load backbone weights that must cover every backbone tensor, with the same shapes."""
    own = model.state_dict()
    backbone = {k for k in own if not k.startswith(HEAD)}
    missing = sorted(k for k in backbone - set(state_dict) if not k.endswith('num_batches_tracked'))
    unexpected = sorted(set(state_dict) - backbone)
    wrong = [k for k in state_dict if k in own and own[k].shape != state_dict[k].shape]
    if wrong:
        k = wrong[0]
        raise UserError(f'{source} does not fit {model.backbone_name}: {len(wrong)} tensors have other shapes '
                        f'(e.g. {k}: file {tuple(state_dict[k].shape)}, model {tuple(own[k].shape)}).')
    if missing or unexpected:
        raise UserError(f'{source} does not fit {model.backbone_name}: {len(missing)} backbone tensors missing '
                        f'{few(missing)}, {len(unexpected)} unexpected {few(unexpected)}.')
    check_weights(state_dict, source)
    model.load_state_dict(state_dict, strict=False)
    log.info('loaded %d ImageNet tensors from %s', len(state_dict), source)


def _load_lenient(model: nn.Module, state_dict: dict, path: str) -> None:
    """The original's and torchvision's files: load what fits and say what does not. A file with or without a
    `module.` prefix, classifier or ASPP is accepted."""
    state_dict = _rename_legacy_densenet_keys(_backbone_only(state_dict))
    own = model.state_dict()
    mismatched = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise UserError(f'{path} does not fit {model.backbone_name}: {len(mismatched)} tensors have other shapes '
                        f'(e.g. {mismatched[0]}: file {tuple(state_dict[mismatched[0]].shape)}, model '
                        f'{tuple(own[mismatched[0]].shape)}). Is it the weights of another backbone?')
    loaded = {k: v for k, v in state_dict.items() if k in own}
    if not loaded:
        raise UserError(f'{path} holds none of the weights of {model.backbone_name} (e.g. it has '
                        f'{next(iter(state_dict), "(nothing)")}); give the ImageNet weights of this backbone.')
    check_weights(loaded, path)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not k.startswith(HEAD)]
    log.info('loaded ImageNet weights from %s (%d tensors)', path, len(loaded))
    if missing:
        log.warning('%d backbone tensors are not in %s and keep their initialisation: %s',
                    len(missing), path, few(missing))
    if unexpected:
        log.warning('%d tensors of %s match nothing in %s and were ignored: %s',
                    len(unexpected), path, model.backbone_name, few(unexpected))


def load_library(model: nn.Module, family: str) -> dict:
    """The backbone's ImageNet weights from where its family gets them when no file is given (LIBRARY_LOADERS);
    returns the record."""
    return LIBRARY_LOADERS[family](model)


# ---------------------------------------------------------------------------------------------------------------
# VoVNet-39/57: the original's file, else pytorchcv


def load_vovnet(model: nn.Module) -> dict:
    """VoVNet's ImageNet initialisation when no file is given: the original's file when it is there, else
    pytorchcv's weights (downloaded and checked by pytorchcv into its cache)."""
    name, num_groups = model.backbone_name, model.model_args['num_groups']
    original = ORIGINAL_FILE.format(name=name)
    if os.path.isfile(original):
        return load_file(model, 'vovnet', original, num_groups, source='original file')
    alternatives = (f'copy the original\'s {os.path.basename(original)} to {os.path.dirname(original)}/, pass '
                    f'another file with --pretrained_path, or add --scratch to train from random initialisation')
    if num_groups is not None:
        raise UserError(f'ImageNet weights for {name} with --groups are needed: {original} does not exist, and '
                        f'pytorchcv\'s are BatchNorm weights. Pass GroupNorm weights with --pretrained_path, or '
                        f'add --scratch.')
    try:
        from pytorchcv.models.common import model_store
    except ImportError:
        raise UserError(f'ImageNet weights for {name} are needed: {original} does not exist, and pytorchcv, which '
                        f'downloads them, is not installed: pip install pytorchcv (or pip install -r '
                        f'requirements-extras.txt); or {alternatives}.') from None
    root = os.path.expanduser(
        inspect.signature(model_store.get_model_file).parameters['local_model_store_dir_path'].default)
    error, sha1, tag = model_store.get_model_name_suffix_data(name)
    file_name = f'{name}-{error}-{sha1[:8]}.pth'  # pytorchcv's naming of its files (model_store.get_model_file)
    url = f'{model_store.imgclsmob_repo_url}/releases/download/{tag}/{file_name}.zip'
    log.info('%s does not exist: using pytorchcv\'s %s ImageNet weights (%s)', original, name,
             os.path.join(root, file_name))
    cached = os.path.join(root, file_name)
    was_cached = os.path.isfile(cached)
    try:
        path = model_store.get_model_file(name, root)
    except (OSError, RuntimeError, ValueError, UserWarning, zipfile.BadZipFile) as e:
        cause = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        if was_cached:  # pytorchcv found it, its sha1 did not match, and downloading it again failed
            raise UserError(f'pytorchcv\'s {name} ImageNet weights in the cache, {cached}, are damaged (their sha1 '
                            f'is not {sha1}), and downloading them again from {url} failed ({cause}). Delete '
                            f'that file and unzip a fresh copy of {url} into {root}/; or {alternatives}.') from None
        raise UserError(f'ImageNet weights for {name} are needed: {original} does not exist, and pytorchcv\'s '
                        f'could not be fetched from {url} ({cause}). On a machine without internet, unzip that '
                        f'file into {root}/ (pytorchcv checks its sha1 {sha1}); or {alternatives}.') from None
    with damaged_cache(f'pytorchcv\'s {name} ImageNet weights', path):
        state = read_weights(path, what='the file')
        _load_strict(model, from_pytorchcv(state, name, model.state_dict(), path), path)
    return {'source': 'pytorchcv', 'model': name, 'file': path, 'sha1': sha1}


# ---------------------------------------------------------------------------------------------------------------
# eSE-VoVNet: timm


def load_timm(model: nn.Module) -> dict:
    """timm's ImageNet weights for an eSE-VoVNet, loaded by timm's own pretrained loading into a timm model (from
    the Hugging Face hub cache when the file is there, no network; else downloaded into it), then into `model`."""
    name = model.backbone_name
    timm = require('timm', f'the {name} backbone')
    with torch.random.fork_rng(devices=[]):  # the model's own random initialisation stays as it was
        net = vovnet.timm_vovnet(name)
    cfg = net.pretrained_cfg
    model_name, repo = f'{cfg["architecture"]}.{cfg["tag"]}', cfg['hf_hub_id']
    page = f'https://huggingface.co/{repo}'
    cached = _hub_cached(repo)
    if cached:
        with damaged_cache(f'timm\'s {model_name} ImageNet weights', cached):
            state = read_weights(cached, what='the file')
            check_weights(state, 'the file')  # load_pretrained would cast an integer tensor without a word
            timm.models.load_pretrained(net, pretrained_cfg={**cfg, 'state_dict': state})
    else:
        _download_timm(timm, net, model_name, page, name)
        cached = _hub_cached(repo)
    _load_strict(model, _backbone_only(net.state_dict()), cached or page)
    record = {'source': 'timm', 'model': model_name, 'file': cached}
    blob = os.path.realpath(cached) if cached else ''
    if os.path.basename(os.path.dirname(blob)) == 'blobs' and re.fullmatch(r'[0-9a-f]{64}', os.path.basename(blob)):
        record['sha256'] = os.path.basename(blob)  # the hub names a large file's blob by its sha256
    return record


def _download_timm(timm, net: nn.Module, model_name: str, page: str, name: str) -> None:
    """timm's own download of its weights into the Hugging Face cache, and loading into `net`."""
    try:
        log.info('downloading timm\'s %s ImageNet weights from %s', model_name, page)
        timm.models.load_pretrained(net)
    except (OSError, RuntimeError, ValueError) as e:
        from huggingface_hub import constants
        cause = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f'timm\'s {model_name} ImageNet weights for {name} could not be loaded from {page} '
                        f'({cause}). With internet they are downloaded into the Hugging Face cache '
                        f'({constants.HF_HUB_CACHE}); on a machine without it, download model.safetensors from '
                        f'that page and pass it with --pretrained_path FILE, or add --scratch to train from random '
                        f'initialisation.') from None


def _hub_cached(repo: str) -> str | None:
    """The cached weights file of a timm hub repository, or None."""
    from huggingface_hub import try_to_load_from_cache
    for filename in ('model.safetensors', 'pytorch_model.bin'):
        path = try_to_load_from_cache(repo, filename)
        if isinstance(path, str):
            return path
    return None


# ---------------------------------------------------------------------------------------------------------------
# ResNet, DenseNet: torchvision


def load_torchvision(model: nn.Module) -> dict:
    """torchvision's ImageNet weights (the ones the original used), read from torch's hub cache or downloaded into
    it, loaded into a ResNet's or DenseNet's backbone; returns the record."""
    name = model.backbone_name
    weights, cached = _torchvision_file(name)
    if os.path.isfile(cached):  # torch.hub reads a cached file as it is (the hash is checked on download only)
        with damaged_cache(f'torchvision\'s {name} ImageNet weights', cached):
            state = read_weights(cached, what='the file')
    else:
        state = _download_torchvision(weights, name, cached)
    return _load_torchvision_state(model, state, weights, name, cached)


def _download_torchvision(weights, name: str, cached: str) -> dict:
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # no network, a refused download
        raise UserError(
            f'the ImageNet weights of {name} are needed but could not be read or downloaded ({e}). '
            f'Download {weights.url} to {cached} (or set TORCH_HOME), or add --scratch to train without them.'
        ) from None


def _load_torchvision_state(model: nn.Module, state: dict, weights, name: str, cached: str) -> dict:
    state = {k: v for k, v in _rename_legacy_densenet_keys(state).items() if not k.startswith(('fc.', 'classifier.'))}
    own_only = HEAD
    if model.model_args['beta']:  # three 3x3 convs where the file has the 7x7 conv1
        own_only = HEAD + ('conv1.',)
        state = {k: v for k, v in state.items() if not k.startswith('conv1.')}
        log.warning('the --beta stem starts from random weights: the ImageNet weights have a 7x7 conv1')
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state and not k.startswith(own_only)
               and not k.endswith('num_batches_tracked')]
    if wrong or missing or unexpected:
        cause = (f'{wrong[0]} has shape {tuple(state[wrong[0]].shape)}, the model {tuple(own[wrong[0]].shape)}'
                 if wrong else f'{len(missing)} tensors missing {few(missing)}, {len(unexpected)} unexpected '
                               f'{few(unexpected)}')
        raise UserError(f'the ImageNet weights in {cached} do not fit torchvision\'s {name} ({cause}); delete '
                        f'the file so that it is downloaded again, or copy {weights.url} there.')
    with damaged_cache(f'torchvision\'s {name} ImageNet weights', cached):
        check_weights(state, 'the file')
    model.load_state_dict(state, strict=False)
    return {'source': 'torchvision', 'weights': f'{type(weights).__name__}.{weights.name}', 'file': cached}


def _torchvision_file(name: str):
    """torchvision's ImageNet weights of `name` and their file in the hub cache."""
    import torchvision  # here: it imports torch._dynamo, a second of every process's start
    weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    return weights, os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(weights.url))


# torchvision's DenseNet files name layers `norm.1`, `conv.2`, ...; its modules are `norm1`, `conv2`.
_LEGACY_DENSENET_KEY = re.compile(
    r'^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$')


def _rename_legacy_densenet_keys(state_dict):
    return {_LEGACY_DENSENET_KEY.sub(r'\1\2', k): v for k, v in state_dict.items()}


# Where each backbone family's ImageNet weights come from when no file is given.
LIBRARY_LOADERS = {'vovnet': load_vovnet, 'ese_vovnet': load_timm, 'resnet': load_torchvision,
                   'densenet': load_torchvision}
