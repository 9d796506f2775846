"""Trained models that can be shared and loaded again: a folder of three files, published on the Hugging Face Hub.

    python hub.py save --checkpoint data/deeplab_vovnet39_pascal_v3_bn_lr7e-3_epoch50.pth --output hub/vovnet39
    python hub.py save --checkpoint CKPT --output FOLDER --metrics eval.json   # with main.py --json's figures
    python hub.py push --folder hub/vovnet39 --repo my-org/deeplabv3-vovnet39
    python predict.py --checkpoint hf://my-org/deeplabv3-vovnet39 --input photos/

A published model is `model.safetensors` (the weights, no pickle), `config.json` (what rebuilds the model: backbone,
model, classes and their names, output stride, norm options, input normalisation, the evaluation crop, the format
version) and `README.md` (a model card with the Hub's metadata). Wherever a checkpoint is accepted (main.py
--checkpoint and --init, predict.py, export.py, benchmark.py), `hf://org/name[@revision]` or such a folder is too;
from Python, `deeplab.from_pretrained("org/name")`. Downloads go through huggingface_hub's cache, revisions and
offline mode (HF_HUB_OFFLINE=1); huggingface_hub and safetensors are optional (requirements-extras.txt).
"""
import argparse
import importlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile

import torch

import checkpoints
import errors
import files
import imagenet
import pascal
from errors import UserError, few

log = logging.getLogger('hub')

FORMAT = 'vovnet-deeplabv3-hub'
VERSION = 1
WEIGHTS, CONFIG, CARD = 'model.safetensors', 'config.json', 'README.md'
FILES = (WEIGHTS, CONFIG, CARD)
PREFIX = 'hf://'
EVAL_CROP = 513  # the original's evaluation canvas
ORIGINAL_REPO = 'https://github.com/stigma0617/VoVNet-DeepLabV3'
# The original's released checkpoints (file name -> mean IoU on VOC 2012 val its README reports, not measured here).
RELEASED = {f'deeplab_{b}_pascal_v3_bn_lr7e-3_epoch50.pth': miou for b, miou in (
    ('resnet50', 74.27), ('densenet201', 75.63), ('vovnet39', 75.71), ('resnet101', 76.81), ('densenet161', 76.13),
    ('vovnet57', 77.4))}


def _hub(purpose: str):
    """huggingface_hub with the submodules this module reaches through it (`utils`, `errors`, `constants`,
    `file_download`) imported by name: the package loads them lazily, so in a fresh process `hf.errors` alone is an
    AttributeError."""
    hf = errors.require('huggingface_hub', purpose)
    for name in ('utils', 'errors', 'constants', 'file_download'):
        importlib.import_module(f'huggingface_hub.{name}')
    return hf


def _safetensors(purpose: str):
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
    hf = _hub(f'loading {reference}')
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
    hf = _hub(f'loading {reference}')
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
    import deeplab
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
        raise UserError(f'{CONFIG} of {source}: {problem}. The folder is damaged or was not written by hub.py save; '
                        f'use another copy of it.')
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
    """The input normalisation: the models of this project compute on ImageNet's mean and std (pascal.MEAN, STD),
    which evaluation and prediction apply; a config asking for another is refused, not silently ignored."""
    if spec is None:
        return
    if not isinstance(spec, dict) or set(spec) - {'mean', 'std', 'note'}:
        raise _field(source, 'input', spec, 'an object of mean, std (and a note)')
    for key, expected in (('mean', pascal.MEAN), ('std', pascal.STD)):
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
        st = _safetensors(f'reading {reference}')
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
    import deeplab
    try:
        with torch.random.fork_rng(devices=[]), torch.device('meta'):  # names and shapes only: no memory, no init
            expected = deeplab.build_model(**args).state_dict()
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


def from_pretrained(reference: str, device: str | torch.device = 'cpu'):
    """The published model `org/name`, `hf://org/name[@revision]` or a local folder, in eval mode, with its
    `class_names`, `mean` and `std` (the input normalisation) as attributes."""
    import deeplab
    repo_like = re.fullmatch(r'[\w.-]+/[\w.-]+(@.+)?', reference)
    if not reference.startswith(PREFIX) and not os.path.isdir(reference) and repo_like:
        reference = PREFIX + reference
    checkpoint = read(reference)
    model = deeplab.build_model(**checkpoint['model_args'])
    deeplab.load_weights(model, checkpoint['state_dict'], reference)
    config = checkpoint['config']
    model.class_names = checkpoint['class_names']
    model.mean, model.std = pascal.MEAN, pascal.STD  # the config's, which read_config holds to these
    model.crop_size = config.get('crop_size', EVAL_CROP)  # the canvas of its evaluation protocol
    model.config = config
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------------------------
# Writing: save a checkpoint as a folder, push a folder


def original_format(checkpoint: dict) -> bool:
    """A checkpoint of the original work: its keys carry DataParallel's `module.` prefix and it holds no record
    of this project (the released files are {'epoch', 'state_dict', 'optimizer'})."""
    return ('model_args' not in checkpoint and 'format' not in checkpoint
            and all(k.startswith('module.') for k in checkpoint['state_dict']))


def make_config(checkpoint: dict, model, path: str, metrics: dict | None) -> dict:
    recorded = checkpoint.get('args') or {}
    names = checkpoint.get('class_names') or (metrics or {}).get('class_names')
    if names is None and model.num_classes == len(pascal.VOC_CLASSES):
        names = list(pascal.VOC_CLASSES)
    training = {k: recorded[k] for k in ('dataset', 'data_root', 'epochs', 'batch_size', 'base_lr', 'last_mult',
                                         'crop_size', 'output_stride', 'amp', 'freeze_bn', 'seed') if k in recorded}
    if 'epoch' in checkpoint:
        training['epochs_trained'] = int(checkpoint['epoch'])
    if checkpoint.get('initial_weights'):
        training['initial_weights'] = checkpoint['initial_weights']
    if checkpoint.get('best_miou') is not None:
        training['best_validation_miou'] = checkpoint['best_miou']
    released = original_format(checkpoint)
    if released:
        training.setdefault('dataset', 'pascal')
        training.setdefault('data_root', pascal.DEFAULT_ROOTS['pascal'])
    if training.get('dataset'):
        training['dataset_name'] = describe_dataset(training['dataset'], training.get('data_root'), names)[1]
    return {'format': FORMAT, 'format_version': VERSION, **model.model_args,
            'model': model.name, 'class_names': names,
            'input': {'mean': list(pascal.MEAN), 'std': list(pascal.STD),
                      'note': 'RGB scaled to [0, 1], then (x - mean) / std'},
            'crop_size': EVAL_CROP, 'training': training,
            'source': {'checkpoint': os.path.basename(path), 'sha256': files.sha256_file(path),
                       'original_release': released},
            'evaluation': metrics}


def describe_dataset(dataset: str, data_root: str | None, class_names) -> tuple[str, str]:
    """(Hub dataset id, name) of a dataset as the flags named it: PASCAL VOC 2012 only for VOC itself (its classes, in
    its VOCdevkit folder), Cityscapes for that layout, and any other dataset in VOC's list layout by its folder and
    classes, never as VOC."""
    if dataset == 'cityscapes':
        return 'cityscapes', 'Cityscapes'
    root = data_root or pascal.DEFAULT_ROOTS.get(dataset or 'pascal')
    folder = os.path.basename(os.path.normpath(root)) if root else 'unknown'
    if dataset == 'pascal' and folder.lower() == 'vocdevkit' and list(class_names or []) == list(pascal.VOC_CLASSES):
        return 'pascal-voc-2012', 'PASCAL VOC 2012'
    names = f': {", ".join(class_names[:6])}{", ..." if len(class_names) > 6 else ""}' if class_names else ''
    return 'custom', f'a custom dataset ({folder}/, {len(class_names or [])} classes{names})'


def _shown(value) -> str:
    return few(map(str, value), 4) if isinstance(value, list) else str(value)


def check_metrics(metrics: dict, metrics_path: str, checkpoint: dict, checkpoint_path: str, model) -> None:
    """The evaluation given to a card must be of this model: the same checkpoint file when it names one (its
    sha256), else the same model, backbone, classes, output stride and training dataset; a UserError naming what
    differs otherwise."""
    where = f'--metrics {metrics_path}'
    sha = metrics.get('checkpoint_sha256')
    if sha and sha != files.sha256_file(checkpoint_path):
        raise UserError(f'{where} is the evaluation of another file ({metrics.get("checkpoint")}, sha256 '
                        f'{sha[:12]}...) than --checkpoint {checkpoint_path}: evaluate this checkpoint with main.py '
                        f'--json and give that file.')
    ours = {'model': model.name, 'backbone': model.backbone_name, 'num_classes': model.num_classes,
            'output_stride': model.output_stride, 'class_names': checkpoint.get('class_names'),
            'dataset': checkpoint.get('dataset') or (checkpoint.get('args') or {}).get('dataset')}
    theirs = dict(metrics, output_stride=(metrics.get('protocol') or {}).get('output_stride'))
    for field, value in ours.items():
        if value is not None and theirs.get(field) is not None and theirs[field] != value:
            raise UserError(f'{where} describes another model than --checkpoint {checkpoint_path}: its {field} is '
                            f'{_shown(theirs[field])}, the checkpoint\'s {_shown(value)}. Evaluate this checkpoint '
                            f'with main.py --json and give that file.')
    if not isinstance(metrics.get('precision', 'fp32'), str):
        raise UserError(f'{where} records precision {metrics["precision"]!r}, not a description such as "fp32": give '
                        f'the file main.py --json writes.')


def read_metrics(path: str) -> dict:
    try:
        with open(path, encoding='utf-8') as f:
            metrics = json.load(f)
    except FileNotFoundError:
        raise UserError(f'--metrics {path} does not exist; write it with main.py --json FILE (evaluation).') from None
    except (OSError, ValueError) as e:
        raise UserError(f'--metrics {path} cannot be read as JSON ({e}); give the file of main.py --json.') from None
    if not isinstance(metrics, dict) or not isinstance(metrics.get('mean_iou'), (int, float)):
        raise UserError(f'--metrics {path} holds no mean_iou: give the file main.py --json writes when evaluating.')
    if isinstance(metrics['mean_iou'], bool) or not 0 <= metrics['mean_iou'] <= 100:
        raise UserError(f'--metrics {path} has mean_iou {metrics["mean_iou"]!r}, not a percentage from 0 to 100: '
                        f'give the file main.py --json writes when evaluating.')
    return metrics


def model_card(config: dict, license_: str) -> str:
    """README.md: the Hub's YAML metadata, then what the model is, its training, its evaluation, how to load it."""
    hf = _hub('writing the model card')
    title = {'deeplabv3': 'DeepLabV3', 'deeplabv3plus': 'DeepLabV3+'}[config['model']]
    name = f'{title} {config["backbone"]}'
    training, source, metrics = config['training'], config['source'], config.get('evaluation')
    dataset_id, trained_on = describe_dataset(training.get('dataset'), training.get('data_root'),
                                              config.get('class_names'))
    if metrics:  # the evaluation's own data, as main.py --json recorded it
        dataset_id, evaluated_on = describe_dataset(metrics.get('dataset', training.get('dataset')),
                                                    metrics.get('data_root', training.get('data_root')),
                                                    metrics.get('class_names', config.get('class_names')))
        dataset_name = f'{evaluated_on} {metrics.get("split", "val")}'
    else:
        dataset_name = f'{trained_on} val'
    precision = (metrics or {}).get('precision', 'fp32')
    reported = RELEASED.get(source['checkpoint']) if source['original_release'] else None
    results = []
    if metrics:
        results.append(hf.EvalResult(task_type='image-segmentation', dataset_type=dataset_id,
                                     dataset_name=dataset_name, metric_type='mean_iou',
                                     metric_value=round(metrics['mean_iou'], 2),
                                     metric_name=f'mean IoU (%), {precision}'))
    elif reported is not None:
        results.append(hf.EvalResult(task_type='image-segmentation', dataset_type=dataset_id,
                                     dataset_name=dataset_name, metric_type='mean_iou', metric_value=reported,
                                     metric_name='mean IoU (%), reported by the original work',
                                     source_name='VoVNet-DeepLabV3 README', source_url=ORIGINAL_REPO))
    data = hf.ModelCardData(
        library_name='vovnet-deeplabv3', pipeline_tag='image-segmentation', license=license_,
        tags=['semantic-segmentation', config['model'], config['backbone'], 'pytorch', 'safetensors'],
        datasets=[dataset_id], model_name=name if results else None, eval_results=results or None)
    init = training.get('initial_weights')
    lines = [f'# {name}', '',
             f'{title} with a {config["backbone"]} backbone, output stride {config["output_stride"]}, '
             f'{config["num_classes"]} classes, written by hub.py of VoVNet-DeepLabV3 from `{source["checkpoint"]}` '
             f'(sha256 `{source["sha256"]}`).', '']
    if source['original_release']:
        lines += ['This is a checkpoint of the original work (its keys: DataParallel\'s `module.` prefix, no record '
                  f'of this project), [{ORIGINAL_REPO}]({ORIGINAL_REPO}), converted unchanged.', '']
    lines += ['## Training', '']
    facts = [('dataset', trained_on)] if training.get('dataset') else []
    facts += [(k.replace('_', ' '), training[k]) for k in ('epochs', 'epochs_trained', 'batch_size', 'base_lr',
                                                           'last_mult', 'crop_size', 'amp', 'seed') if k in training]
    if source['original_release']:
        lines += ['The original reports its released runs as: PASCAL VOC 2012 + SBD, 50 epochs, batch 16, base lr '
                  '0.007 (poly), crop 513, from ImageNet weights. The file records only:', '']
    lines += [f'- {k}: {v}' for k, v in facts]
    lines += [f'- initial weights: {imagenet.describe(init)}', '']
    lines += ['## Evaluation', '']
    if metrics:
        protocol = metrics.get('protocol') or {}
        lines += [f'Mean IoU **{metrics["mean_iou"]:.2f}** on {metrics.get("images", "?")} images of '
                  f'{dataset_name}, computed in {precision} (measured by main.py: single scale, each image padded on a '
                  f'{protocol.get("crop_size", EVAL_CROP)}x{protocol.get("crop_size", EVAL_CROP)} canvas'
                  + (f', scales {protocol["scales"]}' if protocol.get('scales') else '')
                  + (', flip' if protocol.get('flip') else '') + ').', '']
        if metrics.get('class_iou'):
            lines += ['| class | IoU (%) |', '|:--|--:|']
            lines += [f'| {c} | {v:.2f} |' for c, v in metrics['class_iou'].items()]
            lines.append('')
    elif reported is not None:
        lines += [f'Mean IoU {reported} on PASCAL VOC 2012 val, **as reported by the original work** (its README), '
                  'not measured by this conversion.', '']
    else:
        lines += ['Not evaluated here (save with `--metrics` from `main.py --json` to add the figures).', '']
        if training.get('best_validation_miou') is not None:
            lines += [f'Best validation mean IoU during training: {training["best_validation_miou"]:.2f}.', '']
    lines += ['## Use', '', '```bash',
              'python predict.py --checkpoint hf://ORG/NAME --input photos/ --output masks/', '```', '', '```python',
              'from deeplab import from_pretrained', 'model = from_pretrained("ORG/NAME")  # eval mode; '
              'model.class_names, model.mean, model.std', '```', '',
              f'Inputs: RGB in [0, 1], normalised with mean {config["input"]["mean"]} and std '
              f'{config["input"]["std"]}; the logits come at the input size.', '']
    return hf.ModelCard.from_template(data, template_str='---\n{{ card_data }}\n---\n\n' + '\n'.join(lines)).content


def save(checkpoint_path: str, output: str, metrics_path: str | None = None, license_: str = 'unknown') -> None:
    """Write the folder of `checkpoint_path` (this project's or the original's) to `output`, all files or none."""
    import deeplab
    _hub('hub.py save (the model card)')
    st = _safetensors('hub.py save')
    if is_reference(checkpoint_path):
        raise UserError(f'{checkpoint_path} is already a published model; copy the folder, or push it.')
    files.check_name_fits(os.path.join(output, WEIGHTS), '--output')
    if os.path.isdir(output) and os.listdir(output):
        raise UserError(f'--output {output} exists and is not empty; give a new folder (nothing was written).')
    files.refuse_overwrite({os.path.join(output, n): '--output' for n in FILES},
                           {checkpoint_path: 'the checkpoint (--checkpoint)', metrics_path: '--metrics'})
    metrics = read_metrics(metrics_path) if metrics_path else None
    checkpoint = checkpoints.load(checkpoint_path)
    model = deeplab.model_from_checkpoint(checkpoint_path)
    if metrics:
        check_metrics(metrics, metrics_path, checkpoint, checkpoint_path, model)
    config = make_config(checkpoint, model, checkpoint_path, metrics)
    card = model_card(config, license_)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with files.staged_folder(output, '--output') as staging:
        files.atomic_write(os.path.join(staging, WEIGHTS), lambda p: st.save_file(state, p, metadata={'format': 'pt'}),
                           '--output', by_path=True)
        files.atomic_write(os.path.join(staging, CONFIG),
                           lambda f: f.write((json.dumps(config, indent=2) + '\n').encode()), '--output')
        files.atomic_write(os.path.join(staging, CARD), lambda f: f.write(card.encode()), '--output')
    log.info('wrote %s (%s, %s, %s)', output, ', '.join(FILES), deeplab.describe(
        model.backbone_name, model.num_classes, model.name), 'with evaluation figures' if metrics else
        'no evaluation figures')
    log.info('publish it with: python hub.py push --folder %s --repo ORG/NAME', output)


def push(folder: str, repo: str, private: bool = False, message: str | None = None) -> str:
    """Upload a folder written by `save` to the Hub model repository `repo` (created if missing); returns its URL."""
    hf = _hub('hub.py push')
    try:
        hf.utils.validate_repo_id(repo)
        if repo.count('/') != 1:
            raise hf.errors.HFValidationError('it must be org/name')
    except hf.errors.HFValidationError as e:
        raise UserError(f'--repo {repo!r} is not a Hub repository name ({e}); write org/name.') from None
    read(folder)  # what is published must load back
    if not os.path.isfile(os.path.join(folder, CARD)):
        raise UserError(f'the model folder {folder} has no {CARD} (the model card); write it with hub.py save.')
    if hf.constants.is_offline_mode():
        raise UserError(f'HF_HUB_OFFLINE is set, so {folder} cannot be uploaded to {repo}: unset it (with a network) '
                        f'and push again.')
    if hf.get_token() is None:
        raise UserError('not logged in to the Hugging Face Hub: run `hf auth login` (or set HF_TOKEN to a token with '
                        'write access), then push again.')
    api = hf.HfApi()
    try:
        api.create_repo(repo, repo_type='model', private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as upload:  # the card's commands name the repository they load from
            for name in (WEIGHTS, CONFIG):
                shutil.copyfile(os.path.join(folder, name), os.path.join(upload, name))
            with open(os.path.join(folder, CARD), encoding='utf-8') as f:
                card = f.read().replace('ORG/NAME', repo)
            with open(os.path.join(upload, CARD), 'w', encoding='utf-8') as f:
                f.write(card)
            commit = api.upload_folder(repo_id=repo, folder_path=upload, allow_patterns=list(FILES),
                                       commit_message=message or f'Upload {os.path.basename(os.path.abspath(folder))} '
                                                                 f'with hub.py')
    except hf.errors.HfHubHTTPError as e:
        raise UserError(f'the Hub refused the upload to {repo}: {errors.first_line(e)} (check the token\'s write '
                        f'access to {repo.split("/")[0]}).') from None
    except network_errors() as e:
        raise UserError(f'could not reach the Hub ({hf.constants.ENDPOINT}) to upload {folder} to {repo} '
                        f'({errors.first_line(e)}): check the network (or HF_ENDPOINT), then push again.') from None
    url = getattr(commit, 'commit_url', None) or f'https://huggingface.co/{repo}'
    log.info('pushed %s to %s; load it with --checkpoint hf://%s', folder, url, repo)
    return url


# ---------------------------------------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)
    s = sub.add_parser('save', help='write the folder of a checkpoint')
    s.add_argument('--checkpoint', required=True, help='a checkpoint of main.py --train, or a released one')
    s.add_argument('--output', required=True, help='the folder to write (new or empty)')
    s.add_argument('--metrics', default=None, metavar='FILE',
                   help='the JSON of an evaluation of this checkpoint (main.py --json FILE), for the model card')
    s.add_argument('--license', default='unknown', help='the license in the model card (default: %(default)s)')
    u = sub.add_parser('push', help='upload a folder written by save')
    u.add_argument('--folder', required=True)
    u.add_argument('--repo', required=True, help='org/name (or user/name) of the Hub model repository')
    u.add_argument('--private', action='store_true', help='create the repository private')
    u.add_argument('--message', default=None, help='the commit message')
    return p


def run(args) -> None:
    if args.command == 'save':
        save(args.checkpoint, args.output, args.metrics, args.license)
    else:
        push(args.folder, args.repo, args.private, args.message)


def cli(argv=None) -> int:
    return errors.run_command(get_args_parser(), run, argv, 'free memory')


if __name__ == '__main__':
    sys.exit(cli())
