"""Helpers every script shares, in five sections: errors and command lines; files (safe reading, atomic writing,
outputs that must not overwrite inputs); metrics (the confusion matrix, class maps, the VOC palette); processes
(torchrun's environment, the process group, signals); logging and progress. What only the data pipeline uses is
in pascal.py, the optimizer's beside it in main.py, running a model in inference.py."""
import argparse
import collections
import contextlib
import errno
import hashlib
import io
import json
import logging
import math
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

IGNORE_INDEX = 255
log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Errors, exit status and command lines


class UserError(Exception):
    """A failure the user can fix (a missing file, a bad flag): printed as one message, no traceback."""

    def for_user(self) -> str:
        text = str(self)
        # Raised in a DataLoader worker, the error comes back re-created with the worker's traceback in front;
        # the user needs only the message, which is what follows the last "UserError: ".
        marker = f'{type(self).__name__}: '
        if text.startswith('Caught ') and marker in text:
            text = text[text.rindex(marker) + len(marker):].strip()
        return text


class Interrupted(Exception):
    """A run stopped on request (SIGINT, SIGTERM) after saving its state; the message says how to resume."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def exit_status(run: Callable[[], object]) -> int:
    """Call `run()` and return the process's exit status: 0, or after a failure the user can fix or an interruption,
    one message on stderr (from rank 0) and 1 or 128 + the signal, instead of a traceback."""
    try:
        run()
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


def _reports() -> bool:
    """Whether this process prints the failure: rank 0, or any process when the environment cannot tell."""
    try:
        return dist_info().is_main
    except UserError:
        return True


def run_command(parser, run: Callable, argv=None) -> int:
    """A script's command line: parse, log to stdout, run; its exit status as `exit_status` gives it."""
    args = parser.parse_args(argv)
    setup_logging()
    return exit_status(lambda: run(args))


def number(kind: type, minimum, inclusive: bool = True, maximum=None) -> Callable:
    """An argparse type: a finite `kind` (int or float) of at least `minimum` (above it when not `inclusive`) and
    at most `maximum`, so that a bad value is argparse's one-line message rather than a failure later on."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f'must be a finite number, not {text}')
        if value < minimum or (not inclusive and value == minimum):
            bound = f'at least {minimum}' if inclusive else f'greater than {minimum}'
            raise argparse.ArgumentTypeError(f'must be {bound}, not {text}')
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f'must be at most {maximum}, not {text}')
        return value
    return parse


EXTRAS = 'requirements-extras.txt'  # the optional libraries: pytorchcv, timm


def require(module: str, purpose: str):
    """Import an optional library, or a one-line UserError naming what needs it and the pip install."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f'{purpose} needs {module}, which is not installed: pip install {module} '
                        f'(or pip install -r {EXTRAS}).') from None


def out_of_memory(e: BaseException) -> bool:
    """Whether an exception is an allocation that failed: CUDA's OutOfMemoryError, the CPU allocator's
    "can't allocate memory" RuntimeError, or Python's MemoryError."""
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or 'out of memory' in text)


def first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]


def few(items, n: int = 3) -> str:
    """'(a, b, c, ...)': the first `n` of a list, for messages."""
    items = list(items)
    return '(' + ', '.join(items[:n]) + (', ...' if len(items) > n else '') + ')'


def short_error(e: Exception) -> str:
    """The informative lines of load_state_dict's error, shortened."""
    lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
    text = '; '.join(lines[:3]) or str(e).strip()
    return text if len(text) <= 300 else text[:297] + '...'



# ---------------------------------------------------------------------------------------------------------------
# Files: safe reading, atomic writing, outputs that must not overwrite inputs


def strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict without the `module.` (DataParallel/DDP) or `_orig_mod.` (torch.compile) key prefix."""
    state_dict = collections.OrderedDict(state_dict)
    for prefix in ('module.', '_orig_mod.'):
        torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(state_dict, prefix)
    return state_dict


def load_checkpoint(path: str, what: str = 'checkpoint') -> dict:
    """Read a checkpoint safely (`weights_only=True`, on the CPU) and return a dict with a 'state_dict'.

    Accepts a released checkpoint ({'epoch', 'state_dict', 'optimizer'}), this project's checkpoints, a bare
    state dict, or {'model': state_dict}. Anything else is a UserError that says what the file holds.
    """
    if os.path.isdir(path):
        raise UserError(f'{what} {path} is a folder; give the .pth file in it.')
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
        return obj
    if isinstance(obj, dict) and isinstance(obj.get('model'), dict):
        return {**obj, 'state_dict': obj['model']}
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {'state_dict': obj}
    kind = f'a dict with keys {sorted(obj)[:5]}' if isinstance(obj, dict) else f'a {type(obj).__name__}'
    raise UserError(f'{what} {path} holds {kind}, not model weights; give a checkpoint written by main.py '
                    f'--train, a released checkpoint, or a saved state dict.')


def first_non_finite(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, or None."""
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return name
    return None


def check_finite(state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights with NaN or infinite values, naming the file and the first such tensor: a model built
    from them predicts nothing useful, and an evaluation would print a near-zero mean IoU without a word."""
    bad = first_non_finite(state_dict)
    if bad is not None:
        raise UserError(f'{source} has non-finite values (NaN or infinity) in {bad}: it was written by a run that '
                        f'diverged, or is damaged. Use an earlier checkpoint, or download or copy it again.')


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


# What to do when a write fails, by errno.
_WRITE_ADVICE = {
    errno.ENOSPC: 'Free some space, or write elsewhere', errno.EDQUOT: 'Free some space (quota), or write elsewhere',
    errno.EFBIG: 'It is larger than this process may write (ulimit -f): raise the limit, or write elsewhere',
    errno.EROFS: 'The file system is read-only: write elsewhere',
    errno.EACCES: 'Fix the permissions, or write elsewhere', errno.EPERM: 'Fix the permissions, or write elsewhere',
    errno.ENAMETOOLONG: 'The name is too long for the file system: choose a shorter one',
    errno.ENOTDIR: 'A part of the path is a file, not a folder: write elsewhere',
    errno.EEXIST: 'The path is a file, not a folder: write elsewhere', errno.EISDIR: 'The path is a folder, not a file',
}


def os_error_in(e: BaseException) -> OSError | None:
    """The OSError behind an exception: itself, or the one it was raised from or while handling (torch.save reports
    a failed write as a RuntimeError 'unexpected pos', with the OSError as its context)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def write_error(path: str, e: BaseException, flag: str | None = None, keeps: str | None = None,
                subject: str | None = None) -> UserError:
    """The message for a file or folder that could not be written: which, why, and what to do (free space, or
    write elsewhere with `flag`); `keeps` says what is unharmed (an earlier checkpoint)."""
    os_error = os_error_in(e) or e
    cause = getattr(os_error, 'strerror', None) or first_line(os_error)
    advice = _WRITE_ADVICE.get(getattr(os_error, 'errno', None), 'Check the folder, or write elsewhere')
    return UserError(f'{subject or f"could not write {path}"}: {cause}. {advice}' + (f' ({flag})' if flag else '')
                     + '.' + (f' {keeps}.' if keeps else ''))


def atomic_write(path: str, write: Callable, flag: str | None = None, keeps: str | None = None,
                 by_path: bool = False) -> None:
    """Write `path` through a temporary file in the same folder (flush, fsync, rename), so that a crash or a
    full disk leaves either the old file or the new one, never a partial one, nor the temporary file. `write`
    gets the open temporary file, or with `by_path` its path (for libraries that save to a path). A failed
    write (full disk, read-only or missing folder, name too long, file-size limit) is a UserError naming the file,
    the cause and `flag`, the option that chooses another place."""
    folder = os.path.dirname(os.path.abspath(path))
    # A short temporary name: a file name near the file system's limit must not fail for its temporary's sake.
    tmp = os.path.join(folder, f'.{os.path.basename(path)[:64]}.{os.getpid()}.tmp')
    try:
        os.makedirs(folder, exist_ok=True)
        if by_path:
            write(tmp)
        with open(tmp, 'r+b' if by_path else 'wb') as f:
            if not by_path:
                write(f)
                f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, Exception) and not isinstance(e, UserError) and os_error_in(e) is not None:
            raise write_error(path, e, flag, keeps) from None
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def make_output_folder(path: str, flag: str) -> None:
    """Create an output folder and check that it takes files, so that one that cannot be written is a message
    before any work is done rather than a traceback after it."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise write_error(path, e, flag, subject=f'cannot write to the output folder {path}') from None


def check_name_fits(path: str, flag: str) -> None:
    """Refuse up front a file name longer than its file system allows (255 bytes on most), which would otherwise
    fail only when the file is written, after the work."""
    folder = os.path.dirname(os.path.abspath(path)) or '.'
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        limit = os.pathconf(folder, 'PC_NAME_MAX')
    except (OSError, ValueError):
        limit = 255
    for part in os.path.abspath(path).split(os.sep):
        if len(os.fsencode(part)) > limit:
            raise UserError(f'{path[:80]}... cannot be written: the name {part[:40]}... is too long, '
                            f'{len(os.fsencode(part))} bytes where the file system allows {limit}. Choose a shorter '
                            f'{flag}.')


def refuse_overwrite(outputs: dict[str, str], inputs: dict[str, str]) -> None:
    """Refuse, before any work, to write over an input of the same command: an output path that is an input file,
    by name or through a link. `outputs` maps each path to the option that places it, `inputs` each input path to
    what it is ('--checkpoint', 'an input image', ...)."""
    def identities(path):
        ids = {('path', os.path.realpath(path))}
        with contextlib.suppress(OSError):
            st = os.stat(path)
            ids.add(('inode', st.st_dev, st.st_ino))
        return ids

    known = {}
    for path, what in inputs.items():
        if path:
            for identity in identities(path):
                known.setdefault(identity, (path, what))
    for path, flag in outputs.items():
        for identity in identities(path):
            if identity in known:
                source, what = known[identity]
                same = '' if os.path.abspath(source) == os.path.abspath(path) else f' ({source})'
                raise UserError(f'this command would write {path}, which is {what}{same}: an output must not '
                                f'overwrite an input. Choose another {flag}; nothing was written.')


@contextlib.contextmanager
def staged_folder(final: str, flag: str | None = None):
    """Yield a private staging folder beside `final`; on success its files move into `final`, on failure (or a
    stop) they are deleted with it, so a failed or interrupted run leaves no partial set of outputs and no
    staging folder."""
    parent, name = os.path.split(os.path.abspath(final))
    staging = os.path.join(parent, f'.{name}.partial-{os.getpid()}')
    try:
        os.makedirs(staging, exist_ok=True)
    except OSError as e:
        raise write_error(final, e, flag) from None
    try:
        yield staging
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, UserError) and staging in str(e):  # name the file the user asked for, not its stand-in
            raise UserError(str(e).replace(staging, os.path.abspath(final))) from None
        raise
    try:  # publish
        os.makedirs(final, exist_ok=True)
        for entry in os.listdir(staging):
            os.replace(os.path.join(staging, entry), os.path.join(final, entry))
        os.rmdir(staging)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise write_error(final, e, flag) from None


def save_checkpoint(checkpoint: dict, path: str) -> None:
    atomic_write(path, lambda f: torch.save(checkpoint, f), flag='--output_dir',
                 keeps='Any earlier checkpoint there is unchanged')


def save_image(image, path: str, flag: str | None = None) -> None:
    """Save a PIL image atomically, in the format its extension names. It is encoded in memory first: given a
    real file, Pillow's JPEG encoder writes to its descriptor from C and ignores a failed write (seen on a full
    disk: a truncated JPEG, saved without an error); writing the bytes through Python raises as it should."""
    fmt = os.path.splitext(path)[1].lstrip('.').upper().replace('JPG', 'JPEG') or 'PNG'
    encoded = io.BytesIO()
    image.save(encoded, format=fmt)
    atomic_write(path, lambda f: f.write(encoded.getbuffer()), flag)


def save_mask(pred, path: str, palette: list[int], flag: str | None = None) -> None:
    """Save a class map (tensor or array of class indices) atomically as a palettised PNG."""
    if isinstance(pred, torch.Tensor):
        pred = pred.cpu().numpy()
    image = Image.fromarray(pred.astype(np.uint8), 'P')
    image.putpalette(palette)
    save_image(image, path, flag)



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
    a dimension other than the last runs 4x slower (24 ms vs 6 ms for VOC's 21 x 375 x 500 on 2 cores, most of
    the evaluation's time outside the model).
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
# Processes: torchrun's environment, the process group, signals


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


class GracefulStop:
    """Turns the first SIGINT/SIGTERM into a request that a loop polls between its steps (training iterations,
    evaluated or predicted images); a later one acts as usual (stops at once), or with `repeat_raises` raises
    Interrupted at once, so that the caller's cleanup (a staging folder) still runs.

    The same signal again within `repeat_window` seconds counts as the first one delivered twice: a Ctrl-C in the
    terminal reaches every process of torchrun's group, and torchrun forwards it to its workers once more (a
    cluster scheduler's SIGTERM does the same), which would otherwise stop them before they save anything.
    """

    def __init__(self, repeat_window: float = 2.0, repeat_raises: bool = False):
        self.signal: int | None = None
        self.repeat_window = repeat_window
        self.repeat_raises = repeat_raises
        self._first = 0.0
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.signal is None:
            self.signal, self._first = signum, now
            return
        if signum == self.signal and now - self._first < self.repeat_window:
            return
        if self.repeat_raises:
            raise Interrupted(signum, f'stopped at once by a second signal {signum}; nothing was published')
        previous = self._previous.get(signum, signal.SIG_DFL)
        signal.signal(signum, previous)
        if callable(previous):  # Python's SIGINT handler: KeyboardInterrupt
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), signum)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    @property
    def requested(self) -> bool:
        return self.signal is not None



# ---------------------------------------------------------------------------------------------------------------
# Logging and progress


PROJECT_LOGGERS = ('main', 'deeplab', 'imagenet', 'vovnet', 'pascal', 'utils', 'plots', 'predict', 'export',
                   'benchmark', 'demo')


def _thread_excepthook(args) -> None:
    """TensorBoard's writer thread re-raises a failed write (full disk) in the main thread, which reports it as a
    message (MetricsWriter); print nothing for it here, where Python would print the thread's traceback."""
    if isinstance(args.exc_value, OSError) and type(args.thread).__name__ == '_AsyncWriterThread':
        return
    threading.__excepthook__(args)


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
    threading.excepthook = _thread_excepthook
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


class MetricsWriter:
    """Metrics as JSON lines (`metrics.jsonl`) and, when `tensorboard` is installed, TensorBoard event files, in
    one folder; a no-op in processes other than the main one. A write that fails (full disk) is a UserError naming
    the file; the log keeps only whole lines."""

    def __init__(self, folder: str, enabled: bool = True, resume: bool = False):
        self.enabled = enabled
        self.folder = folder
        self.path = os.path.join(folder, 'metrics.jsonl')
        self.tensorboard = None
        if not enabled:
            return
        try:
            os.makedirs(folder, exist_ok=True)
            if not resume and os.path.exists(self.path):
                os.replace(self.path, self.path + '.previous')
        except OSError as e:
            raise write_error(folder, e, '--output_dir') from None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.info('TensorBoard is not installed, so no event files are written (pip install tensorboard); '
                     'the metrics are in %s', self.path)
            return
        try:
            self.tensorboard = SummaryWriter(folder)
        except OSError as e:
            raise write_error(f'the TensorBoard event file in {folder}', e, '--output_dir') from None

    def write(self, step: int, **values) -> None:
        if not self.enabled:
            return
        line = memoryview((json.dumps({'iteration': step, **values}) + '\n').encode())
        # Unbuffered: a buffered file's truncate() flushes first, fails again on the bytes a full disk refused,
        # and leaves the half line (seen with a file-size limit).
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise write_error(self.path, e, '--output_dir') from None
        try:
            start = os.fstat(fd).st_size
            while line:
                line = line[os.write(fd, line):]
        except OSError as e:
            with contextlib.suppress(OSError):  # no half line for the curves to trip on
                os.ftruncate(fd, start)
            raise write_error(self.path, e, '--output_dir') from None
        finally:
            os.close(fd)
        if self.tensorboard is not None:
            try:
                for key, value in values.items():
                    if isinstance(value, (int, float)) and key not in ('epoch', 'time'):
                        self.tensorboard.add_scalar(key, value, step)
            except OSError as e:
                self.close()
                raise write_error(f'the TensorBoard event file in {self.folder}', e, '--output_dir') from None

    def close(self) -> None:
        """Close the TensorBoard writer; a failure to flush its last events (full disk) is a warning here, since
        this runs at the end of training, also after another failure that the user must see."""
        if self.tensorboard is not None:
            writer, self.tensorboard = self.tensorboard, None
            try:
                writer.close()
            except OSError as e:
                log.warning('the last TensorBoard events in %s could not be written: %s', self.folder,
                            e.strerror or e)
