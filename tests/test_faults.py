"""Killed and interrupted training runs lose no work: resuming gives the weights of an uninterrupted run."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import cli_in

import main

pytestmark = pytest.mark.slow  # faults produced for real: processes, signals, mounts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = 'deeplab_vovnet39_pascal_v3_f'
ARGS = ['--train', '--exp', 'f', '--backbone', 'vovnet39', '--scratch', '--epochs', '3', '--crop_size', '65',
        '--batch_size', '2', '--workers', '0', '--seed', '1', '--base_lr', '0.01', '--save_every', '1',
        '--print_freq', '1']


@pytest.fixture(scope='module')
def uninterrupted(synthetic_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp('uninterrupted')
    cli_in(folder, ARGS + ['--data_root', synthetic_root])
    return torch.load(folder / 'data' / f'{RUN}_epoch3.pth', weights_only=True)['state_dict']


def start(synthetic_root, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED='1')
    return subprocess.Popen([sys.executable, os.path.join(ROOT, 'main.py')] + ARGS + ['--data_root',
                            str(synthetic_root)], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for(process, text):
    """Read the process's output until a line contains `text`; returns all lines read."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f'{text!r} never appeared; output:\n{"".join(lines)}\n{process.stderr.read()}')


def resume_and_compare(path, synthetic_root, reference):
    assert main.cli(ARGS + ['--data_root', str(synthetic_root), '--resume', str(path)]) == 0
    final = torch.load(f'data/{RUN}_epoch3.pth', weights_only=True)['state_dict']
    assert final.keys() == reference.keys()
    for key in final:
        assert torch.equal(final[key], reference[key]), key


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_mid_epoch_saves_a_resumable_checkpoint(uninterrupted, synthetic_root, tmp_path,
                                                                  monkeypatch, signum):
    monkeypatch.chdir(tmp_path)
    process = start(synthetic_root, tmp_path)
    wait_for(process, 'epoch 2/3  iter 2/4')
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err
    assert f'stopped by signal {int(signum)} at epoch 2, iteration' in err
    path = tmp_path / 'data' / f'{RUN}_interrupted.pth'
    assert f'--resume {os.path.join("data", path.name)}' in err
    assert 'Traceback' not in out + err
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint['epoch'] == 1 and 5 <= checkpoint['iteration'] <= 8
    resume_and_compare(path, synthetic_root, uninterrupted)


def test_sigkill_mid_epoch_resumes_from_the_last_checkpoint(uninterrupted, synthetic_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    process = start(synthetic_root, tmp_path)
    wait_for(process, f'saved data/{RUN}_epoch1.pth')
    wait_for(process, 'epoch 2/3  iter 1/4')
    process.kill()
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert sorted(os.listdir(tmp_path / 'data')) == [f'{RUN}_epoch1.pth', 'logs']  # nothing half-written
    resume_and_compare(tmp_path / 'data' / f'{RUN}_epoch1.pth', synthetic_root, uninterrupted)


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open(f'/proc/{entry}/stat') as f:
                    if int(f.read().rsplit(')', 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return found


def test_ctrl_c_under_torchrun_saves_a_resumable_checkpoint(synthetic_root, tmp_path):
    # A Ctrl-C in the terminal reaches torchrun and each of its workers, and torchrun forwards it to the workers
    # once more. Where a worker has handled the first SIGINT before the second arrives (sent here 0.2 s later to
    # make that order certain), it must still finish the iteration and save the state.
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    process = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                                os.path.join(ROOT, 'main.py')] + ARGS + ['--batch_size', '4',  # 2 per process
                                                                          '--data_root', str(synthetic_root)],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)  # its own process group, as a terminal's foreground job
    lines = wait_for(process, 'epoch 1/3  iter 1/2')
    workers = children(process.pid)
    assert len(workers) == 2
    os.killpg(process.pid, signal.SIGINT)
    time.sleep(0.2)
    for pid in workers:
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            pass
    out = ''.join(lines) + process.communicate(timeout=120)[0]
    path = tmp_path / 'data' / f'{RUN}_interrupted.pth'
    assert f'stopped by signal {int(signal.SIGINT)} at epoch' in out, out[-3000:]
    assert f'--resume {os.path.join("data", path.name)}' in out
    checkpoint = torch.load(path, weights_only=True)
    assert 1 <= checkpoint['iteration'] <= 2


def test_a_repeated_signal_is_one_stop_and_a_later_one_stops_at_once():
    import errors
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)  # ignored where pytest runs in background
    try:
        with errors.GracefulStop(repeat_window=0.5) as stop:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)  # the same Ctrl-C, delivered twice
            assert stop.signal == signal.SIGINT
            time.sleep(0.6)
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)  # pressed again: stop now
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)
