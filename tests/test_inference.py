"""inference.Runner, the one path of images through a model, against the code it replaced (evaluation's
predict_logits and multi_scale_probs in main.py, predict.py's Predictor, the benchmark's forward), copied below as
they were: the same outputs, bit for bit, on every path. Also the progress lines of evaluation and prediction,
and the choices --amp auto makes."""
import os
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import initial_model, randomize

import deeplab
import inference
import utils

# --- the previous code, verbatim but for names


def old_predict_logits(model, image, execution):
    with execution.autocast():
        return model(execution.input(image)).float()


def old_multi_scale_probs(model, image, scales, flip, crop_size, execution, logits_at_1=None):
    image = image.to(execution.device)
    h, w = image.shape[-2:]
    total = 0
    for scale in scales:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        scaled = F.interpolate(image, size=size, mode='bilinear', align_corners=True) if scale != 1 else image
        pad = (0, max(0, crop_size - size[1]), 0, max(0, crop_size - size[0]))
        for flipped in ((False, True) if flip else (False,)):
            if scale == 1 and not flipped and logits_at_1 is not None:
                total = total + logits_at_1.softmax(1)
                continue
            x = F.pad(scaled.flip(-1) if flipped else scaled, pad)
            logits = old_predict_logits(model, x, execution)[..., :size[0], :size[1]]
            if flipped:
                logits = logits.flip(-1)
            logits = F.interpolate(logits, size=(h, w), mode='bilinear', align_corners=True)
            total = total + logits.softmax(1)
    return total


class OldPredictor:
    def __init__(self, model, device, crop_size, amp, slide):
        self.model, self.device, self.crop, self.amp, self.slide = model, device, crop_size, amp, slide

    def _forward(self, x):
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            return self.model(x.to(self.device)).float()

    def batch(self, images):
        canvas = torch.zeros(len(images), 3, self.crop, self.crop)
        for i, image in enumerate(images):
            canvas[i, :, :image.shape[1], :image.shape[2]] = image
        pred = utils.class_map(self._forward(canvas)).cpu()
        return [pred[i, :image.shape[1], :image.shape[2]] for i, image in enumerate(images)]

    def large(self, image):
        h, w = image.shape[1:]
        padded = F.pad(image, (0, max(0, self.crop - w), 0, max(0, self.crop - h)))
        if not self.slide:
            return utils.class_map(self._forward(padded[None]))[0, :h, :w].cpu()
        ph, pw = padded.shape[1:]
        crop, stride = self.crop, max(1, self.crop * 2 // 3)
        total, count = None, torch.zeros(1, ph, pw)
        for y in inference.window_starts(ph, crop, stride):
            for x in inference.window_starts(pw, crop, stride):
                probs = self._forward(padded[None, :, y:y + crop, x:x + crop]).softmax(1)[0].cpu()
                if total is None:
                    total = torch.zeros(probs.shape[0], ph, pw)
                total[:, y:y + crop, x:x + crop] += probs
                count[:, y:y + crop, x:x + crop] += 1
        return utils.class_map(total / count, 0)[:h, :w]


# --- the same outputs


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    model = deeplab.vovnet39(num_classes=5).eval()
    with torch.no_grad():  # centre each class's logits on a sample, so that several classes win somewhere
        model.aspp.conv3.bias.sub_(model(torch.randn(1, 3, 97, 97)).mean((0, 2, 3)))
    return model


EXECUTIONS = [(None, False), (None, True), (torch.bfloat16, True)]


@pytest.mark.parametrize('amp,channels_last', EXECUTIONS)
@pytest.mark.slow
def test_evaluation_and_multi_scale_logits_are_the_previous_code_s(model, amp, channels_last):
    execution = inference.Execution(torch.device('cpu'), amp, channels_last)
    net = execution.prepare(model)
    runner = inference.Runner(net, execution, 65)
    image = torch.randn(1, 3, 65, 81)  # as evaluation's dataset gives it: padded to the crop, one side larger
    h, w = 50, 81
    image[..., h:, :] = 0
    with torch.inference_mode():
        old = old_predict_logits(net, image, execution)[..., :h, :w]
        assert torch.equal(runner.logits(image, (h, w)), old)
        for scales, flip in (([0.5, 1.0, 1.5], True), ([0.75], False), ([1.0], True)):
            expected = old_multi_scale_probs(net, image[..., :h, :w], scales, flip, 65, execution, old)
            assert torch.equal(runner.multi_scale_probs(image[..., :h, :w], scales, flip, old), expected)


class Context(torch.nn.Module):
    """Local evidence plus three times the canvas's mean: its classes move with whatever the canvas holds (padding
    included), where a DeepLab's move only a little."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 7, 5, padding=2)

    def forward(self, x):
        y = self.conv(x)
        return y + 3 * y.mean((2, 3), keepdim=True)


@pytest.mark.parametrize('amp', [None, torch.bfloat16])
@pytest.mark.parametrize('which', ['deeplab', 'context'])
@pytest.mark.slow
def test_prediction_of_small_batches_whole_images_and_windows_is_the_previous_code_s(model, amp, which):
    model = model if which == 'deeplab' else Context().eval()
    cpu = torch.device('cpu')
    runner = inference.Runner(model, inference.Execution(cpu, amp), 65)
    old = OldPredictor(model, cpu, 65, amp, slide=False)
    old_windows = OldPredictor(model, cpu, 65, amp, slide=True)
    small = [torch.randn(3, 40, 60), torch.randn(3, 65, 30), torch.randn(3, 12, 65)]
    large = [torch.randn(3, 70, 140), torch.randn(3, 150, 66)]
    classes = set()
    with torch.inference_mode():
        for a, b in zip(runner.class_maps(small), old.batch(small)):
            assert torch.equal(a, b)
            classes |= set(a.unique().tolist())
        for image in large:
            assert torch.equal(runner.whole(image), old.large(image))
            windows = runner.windows(image)
            assert torch.equal(windows, old_windows.large(image))
            classes |= set(windows.unique().tolist())
    assert len(classes) > 1  # the class maps compared are not all one class


@pytest.mark.parametrize('crop', [32, 65])
@pytest.mark.parametrize('size', [(200, 150), (66, 300), (300, 64), (131, 130)])
def test_windows_finished_band_by_band_equal_windows_over_the_whole_canvas(crop, size):
    cpu = torch.device('cpu')
    model = Context().eval()
    runner = inference.Runner(model, inference.Execution(cpu), crop)
    image = torch.randn(3, *size)
    with torch.inference_mode():
        banded = runner.windows(image)
        assert torch.equal(banded, OldPredictor(model, cpu, crop, None, slide=True).large(image))
    assert len(banded.unique()) > 3


def test_the_benchmark_forward_is_the_previous_code_s(model):
    x = torch.randn(1, 3, 65, 65).contiguous(memory_format=torch.channels_last)
    net = model.to(memory_format=torch.channels_last)
    runner = inference.Runner(net, inference.Execution(torch.device('cpu'), torch.bfloat16, True), 65)
    with torch.inference_mode():
        with torch.autocast('cpu', dtype=torch.bfloat16):
            old = net(x)
        assert torch.equal(runner.forward(x), old)
    model.to(memory_format=torch.contiguous_format)


# --- progress


def test_the_pace_prints_the_first_item_then_every_interval_and_the_last(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(utils.time, 'time', lambda: now[0])
    pace = utils.Pace(total=10, every=10.0)
    printed = []
    for _ in range(10):
        now[0] += 3.0  # 3 s an item
        printed.append(pace.step())
    assert printed == [True, False, False, False, True, False, False, False, True, True]  # 0, 12, 24 s; last
    assert pace.rate() == '3.0 s/img' and pace.eta() == '0:00'
    pace = utils.Pace(total=100)
    now[0] += 2.0
    pace.step(4)
    assert pace.rate() == '2.0 img/s' and pace.eta() == '0:48'


@pytest.mark.slow
def test_evaluation_and_prediction_print_progress_with_speed_and_time_left(synthetic_root, tmp_path, monkeypatch,
                                                                           run_cli):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / 'ckpt.pth'
    torch.save({'state_dict': randomize(initial_model(), seed=3).state_dict()}, path)
    status, out, err = run_cli('--exp', 'p', '--backbone', 'vovnet39', '--crop_size', '65', '--workers', '0',
                               '--checkpoint', path, '--data_root', synthetic_root)
    assert status == 0, err
    lines = re.findall(r'^evaluating  image (\d+)/4  \S+ (?:img/s|s/img)  eta \d+:\d\d$', out, re.M)
    assert lines[0] == '1' and lines[-1] == '4'
    images = synthetic_root / 'VOC2012' / 'JPEGImages'
    status, out, err = run_cli('--checkpoint', path, '--input', images, '--output', tmp_path / 'out', '--crop_size',
                               '65', module='predict')
    assert status == 0, err
    lines = re.findall(r'^\[(\d+)/12\] .* -> .*\.png  \S+ (?:img/s|s/img)  eta \d+:\d\d$', out, re.M)
    assert lines[0] == '1' and lines[-1] == '12'


# --- fast where the hardware allows


@pytest.mark.parametrize('bf16_units', [True, False])
@pytest.mark.slow
def test_auto_precision_is_bf16_channels_last_where_the_cpu_has_bf16_units(bf16_units, tmp_path, monkeypatch,
                                                                          run_cli, synthetic_root):
    monkeypatch.setattr(inference, 'cpu_has_bf16', lambda: bf16_units)
    assert inference.fast_amp(torch.device('cpu')) == ('bf16' if bf16_units else 'off')
    path = tmp_path / 'ckpt.pth'
    torch.save({'state_dict': initial_model().state_dict()}, path)
    images = synthetic_root / 'VOC2012' / 'JPEGImages'
    status, out, err = run_cli('--checkpoint', path, '--input', images / 'synthetic_val_00000.jpg', '--output',
                               tmp_path / 'out', '--crop_size', '65', module='predict')
    assert status == 0, err
    assert ('(cpu, bf16, channels last)' if bf16_units else '(cpu, fp32)') in out
    status, out, err = run_cli('--checkpoint', path, '--input', images / 'synthetic_val_00000.jpg', '--output',
                               tmp_path / 'out2', '--crop_size', '65', '--amp', 'off', module='predict')
    assert '(cpu, fp32)' in out
    # Evaluation stays fp32 and says which flags would make it faster here.
    monkeypatch.chdir(tmp_path)
    status, out, err = run_cli('--exp', 'p', '--backbone', 'vovnet39', '--crop_size', '65', '--workers', '0',
                               '--checkpoint', path, '--data_root', synthetic_root, '--no-save_predictions')
    assert status == 0, err
    hint = 'this machine has bf16 units: --amp bf16 --channels_last evaluates faster'
    assert (hint in out) == bf16_units


@pytest.mark.slow
def test_export_falls_back_to_the_torchscript_exporter_for_older_opsets(tmp_path, run_cli):
    ort = pytest.importorskip('onnxruntime')
    path = tmp_path / 'ckpt.pth'
    torch.save({'state_dict': initial_model(num_classes=4).state_dict()}, path)
    status, _, err = run_cli('--checkpoint', path, '--output', tmp_path / 'm.onnx', '--opset', '17', module='export')
    assert status == 1 and '--exporter torchscript' in err and not os.path.exists(tmp_path / 'm.onnx')
    status, out, err = run_cli('--checkpoint', path, '--output', tmp_path / 'm.onnx', '--opset', '17', '--exporter',
                               'torchscript', '--height', '65', '--width', '65', module='export')
    assert status == 0, err
    assert 'opset 17, torchscript exporter' in out and 'argmax agreement 100.0000%' in out
    import onnx
    assert onnx.load(str(tmp_path / 'm.onnx')).opset_import[0].version == 17
    session = ort.InferenceSession(str(tmp_path / 'm.onnx'), providers=['CPUExecutionProvider'])
    assert session.run(['logits'], {'image': torch.randn(2, 3, 70, 90).numpy()})[0].shape == (2, 4, 70, 90)
