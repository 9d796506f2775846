"""Bad inputs aimed at the surfaces a user reaches last (--json, hub.py save --metrics, config.json, checkpoint
records, --pretrained_path, int8 export and prediction), each produced for real and answered by one message naming
the file or the flag, exit status 1, no traceback, and the file system as it was."""
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import USER_CKPT, USER_SMALL, USER_TRAIN, initial_model, randomize
from PIL import Image
from torch import nn

import checkpoints
import errors
import inference
import quantize
import weights

EVAL = ['--exp', 't', '--epochs', '1', '--backbone', 'vovnet39', '--data_root', 'voc', *USER_SMALL]


def tree(folder) -> dict[str, tuple[int, int, int, int]]:
    """Every file under `folder` with its inode, size, modification and change times (ns): what a refused command
    must leave unchanged. Any write, truncation or replacement changes the change time (the kernel sets it; no
    call sets it back) or the inode, even one that writes the same bytes, which a hash of the contents would not
    see; and it costs a stat instead of hashing the workspace's ~0.5 GB twice per test."""
    found = {}
    for base, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(base, name)
            if not os.path.islink(path):
                s = os.stat(path)
                found[os.path.relpath(path, folder)] = s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns
    return found


def refused_in_process(result, *phrases):
    status, out, err = result
    assert status == 1 and 'Traceback' not in out + err, err[-2000:]
    for phrase in phrases:
        assert phrase in err, err[-2000:]


# --- No output over an input, nor over another output of the same run


@pytest.mark.slow
@pytest.mark.parametrize('target,phrases', [
    ('voc/VOC2012/list/val.txt', ("the dataset's list file", '--json')),
    ('data/deeplab_vovnet39_pascal_v3_t_epoch1_iou.png', ('twice, as --output_dir and as --json',)),
    ('data/val/synthetic_val_00001.png', ('twice, as --output_dir and as --json',)),
    (USER_CKPT, ('the checkpoint evaluated', '--json')),
    ('data', ('is a folder',)),
])
def test_json_never_lands_on_an_input_or_another_output(user_workspace, target, phrases, run_cli, monkeypatch):
    folder, _ = user_workspace
    monkeypatch.chdir(folder)
    before = tree(folder)
    refused_in_process(run_cli(*EVAL, '--json', target), *phrases)
    assert tree(folder) == before


@pytest.mark.slow
def test_export_never_writes_over_a_file_of_the_model_folder_it_reads(user_workspace, run_cli, monkeypatch):
    folder, _ = user_workspace
    monkeypatch.chdir(folder)
    before = tree(folder)
    refused_in_process(run_cli('--checkpoint', 'hub/m', '--output', 'hub/m/config.json', module='export'),
                       'hub/m/config.json', 'the checkpoint (--checkpoint) (config.json)', '--output')
    assert tree(folder) == before


# --- Records and cards that tell the truth


@pytest.fixture
def evaluation(user_workspace, tmp_path):
    """The workspace's checkpoint and its evaluation's figures (main.py --json), in a folder of the test's own."""
    folder, _ = user_workspace
    shutil.copy(folder / USER_CKPT, tmp_path / 'ckpt.pth')
    figures = json.load(open(folder / 'data' / 'eval.json'))
    figures['checkpoint_sha256'] = hashlib.sha256((tmp_path / 'ckpt.pth').read_bytes()).hexdigest()

    def metrics(**changes):
        path = tmp_path / f'metrics{len(os.listdir(tmp_path))}.json'
        path.write_text(json.dumps({**figures, **changes}))
        return path
    return tmp_path / 'ckpt.pth', metrics


@pytest.mark.slow
@pytest.mark.parametrize('changes,phrases', [
    ({'model': 'deeplabv3plus', 'checkpoint_sha256': None}, ('its model is deeplabv3plus', "checkpoint's deeplabv3")),
    ({'checkpoint_sha256': '0' * 64, 'checkpoint': 'other.pth'}, ('evaluation of another file (other.pth',)),
    ({'num_classes': 5, 'checkpoint_sha256': None}, ('its num_classes is 5',)),
    ({'backbone': 'resnet50', 'checkpoint_sha256': None}, ('its backbone is resnet50',)),
    ({'protocol': {'crop_size': 65, 'output_stride': 8}, 'checkpoint_sha256': None}, ('its output_stride is 8',)),
    ({'mean_iou': 250.0}, ('not a percentage',)),
])
def test_hub_save_refuses_the_metrics_of_another_model(evaluation, changes, phrases, tmp_path, run_cli):
    checkpoint, metrics = evaluation
    refused_in_process(run_cli('save', '--checkpoint', checkpoint, '--output', tmp_path / 'out', '--metrics',
                               metrics(**changes), module='hub'), '--metrics', *phrases)
    assert not os.path.exists(tmp_path / 'out')


@pytest.mark.slow
def test_a_card_names_the_users_dataset_and_the_precision_it_was_measured_in(evaluation, tmp_path, run_cli):
    checkpoint, metrics = evaluation
    int8 = metrics(precision='int8 (PT2E, 4 calibration images)')
    status, _, err = run_cli('save', '--checkpoint', checkpoint, '--output', tmp_path / 'out', '--metrics', int8,
                             module='hub')
    assert status == 0, err
    card = (tmp_path / 'out' / 'README.md').read_text()
    assert 'computed in int8 (PT2E, 4 calibration images)' in card and 'mean IoU (%), int8' in card
    assert 'PASCAL VOC' not in card and 'a custom dataset (voc/, 21 classes: background, aeroplane' in card


def test_a_five_class_custom_dataset_is_not_called_voc(tmp_path, run_cli):
    names = ['sky', 'road', 'car', 'tree', 'person']
    model = randomize(initial_model(num_classes=5), seed=2)
    torch.save({'state_dict': model.state_dict(), 'model_args': model.model_args, 'epoch': 3, 'class_names': names,
                'dataset': 'pascal', 'args': {'dataset': 'pascal', 'data_root': 'streets'}}, tmp_path / 'c.pth')
    status, _, err = run_cli('save', '--checkpoint', tmp_path / 'c.pth', '--output', tmp_path / 'out', module='hub')
    assert status == 0, err
    card = (tmp_path / 'out' / 'README.md').read_text()
    assert 'PASCAL VOC' not in card and 'pascal-voc-2012' not in card
    assert 'a custom dataset (streets/, 5 classes: sky, road, car, tree, person)' in card


@pytest.mark.slow
def test_a_trained_model_given_as_imagenet_weights_points_to_init(user_workspace, run_cli, monkeypatch):
    folder, _ = user_workspace
    monkeypatch.chdir(folder)
    before = tree(folder)
    common = [*USER_TRAIN, '--exp', 'pp', '--data_root', 'voc']
    refused_in_process(run_cli(*common, '--pretrained_path', USER_CKPT), 'whole trained segmentation model',
                       f'--init {USER_CKPT}')
    refused_in_process(run_cli(*common, '--pretrained_path', 'hub/m'), '--pretrained_path', 'is a folder', '--init')
    assert tree(folder) == before


# --- Every field of a model file, checked where it is read


@pytest.fixture(scope='module')
def model_folder(tmp_path_factory):
    """A folder written by hub.py save from a small random model."""
    base = tmp_path_factory.mktemp('fields')
    model = randomize(initial_model(num_classes=3), seed=1)
    torch.save({'state_dict': model.state_dict(), 'model_args': model.model_args}, base / 'c.pth')
    import hub
    hub.save(str(base / 'c.pth'), str(base / 'm'))
    return base / 'm'


@pytest.mark.parametrize('field,value,phrases', [
    ('num_classes', -3, ('num_classes=-3', 'from 1 to 255')),
    ('num_classes', 10 ** 30, ('num_classes=1000000000000000000000000000000',)),
    ('output_stride', 32, ('output_stride=32', '8 or 16')),
    ('num_groups', 0, ('num_groups=0', 'positive number of GroupNorm groups')),
    ('num_groups', 7, ('cannot be built', 'num_groups=7')),
    ('weight_std', 'yes', ("weight_std='yes'", 'true/false')),
    ('format_version', '1', ("format_version is '1'", 'whole number')),
    ('format_version', 0, ('format_version is 0',)),
    ('class_names', ['a', 'b'], ('2 class names for 3 classes',)),
    ('class_names', ['a', 7, 'c'], ('class_names is', 'a list of names')),
    ('input', {'mean': [0.5, 0.5], 'std': [0.229, 0.224, 0.225]}, ('input.mean is [0.5, 0.5]', 'three numbers')),
    ('input', {'mean': [0.5, 0.5, 0.5], 'std': [0.229, 0.224, 0.225]}, ('input.mean is [0.5, 0.5, 0.5]',
                                                                          "ImageNet's mean")),
    ('crop_size', 'big', ("crop_size is 'big'",)),
    ('evaluation', [], ('evaluation is []',)),
    ('colour_space', 'BGR', ('fields this code does not read (colour_space)',)),
])
def test_each_config_field_is_checked_naming_the_file_and_the_field(model_folder, tmp_path, field, value, phrases):
    folder = tmp_path / 'm'
    shutil.copytree(model_folder, folder)
    config = json.load(open(folder / 'config.json'))
    config[field] = value
    (folder / 'config.json').write_text(json.dumps(config))
    with pytest.raises(errors.UserError) as e:
        weights.from_pretrained(str(folder))
    message = e.value.for_user()
    assert f'config.json of {folder}' in message or f'{folder} is in format' in message, message
    for phrase in phrases:
        assert phrase in message, message
    assert '--groups' not in message


def test_a_folder_where_config_json_should_be_a_file_is_a_message(model_folder, tmp_path):
    folder = tmp_path / 'm'
    shutil.copytree(model_folder, folder)
    os.unlink(folder / 'model.safetensors')
    os.mkdir(folder / 'model.safetensors')
    with pytest.raises(errors.UserError, match='has no model.safetensors'):
        weights.from_pretrained(str(folder))


@pytest.mark.parametrize('field,value,phrase', [
    ('version', '1', "version = '1'"), ('version', 2, 'version = 2'), ('epoch', -1, 'epoch = -1'),
    ('class_names', ['a', 'b'], '2 class names for its 3 classes'), ('best_miou', 'high', "best_miou = 'high'"),
])
def test_each_checkpoint_field_is_checked_naming_the_file_and_the_field(tmp_path, field, value, phrase):
    model = initial_model(num_classes=3)
    path = tmp_path / 'c.pth'
    torch.save({'state_dict': model.state_dict(), 'model_args': model.model_args, field: value}, path)
    with pytest.raises(errors.UserError) as e:
        checkpoints.load(str(path))
    assert str(path) in e.value.for_user() and phrase in e.value.for_user()


def test_stray_decoder_tensors_in_a_deeplabv3_checkpoint_are_named_without_groups_advice(tmp_path):
    v3 = initial_model(num_classes=3)
    v3plus = initial_model(num_classes=3, model='deeplabv3plus')
    state = {**v3.state_dict(), **{k: v for k, v in v3plus.state_dict().items() if k.startswith('decoder.project')}}
    torch.save({'state_dict': state, 'model_args': v3.model_args}, tmp_path / 'c.pth')
    with pytest.raises(errors.UserError) as e:
        weights.model_from_checkpoint(str(tmp_path / 'c.pth'))
    message = e.value.for_user()
    assert 'tensors of two models' in message and 'decoder.project' in message and '--groups' not in message


# --- Exports: all or nothing


@pytest.mark.slow
def test_int8_export_with_unreadable_calibration_images_writes_nothing(user_workspace, tmp_path, run_cli):
    folder, _ = user_workspace
    bad = tmp_path / 'bad'
    bad.mkdir()
    (bad / 'a.jpg').write_bytes(b'not an image')
    (bad / 'b.png').write_bytes(Image.new('RGB', (40, 40)).tobytes()[:50])
    refused_in_process(run_cli('--checkpoint', folder / USER_CKPT, '--output', tmp_path / 'out' / 'm.onnx',
                               '--quantize', 'int8', '--calibration_input', bad, '--height', '65', '--width', '65',
                               module='export'), f'--calibration_input {bad}', 'a.jpg', 'b.png')
    assert sorted(os.listdir(tmp_path)) == ['bad']


@pytest.mark.slow
def test_an_int8_export_that_onnx_runtime_would_reject_is_refused_before_any_work(user_workspace, tmp_path,
                                                                                   run_cli):
    folder, _ = user_workspace
    refused_in_process(run_cli('--checkpoint', folder / USER_CKPT, '--output', tmp_path / 'm.onnx', '--quantize',
                               'int8', '--calibration_input', folder / 'voc' / 'VOC2012' / 'JPEGImages',
                               '--exporter', 'torchscript', '--opset', '11', module='export'),
                       '--opset 11', '--exporter torchscript', 'opset 13')
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_an_int8_export_that_fails_writing_leaves_neither_file(user_workspace, tmp_path, mount, run_cli,
                                                                monkeypatch):
    """A disk with room for the fp32 file (118 MB) but not for the int8 one beside it: the int8 step fails for
    real (ENOSPC) and the fp32 file, written first, is not left behind either. (The TorchScript exporter: 1 s
    instead of the dynamo exporter's 9; both files are written by the same code, and test_quantize exports int8
    with the dynamo exporter.)"""
    folder, _ = user_workspace
    disk = mount('disk', '125m')
    if disk is None:
        pytest.skip('this process may not mount a tmpfs (not root)')
    monkeypatch.chdir(folder)
    status, out, err = run_cli('--checkpoint', folder / USER_CKPT, '--output', disk / 'm.onnx', '--quantize', 'int8',
                               '--calibration_input', folder / 'voc' / 'VOC2012' / 'JPEGImages', '--calibration', '2',
                               '--height', '65', '--width', '65', '--exporter', 'torchscript', '--opset', '17',
                               module='export')
    assert status == 1 and 'Traceback' not in out + err, err[-2000:]
    assert 'No space left on device' in err and '--output' in err and 'm_int8.onnx' in err  # the int8 file's
    assert os.listdir(disk) == []


# --- int8 prediction


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


@pytest.mark.slow
def test_int8_windows_of_images_of_any_width_run_one_compilation_of_the_canvas():
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    crop = 32
    net = quantize.int8(Tiny().eval(), [torch.randn(3, crop, crop) for _ in range(2)])
    quantize.warm_up(net, (1, 3, crop, crop))
    runner = inference.Runner(net, inference.Execution(torch.device('cpu')), crop)
    compiled = counters['stats']['unique_graphs']
    with torch.inference_mode():
        for width in (50, 70, 91):  # windows sliced from padded images of three widths: three sets of strides
            assert runner.windows(torch.randn(3, 40, width)).shape == (40, width)
    assert counters['stats']['unique_graphs'] == compiled


@pytest.mark.slow
def test_int8_prediction_of_unreadable_inputs_names_input_and_the_files(user_workspace, tmp_path, run_cli):
    pytest.importorskip('torchao')
    folder, _ = user_workspace
    photos = tmp_path / 'photos'
    photos.mkdir()
    good = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    good.save(photos / 'cut.png')
    data = (photos / 'cut.png').read_bytes()
    (photos / 'cut.png').write_bytes(data[:len(data) // 2])  # the header reads, the pixels do not
    (photos / 'junk.jpg').write_bytes(b'junk')
    for flags in ([], ['--quantize', 'int8']):
        status, out, err = run_cli('--checkpoint', folder / USER_CKPT, '--input', photos, '--output',
                                   tmp_path / 'out', '--crop_size', '65', *flags, module='predict')
        refused_in_process((status, out, err), f'--input {photos}')
        assert 'cut.png' in out + err and 'junk.jpg' in out + err
        assert not os.path.exists(tmp_path / 'out')
