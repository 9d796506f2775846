"""Published models: a folder of `model.safetensors` (the weights, no pickle), `config.json` (what rebuilds the
model) and `README.md` (its card), local or on the Hugging Face Hub as `hf://org/name[@revision]`, read through
huggingface_hub's cache, revisions and offline mode (HF_HUB_OFFLINE=1). Reading and checking only: every field of
config.json, every tensor against it; hub.py writes and publishes such folders. huggingface_hub and safetensors are
optional (requirements-extras.txt).
"""
import importlib
import json
import os
import sys

import torch

import checkpoints
import deeplab
import errors
import utils
from errors import UserError, few

FORMAT = 'vovnet-deeplabv3-hub'
VERSION = 1
WEIGHTS, CONFIG, CARD = 'model.safetensors', 'config.json', 'README.md'
FILES = (WEIGHTS, CONFIG, CARD)
PREFIX = 'hf://'
EVAL_CROP = 513  # the original's evaluation canvas
def require_hub(purpose: str):
    """huggingface_hub with the submodules this module reaches through it (`utils`, `errors`, `constants`,
    `file_download`) imported by name: the package loads them lazily, so in a fresh process `hf.errors` alone is an
    AttributeError."""
    hf = errors.require('huggingface_hub', purpose)
    for name in ('utils', 'errors', 'constants', 'file_download'):
        importlib.import_module(f'huggingface_hub.{name}')
    return hf


def require_safetensors(purpose: str):
    errors.require('safetensors', purpose)
    import safetensors.torch
    return safetensors.torch


# ---------------------------------------------------------------------------------------------------------------
# Reading: hf://org/name[@revision] or a folder


def is_reference(path: str | None) -> bool:
    """Whether `path` names a published model: `hf://...`, or a folder holding config.json."""
    return bool(path) and (str(path).startswith(PREFIX) or os.path.isfile(os.path.join(str(path), CONFIG)))


def stem(reference: str) -> str:
    """A file-name stem for the outputs of a model named `reference`: a checkpoint's name without its extension,
    a folder's name, or for hf://org/name@rev `name@rev`."""
    if reference.startswith(PREFIX):
        return reference[len(PREFIX):].rstrip('/').split('/')[-1]
    name = os.path.normpath(reference)
    return name if os.path.isdir(reference) else os.path.splitext(name)[0]


def parse(reference: str) -> tuple[str, str | None]:
    """(repository id, revision or None) of `hf://org/name[@revision]`, by huggingface_hub's own parser."""
    hf = require_hub(f'loading {reference}')
    try:
        uri = hf.utils.parse_hf_uri(reference)
    except (ValueError, hf.errors.HFValidationError) as e:
        raise UserError(f'{reference} is not a model on the Hub: {e} Write hf://org/name or hf://org/name@revision.') \
            from None
    if uri.type != 'model' or uri.path_in_repo:
        what = f'a {uri.type}' + (', a path in it' if uri.path_in_repo else '')
        raise UserError(f'{reference} is not a model repository ({what}); write hf://org/name or '
                        f'hf://org/name@revision.')
    return uri.id, uri.revision


def download(reference: str) -> dict[str, str]:
    """The local paths of config.json and model.safetensors of `hf://org/name[@revision]`, from huggingface_hub's
    cache or downloaded into it."""
    hf = require_hub(f'loading {reference}')
    repo, revision = parse(reference)
    where = f'{repo}' + (f' at revision {revision}' if revision else '')
    paths = {}
    for name in (CONFIG, WEIGHTS):
        try:
            paths[name] = hf.hf_hub_download(repo, name, revision=revision)
        except hf.errors.RevisionNotFoundError:
            raise UserError(f'the Hub repository {repo} has no revision {revision!r}: give a branch, tag or commit '
                            f'it has (hf://{repo}@main).') from None
        except hf.errors.RepositoryNotFoundError:
            raise UserError(f'the Hub has no model repository {repo} (or it is private or gated and this machine is '
                            f'not logged in: hf auth login, or set HF_TOKEN).') from None
        except hf.errors.LocalEntryNotFoundError:
            offline = hf.constants.is_offline_mode()
            raise UserError(f'{name} of {where} is not in the Hugging Face cache ({hf.constants.HF_HUB_CACHE}) and '
                            + ('HF_HUB_OFFLINE is set' if offline else 'the Hub could not be reached')
                            + ': download it once with a network (or unset HF_HUB_OFFLINE), or give a local folder '
                              'written by hub.py save.') from None
        except hf.errors.EntryNotFoundError:
            raise UserError(f'{where} has no {name}: it is not a model published by hub.py (which writes '
                            f'{", ".join(FILES)}).') from None
        except hf.errors.HfHubHTTPError as e:
            raise UserError(f'the Hub refused {name} of {where}: {errors.first_line(e)}') from None
        except network_errors() as e:
            raise UserError(f'could not reach the Hub ({hf.constants.ENDPOINT}) for {name} of {where} '
                            f'({errors.first_line(e)}), and it is not in the cache ({hf.constants.HF_HUB_CACHE}): '
                            f'check the network (or HF_ENDPOINT), or give a local folder written by hub.py save.') \
                from None
    return paths


def network_errors() -> tuple[type[BaseException], ...]:
    """The exceptions of a Hub that cannot be reached: OSError (ConnectionError, huggingface_hub's
    OfflineModeIsEnabled) and the transport errors of the HTTP client huggingface_hub uses (httpx, or httpx2 in
    its 2.x releases), which are not OSErrors."""
    found = [OSError]
    for client in ('httpx2', 'httpx', 'requests'):
        module = sys.modules.get(client)  # imported by huggingface_hub itself when it uses it
        if client == 'requests' and module is not None:
            found.append(module.exceptions.RequestException)
        elif module is not None and hasattr(module, 'TransportError'):
            found.append(module.TransportError)
    return tuple(found)


def _local(folder: str) -> dict[str, str]:
    missing = [name for name in (CONFIG, WEIGHTS) if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise UserError(f'the model folder {folder} has no {" and no ".join(missing)}: give a folder written by '
                        f'hub.py save ({", ".join(FILES)}).')
    return {name: os.path.join(folder, name) for name in (CONFIG, WEIGHTS)}


# The fields of config.json besides the model arguments (checkpoints.MODEL_ARGS), each read here or refused.
CONFIG_FIELDS = ('format', 'format_version', 'class_names', 'input', 'crop_size', 'training', 'source', 'evaluation')


def _field(source: str, field: str, value, wanted: str) -> UserError:
    return UserError(f'{CONFIG} of {source}: {field} is {value!r}, where it must be {wanted}. The folder is damaged or '
                     f'was not written by hub.py save; use another copy of it.')


def read_config(path: str, source: str) -> dict:
    """config.json, every field checked (its type, range and count), naming the file and the field: this format,
    a version this code reads, model arguments it can build from, the class names, the input normalisation this
    project computes with, and the records of the training, the source checkpoint and the evaluation."""
    if os.path.isdir(path):
        raise UserError(f'{CONFIG} of {source} is a folder, not a file: the folder is damaged or was not written by '
                        f'hub.py save.')
    try:
        with open(path, encoding='utf-8') as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f'{CONFIG} of {source} is not valid JSON ({e}): the folder is damaged or was not written by '
                        f'hub.py save.') from None
    except OSError as e:
        raise UserError(f'{CONFIG} of {source} cannot be read ({errors.first_line(e)}).') from None
    if not isinstance(config, dict) or config.get('format') != FORMAT:
        raise UserError(f'{CONFIG} of {source} is not the config of a model written by hub.py save (its "format" '
                        f'is {config.get("format") if isinstance(config, dict) else None!r}, not {FORMAT!r}).')
    version = config.get('format_version')
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _field(source, 'format_version', version, f'a whole number from 1 to {VERSION}')
    if version > VERSION:
        raise UserError(f'{source} is in format version {version}, newer than this code reads ({VERSION}): '
                        f'update this repository (git pull).')
    unknown = [k for k in config if k not in CONFIG_FIELDS and k not in checkpoints.MODEL_ARGS]
    if unknown:
        raise UserError(f'{CONFIG} of {source} has fields this code does not read {few(unknown)}: it was written by '
                        f'another program or a newer version of this one; update this repository (git pull).')
    missing = [k for k in ('backbone', 'num_classes', 'output_stride') if k not in config]
    if missing:
        raise UserError(f'{CONFIG} of {source} lacks {" and ".join(missing)}: the folder is damaged or was not '
                        f'written by hub.py save.')
    args = model_args(config)
    problem = checkpoints.model_args_problem(args)
    if problem is not None:
        raise UserError(f'{CONFIG} of {source} describes a model this project cannot build ({problem}): the folder '
                        f'is damaged or was not written by hub.py save. Use another copy of it.')
    if args['backbone'] not in deeplab.SPECS:
        raise UserError(f'{CONFIG} of {source} names the backbone {args["backbone"]!r}, which this code does not '
                        f'have ({", ".join(deeplab.BACKBONES)}).')
    names = config.get('class_names')
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) and n for n in names)):
        raise _field(source, 'class_names', names, 'a list of names (strings), one per class')
    if names is not None and len(names) != args['num_classes']:
        raise UserError(f'{CONFIG} of {source} lists {len(names)} class names for {args["num_classes"]} classes '
                        f'(num_classes).')
    _check_input(config.get('input'), source)
    crop = config.get('crop_size', EVAL_CROP)
    if not isinstance(crop, int) or isinstance(crop, bool) or not 32 <= crop <= 8192:
        raise _field(source, 'crop_size', crop, 'the evaluation canvas, a whole number of pixels from 32 to 8192')
    for key in ('training', 'source', 'evaluation'):
        if not isinstance(config.get(key), (dict, type(None))):
            raise _field(source, key, config[key], 'an object (a record), or null')
    metrics = config.get('evaluation') or {}
    if 'mean_iou' in metrics and (not isinstance(metrics['mean_iou'], (int, float)) or isinstance(
            metrics['mean_iou'], bool) or not 0 <= metrics['mean_iou'] <= 100):
        raise _field(source, 'evaluation.mean_iou', metrics['mean_iou'], 'a mean IoU from 0 to 100')
    return config


def _check_input(spec, source: str) -> None:
    """The input normalisation: the models of this project compute on ImageNet's mean and std (utils.MEAN, STD),
    which evaluation and prediction apply; a config asking for another is refused, not silently ignored."""
    if spec is None:
        return
    if not isinstance(spec, dict) or set(spec) - {'mean', 'std', 'note'}:
        raise _field(source, 'input', spec, 'an object of mean, std (and a note)')
    for key, expected in (('mean', utils.MEAN), ('std', utils.STD)):
        value = spec.get(key)
        if not (isinstance(value, list) and len(value) == 3 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise _field(source, f'input.{key}', value, 'three numbers, one per RGB channel')
        if any(abs(v - e) > 1e-6 for v, e in zip(value, expected)):
            raise UserError(f'{CONFIG} of {source}: input.{key} is {value}, but this project normalises images with '
                            f'ImageNet\'s {key} {list(expected)} in evaluation and prediction, so the model would be '
                            f'fed other inputs than it asks for. Re-save the model with hub.py save.')


def model_args(config: dict) -> dict:
    return {k: config[k] for k in checkpoints.MODEL_ARGS if k in config}


def cache_entry(reference: str, path: str) -> str | None:
    """huggingface_hub's cache folder of the repository whose file `path` is (.../models--org--name), or None for
    a file outside the cache."""
    snapshot = os.path.dirname(path)  # .../models--org--name/snapshots/<commit>/config.json
    if not reference.startswith(PREFIX) or os.path.basename(os.path.dirname(snapshot)) != 'snapshots':
        return None
    return os.path.dirname(os.path.dirname(snapshot))


def read(reference: str) -> dict:
    """A published model as checkpoints.load gives a checkpoint: its state dict, model arguments, class names,
    and `config`. Every field of the config is checked, and the weights against it (every tensor, its shape, finite
    values). A damaged file in huggingface_hub's cache is named by its cache entry, with the command that clears
    it (the cache would otherwise serve the same file again)."""
    paths = download(reference) if reference.startswith(PREFIX) else _local(reference)
    entry = cache_entry(reference, paths[CONFIG])
    try:
        config = read_config(paths[CONFIG], reference)
        st = require_safetensors(f'reading {reference}')
        try:
            state_dict = st.load_file(paths[WEIGHTS])
        except Exception as e:  # safetensors' own error types: a truncated or foreign file
            again = 'download it again' if entry else 'save it again'
            raise UserError(f'{WEIGHTS} of {reference} cannot be read as safetensors ({errors.first_line(e)}): the '
                            f'file is damaged; {again}.') from None
        check_fit(state_dict, model_args(config), reference)
    except UserError as e:
        if entry is None:
            raise
        repo = parse(reference)[0]
        raise UserError(f'{e.for_user()} It is in the Hugging Face cache, {entry}, which would serve it again: '
                        f'remove it (hf cache rm model/{repo}, or delete that folder), then load it again to download '
                        f'it anew.') from None
    snapshot = os.path.dirname(paths[CONFIG])
    training = config.get('training') or {}
    return {'state_dict': state_dict, 'revision': os.path.basename(snapshot) if entry else None,
            'model_args': model_args(config), 'class_names': config.get('class_names'),
            'dataset': training.get('dataset'), 'config': config, 'initial_weights': training.get('initial_weights')}


def check_fit(state_dict: dict[str, torch.Tensor], args: dict, source: str) -> None:
    """The weights must be exactly those of the model the config describes: name the first that is not."""
    try:
        # Names and shapes only: built without drawing initial weights. (On the meta device instead, its first use
        # imported torch._dynamo and sympy: predict.py of one photo from a Hub folder took 3.6 s instead of 2.3.)
        expected = deeplab.empty(**args).state_dict()
    except (ValueError, RuntimeError, UserError) as e:  # e.g. GroupNorm groups that do not divide the channels
        message = e.for_user() if isinstance(e, UserError) else errors.first_line(e)
        for option, flag in deeplab.OPTION_FLAGS.items():  # the builder speaks of flags; the file has fields
            message = message.replace(flag, option)
        raise UserError(f'{CONFIG} of {source} describes a model that cannot be built '
                        f'({", ".join(f"{k}={v!r}" for k, v in args.items())}): {message}') from None
    for name, tensor in expected.items():
        if name not in state_dict:
            raise UserError(f'{WEIGHTS} of {source} does not fit its {CONFIG}: it has no {name} (the config describes '
                            f'{deeplab.describe(args["backbone"], args["num_classes"], args.get("model"))}).')
        if state_dict[name].shape != tensor.shape:
            raise UserError(f'{WEIGHTS} of {source} does not fit its {CONFIG}: {name} has shape '
                            f'{tuple(state_dict[name].shape)}, the model {tuple(tensor.shape)}.')
    extra = [k for k in state_dict if k not in expected]
    if extra:
        raise UserError(f'{WEIGHTS} of {source} does not fit its {CONFIG}: {len(extra)} tensors the model does not '
                        f'have {few(extra)}.')
    checkpoints.check_weights(state_dict, f'{WEIGHTS} of {source}')


