"""Faults produced for real, not by raising the expected exception: full and read-only file systems (tmpfs mounts,
or the file-size limit where this process may not mount), names too long, paths that are files, outputs that
would overwrite inputs, text files in other encodings, allocation failures under a memory limit, signals to
running processes, batches without a labelled pixel, and an environment torchrun did not set.

Each asserts the exit status, the file or flag named, no traceback, and the file system afterwards."""
import glob
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, THREADS, initial_model, randomize, run_clis
from PIL import Image

import checkpoints
import engine
import errors
import pascal
import utils

pytestmark = pytest.mark.slow  # faults produced for real: processes, signals, mounts

TRAIN = ['--train', '--exp', 'f', '--epochs', '1', '--backbone', 'vovnet39', '--scratch', '--crop_size', '65',
         '--batch_size', '4', '--seed', '0', '--workers', '0']
EVAL = ['--exp', 'f', '--epochs', '1', '--backbone', 'vovnet39', '--crop_size', '65', '--workers', '0']


def assert_clean_failure(result, *needles, status=1):
    code, out, err = result[:3] if isinstance(result, tuple) else (result.returncode, result.stdout, result.stderr)
    assert code == status, (code, out[-2000:], err[-3000:])
    for needle in needles:
        assert needle in err, (needle, err[-3000:])
    assert 'Traceback' not in out + err and 'Exception in thread' not in err
    return err


def leftovers(folder) -> list[str]:
    """Temporary and staging files of this project's writes (atomic_write, staged_folder)."""
    return sorted(p for p in glob.glob(os.path.join(str(folder), '**', '.*'), recursive=True)
                  if p.endswith('.tmp') or '.partial-' in p)


def script(module, args, cwd, file_size=None, memory_above=None, env=None, **kwargs):
    """Run `module`'s command line in a new Python process; `file_size` limits each file it writes
    (RLIMIT_FSIZE, with SIGXFSZ ignored so that a write fails with EFBIG instead of killing it), `memory_above`
    its address space to what it uses after importing torch plus that many MB (RLIMIT_AS)."""
    code = textwrap.dedent(f'''
        import resource, sys
        sys.path.insert(0, {ROOT!r})
        # torch._dynamo too: every training run imports it (the optimizer's first parameter group), so that the
        # memory above is the same for evaluation and training, whatever the module imports at its start.
        import torch, torch._dynamo, {module}
        memory_above = {memory_above!r}
        if memory_above is not None:
            size = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) << 10
            limit = size + (memory_above << 20)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        sys.exit({module}.cli({[str(a) for a in args]!r}))
    ''')

    def limits():
        if file_size is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
    return subprocess.run([sys.executable, '-c', code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          preexec_fn=limits, env=dict(os.environ, OMP_NUM_THREADS=THREADS, **(env or {})), **kwargs)


def scripts(calls, cwd, memory_above):
    """Run command lines (module, args) one after the other in one new Python process under script()'s memory
    limit (set once, after importing torch, dynamo and the modules): (exit status, stdout, stderr) of each, as
    run_cli gives them. For failures that the limit makes, not a fresh interpreter for each command."""
    limit = textwrap.dedent(f'''
        import resource, torch, torch._dynamo, {', '.join(sorted({m for m, _ in calls}))}
        size = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) << 10
        resource.setrlimit(resource.RLIMIT_AS, (size + ({memory_above} << 20),) * 2)
    ''')
    return run_clis([(module, args, limit if i == 0 else None) for i, (module, args) in enumerate(calls)], cwd)


_CHECKPOINTS: dict[tuple, bytes] = {}  # the bytes of each small checkpoint made, written again for each test


def small_checkpoint(path, backbone='vovnet39', classes=21, seed=7):
    key = backbone, classes, seed
    if key not in _CHECKPOINTS:
        model = randomize(initial_model(backbone, num_classes=classes), seed=seed)
        with torch.no_grad():
            model.aspp.conv3.bias.copy_(torch.linspace(-1, 1, classes))
        buffer = io.BytesIO()
        torch.save({'epoch': 1, 'state_dict': model.state_dict()}, buffer)
        _CHECKPOINTS[key] = buffer.getvalue()
    with open(path, 'wb') as f:
        f.write(_CHECKPOINTS[key])
    return path


def photos(folder, count=3, size=(70, 50)):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f'p{i}.jpg')
    return folder


# --- 1. every write can fail


def test_a_checkpoint_that_does_not_fit_leaves_the_previous_one_and_no_temporary_file(
        mount, synthetic_root, tmp_path, monkeypatch, run_cli):
    disk = mount('disk', '60m')
    previous = tmp_path / 'previous.pth'  # an earlier checkpoint of the same name, small enough to fit
    torch.save({'epoch': 1, 'state_dict': {'conv.weight': torch.ones(3, 3)}}, previous)
    size_limit = None
    if disk is None:  # not root: the file-size limit makes the same write fail, with EFBIG
        disk, size_limit = tmp_path / 'disk', 60 << 20
    target = disk / 'deeplab_vovnet39_pascal_v3_f_epoch1.pth'  # VoVNet-39 and its momentum: 236 MB
    shutil.copy(previous, target)
    before = target.read_bytes()
    args = TRAIN + ['--data_root', synthetic_root, '--output_dir', disk]
    if size_limit is None:
        monkeypatch.chdir(tmp_path)
        result = run_cli(*args)
        cause = 'No space left on device'
    else:
        result = script('main', args, tmp_path, file_size=size_limit)
        cause = 'File too large'
    err = assert_clean_failure(result, f'could not write {target}: {cause}', '(--output_dir)',
                               'Any earlier checkpoint there is unchanged')
    assert 'unexpected pos' not in err  # torch.save's RuntimeError, traced back to its OSError
    assert target.read_bytes() == before and leftovers(disk) == []
    checkpoints.load(str(target))


def test_predictions_and_metrics_on_a_full_disk_stop_with_the_file_named(mount, synthetic_root, tmp_path,
                                                                          monkeypatch, run_cli):
    disk = mount('disk', '8k')  # two 4 KB pages: tmpfs gives each small file one
    if disk is None:
        pytest.skip('mounting a tmpfs needs root; the file-size limit cannot fill a disk (see the test above)')
    monkeypatch.chdir(tmp_path)
    ckpt = small_checkpoint(tmp_path / 'ckpt.pth')
    # Evaluation: 4 predictions do not fit; they went to a staging folder that is removed, nothing published.
    err = assert_clean_failure(run_cli(*EVAL, '--checkpoint', ckpt, '--data_root', synthetic_root, '--output_dir',
                                       disk), 'could not write', 'No space left on device', '(--output_dir)')
    assert f'{disk}/val' in err and leftovers(disk) == [] and os.listdir(disk) == []
    # Training: its metrics log (or TensorBoard's events) cannot be written on a full disk.
    os.makedirs(disk / 'logs' / 'deeplab_vovnet39_pascal_v3_f')
    with open(disk / 'filler', 'wb') as f:
        with pytest.raises(OSError):
            f.write(b'x' * (1 << 20))
    err = assert_clean_failure(run_cli(*TRAIN, '--data_root', synthetic_root, '--output_dir', disk),
                               'could not write', 'No space left on device')
    assert 'metrics.jsonl' in err or 'TensorBoard' in err
    # Prediction: what is written is whole; the file that failed is named.
    os.remove(disk / 'filler')
    shutil.rmtree(disk / 'logs', ignore_errors=True)
    photos(tmp_path / 'in', count=6, size=(300, 300))
    err = assert_clean_failure(run_cli('--checkpoint', ckpt, '--input', tmp_path / 'in', '--output', disk / 'out',
                                       '--crop_size', '65', module='predict'), 'No space left on device', '(--output)')
    assert leftovers(disk) == []
    for path in glob.glob(str(disk / 'out' / '*')):
        Image.open(path).load()


@pytest.mark.parametrize('command', ['train', 'evaluate', 'predict', 'export', 'benchmark', 'demo'])
def test_a_read_only_folder_is_a_message_before_any_work(command, mount, synthetic_root, tmp_path, monkeypatch,
                                                          run_cli):
    ro = mount('ro', '1m', readonly=True)
    if ro is None:
        pytest.skip('a read-only file system needs a mount, which needs root (root writes through permissions)')
    monkeypatch.chdir(tmp_path)
    ckpt = small_checkpoint(tmp_path / 'ckpt.pth')
    photos(tmp_path / 'in', count=1)
    argv = {'train': (TRAIN + ['--data_root', synthetic_root, '--output_dir', ro / 'out'], 'main'),
            'evaluate': (EVAL + ['--checkpoint', ckpt, '--data_root', synthetic_root, '--output_dir', ro], 'main'),
            'predict': (['--checkpoint', ckpt, '--input', tmp_path / 'in', '--output', ro / 'out'], 'predict'),
            'export': (['--checkpoint', ckpt, '--output', ro / 'm.onnx', '--height', '65', '--width', '65'],
                       'export'),
            'benchmark': (['--backbones', 'vovnet39', '--size', '65', '--iters', '1', '--warmup', '0', '--configs',
                           'fp32', '--no_isolate', '--json', ro / 'b.json'], 'benchmark'),
            'demo': (['--root', ro / 'data', '--train_images', '8', '--val_images', '4'], 'demo')}[command]
    status, out, err = run_cli(*argv[0], module=argv[1])
    assert_clean_failure((status, out, err), 'Read-only file system', 'write elsewhere')
    assert os.listdir(ro) == []
    if command != 'evaluate':  # evaluation reads the dataset first, the others did nothing
        assert 'Mean IoU' not in out and 'ms/step' not in out


@pytest.mark.parametrize('command', ['train', 'predict', 'export', 'benchmark'])
def test_a_name_too_long_is_refused_before_any_work(command, synthetic_root, tmp_path, monkeypatch, run_cli):
    monkeypatch.chdir(tmp_path)
    long = 'n' * 300
    ckpt = small_checkpoint(tmp_path / 'ckpt.pth')
    photos(tmp_path / 'in', count=1)
    argv, needle = {
        'train': (['--train', '--exp', long] + TRAIN[3:] + ['--data_root', synthetic_root], '--exp'),
        'predict': (['--checkpoint', ckpt, '--input', tmp_path / 'in', '--output', tmp_path / long], '--output'),
        'export': (['--checkpoint', ckpt, '--output', f'{long}.onnx'], '--output'),
        'benchmark': (['--backbones', 'vovnet39', '--size', '65', '--iters', '1', '--json', f'{long}.json'], '--json'),
    }[command]
    status, out, err = run_cli(*argv, module='main' if command == 'train' else command)
    assert_clean_failure((status, out, err), needle)
    assert 'too long' in err
    assert sorted(os.listdir(tmp_path)) == ['ckpt.pth', 'in']


@pytest.mark.parametrize('command', ['export', 'benchmark', 'demo_root', 'demo_output', 'train'])
def test_a_path_that_is_a_folder_or_a_file_where_the_other_is_needed(command, synthetic_root, tmp_path, monkeypatch,
                                                                      run_cli):
    monkeypatch.chdir(tmp_path)
    ckpt = small_checkpoint(tmp_path / 'ckpt.pth')
    os.makedirs('a_folder')
    (tmp_path / 'a_file').write_text('')
    argv, module, needle = {
        'export': (['--checkpoint', ckpt, '--output', 'a_folder', '--height', '65', '--width', '65'], 'export',
                   'a_folder'),
        'benchmark': (['--backbones', 'vovnet39', '--size', '65', '--iters', '1', '--json', 'a_folder'], 'benchmark',
                      '--json a_folder is a folder'),
        'demo_root': (['--root', 'a_file'], 'demo', '--root a_file is a file'),
        'demo_output': (['--output_dir', 'a_file'], 'demo', '--output_dir a_file is a file'),
        'train': (TRAIN + ['--data_root', synthetic_root, '--output_dir', 'a_file'], 'main', 'a_file'),
    }[command]
    assert_clean_failure(run_cli(*argv, module=module), needle)
    assert sorted(os.listdir(tmp_path)) == ['a_file', 'a_folder', 'ckpt.pth'] and os.listdir('a_folder') == []


# --- 2. no output overwrites an input


def test_export_onto_its_checkpoint_is_refused(tmp_path, run_cli):
    ckpt = small_checkpoint(tmp_path / 'model.onnx')  # the default output: the checkpoint's name with .onnx
    before = ckpt.read_bytes()
    for output in ([], ['--output', ckpt], ['--output', tmp_path / '.' / 'model.onnx']):
        assert_clean_failure(run_cli('--checkpoint', ckpt, *output, module='export'), 'which is the checkpoint',
                             '--output')
    os.link(ckpt, tmp_path / 'linked.onnx')
    assert_clean_failure(run_cli('--checkpoint', tmp_path / 'linked.onnx', '--output', ckpt, module='export'),
                         'which is the checkpoint')
    assert ckpt.read_bytes() == before


def test_predictions_onto_their_input_images_are_refused(tmp_path, run_cli):
    ckpt = small_checkpoint(tmp_path / 'ckpt.pth')
    folder = tmp_path / 'photos'
    photos(folder, count=2)
    Image.new('RGB', (40, 30), 'red').save(folder / 'p0.png')  # p0.jpg and p0.png: p0.png would be a mask
    before = {p: open(p, 'rb').read() for p in glob.glob(str(folder / '*'))}
    assert_clean_failure(run_cli('--checkpoint', ckpt, '--input', folder, '--output', folder, module='predict'),
                         'which is an input image', '--output')
    assert {p: open(p, 'rb').read() for p in glob.glob(str(folder / '*'))} == before
    os.remove(folder / 'p0.png')  # now no name collides: predicting into the input folder is allowed
    status, _, err = run_cli('--checkpoint', ckpt, '--input', folder, '--output', folder, '--crop_size', '65',
                             module='predict')
    assert status == 0, err


def test_evaluation_predictions_onto_dataset_files_and_training_onto_its_resume_file_are_refused(
        synthetic_root, tmp_path, monkeypatch, run_cli):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / 'voc'
    shutil.copytree(synthetic_root, data)
    masks = data / 'VOC2012' / 'SegmentationClassAug'
    os.rename(masks, data / 'VOC2012' / 'val')  # masks in a folder named val, predictions to <output_dir>/val
    for name in ('train_aug.txt', 'val.txt'):
        path = data / 'VOC2012' / 'list' / name
        path.write_text(path.read_text().replace('/SegmentationClassAug/', '/val/'))
    before = {p: open(p, 'rb').read() for p in glob.glob(str(data / 'VOC2012' / 'val' / '*'))}
    ckpt = small_checkpoint(tmp_path / 'ckpt.pth')
    assert_clean_failure(run_cli(*EVAL, '--checkpoint', ckpt, '--data_root', data, '--output_dir', data / 'VOC2012'),
                         'which is a file of the dataset', '--output_dir')
    assert {p: open(p, 'rb').read() for p in glob.glob(str(data / 'VOC2012' / 'val' / '*'))} == before
    # Training would write its best checkpoint over the one it resumes from.
    best = tmp_path / 'data' / 'deeplab_vovnet39_pascal_v3_f_best.pth'
    os.makedirs(best.parent)
    shutil.copy(ckpt, best)
    assert_clean_failure(run_cli(*TRAIN, '--epochs', '2', '--val_every', '1', '--data_root', synthetic_root,
                                 '--resume', best), 'which is the checkpoint to resume', '--output_dir or --exp')


def test_benchmark_results_onto_its_checkpoint_are_refused(tmp_path, run_cli):
    ckpt = small_checkpoint(tmp_path / 'ckpt.json')
    assert_clean_failure(run_cli('--backbones', 'vovnet39', '--checkpoint', ckpt, '--json', ckpt, module='benchmark'),
                         'which is the checkpoint', '--json')


# --- 3. loaded weights are checked


def test_a_checkpoint_with_nan_weights_or_momentum_is_refused_naming_the_tensor(synthetic_root, tmp_path,
                                                                                monkeypatch, run_cli):
    monkeypatch.chdir(tmp_path)
    state = torch.load(small_checkpoint(tmp_path / 'ok.pth'), weights_only=True)
    state['state_dict']['stage4.OSA4_2.concat.OSA4_2_concat/norm.running_var'][3] = float('inf')
    torch.save(state, tmp_path / 'bad.pth')
    assert_clean_failure(run_cli(*EVAL, '--checkpoint', 'bad.pth', '--data_root', synthetic_root),
                         'bad.pth has non-finite values', 'stage4.OSA4_2.concat.OSA4_2_concat/norm.running_var')
    assert not os.path.exists('data/val')
    for module in ('predict', 'export'):
        photos(tmp_path / 'in', count=1)
        assert_clean_failure(run_cli('--checkpoint', 'bad.pth', '--input', 'in', '--output', 'out', module=module)
                             if module == 'predict' else run_cli('--checkpoint', 'bad.pth', module=module),
                             'non-finite values')
    # Resume: weights fine, momentum not.
    status, _, err = run_cli(*TRAIN, '--data_root', synthetic_root)
    assert status == 0, err
    resumed = torch.load('data/deeplab_vovnet39_pascal_v3_f_epoch1.pth', weights_only=True)
    first = next(iter(resumed['optimizer']['state']))
    resumed['optimizer']['state'][first]['momentum_buffer'][0] = float('nan')
    torch.save(resumed, 'diverged.pth')
    assert_clean_failure(run_cli(*TRAIN, '--epochs', '2', '--data_root', synthetic_root, '--resume', 'diverged.pth'),
                         'diverged.pth has non-finite values', 'optimizer state',
                         f'momentum_buffer of parameter {first}')


# --- 4. text files in the encodings people have


def test_list_and_class_files_with_a_bom_crlf_or_latin1_are_read(synthetic_root, tmp_path, monkeypatch, run_cli,
                                                                 caplog):
    import pascal
    root = tmp_path / 'voc'
    shutil.copytree(synthetic_root, root)
    base = root / 'VOC2012'
    lists = base / 'list'
    # train_aug.txt: a byte-order mark and Windows line ends.
    train = (lists / 'train_aug.txt').read_text()
    (lists / 'train_aug.txt').write_bytes(b'\xef\xbb\xbf' + train.replace('\n', '\r\n').encode())
    # val.txt in Latin-1: one image named with Latin-1 bytes on disk, one named in UTF-8 (a list from Windows).
    lines = (lists / 'val.txt').read_text().splitlines()
    os.rename(base / 'JPEGImages' / 'synthetic_val_00000.jpg', os.path.join(os.fsencode(base / 'JPEGImages'),
                                                                            b'caf\xe9_0.jpg'))
    os.rename(base / 'JPEGImages' / 'synthetic_val_00001.jpg', base / 'JPEGImages' / 'caf\u00e9_1.jpg')
    lines[0] = lines[0].replace('synthetic_val_00000.jpg', 'caf\u00e9_0.jpg')
    lines[1] = lines[1].replace('synthetic_val_00001.jpg', 'caf\u00e9_1.jpg')
    (lists / 'val.txt').write_bytes('\r\n'.join(lines).encode('latin-1'))
    names = ['fond'] + [f'cat\u00e9gorie {i}' for i in range(20)]
    (tmp_path / 'names.txt').write_bytes('\n'.join(names).encode('latin-1'))
    (tmp_path / 'names_bom.txt').write_bytes(b'\xef\xbb\xbf' + '\r\n'.join(names).encode())
    assert len(pascal.build_dataset('pascal', str(root), 'train', None)) == 8
    val = pascal.build_dataset('pascal', str(root), 'val', None)
    assert [os.path.exists(image) for image, _ in val.samples] == [True] * 4
    assert pascal.read_class_names(str(tmp_path / 'names_bom.txt')) == names
    assert pascal.read_class_names(str(tmp_path / 'names.txt')) == names
    assert 'not UTF-8 (line 2)' in caplog.text
    monkeypatch.chdir(tmp_path)
    ckpt = small_checkpoint(tmp_path / 'ckpt.pth')
    status, out, err = run_cli(*EVAL, '--checkpoint', ckpt, '--data_root', root, '--class_names', 'names.txt')
    assert status == 0, err
    assert 'IoU cat\u00e9gorie 3: ' in out and 'Logging error' not in err
    # A file that does not exist is still named (its Latin-1 byte shown escaped), never a UnicodeDecodeError.
    (lists / 'val.txt').write_bytes(b'/JPEGImages/gone\xe9.jpg /SegmentationClassAug/gone.png\n')
    assert_clean_failure(run_cli(*EVAL, '--checkpoint', ckpt, '--data_root', root), 'gone', 'do not exist')


def test_predict_on_file_names_that_are_not_utf8(tmp_path, run_cli):
    ckpt = small_checkpoint(tmp_path / 'ckpt.pth')
    photos(tmp_path / 'in', count=1)
    os.rename(tmp_path / 'in' / 'p0.jpg', os.path.join(os.fsencode(tmp_path / 'in'), b'\xe9t\xe9.jpg'))
    status, out, err = run_cli('--checkpoint', ckpt, '--input', tmp_path / 'in', '--output', tmp_path / 'out',
                               '--crop_size', '65', module='predict')
    assert status == 0, err
    assert 'Logging error' not in err and '[1/1]' in out
    assert os.listdir(os.fsencode(tmp_path / 'out')) != []


# --- 5. bounded memory (the windows, finished band by band, equal the previous whole-canvas ones: test_inference)


def test_large_photos_are_predicted_in_windows_within_a_memory_limit_that_whole_prediction_exceeds(tmp_path):
    ckpt = small_checkpoint(tmp_path / 'ckpt.pth')
    os.makedirs(tmp_path / 'in')
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1100, 1300, 3), dtype=np.uint8)).save(
        tmp_path / 'in' / 'big.jpg')
    args = ['--checkpoint', ckpt, '--input', tmp_path / 'in', '--crop_size', '257', '--amp', 'off']  # fp32
    # Above what importing took, on 2 cores of an AMD EPYC (Zen 4): windows need 310-330 MB, the whole photo 867.
    windows, whole, huge = scripts([('predict', args + ['--output', tmp_path / 'w', '--window_above', '1']),
                                    ('predict', args + ['--output', tmp_path / 'o', '--whole']),
                                    ('predict', args + ['--output', tmp_path / 'c', '--crop_size', '60000'])],
                                   tmp_path, memory_above=560)
    assert windows[0] == 0, windows[2][-3000:]
    assert '(1300x1100, windows)' in windows[1]
    assert Image.open(tmp_path / 'w' / 'big.png').size == (1300, 1100)
    assert_clean_failure(whole, 'out of memory predicting', 'big.jpg (1300x1100)', 'in windows')
    assert leftovers(tmp_path / 'o') == [] and not os.path.exists(tmp_path / 'o' / 'big.png')
    assert_clean_failure(huge, 'out of memory predicting', 'lower --batch_size or --crop_size')


def test_out_of_memory_in_evaluation_and_training_is_a_message_naming_what_to_lower(synthetic_root, tmp_path):
    small_checkpoint(tmp_path / 'ckpt.pth')
    train = ['--train', '--exp', 'f', '--epochs', '1', '--scratch', '--seed', '0']
    flags = lambda workers: ['--backbone', 'vovnet39', '--workers', workers, '--data_root', synthetic_root]  # noqa: E731
    padding = lambda workers: [  # noqa: E731  an image padded to a 20000 x 20000 canvas (4.8 GB)
        ('main', ['--exp', 'f', '--epochs', '1', '--crop_size', '20000', '--checkpoint', 'ckpt.pth', *flags(workers)]),
        ('main', [*train, *flags(workers), '--crop_size', '20000', '--batch_size', '4'])]
    # a training step whose activations do not fit (8 crops of 1025 x 1025) runs first, on the whole margin: what
    # the failed commands leave mapped (~490 MB after the padding ones here) could make its batch fail first
    step = ('main', [*train, *flags('0'), '--crop_size', '1025', '--batch_size', '8'])
    step, *padded = scripts([step, *padding('0'), *padding('1')], tmp_path, memory_above=900)
    for evaluation, training in (padded[:2], padded[2:]):
        assert_clean_failure(evaluation, 'out of memory preparing', '--crop_size that fits in memory')
        assert_clean_failure(training, 'out of memory preparing a batch', 'lower --batch_size or --crop_size')
    assert_clean_failure(step, 'out of memory in a training step', 'Lower --batch_size or --crop_size')
    assert leftovers(tmp_path) == [] and not os.path.exists(tmp_path / 'data' / 'val')
    assert not glob.glob(str(tmp_path / 'data' / '*.pth'))


def test_a_metrics_line_that_does_not_fit_is_not_left_half_written(synthetic_root, tmp_path):
    result = script('main', TRAIN + ['--data_root', synthetic_root, '--print_freq', '1'], tmp_path, file_size=250)
    assert_clean_failure(result, 'metrics.jsonl: File too large')
    text = (tmp_path / 'data' / 'logs' / 'deeplab_vovnet39_pascal_v3_f' / 'metrics.jsonl').read_text()
    assert text.endswith('\n') and all(json.loads(line) for line in text.splitlines())


# --- 6. signals


def start(module, args, cwd):
    code = f'import sys; sys.path.insert(0, {ROOT!r}); import {module}; sys.exit({module}.cli({args!r}))'
    return subprocess.Popen([sys.executable, '-c', code], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS='1'))


def wait_for(condition, process, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, 'timed out'
        time.sleep(0.02)


@pytest.mark.parametrize('signum,group', [(signal.SIGTERM, True), (signal.SIGINT, False)])
def test_a_signal_during_evaluation_publishes_nothing_and_leaves_no_staging_folder(signum, group, synthetic_root,
                                                                                     tmp_path):
    data = tmp_path / 'voc'
    shutil.copytree(synthetic_root, data)
    val = data / 'VOC2012' / 'list' / 'val.txt'
    val.write_text(val.read_text() * 200)  # 800 images: time to be stopped
    small_checkpoint(tmp_path / 'ckpt.pth')
    process = start('main', EVAL[:-1] + ['1', '--checkpoint', 'ckpt.pth', '--data_root', str(data)], tmp_path)
    staging = lambda: glob.glob(str(tmp_path / 'data' / '.val.partial-*' / '*.png'))  # noqa: E731
    wait_for(lambda: len(staging()) >= 3, process)
    (os.killpg if group else os.kill)(process.pid, signum)  # the group: its data-loading worker too
    out, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, err
    assert f'evaluation stopped by signal {int(signum)} after' in err and 'nothing was published' in err
    assert 'Traceback' not in out + err
    assert leftovers(tmp_path) == [] and not os.path.exists(tmp_path / 'data' / 'val')


class DiesWhileShutDown(torch.utils.data.Dataset):
    """Item 1 kills its worker with SIGTERM after a while: the loop has taken item 0 and is shutting the workers
    down, as when a process group's SIGTERM reaches a worker after its main process stopped."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        if index == 1:
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGTERM)
        return torch.tensor(index)


def test_a_worker_killed_while_the_loop_shuts_its_workers_down_is_no_error(monkeypatch):
    unraisable = []
    monkeypatch.setattr(sys, 'unraisablehook', unraisable.append)
    loader = torch.utils.data.DataLoader(DiesWhileShutDown(), batch_size=1, num_workers=1)
    batches = pascal.Batches(loader)
    assert int(next(iter(batches))) == 0
    worker = batches._iterator._workers[0]
    batches.close()
    assert worker.exitcode == -signal.SIGTERM and unraisable == []  # killed during the join, and nothing printed


def test_a_workers_death_raised_while_a_stop_unwinds_is_still_the_stop(capsys):
    """PyTorch's SIGCHLD handler raises a data-loading worker's death wherever the main process is: a signal to the
    process group stops the run and kills the worker, and the handler may run while the stop unwinds (seen in a
    real run: in Batches.close, before it joined the workers). The run ends as the stop, not with a traceback."""
    def stopped_then_worker_died():
        try:
            raise errors.Interrupted(signal.SIGTERM, 'evaluation stopped by signal 15 after 3 of 800 images; '
                                                     'nothing was published')
        finally:
            raise RuntimeError('DataLoader worker (pid 4242) is killed by signal: Terminated. ')
    assert utils.exit_status(stopped_then_worker_died) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == 'evaluation stopped by signal 15 after 3 of 800 images; nothing was published\n'

    def worker_died():  # without a stop it is the failure it is
        raise RuntimeError('DataLoader worker (pid 4242) is killed by signal: Killed. ')
    with pytest.raises(RuntimeError, match='is killed by signal'):
        utils.exit_status(worker_died)


def test_a_signal_during_prediction_leaves_whole_files_only(tmp_path):
    small_checkpoint(tmp_path / 'ckpt.pth')
    photos(tmp_path / 'in', count=300)
    process = start('predict', ['--checkpoint', 'ckpt.pth', '--input', 'in', '--output', 'out', '--crop_size', '65',
                                '--batch_size', '1'], tmp_path)
    wait_for(lambda: len(glob.glob(str(tmp_path / 'out' / '*_overlay.jpg'))) >= 3, process)
    os.kill(process.pid, signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert 'stopped by signal 15 after' in err and 'Traceback' not in out + err
    assert leftovers(tmp_path / 'out') == []
    written = glob.glob(str(tmp_path / 'out' / '*'))
    assert 6 <= len(written) < 600
    for path in written:
        Image.open(path).load()


# --- 7. the loss of a batch without a labelled pixel


def test_the_batch_loss_is_the_mean_bit_for_bit_and_zero_without_labelled_pixels():
    criterion = engine.BatchCrossEntropy()
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = (torch.randn(2, 21, 33, 41, generator=generator) * 5).requires_grad_()
        target = torch.randint(0, 21, (2, 33, 41), generator=generator)
        target[torch.rand(2, 33, 41, generator=generator) < 0.4] = 255
        ours = criterion(logits, target)
        mean = F.cross_entropy(logits, target, ignore_index=255)
        assert torch.equal(ours, mean)
        assert torch.equal(torch.autograd.grad(ours, logits)[0], torch.autograd.grad(mean, logits)[0])
    target = torch.full((2, 33, 41), 255)
    loss = criterion(logits, target)
    assert loss.item() == 0 and int(criterion.labelled) == 0
    assert torch.equal(torch.autograd.grad(loss, logits)[0], torch.zeros_like(logits))
    assert F.cross_entropy(logits, target, ignore_index=255).isnan()  # what it replaces


def test_training_on_batches_without_labelled_pixels_is_finite_on_one_and_two_processes(synthetic_root, tmp_path,
                                                                                      monkeypatch, run_cli):
    data = tmp_path / 'voc'
    shutil.copytree(synthetic_root, data)
    for mask in glob.glob(str(data / 'VOC2012' / 'SegmentationClassAug' / '*.png')):
        Image.new('L', Image.open(mask).size, 255).save(mask)  # 'P' would be saved with 255 remapped to 1
    args = TRAIN + ['--data_root', str(data), '--print_freq', '1']
    for processes in (1, 2):  # one: main.py in this process; two: under torchrun
        folder = tmp_path / f'run{processes}'
        folder.mkdir()
        if processes == 1:
            monkeypatch.chdir(folder)
            status, out, err = run_cli(*args)
            assert status == 0, err
        else:
            result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                                     f'--nproc_per_node={processes}', os.path.join(ROOT, 'main.py')] + args,
                                    cwd=folder, capture_output=True, text=True, timeout=300,
                                    env=dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT))
            assert result.returncode == 0, result.stderr[-3000:]
            out = result.stdout
        assert 'loss 0.0000 (0.0000)' in out
        weights = torch.load(folder / 'data' / 'deeplab_vovnet39_pascal_v3_f_epoch1.pth', weights_only=True)
        assert checkpoints.first_non_finite(weights['state_dict']) is None


def test_a_diverging_loss_message_counts_the_labelled_pixels(synthetic_root, tmp_path, monkeypatch, run_cli):
    monkeypatch.chdir(tmp_path)
    real = engine.BatchCrossEntropy.forward
    monkeypatch.setattr(engine.BatchCrossEntropy, 'forward', lambda self, logits, target: real(
        self, logits * float('inf'), target))
    err = assert_clean_failure(run_cli(*TRAIN, '--data_root', synthetic_root), 'the loss became nan')
    assert 'labelled pixels of its batch: the run diverged' in err


# --- 8. flags and environment


@pytest.mark.parametrize('flags,message', [
    (['--configs', 'fp32+bf16'], 'names 2 precisions (fp32, bf16)'),
    (['--configs', 'int8+bf16'], 'names 2 precisions'),
    (['--configs', 'cl+cl'], 'repeats cl'),
    (['--configs', 'ov+cl'], 'OpenVINO (ov) takes a precision only (ov, ov+fp32, ov+bf16, ov+int8), not cl'),
    (['--configs', 'ov', '--mode', 'train'], 'OpenVINO configurations (ov) measure inference'),
    (['--configs', ','], 'names no configuration'),
    (['--backbones', ','], 'names no backbone'),
    (['--backbones', ' , '], 'names no backbone'),
])
def test_benchmark_refuses_conflicting_or_empty_lists(flags, message, tmp_path, monkeypatch, run_cli):
    monkeypatch.chdir(tmp_path)
    assert_clean_failure(run_cli(*flags, module='benchmark'), message)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('env,message', [
    (dict(WORLD_SIZE='2'), 'WORLD_SIZE=2 is set, but not RANK, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR'),
    (dict(WORLD_SIZE='two'), "WORLD_SIZE='two' is not a number"),
    (dict(WORLD_SIZE='2', RANK='5', LOCAL_RANK='0', LOCAL_WORLD_SIZE='2', MASTER_ADDR='127.0.0.1',
          MASTER_PORT='29512'), 'RANK=5 and WORLD_SIZE=2 do not make a process group'),
])
def test_a_distributed_environment_torchrun_did_not_set_is_a_message(env, message, synthetic_root, tmp_path,
                                                                      monkeypatch, run_cli):
    monkeypatch.chdir(tmp_path)  # the environment is read when the command runs: no process of its own is needed
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for module, args in (('main', TRAIN + ['--data_root', str(synthetic_root)]),
                         ('predict', ['--checkpoint', 'x.pth', '--input', str(tmp_path), '--output', 'out'])):
        assert_clean_failure(run_cli(*args, module=module), message)
    assert not os.path.exists(tmp_path / 'data') and not torch.distributed.is_initialized()


def test_a_class_names_file_of_the_wrong_length_names_the_file_and_the_flag(synthetic_root, tmp_path, monkeypatch,
                                                                           run_cli):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'names.txt').write_text('background\nthing\n')
    assert_clean_failure(run_cli(*TRAIN, '--data_root', synthetic_root, '--class_names', 'names.txt',
                                 '--num_classes', '3'),
                         'names.txt (--class_names) holds 2 class names, but --num_classes is 3')


def test_prediction_that_produced_nothing_exits_non_zero(tmp_path, run_cli):
    small_checkpoint(tmp_path / 'ckpt.pth')
    os.makedirs(tmp_path / 'in')
    (tmp_path / 'in' / 'notes.txt').write_text('not an image')
    (tmp_path / 'in' / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really')
    err = assert_clean_failure(run_cli('--checkpoint', tmp_path / 'ckpt.pth', '--input', tmp_path / 'in', '--output',
                                       tmp_path / 'out', module='predict'), 'no image of --input')
    assert '2 files skipped' in err and not os.path.exists(tmp_path / 'out')  # nor an empty folder
