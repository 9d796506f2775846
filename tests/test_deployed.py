"""Exported models (deployed.py): the OpenVINO IR that export.py --format openvino writes (fp32, and int8 through
NNCF) and the ONNX file, evaluated and predicted with as the checkpoint is (main.py / predict.py --checkpoint FILE),
and the files and flags they refuse."""
import glob
import importlib.util
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
from conftest import ROOT, cli_in, command, run_clis, succeeded
from PIL import Image

pytest.importorskip('openvino')
if importlib.util.find_spec('nncf') is None:  # looked up, not imported: this process never runs it (0.6 s, in
    pytest.skip('nncf is not installed', allow_module_level=True)  # every worker's collection)

EVAL = ['--exp', 'd', '--epochs', '1', '--backbone', 'vovnet39', '--crop_size', '65', '--workers', '0']

# Exported models run in fresh processes, never in pytest's: after OpenVINO and ONNX Runtime models had run in one
# process, that process segfaulted now and then later on (a signal raised in it, or a later test; seen in CI and
# reproduced outside pytest; docs/deployment.md). Each test's command lines run in one process of their own
# (conftest.run_clis).
def masks(folder) -> dict[str, np.ndarray]:
    return {os.path.basename(f): np.asarray(Image.open(f)) for f in sorted(glob.glob(os.path.join(folder, '*.png')))}


def agreement(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return float(np.mean([(a[k] == b[k]).mean() for k in a]))


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory, synthetic_root):
    """A tiny trained VoVNet-39: 6 epochs on the synthetic set (3 s), so that its mean IoU is not zero (2.6 here:
    background found) and an exported file's mean IoU can be compared with it."""
    folder = tmp_path_factory.mktemp('deployed')
    cli_in(folder, ['--train', '--exp', 'd', '--epochs', '6', '--backbone', 'vovnet39', '--scratch', '--crop_size',
                      '65', '--batch_size', '4', '--workers', '0', '--seed', '0', '--base_lr', '0.01',
                      '--save_every', '100', '--print_freq', '100', '--data_root', synthetic_root])
    shutil.move(folder / 'data' / 'deeplab_vovnet39_pascal_v3_d_epoch6.pth', folder / 'vov.pth')
    shutil.rmtree(folder / 'data')
    return folder / 'vov.pth'


@pytest.fixture(scope='module')
def exported(checkpoint, synthetic_root):
    """The checkpoint exported by the README's commands as a user runs them (fresh processes): an IR and its int8
    counterpart, and an ONNX file, each checked against PyTorch by export.py itself. Returns the folder and the
    two commands' outputs."""
    folder = checkpoint.parent
    images = os.path.join(synthetic_root, 'VOC2012', 'JPEGImages')
    ir = command(['export.py', '--checkpoint', 'vov.pth', '--format', 'openvino', '--height', '65', '--width', '65',
                  '--quantize', 'int8', '--calibration_input', images, '--calibration', '8'], str(folder))
    assert succeeded(ir), ir.stderr[-3000:]
    onnx = command(['export.py', '--checkpoint', 'vov.pth', '--output', 'vov.onnx', '--height', '65', '--width', '65'],
                   str(folder))
    assert succeeded(onnx), onnx.stderr[-3000:]
    return folder, ir.stdout, onnx.stdout


READ_BACK = """
import json, numpy as np, torch, deployed, weights
found = {}
for name in ('vov.xml', 'vov_int8.xml', 'vov.onnx'):
    model = deployed.read(name)
    shape = list(model(torch.randn(2, 3, 70, 90)).shape)
    found[name] = [model.name, model.backbone_name, model.num_classes, model.output_stride, model.meta, shape]
# the ONNX file against the checkpoint's PyTorch model at other heights and widths than the export's
import onnxruntime as ort
model = weights.model_from_checkpoint('vov.pth').eval()
session = ort.InferenceSession('vov.onnx', providers=['CPUExecutionProvider'])
sizes = []
for h, w in ((65, 65), (80, 97), (129, 70)):
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h))
    with torch.no_grad():
        expected = model(x).numpy()
    got = session.run(['logits'], {'image': x.numpy()})[0]
    sizes.append([list(got.shape), bool(np.array_equal(got.argmax(1), expected.argmax(1)))])
print(json.dumps({'files': found, 'onnx_sizes': sizes}))
"""


@pytest.fixture(scope='module')
def read_back(exported):
    """What the exported files give when read back by deployed.read, and the ONNX file's argmax against the
    checkpoint's PyTorch model at three sizes: one fresh process (exported models never run in pytest's)."""
    folder = exported[0]
    result = command(['-c', READ_BACK], str(folder))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.slow
def test_the_ir_export_writes_both_files_with_the_metadata_and_checks_them(exported, read_back):
    folder, out, _ = exported
    assert sorted(os.listdir(folder)) == ['vov.bin', 'vov.onnx', 'vov.pth', 'vov.xml', 'vov_int8.bin',
                                          'vov_int8.xml']
    assert 'OpenVINO' in out and 'vs PyTorch on a 97x96 input' in out and 'argmax agreement 100.0000%' in out
    int8 = next(line for line in out.splitlines() if line.startswith('vov_int8.xml:'))
    assert 80 < float(int8.split('fp32 ')[1].split('%')[0]) <= 100
    assert os.path.getsize(folder / 'vov_int8.bin') < os.path.getsize(folder / 'vov.bin') / 3  # int8 weights
    found = read_back['files']
    for name, precision in (('vov.xml', 'fp32'), ('vov_int8.xml', 'int8 (NNCF, 8 calibration images)'),
                            ('vov.onnx', 'fp32')):
        model, backbone, classes, stride, meta, shape = found[name]
        assert (model, backbone, classes, stride) == ('deeplabv3', 'vovnet39', 21, 16)
        assert meta['precision'] == precision and meta['checkpoint'] == 'vov.pth'
        assert meta['mean'] == [0.485, 0.456, 0.406] and len(meta['checkpoint_sha256']) == 64
        assert shape == [2, 21, 70, 90]  # dynamic batch, height and width


@pytest.mark.slow
def test_onnx_export_matches_pytorch_argmax_on_every_pixel(exported, read_back):
    """The README's ONNX export command, in a fresh process (moved here from test_tools, which exported a
    checkpoint of its own: this module's ONNX file is that command's)."""
    folder, _, out = exported
    assert re.search(r'argmax agreement 100\.0000%', out), out
    for (h, w), (shape, argmax_equal) in zip(((65, 65), (80, 97), (129, 70)), read_back['onnx_sizes']):
        assert shape == [2, 21, h, w]  # dynamic height and width
        assert argmax_equal, (h, w)
    assert sorted(os.listdir(folder)) == ['vov.bin', 'vov.onnx', 'vov.pth', 'vov.xml', 'vov_int8.bin',
                                          'vov_int8.xml']  # no temporary left


@pytest.mark.slow
def test_each_exported_file_evaluates_to_the_checkpoints_figures(exported, synthetic_root, tmp_path, monkeypatch):
    folder, _, _ = exported
    monkeypatch.chdir(tmp_path)
    runs = (('vov.pth', ['--amp', 'off']), ('vov.xml', ['--amp', 'off']), ('vov.onnx', []), ('vov_int8.xml', []),
            ('vov.xml#again', ['--amp', 'off']))
    out_dir = lambda name: name.replace('.', '_').replace('#', '_')  # noqa: E731
    calls = [('main', [*EVAL, '--checkpoint', folder / name.split('#')[0], '--data_root', synthetic_root,
                       '--output_dir', out_dir(name), '--json', f'{out_dir(name)}.json', *flags])
             for name, flags in runs]
    results = {}
    for (name, _), (status, out, err) in zip(runs, run_clis(calls, tmp_path)):
        assert status == 0 and 'Traceback' not in out + err, err
        results[name] = masks(os.path.join(out_dir(name), 'val')), json.load(open(f'{out_dir(name)}.json'))
    reference_masks, reference = results['vov.pth']
    for name in ('vov.xml', 'vov.onnx'):
        assert agreement(reference_masks, results[name][0]) > 0.999
        assert abs(results[name][1]['mean_iou'] - reference['mean_iou']) <= 0.1
    assert results['vov.xml'][1]['precision'].startswith('f32 (OpenVINO')
    assert results['vov.onnx'][1]['precision'] == 'fp32 (ONNX Runtime)'
    assert results['vov_int8.xml'][1]['precision'].startswith('int8 (NNCF, 8 calibration images)')
    assert agreement(reference_masks, results['vov_int8.xml'][0]) > 0.9
    assert reference['mean_iou'] > 1  # a trained model: the comparisons of mean IoU are not of zeros
    assert abs(results['vov_int8.xml'][1]['mean_iou'] - reference['mean_iou']) <= 1.0
    assert agreement(results['vov.xml#again'][0], results['vov.xml'][0]) == 1.0  # the same masks twice
    assert results['vov.xml#again'][1]['mean_iou'] == results['vov.xml'][1]['mean_iou']


@pytest.mark.slow
def test_prediction_with_the_ir_gives_the_checkpoints_masks(exported, tmp_path):
    folder, _, _ = exported
    photos = tmp_path / 'photos'
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([(60, 50), (150, 70)]):  # the second one larger than the crop: windows
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(photos / f'p{i}.png')
    common = ['--input', photos, '--crop_size', '65', '--amp', 'off']
    got = {}
    runs = (('pth', 'vov.pth'), ('ir', 'vov.xml'), ('onnx', 'vov.onnx'))
    calls = [('predict', ['--checkpoint', folder / checkpoint, *common, '--output', tmp_path / name])
             for name, checkpoint in runs]
    for (name, _), (status, out, err) in zip(runs, run_clis(calls, tmp_path)):
        assert status == 0 and 'Traceback' not in out + err, err
        got[name] = masks(tmp_path / name)
    assert 'OpenVINO' not in out and 'ONNX Runtime, fp32' in out
    assert got['pth']['p1.png'].shape == got['ir']['p1.png'].shape == (70, 150)
    assert agreement(got['pth'], got['ir']) > 0.999 and agreement(got['pth'], got['onnx']) > 0.999


def refused(result, *needles):
    status, out, err = result
    assert status == 1 and 'Traceback' not in out + err, (status, err[-3000:])
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.mark.slow
def test_exported_files_that_cannot_be_run_are_messages_naming_the_file(exported, synthetic_root, tmp_path,
                                                                        monkeypatch):
    folder, _, _ = exported
    monkeypatch.chdir(tmp_path)
    for name in ('vov.xml', 'vov.bin', 'vov_int8.bin', 'vov.onnx'):
        shutil.copy(folder / name, name)
    os.makedirs('no_bin')
    shutil.copy('vov.xml', 'no_bin/vov.xml')
    os.makedirs('other_bin')
    shutil.copy('vov.xml', 'other_bin/vov.xml')
    shutil.copy('vov_int8.bin', 'other_bin/vov.bin')  # another export's weights
    os.makedirs('same_size')
    shutil.copy('vov.xml', 'same_size/vov.xml')
    weights = bytearray(open('vov.bin', 'rb').read())
    weights[1000:1004] = b'\x00\x00\x80\x7f'  # one weight changed: the size fits, the content does not
    open('same_size/vov.bin', 'wb').write(weights)
    open('page.xml', 'w').write('<html><body>not a model</body></html>')
    open('text.xml', 'w').write('not XML at all')
    open('text.onnx', 'w').write('not ONNX at all')
    import onnx
    proto = onnx.load('vov.onnx')
    del proto.metadata_props[:]
    onnx.save(proto, 'bare.onnx')
    make = """
import openvino as ov, torch, deployed, deeplab
from conftest import randomize
ov.save_model(ov.convert_model(torch.nn.Conv2d(3, 21, 1), example_input=torch.zeros(1, 3, 8, 8)), 'bare.xml')
five = randomize(deeplab.vovnet39(num_classes=5), seed=1).eval()  # another class count than the dataset's
deployed.save_ir(deployed.to_openvino(five, 65, 65), 'five.xml', 'five.bin',
                 deployed.metadata(five, 'five.pth', None, 'fp32'))
"""
    photo = tmp_path / 'p.png'
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(photo)
    cases = [('no_bin/vov.xml', ['no_bin/vov.bin is missing']),
             ('other_bin/vov.xml', ['other_bin/vov.xml', 'the .bin is damaged or belongs to another export']),
             ('same_size/vov.xml', ['same_size/vov.bin does not match same_size/vov.xml']),
             ('page.xml', ['page.xml is not an OpenVINO IR']),
             ('text.xml', ['text.xml is not an OpenVINO IR']),
             ('text.onnx', ['text.onnx is not an ONNX model ONNX Runtime']),
             ('bare.onnx', ['bare.onnx carries no metadata of this project']),
             ('bare.xml', ['bare.xml carries no metadata of this project']),
             ('absent.xml', ['absent.xml does not exist'])]
    checks = []
    for checkpoint, needles in cases:
        checks.append(('main', [*EVAL, '--checkpoint', checkpoint, '--data_root', synthetic_root], needles))
        checks.append(('predict', ['--checkpoint', checkpoint, '--input', photo, '--output', 'masks'], needles))
    checks.append(('main', [*EVAL, '--checkpoint', 'five.xml', '--data_root', synthetic_root],
                   ['five.xml predicts 5 classes, the dataset has 21']))
    for flags, needle in ((['--backbone', 'resnet50'], 'pass --backbone vovnet39'),
                          (['--output_stride', '8'], 'pass --output_stride 16'),
                          (['--quantize', 'int8'], '--quantize applies to PyTorch checkpoints'),
                          (['--amp', 'fp16'], '--amp fp16 runs on CUDA GPUs')):
        checks.append(('predict', ['--checkpoint', 'vov.xml', '--input', photo, '--output', 'masks', *flags],
                       [needle]))
    checks.append(('main', [*EVAL, '--checkpoint', 'vov.onnx', '--data_root', synthetic_root, '--amp', 'bf16'],
                   ['vov.onnx runs in ONNX Runtime in the precision it was exported in']))
    checks.append(('main', [*EVAL, '--checkpoint', 'vov.xml', '--data_root', synthetic_root, '--json', 'vov.bin'],
                   ['vov.bin', 'its weights']))  # the IR's .bin is an input too
    checks.append(('benchmark', ['--checkpoint', 'vov.xml', '--configs', 'fp32'],
                   ['vov.xml is an exported file, measured as it is']))
    # What needs a PyTorch model (export, publishing, training from it) names the exported file as such.
    rebuild = 'give the checkpoint it was exported from'
    checks.append(('export', ['--checkpoint', 'vov.xml', '--output', 'again.onnx'],
                   ['checkpoint vov.xml is an exported model (OpenVINO IR)', rebuild]))
    checks.append(('hub', ['save', '--checkpoint', 'vov.bin', '--output', 'published'],
                   ['vov.bin is the weights file of the exported model vov.xml', 'give vov.xml to main.py', rebuild]))
    checks.append(('main', ['--train', '--exp', 'd', '--epochs', '1', '--backbone', 'vovnet39', '--init', 'vov.onnx',
                            '--data_root', synthetic_root], ['--init vov.onnx is an exported model (ONNX)', rebuild]))
    make = f'import sys; sys.path.insert(0, {os.path.join(ROOT, "tests")!r})' + make  # run before the first check
    results = run_clis([(module, argv, make if i == 0 else None) for i, (module, argv, _) in enumerate(checks)],
                       tmp_path)
    for (_, _, needles), result in zip(checks, results):
        refused(result, *needles)
    assert not os.path.exists('masks') and not os.path.exists('data/val')
    assert not os.path.exists('again.onnx') and not os.path.exists('published') and not os.path.exists('data')


def test_export_refuses_outputs_over_its_inputs_and_names_that_contradict_the_format(checkpoint, tmp_path,
                                                                                     monkeypatch, run_cli):
    monkeypatch.chdir(tmp_path)
    shutil.copy(checkpoint, 'model.bin')  # a checkpoint named as the IR's weights would be
    refused(run_cli('--checkpoint', 'model.bin', '--output', 'model.xml', module='export'),
            'model.bin', 'the checkpoint')
    refused(run_cli('--checkpoint', 'model.bin', '--format', 'openvino', '--output', 'model.onnx', module='export'),
            'an OpenVINO IR is an .xml file')
    refused(run_cli('--checkpoint', 'model.bin', '--format', 'onnx', '--output', 'model.xml', module='export'),
            'pass --format openvino')
    assert sorted(os.listdir()) == ['model.bin']


def test_without_openvino_or_nncf_the_message_is_the_pip_install(checkpoint, tmp_path, monkeypatch, run_cli):
    monkeypatch.chdir(tmp_path)
    ir = tmp_path / 'vov.xml'
    ir.write_text('<?xml version="1.0"?>\n<net name="m" version="11"></net>\n')
    photo = tmp_path / 'p.png'
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(photo)
    monkeypatch.setitem(sys.modules, 'nncf', None)  # an import of it fails as when it is not installed
    refused(run_cli('--checkpoint', checkpoint, '--format', 'openvino', '--quantize', 'int8',
                    '--calibration_input', photo, module='export'), 'pip install nncf')
    monkeypatch.setitem(sys.modules, 'openvino', None)
    refused(run_cli('--checkpoint', checkpoint, '--output', 'm.xml', module='export'), 'pip install openvino')
    refused(run_cli('--checkpoint', ir, '--input', photo, '--output', 'masks', module='predict'),
            'pip install openvino')
    assert sorted(os.listdir()) == ['p.png', 'vov.xml']


@pytest.mark.slow
@pytest.mark.parametrize('name', ['vov_int8.xml', 'vov.onnx'])
def test_ctrl_c_during_the_evaluation_of_an_exported_file_is_a_clean_stop(exported, name, synthetic_root, tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) while main.py evaluates an exported file: the
    stop message and exit status of a checkpoint's evaluation, nothing published (a crash was seen after several
    exported models had run in one process; docs/deployment.md)."""
    import signal

    from test_real_faults import leftovers, start, wait_for
    folder, _, _ = exported
    data = tmp_path / 'voc'
    shutil.copytree(synthetic_root, data)
    val = data / 'VOC2012' / 'list' / 'val.txt'
    val.write_text(val.read_text() * 200)  # 800 images: time to be stopped
    process = start('main', [*EVAL, '--checkpoint', str(folder / name), '--data_root', str(data)], tmp_path)
    staging = lambda: glob.glob(str(tmp_path / 'data' / '.val.partial-*' / '*.png'))  # noqa: E731
    wait_for(lambda: len(staging()) >= 3, process)
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGINT, err
    assert 'evaluation stopped by signal 2 after' in err and 'nothing was published' in err
    assert 'Traceback' not in out + err
    assert leftovers(tmp_path) == [] and not os.path.exists(tmp_path / 'data' / 'val')


@pytest.mark.slow
def test_the_benchmark_measures_openvino_beside_pytorch_in_one_run(checkpoint, tmp_path):
    [(status, out, err)] = run_clis([('benchmark', [
        '--backbones', 'vovnet39', '--checkpoint', checkpoint, '--size', '65', '--warmup', '1', '--iters', '2',
        '--configs', 'fp32,ov+fp32,ov+int8', '--json', tmp_path / 'b.json', '--no_isolate'])], tmp_path)
    assert status == 0 and 'Traceback' not in out + err, err
    rows = {r['config']: r for r in json.load(open(tmp_path / 'b.json'))['results']}
    assert list(rows) == ['original', 'fp32', 'ov+fp32', 'ov+int8']
    assert rows['ov+fp32']['argmax_agreement'] == 100.0 and rows['ov+int8']['argmax_agreement'] > 80
    assert all(r['latency_ms'] > 0 for r in rows.values())


@pytest.mark.slow
def test_the_benchmark_measures_an_exported_file_as_it_is(exported, tmp_path):
    folder, _, _ = exported
    runs = (('vov_int8.xml', 'OpenVINO'), ('vov.onnx', 'ONNX Runtime'))
    calls = [('benchmark', ['--checkpoint', folder / name, '--size', '65', '--warmup', '1', '--iters', '2'])
             for name, _ in runs]
    for (_, runtime), (status, out, err) in zip(runs, run_clis(calls, tmp_path)):
        assert status == 0 and 'Traceback' not in out + err, err
        rows = [line for line in out.splitlines() if line.startswith('vovnet39')]
        assert len(rows) == 1 and runtime in rows[0] and ' ms ' in rows[0], out
        # no baseline, no parameter count: those figures are left out, not shown as dashes
        assert ' ms  peak ' in rows[0] and all(dash not in rows[0] for dash in ('(x', ' - ', '-%')), rows[0]
