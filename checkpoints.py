"""Checkpoints: the original's file names, the format written here (what rebuilds the model and what resumes the
run), reading any checkpoint safely (`weights_only=True`) and checking its tensors, and resuming a run: where it
starts, the optimizer, the random state, the iteration on the new run's schedule."""
import argparse
import collections
import logging
import os
import pickle
import zipfile
from dataclasses import dataclass

import torch

import files
from errors import UserError, first_line
from utils import first_non_finite, plural

log = logging.getLogger(__name__)

FORMAT = 'vovnet-deeplabv3'
VERSION = 1


# ---------------------------------------------------------------------------------------------------------------
# Names: the original's, data/deeplab_{backbone}_{dataset}_v3_{exp}_epoch{N}.pth, with `v3plus` for DeepLabV3+


FILE_TAGS = {'deeplabv3': 'v3', 'deeplabv3plus': 'v3plus'}  # a model's part of the name (deeplab.MODELS)


def run_name(args) -> str:
    tag = FILE_TAGS[getattr(args, 'model', None) or 'deeplabv3']
    return f'deeplab_{args.backbone}_{args.dataset}_{tag}_{args.exp}'


def epoch_path(args, epoch: int) -> str:
    return os.path.join(args.output_dir, f'{run_name(args)}_epoch{epoch}.pth')


def run_file(args, what: str) -> str:
    """The run's `best` or `interrupted` checkpoint, beside the epoch checkpoints."""
    return os.path.join(args.output_dir, f'{run_name(args)}_{what}.pth')


def log_folder(args) -> str:
    return os.path.join(args.output_dir, 'logs', run_name(args))


def add_arguments(parser: argparse.ArgumentParser, backbones, output_strides) -> None:
    """The flags of a script that rebuilds a model from a checkpoint (predict.py, export.py)."""
    parser.add_argument('--checkpoint', required=True, help='a checkpoint of main.py --train, or a released one')
    parser.add_argument('--backbone', default=None, choices=backbones,
                        help='only needed when the checkpoint does not tell (it usually does)')
    parser.add_argument('--output_stride', type=int, default=None, choices=output_strides,
                        help='default: the one the checkpoint was trained with (16 for the released ones)')
    parser.add_argument('--model', default=None, choices=tuple(FILE_TAGS),
                        help='default: the checkpoint\'s (DeepLabV3 for the released ones); when given, it must '
                             'agree with it')


# ---------------------------------------------------------------------------------------------------------------
# Reading and checking


def strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict without the `module.` (DataParallel/DDP) or `_orig_mod.` (torch.compile) key prefix."""
    state_dict = collections.OrderedDict(state_dict)
    for prefix in ('module.', '_orig_mod.'):
        torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(state_dict, prefix)
    return state_dict


def load(path: str, what: str = 'checkpoint') -> dict:
    """Read a checkpoint safely (`weights_only=True`, on the CPU) and return a dict with a 'state_dict'.

    Accepts a released checkpoint ({'epoch', 'state_dict', 'optimizer'}), this project's checkpoints, a bare
    state dict, or {'model': state_dict}. Anything else is a UserError that says what the file holds.
    """
    if os.path.isdir(path):
        raise UserError(f'{what} {path} is a folder; give the .pth file in it (or a folder written by hub.py save, '
                        f'which holds config.json).')
    if not os.path.isfile(path):
        raise UserError(f'{what} {path} does not exist.')
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if 'Unsupported global' in str(e) or 'can still be loaded' in str(e):  # a class or function to import
            raise UserError(f'{what} {path} holds Python objects that could only be loaded by running code from '
                            f'the file, which this project never does (it loads with weights_only=True). '
                            f'If you trust the file, re-save just its tensors: '
                            f'torch.save(torch.load(path, weights_only=False)["state_dict"], new_path).') from None
        raise UserError(f'{what} {path} is not a PyTorch file (its contents do not unpickle): it may be another '
                        f'kind of file, or truncated; download or copy it again.') from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, IndexError, KeyError) as e:
        raise UserError(f'{what} {path} is truncated or not a PyTorch checkpoint ({first_line(e)}); '
                        f'download or copy it again.') from None
    if isinstance(obj, dict) and isinstance(obj.get('state_dict'), dict):
        check_model_args(obj.get('model_args'), f'{what} {path}')
        check_record(obj, f'{what} {path}')
        return obj
    if isinstance(obj, dict) and isinstance(obj.get('model'), dict):
        return {**obj, 'state_dict': obj['model']}
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {'state_dict': obj}
    kind = f'a dict with keys {sorted(obj)[:5]}' if isinstance(obj, dict) else f'a {type(obj).__name__}'
    raise UserError(f'{what} {path} holds {kind}, not model weights; give a checkpoint written by main.py '
                    f'--train, a released checkpoint, or a saved state dict.')


MODEL_ARGS = dict(model=(str,), backbone=(str,), num_classes=(int,), output_stride=(int,), num_groups=(int, type(None)),
                  weight_std=(bool,), beta=(bool,))  # what deeplab.build_model is rebuilt from, and their types
# Masks and predictions are 8-bit PNGs in which 255 marks the pixels to ignore: classes 0..254.
MAX_CLASSES = 255
OUTPUT_STRIDES = (8, 16)


def _kind(value) -> str:
    return {bool: 'true/false', int: 'a whole number', float: 'a number', str: 'a string', list: 'a list',
            dict: 'an object', type(None): 'null'}.get(type(value), type(value).__name__)


def model_args_problem(model_args) -> str | None:
    """What is wrong with recorded model arguments, as `field=value: what it must be`; None when nothing is. Every
    field build_model is rebuilt from is checked for its type and range here, for every kind of file."""
    if not isinstance(model_args, dict):
        return f'model_args={model_args!r}: {_kind(model_args)}, not a set of named fields'
    for key, value in model_args.items():
        if key not in MODEL_ARGS:
            return f'{key}={value!r}: a field that no model of this project takes'
        types = MODEL_ARGS[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            wanted = ' or '.join(_kind(t()) if t is not type(None) else 'null' for t in types)
            return f'{key}={value!r}: {_kind(value)}, where it must be {wanted}'
    checks = {'model': (lambda v: v in FILE_TAGS, f'one of {", ".join(FILE_TAGS)}'),
              'num_classes': (lambda v: 1 <= v <= MAX_CLASSES, f'from 1 to {MAX_CLASSES} (8-bit masks, 255 ignored)'),
              'output_stride': (lambda v: v in OUTPUT_STRIDES, ' or '.join(map(str, OUTPUT_STRIDES))),
              'num_groups': (lambda v: v is None or v >= 1, 'a positive number of GroupNorm groups, or null')}
    for key, (ok, wanted) in checks.items():
        if key in model_args and not ok(model_args[key]):
            return f'{key}={model_args[key]!r}: it must be {wanted}'
    return None


def check_model_args(model_args, source: str) -> None:
    """The recorded model arguments, when there are any, must be ones build_model takes, of their types and
    ranges: a UserError naming the file and the field otherwise."""
    if model_args is None:
        return
    problem = model_args_problem(model_args)
    if problem is not None:
        raise UserError(f'{source} records a model this project cannot build ({problem}): the file is damaged or '
                        f'was written by another program. Use another copy of it.')


# The fields of this project's checkpoints besides the weights and the optimizer: (types, check, what it must be).
_COUNT = ((int,), lambda v: v >= 0, 'a whole number, 0 or more')
RECORD_FIELDS = {
    'version': ((int,), lambda v: 1 <= v <= VERSION, f'a format version this code reads (1 to {VERSION}): a newer one '
                                                     f'needs a newer copy of this repository (git pull)'),
    'epoch': _COUNT, 'iteration': _COUNT, 'batches_per_epoch': _COUNT, 'seed': _COUNT,
    'best_miou': ((int, float, type(None)), lambda v: v is None or 0 <= v <= 100, 'a mean IoU from 0 to 100, or null'),
    'class_names': ((list,), lambda v: all(isinstance(n, str) and n for n in v), 'a list of names (strings)'),
    'dataset': ((str,), lambda v: True, 'a string'),
    'initial_weights': ((dict, type(None)), lambda v: True, 'a record of where the weights started, or null'),
}


def check_record(checkpoint: dict, source: str) -> None:
    """The fields a checkpoint of this project records besides its weights, each of its type and range, and as
    many class names as its model has classes: a UserError naming the file and the field otherwise."""
    for key, (types, ok, wanted) in RECORD_FIELDS.items():
        if key not in checkpoint:
            continue
        value = checkpoint[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types) or not ok(value):
            raise UserError(f'{source} records {key} = {value!r}, where it must be {wanted}. The file is damaged or '
                            f'was written by another program; use another copy of it.')
    classes = (checkpoint.get('model_args') or {}).get('num_classes')
    names = checkpoint.get('class_names')
    if classes is not None and names is not None and len(names) != classes:
        raise UserError(f'{source} records {len(names)} class names for its {classes} classes: the file is damaged '
                        f'or was written by another program; use another copy of it.')


def check_weights(state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights that cannot be a trained model's, naming the file and the first such tensor: NaN or
    infinite values (a model built from them predicts nothing useful, and an evaluation would print a near-zero
    mean IoU without a word), parameters and statistics that are not floating point (an integer or complex
    tensor would be cast without a word), negative BatchNorm variances (NaN logits), and counters
    (`num_batches_tracked`) that are not whole non-negative numbers."""
    bad = first_non_finite(state_dict)
    if bad is not None:
        raise UserError(f'{source} has non-finite values (NaN or infinity) in {bad}: it was written by a run that '
                        f'diverged, or is damaged. Use an earlier checkpoint, or download or copy it again.')
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise UserError(f'{source} holds {type(tensor).__name__} at {name}, not a tensor: it is not a state '
                            f'dict of weights, or is damaged. Use another file.')
        if name.endswith('num_batches_tracked'):
            if tensor.is_complex() or tensor.dtype == torch.bool or (tensor < 0).any() or (
                    tensor.is_floating_point() and (tensor != tensor.round()).any()):
                raise UserError(f'{source} has {name} = {tensor.flatten()[:3].tolist()}, not a count of batches (a '
                                f'whole number, 0 or more): the file is damaged or was not written by PyTorch. '
                                f'Use another copy of it.')
        elif not tensor.is_floating_point():
            raise UserError(f'{source} stores {name} as {str(tensor.dtype).removeprefix("torch.")}, where weights and '
                            f'statistics are floating point: the file is damaged or not a model\'s weights. Use '
                            f'another copy of it.')
        elif name.endswith('running_var') and (tensor < 0).any():
            raise UserError(f'{source} has negative variances in {name} (smallest {tensor.min().item():.4g}): '
                            f'BatchNorm would turn them into NaN. The file is damaged; use another copy of it.')


def save(checkpoint: dict, path: str) -> None:
    files.atomic_write(path, lambda f: torch.save(checkpoint, f), flag='--output_dir',
                       keeps='Any earlier checkpoint there is unchanged')


# ---------------------------------------------------------------------------------------------------------------
# A training run's state, written into its checkpoints


@dataclass
class TrainState:
    epoch: int = 0  # completed epochs
    iteration: int = 0  # completed iterations over all epochs
    batches_per_epoch: int = 0
    seed: int = 0
    best_miou: float | None = None
    last_checkpoint: str | None = None
    initial_weights: dict | None = None  # where the run's weights started (imagenet.describe)


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


def make(state: TrainState, model, optimizer, scaler, args, class_names, device: torch.device) -> dict:
    """The checkpoint of a run: what rebuilds the model (`model_args`), what resumes the run, how it started."""
    return {
        'format': FORMAT, 'version': VERSION,
        'epoch': state.epoch, 'iteration': state.iteration, 'batches_per_epoch': state.batches_per_epoch,
        'seed': state.seed, 'best_miou': state.best_miou,
        'state_dict': model.state_dict(), 'optimizer': optimizer.state_dict(),
        'scaler': scaler.state_dict() if scaler.is_enabled() else None,
        'model_args': dict(model.model_args), 'initial_weights': state.initial_weights,
        'dataset': args.dataset, 'class_names': list(class_names), 'rng': rng_state(device),
        'args': {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))},
    }


def start_state(args, resume: dict | None, draw_seed) -> TrainState:
    """Where the run starts: from scratch (its seed `--seed`, or `draw_seed()`), or where the resumed checkpoint
    left (its epoch, iteration, seed, best validation, initial weights)."""
    state = TrainState(last_checkpoint=args.resume)
    if resume is not None and 'iteration' in resume:
        state.epoch, state.iteration, state.seed = resume['epoch'], resume['iteration'], resume['seed']
        state.best_miou = resume.get('best_miou')
        state.initial_weights = resume.get('initial_weights')
        if args.seed is not None and args.seed != state.seed:
            log.warning('--seed %d differs from the resumed run\'s seed %d; keeping %d so the schedule continues '
                        'as it was', args.seed, state.seed, state.seed)
    else:
        state.seed = args.seed if args.seed is not None else draw_seed()
        if resume is not None:  # a released checkpoint: only the epoch is known
            state.epoch = int(resume.get('epoch', 0))
    if state.epoch >= args.epochs:
        raise UserError(f'{args.resume} has already trained {plural(state.epoch, "epoch")}; ask for more '
                        f'with --epochs.')
    return state


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
    raise UserError(f'{path} ({plural(state.iteration, "iteration")} in {plural(state.epoch, "epoch")}) '
                    f'was trained with another number of batches per epoch than this run\'s {iterations}. {advice}.')
