"""Failures as the user sees them: one message naming what was wrong and what to do, and an exit status, never a
traceback. The scripts translate out-of-memory, worker deaths, signals and library errors here, at their edges;
the ML code (engine.py, deeplab.py) raises plain or typed exceptions and holds no message prose."""
import argparse
import contextlib
import importlib
import math
import os
import signal
import time
from collections.abc import Callable

import torch

EXTRAS = 'requirements-extras.txt'  # the optional libraries: pytorchcv, timm, huggingface_hub, torchao


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


# ---------------------------------------------------------------------------------------------------------------
# Exit statuses and command lines


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


def require(module: str, purpose: str, package: str | None = None):
    """Import an optional library, or a one-line UserError naming what needs it and the pip install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f'{purpose} needs {module}, which is not installed: pip install {package or module} '
                        f'(or pip install -r {EXTRAS}).') from None


# ---------------------------------------------------------------------------------------------------------------
# Describing exceptions


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
# Translations, used where a script runs its loops


def available_memory(device: torch.device) -> int | None:
    """Bytes this process could still allocate in the CPU's memory: the kernel's MemAvailable, within the
    container's limit. None where an allocation too large fails with an exception instead of a kill, which the
    scripts turn into their own messages: on CUDA, and under an address-space limit (RLIMIT_AS); and where it
    cannot be told."""
    if device.type != 'cpu':
        return None
    import resource
    if resource.getrlimit(resource.RLIMIT_AS)[0] != resource.RLIM_INFINITY:
        return None
    values = []
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open('/proc/meminfo') as f:
            values.append(int(next(line for line in f if line.startswith('MemAvailable:')).split()[1]) * 1024)
    with contextlib.suppress(OSError, ValueError):
        with open('/sys/fs/cgroup/memory.max') as f, open('/sys/fs/cgroup/memory.current') as g:
            values.append(int(f.read()) - int(g.read()))  # "max" (no limit) is a ValueError
    return min(values) if values else None


def refuse_if_huge(needed: float, device: torch.device, what: str, flags: str) -> None:
    """Refuse work whose memory, estimated from the flags, is beyond twice what `device` has free: on Linux such
    allocations are granted and the process is killed when it uses them, without a word. The margin keeps rough
    estimates from refusing what would fit."""
    available = available_memory(device)
    if available is not None and needed > 2 * available:
        raise UserError(f'{what} would need about {needed / 2 ** 30:,.0f} GB of memory, and this machine has '
                        f'{available / 2 ** 30:,.1f} GB free: lower {flags}.')


@contextlib.contextmanager
def out_of_memory_is(message: Callable[[BaseException], str]):
    """An allocation that fails inside the block becomes a UserError with `message(e)`; the rest passes."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        if not out_of_memory(e):
            raise
        raise UserError(message(e)) from None


def raise_for_loader(e: BaseException, iterator, out_of_memory_advice: str) -> None:
    """The message for a batch a DataLoader could not deliver: memory that ran out (in this process or a worker),
    or a worker that died; other exceptions pass."""
    if out_of_memory(e):
        raise UserError(f'out of memory preparing a batch ({first_line(e)}): {out_of_memory_advice}.') from None
    raise_if_worker_died(e, iterator)


def worker_died(e: BaseException) -> bool:
    """Whether `e` is PyTorch's report of a data-loading worker's death ("DataLoader worker (pid ...) exited
    unexpectedly", "... is killed by signal", raised by the loader or its SIGCHLD handler), not an exception the
    worker raised ("Caught ... in DataLoader worker process")."""
    return isinstance(e, RuntimeError) and 'DataLoader worker (pid' in str(e)


def raise_if_worker_died(e: BaseException, iterator=None) -> None:
    """Turn PyTorch's "DataLoader worker (pid ...) exited unexpectedly" into a message with the cause: the signal or
    status the worker ended with (`iterator`, the loader's, knows its workers)."""
    if not worker_died(e):
        return
    text = str(e)
    causes = []
    for worker in getattr(iterator, '_workers', []):
        code = worker.exitcode
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            causes.append(f'worker pid {worker.pid} was killed by {name}'
                          + (' (Killed: usually the out-of-memory killer)' if name == 'SIGKILL' else ''))
        elif code:
            causes.append(f'worker pid {worker.pid} exited with status {code}')
    cause = '; '.join(causes) or text.strip().splitlines()[0]
    raise UserError(f'a data-loading worker died ({cause}). This usually means it ran out of memory, or of shared '
                    f'memory (/dev/shm) in a container: lower --workers or --batch_size, or load in the main process '
                    f'with --workers 0.') from None


class Stopped(Exception):
    """Work ended because a stop (SIGINT, SIGTERM) was requested: raised between steps, or in place of what the
    signal broke (a batch the loader's workers, killed by it too, could not deliver)."""


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


@contextlib.contextmanager
def stops_on(stop: GracefulStop | None, keep: tuple[type[BaseException], ...] = ()):
    """Inside the block, an exception raised once a stop has been requested is that stop (`Stopped`): the signal
    also reached the DataLoader's workers or the other processes, and what they broke (a pipe, a collective)
    fails wherever the loop is. Exceptions of the types in `keep` pass unchanged."""
    try:
        yield
    except (Stopped, *keep):
        raise
    except Exception:
        if stop is not None and stop.requested:
            raise Stopped() from None
        raise
