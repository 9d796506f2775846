"""Files written safely: through a temporary file and a rename (never half-written), in staging folders that
publish all or nothing, never over an input of the same command nor twice under one name in a run, and each
failed write a message naming the file, the cause and the flag that writes elsewhere."""
import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from errors import UserError, first_line

log = logging.getLogger(__name__)


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


@contextlib.contextmanager
def output_folder(path: str, flag: str):
    """`make_output_folder` for the duration of a command: if the command fails, the folders it created are
    removed again while they are empty, so a refused or failed run leaves no empty output folder behind."""
    created, folder = [], os.path.abspath(path)
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        created.append(folder)
        folder = os.path.dirname(folder)
    make_output_folder(path, flag)
    try:
        yield
    except BaseException:
        for folder in created:  # the deepest first; one that holds files stays, with the folders above it
            try:
                os.rmdir(folder)
            except OSError:
                break
        raise


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


def inputs_of(path: str | None, what: str) -> dict[str, str]:
    """An input for `refuse_overwrite`: a file, or each file of a folder (a published model's config.json and
    weights); nothing for None or a name that is no local path (hf://...)."""
    if not path or not os.path.exists(path):
        return {}
    if os.path.isdir(path):
        return {os.path.join(path, name): f'{what} ({name})' for name in os.listdir(path)
                if os.path.isfile(os.path.join(path, name))}
    return {path: what}


def refuse_overwrite(outputs, inputs: dict[str, str]) -> None:
    """Refuse, before any work, to write over an input of the same command, or twice to one file in the run: an
    output path that is an input file, or another output, by name or through a link. `outputs` maps each path to
    the option that places it (a dict, or (path, option) pairs where two options may name one path), `inputs` each
    input path to what it is ('--checkpoint', 'an input image', ...)."""
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
    pairs = list(outputs.items()) if isinstance(outputs, dict) else list(outputs)
    written = {}
    for path, flag in pairs:
        for identity in identities(path):
            if identity in known:
                source, what = known[identity]
                same = '' if os.path.abspath(source) == os.path.abspath(path) else f' ({source})'
                raise UserError(f'this command would write {path}, which is {what}{same}: an output must not '
                                f'overwrite an input. Choose another {flag}; nothing was written.')
            if identity in written and written[identity][0] != path:
                first, other = written[identity]
                raise UserError(f'this command would write {path} ({flag}) where it also writes {first} ({other}): '
                                f'one output would replace the other. Choose another {flag}; nothing was written.')
            if identity in written and written[identity][1] != flag:
                raise UserError(f'this command would write {path} twice, as {written[identity][1]} and as {flag}: '
                                f'one output would replace the other. Choose another {flag}; nothing was written.')
            written.setdefault(identity, (path, flag))


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


@contextlib.contextmanager
def staged_files(paths: list[str], flag: str):
    """Temporary paths beside `paths` to write them at; all renamed into place when the block succeeds, all
    removed when it fails (or is stopped), so that an export leaves every file it writes or none."""
    staged = {}
    for path in paths:
        folder, name = os.path.split(os.path.abspath(path))
        staged[path] = os.path.join(folder, f'.{name[:64]}.{os.getpid()}.partial{os.path.splitext(name)[1]}')
    placed = []
    try:
        yield staged
        for path, tmp in staged.items():
            os.replace(tmp, path)
            placed.append(path)
    except BaseException as e:
        for path in placed:  # all or none
            with contextlib.suppress(OSError):
                os.unlink(path)
        if isinstance(e, OSError):
            raise write_error(paths[0], e, flag) from None
        raise
    finally:
        for tmp in staged.values():
            with contextlib.suppress(OSError):
                os.unlink(tmp)


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


def _thread_excepthook(args) -> None:
    """TensorBoard's writer thread re-raises a failed write (full disk) in the main thread, which reports it as a
    message (MetricsWriter); print nothing for it here, where Python would print the thread's traceback."""
    if isinstance(args.exc_value, OSError) and type(args.thread).__name__ == '_AsyncWriterThread':
        return
    threading.__excepthook__(args)


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
        threading.excepthook = _thread_excepthook
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
