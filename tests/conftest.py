import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Threads per test process: the machine's cores shared among pytest-xdist's workers (2 cores, 2 workers: one each),
# so that a worker and the commands its tests start do not oversubscribe the cores the other worker runs on.
WORKERS = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
CORES = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
THREADS = str(max(1, min(2, CORES // WORKERS)))
os.environ['OMP_NUM_THREADS'] = THREADS  # the commands the tests start, as many (training's results depend on it)


def pytest_configure(config):
    """torch in the processes that run tests only: pytest-xdist's controller, which starts the workers after loading
    this file, runs none, and importing torch there (1.3 s) delayed every worker's start."""
    if hasattr(config, 'workerinput') or not config.getoption('numprocesses', None):
        import torch
        torch.set_num_threads(int(THREADS))


def _memory_backed_temp_root(minimum_free: int = 8 << 30) -> None:
    """Test folders in memory (/dev/shm) where it has room: training tests write checkpoints of ~230 MB, each
    through fsync, and the disk's flushes cost more than the training steps. PYTEST_DEBUG_TEMPROOT keeps pytest's
    numbered folders (runs side by side do not clobber each other); a root chosen by the user is left alone."""
    if os.environ.get('PYTEST_DEBUG_TEMPROOT') or not os.path.isdir('/dev/shm'):
        return
    if shutil.disk_usage('/dev/shm').free >= minimum_free and os.access('/dev/shm', os.W_OK):
        os.environ['PYTEST_DEBUG_TEMPROOT'] = '/dev/shm'


_memory_backed_temp_root()


def _keep_freed_memory() -> None:
    """glibc's allocator in this process (not in the commands the tests start, which run as a user's do) keeps the
    memory freed by one test for the next: blocks up to 32 MB from its heap, none given back. By default it maps
    and unmaps each large block afresh, and each test's new models and batches cost the kernel zero-filled pages
    again (system time was ~15 % of test_models' CPU time). Nothing computed changes; test_models' peak resident
    memory stayed 4.2 GB."""
    try:
        import ctypes
        libc = ctypes.CDLL('libc.so.6')
    except OSError:  # not glibc
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # malloc.h
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest on 64-bit systems
    libc.mallopt(m_trim_threshold, (1 << 31) - 1)
    libc.mallopt(m_top_pad, 256 << 20)


_keep_freed_memory()

# The modules in the order of their measured time, the longest first (seconds on 2 cores of an AMD EPYC Zen 4, in
# a whole run: 129, 83, 73, 59, 47, 46, 45, 45, 40, 39, 20, 17, 14, 10): pytest-xdist hands whole modules to its
# workers in this order, each worker taking the next when it is almost done, and the longest first lets the workers
# finish together (the others follow, alphabetically). test_user_faults (38 s) goes first: it builds the user
# workspace (conftest.user_workspace, ~10 s) that test_readme, later, then finds made, where test_readme started
# beside it would wait for it.
LONGEST_FIRST = ['test_user_faults', 'test_quantize', 'test_scale', 'test_deployed', 'test_real_faults',
                 'test_imagenet', 'test_decoder', 'test_models', 'test_faults', 'test_tools', 'test_hub',
                 'test_readme', 'test_reliability', 'test_main', 'test_inference']


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))  # stable: each module's order is kept


def randomize(model: 'torch.nn.Module', seed: int = 0) -> 'torch.nn.Module':
    """Random weights and running statistics everywhere, as a trained checkpoint would have. The ASPP's
    running variances are small, so that its BN eps (0.0003 vs 1e-5) visibly changes the logits."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.modules.batchnorm._NormBase):
                small = name.startswith('aspp')
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                lo, hi = (1e-4, 2e-3) if small else (0.5, 1.5)
                m.running_var.copy_(lo + (hi - lo) * torch.rand(m.running_var.shape, generator=g))
                m.num_batches_tracked.fill_(int(torch.randint(1, 10**5, (1,), generator=g)))
            elif isinstance(m, torch.nn.Conv2d) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model


_INITIAL: dict = {}


def initial_model(backbone: str = 'vovnet39', **args) -> 'torch.nn.Module':
    """`deeplab.build_model(backbone, **args)` for a test that needs a model of random weights, not the drawing
    of them: the builder's initial weights are drawn once per test process for these arguments (seed 0; the random
    stream is left as it was) and copied into an uninitialised model (deeplab.empty) on every call. 0.07 s instead
    of 0.26 s for VoVNet-39, 0.16 s instead of 0.62 s for ResNet-101; each call's model is its own. Tests of the
    builders and of the initialisation, and tests whose model must differ from another one they make with the same
    arguments (initial_model's would share its weights), call the builders."""
    import torch

    import deeplab
    key = (backbone, tuple(sorted(args.items())))
    if key not in _INITIAL:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            _INITIAL[key] = deeplab.build_model(backbone, **args).state_dict()
    model = deeplab.empty(backbone=backbone, **args)
    model.load_state_dict(_INITIAL[key])
    return model


@pytest.fixture
def released_checkpoint(tmp_path):
    """Write a checkpoint in the released format: {'epoch', 'state_dict' with `module.`, 'optimizer'}."""
    import torch

    def write(model, name='released.pth', epoch=50):
        state = {f'module.{k}': v.clone() for k, v in model.state_dict().items()}
        optimizer = torch.optim.SGD([{'params': [p for n, p in model.named_parameters() if not n.startswith('aspp')]},
                                     {'params': list(model.aspp.parameters())}], lr=0.007, momentum=0.9)
        path = tmp_path / name
        torch.save({'epoch': epoch, 'state_dict': state, 'optimizer': optimizer.state_dict()}, path)
        return path
    return write


@pytest.fixture(scope='session')
def synthetic_root(tmp_path_factory):
    """A tiny synthetic dataset in the VOC layout (8 training, 4 validation images of 40-64 pixels), written
    once per session; tests that corrupt it work on a copy (`voc_copy`)."""
    import synthetic
    root = tmp_path_factory.mktemp('synthetic')
    synthetic.generate(str(root), num_train=8, num_val=4, seed=0, min_size=40, max_size=64)
    return root


@pytest.fixture
def voc_copy(synthetic_root, tmp_path):
    import shutil
    root = tmp_path / 'voc'
    shutil.copytree(synthetic_root, root)
    return root


def drop_log_handlers() -> None:
    """Remove the handlers a script's command line added: they write to streams (a test's captured ones) that are
    closed after it."""
    for handler in list(logging.getLogger().handlers):
        logging.getLogger().removeHandler(handler)


@pytest.fixture
def run_cli(capsys):
    """Run main.py's command line in this process; returns (exit status, stdout, stderr)."""
    def run(*argv, module='main'):
        import importlib
        cli = importlib.import_module(module).cli
        try:
            status = cli([str(a) for a in argv])
        except SystemExit as e:  # argparse's usage errors
            status = e.code
        finally:
            drop_log_handlers()
        out, err = capsys.readouterr()
        return status, out, err
    return run


@pytest.fixture
def run_process(tmp_path):
    """Run a script (`main.py`, `predict.py`, ...) as the README does: a fresh Python process with nothing imported
    beforehand, in `cwd` (default: the test's folder); returns (exit status, stdout, stderr) as run_cli does."""
    def run(script, *argv, cwd=None, **env):
        result = command([script, *argv], str(cwd or tmp_path), **env)
        return result.returncode, result.stdout, result.stderr
    return run


def cli_in(folder, argv, module='main') -> None:
    """Run main.py's (or `module`'s) command line in this process with `folder` as the working directory (for
    module-scoped fixtures, which cannot use monkeypatch); the run must succeed."""
    import importlib
    cli = importlib.import_module(module).cli
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        assert cli([str(a) for a in argv]) == 0
    finally:
        os.chdir(cwd)
        drop_log_handlers()


@pytest.fixture
def mount(tmp_path):
    """mount(name, size, readonly=False, fill=None): a fresh tmpfs of `size` at tmp_path/name (files from `fill`,
    a folder, copied in first), or None where this process may not mount (not root)."""
    mounted = []

    def make(name, size, readonly=False, fill=None):
        folder = tmp_path / name
        folder.mkdir()
        if subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(folder)],
                          capture_output=True).returncode:
            return None
        mounted.append(folder)
        if fill is not None:
            shutil.copytree(fill, folder, dirs_exist_ok=True)
        if readonly:
            subprocess.run(['mount', '-o', 'remount,ro', str(folder)], check=True)
        return folder
    yield make
    for folder in mounted:
        subprocess.run(['umount', '-l', str(folder)], capture_output=True)


# --- ImageNet weights from the libraries, without a network


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network for the libraries that download ImageNet weights, and empty caches of their own: pytorchcv's
    (~/.torch/models, through HOME), the Hugging Face hub's (timm) and torch's hub (TORCH_HOME). A download fails
    with the exception the library raises on a machine without internet (seen on this project's machines:
    requests' ConnectionError for pytorchcv after its retries, huggingface_hub's LocalEntryNotFoundError after
    46 s of retries for timm)."""
    import requests
    import timm.models._hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError
    home = tmp_path / 'home'
    monkeypatch.setenv('HOME', str(home))
    monkeypatch.setenv('TORCH_HOME', str(home / 'torch'))
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(home / 'huggingface'))

    def no_network(url, *args, **kwargs):
        raise requests.exceptions.ConnectionError(f"HTTPSConnectionPool: Max retries exceeded with url: {url} "
                                                  f"(Caused by NameResolutionError: Failed to resolve)")

    def hub_offline(*args, **kwargs):
        raise LocalEntryNotFoundError('An error happened while trying to locate the file on the Hub and we cannot '
                                      'find the requested files in the local cache. Please check your connection '
                                      'and try again or make sure your Internet connection is on.')
    monkeypatch.setattr(requests, 'get', no_network)
    monkeypatch.setattr(timm.models._hub, 'hf_hub_download', hub_offline)
    return home


@pytest.fixture
def pytorchcv_serves(monkeypatch, offline, tmp_path):
    """pytorchcv's model store serving a state dict written by the test in place of its release file: its
    download function writes the zip it would fetch, and its metadata carries that file's sha1, so that
    pytorchcv's own cache, unzipping and sha1 check run. Returns serve(state_dict) -> (sha1, urls fetched)."""
    import hashlib
    import zipfile

    import torch
    from pytorchcv.models.common import model_store

    def serve(state_dict):
        served = tmp_path / 'served.pth'
        torch.save(state_dict, served)
        sha1 = hashlib.sha1(served.read_bytes()).hexdigest()
        real = model_store.get_model_name_suffix_data
        monkeypatch.setattr(model_store, 'get_model_name_suffix_data',
                            lambda name: (real(name)[0], sha1, real(name)[2]))
        urls = []

        def download(url, path=None, overwrite=False, **kwargs):
            urls.append(url)
            with zipfile.ZipFile(path, 'w') as z:
                z.write(served, os.path.basename(path)[:-len('.zip')])
            return path
        monkeypatch.setattr(model_store, '_download', download)
        return sha1, urls
    return serve


@pytest.fixture
def timm_hub_serves(monkeypatch, offline):
    """The Hugging Face hub serving a state dict written by the test as timm's `model.safetensors`, stored in the
    hub cache's own layout (blob named by its sha256, snapshot link, refs/main), so that timm's pretrained loading
    and the cache lookup run as with a real download. Returns serve(repo, state_dict) -> the downloads made."""
    import hashlib

    import timm.models._hub
    from huggingface_hub import constants
    from huggingface_hub.errors import EntryNotFoundError
    from safetensors.torch import save_file

    def serve(repo, state_dict):
        tensors = {k: v.contiguous().clone() for k, v in state_dict.items()}
        downloads = []

        def download(repo_id, filename, revision=None, cache_dir=None, **kwargs):
            if repo_id != repo or filename != 'model.safetensors':
                raise EntryNotFoundError(f'{repo_id}/{filename} not found')
            downloads.append(filename)
            folder = os.path.join(constants.HF_HUB_CACHE, 'models--' + repo.replace('/', '--'))
            os.makedirs(os.path.join(folder, 'blobs'), exist_ok=True)
            tmp = os.path.join(folder, 'blobs', 'incoming')
            save_file(tensors, tmp)
            sha256 = hashlib.sha256(open(tmp, 'rb').read()).hexdigest()
            os.replace(tmp, os.path.join(folder, 'blobs', sha256))
            commit = '0' * 40
            os.makedirs(os.path.join(folder, 'snapshots', commit), exist_ok=True)
            os.makedirs(os.path.join(folder, 'refs'), exist_ok=True)
            with open(os.path.join(folder, 'refs', 'main'), 'w') as f:
                f.write(commit)
            link = os.path.join(folder, 'snapshots', commit, filename)
            if not os.path.lexists(link):
                os.symlink(os.path.join('..', '..', 'blobs', sha256), link)
            return link
        monkeypatch.setattr(timm.models._hub, 'hf_hub_download', download)
        return downloads
    return serve


# --- The README's commands as a user runs them: fresh processes (test_readme.py and the faults of its flags)


USER_CKPT = 'data/deeplab_vovnet39_pascal_v3_t_epoch1.pth'
USER_SMALL = ['--crop_size', '65', '--workers', '0']
USER_TRAIN = ['--train', '--epochs', '1', '--backbone', 'vovnet39', '--batch_size', '4', '--seed', '0', '--base_lr',
              '0.01', *USER_SMALL]


def command(args, cwd, **env):
    """`python args...` in a fresh process, in `cwd`, without a Hub token and with the Hugging Face files under
    `cwd`; returns the finished process (stdout and stderr as text)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'HUGGING'))}
    environ.update(HF_HOME=os.path.join(cwd, 'hf_home'), HF_HUB_OFFLINE='1', HF_HUB_DISABLE_TELEMETRY='1',
                   PYTHONPATH=ROOT, OMP_NUM_THREADS=THREADS)
    environ.update({k: v for k, v in env.items() if v is not None})
    for k in [k for k, v in env.items() if v is None]:
        environ.pop(k, None)
    script = args[0] if args[0] == '-c' else os.path.join(ROOT, args[0])
    return subprocess.run([sys.executable, script, *map(str, args[1:])], cwd=cwd, env=environ, capture_output=True,
                          text=True, timeout=600)


RUNNER = """
import contextlib, io, json, logging, sys
calls, results = json.load(open(sys.argv[1])), []
for module, argv, setup in calls:
    if setup:
        exec(setup)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = __import__(module).cli(argv)
        except SystemExit as e:
            status = e.code
        finally:
            for handler in list(logging.getLogger().handlers):
                logging.getLogger().removeHandler(handler)
    results.append([status, out.getvalue(), err.getvalue()])
json.dump(results, open(sys.argv[2], 'w'))
"""


def run_clis(calls, cwd) -> list[tuple[int, str, str]]:
    """Run (module, argv[, python run first]) command lines one after the other in one fresh process, in `cwd`;
    returns (exit status, stdout, stderr) of each, as run_cli does. For command lines whose process boundary is
    not what a test checks, where one process each would only repeat the imports."""
    cwd = str(cwd)
    with open(os.path.join(cwd, '.calls.json'), 'w') as f:
        json.dump([(c[0], [str(a) for a in c[1]], c[2] if len(c) > 2 else None) for c in calls], f)
    result = command(['-c', RUNNER, '.calls.json', '.results.json'], cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(cwd, '.results.json')) as f:
        results = [tuple(r) for r in json.load(f)]
    os.unlink(os.path.join(cwd, '.calls.json'))
    os.unlink(os.path.join(cwd, '.results.json'))
    return results


def succeeded(result) -> bool:
    return result.returncode == 0 and 'Traceback' not in result.stdout + result.stderr


def refused(result, *phrases) -> None:
    """Exit 1, one message naming each phrase, no traceback."""
    text = result.stdout + result.stderr
    assert result.returncode == 1 and 'Traceback' not in text, text[-3000:]
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr[-3000:]


def publish_to_cache(cache: str, repo: str, folder: str) -> str:
    """Lay `folder` out in huggingface_hub's cache as a download of `repo` at `main` leaves it: the files as blobs
    named by their hash, a snapshot of links to them named by the commit, refs/main holding the commit. Returns
    the commit."""
    base = os.path.join(cache, 'models--' + repo.replace('/', '--'))
    names = sorted(os.listdir(folder))
    commit = hashlib.sha1(b''.join(open(os.path.join(folder, n), 'rb').read() for n in names)).hexdigest()
    for sub in ('blobs', f'snapshots/{commit}', 'refs'):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    for name in names:
        data = open(os.path.join(folder, name), 'rb').read()
        etag = hashlib.sha256(data).hexdigest()
        with open(os.path.join(base, 'blobs', etag), 'wb') as f:
            f.write(data)
        os.symlink(os.path.join('..', '..', 'blobs', etag), os.path.join(base, 'snapshots', commit, name))
    with open(os.path.join(base, 'refs', 'main'), 'w') as f:
        f.write(commit)
    return commit


def build_user_workspace(folder) -> str:
    """Write the user workspace (see `user_workspace`) into `folder`; returns the commit of its Hub cache entry."""
    import synthetic
    synthetic.generate(str(folder / 'voc'), num_train=8, num_val=4, seed=0, min_size=40, max_size=64)
    trained = command(['main.py', *USER_TRAIN, '--exp', 't', '--scratch', '--data_root', 'voc'], folder)
    assert succeeded(trained), trained.stderr[-3000:]
    evaluated = command(['main.py', '--exp', 't', '--epochs', '1', '--backbone', 'vovnet39', '--data_root', 'voc',
                         '--json', 'data/eval.json', *USER_SMALL], folder)
    assert succeeded(evaluated), evaluated.stderr[-3000:]
    assert 'Mean IoU:' in evaluated.stdout
    saved = command(['hub.py', 'save', '--checkpoint', USER_CKPT, '--output', 'hub/m', '--metrics', 'data/eval.json',
                     '--license', 'mit'], folder)
    assert succeeded(saved), saved.stderr[-3000:]
    return publish_to_cache(str(folder / 'hf_home' / 'hub'), 'org/m', str(folder / 'hub' / 'm'))


@pytest.fixture(scope='session')
def user_workspace(tmp_path_factory):
    """A folder with the synthetic data (voc/), the checkpoint of a 1-epoch run of main.py --train (data/), its
    evaluation's figures (data/eval.json), its hub folder (hub/m, written by hub.py save) and that folder in the
    Hugging Face cache as org/m, each made by the README's command in a process of its own.

    Made once per test run: the first pytest-xdist worker that needs it builds it beside the workers' own folders
    (under a lock, which the others wait on), and each worker works on a copy of its own, since tests run commands
    in it and check what they leave there."""
    import json

    from filelock import FileLock
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base) / 'user-workspace'  # the run's folder
    with FileLock(str(shared) + '.lock'):
        if not (shared / 'commit').is_file():
            shutil.rmtree(shared, ignore_errors=True)
            built = shared.with_name(shared.name + '.partial')
            shutil.rmtree(built, ignore_errors=True)
            built.mkdir()
            commit = build_user_workspace(built)
            (built / 'commit').write_text(json.dumps(commit))
            os.rename(built, shared)
    folder = tmp_path_factory.mktemp('user')
    shutil.copytree(shared, folder, symlinks=True, dirs_exist_ok=True)
    commit = json.loads((folder / 'commit').read_text())
    os.unlink(folder / 'commit')
    return folder, commit
