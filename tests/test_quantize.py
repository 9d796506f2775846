"""int8 inference (quantize.py: PT2E through torchao, compiled by Inductor) in evaluation, prediction, the
benchmark and ONNX export; the compiled training step (engine.CompiledStep) and the sustained images/s."""
import glob
import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import initial_model, randomize
from PIL import Image
from torch import nn

import engine
import inference
import quantize
import runs
import utils

EVAL = ['--exp', 'q', '--epochs', '1', '--backbone', 'vovnet39', '--crop_size', '65', '--workers', '0']


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """A VoVNet-39 with random weights whose class maps vary over the image (not one class everywhere)."""
    path = tmp_path_factory.mktemp('q') / 'vov.pth'
    model = randomize(initial_model(num_classes=21), seed=7)
    with torch.no_grad():
        model.aspp.conv3.bias.copy_(torch.linspace(-1, 1, 21))
    torch.save({'epoch': 1, 'state_dict': model.state_dict()}, path)
    return path


def masks(folder) -> dict[str, np.ndarray]:
    return {os.path.basename(f): np.asarray(Image.open(f)) for f in sorted(glob.glob(os.path.join(folder, '*.png')))}


def agreement(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return float(np.mean([(a[k] == b[k]).mean() for k in a]))


# --- quantize.py on small networks


class TwiceCalled(nn.Module):
    """One ReLU module called after two convolutions, as the ASPP's and torchvision's Bottleneck's; a VoVNet-like
    pool in ceil mode."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.pool(self.relu(self.conv1(x)))
        return self.head(self.relu(self.conv2(x)))


@pytest.mark.slow
def test_a_module_called_twice_and_a_ceil_mode_pool_quantize_and_keep_their_shapes():
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    model = TwiceCalled().eval()
    images = [torch.randn(3, 66, 66) for _ in range(4)]
    net = quantize.int8(model, images)
    assert quantize.warm_up(net, (1, 3, 66, 66)) > 0
    compiled = counters['stats']['unique_graphs']
    x = torch.randn(1, 3, 66, 66)  # made outside inference mode, unlike warm_up's input
    with torch.inference_mode():
        expected, got = model(x), net(x)
    with torch.no_grad():
        assert torch.equal(net(x), got)
    assert counters['stats']['unique_graphs'] == compiled  # warm_up's compilation runs them both
    # 66 pools to 33 in ceil mode; Inductor's int8 pool would give 32
    assert got.shape == expected.shape == (1, 4, 33, 33)
    assert torch.allclose(got, expected, atol=0.1 * expected.abs().max())
    with pytest.raises(RuntimeError, match='inference only'):
        net.train()


class ImagePooled(nn.Module):
    """Features joined with their average over the whole input, as the ASPP's image-level branch does."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = F.relu(self.conv(x))
        pooled = F.adaptive_avg_pool2d(x, 1).expand_as(x)
        return self.head(torch.cat([x, pooled], 1))


@pytest.mark.slow
def test_an_input_larger_than_the_canvas_runs_at_its_own_size_not_padded():
    """Padding it (to a compiled shape) would change the average of the image-level branch, hence every logit:
    on the demo, padding to a 128-pixel grid lost 2.7 points of mean IoU that int8 itself does not."""
    torch.manual_seed(0)
    model = ImagePooled().eval()
    with torch.no_grad():
        model.head.weight[:, 8:] *= 10  # the image-level average weighs in every logit
    net = quantize.int8(model, [torch.randn(3, 40, 40) + 1 for _ in range(4)])
    x = torch.randn(1, 3, 50, 70) + 1
    with torch.inference_mode():
        expected, got, inside = model(x), net(x), net(x[..., :40, :40])
        padded = model(F.pad(x, (0, 128 - 70, 0, 128 - 50)))[..., :50, :70]
    assert got.shape == expected.shape == (1, 4, 50, 70) and inside.shape == (1, 4, 40, 40)
    assert net.uncompiled == 1  # the 40x40 input ran compiled, the larger one as it is
    error = (got - expected).abs().max()
    assert error < 0.1 * expected.abs().max() and error < (padded - expected).abs().max() / 4


def test_calibration_images_are_the_same_ones_every_run_and_on_the_canvas():
    assert quantize.pick(3, 10, 0) == quantize.pick(3, 10, 0) != quantize.pick(3, 10, 1)
    assert len(set(quantize.pick(3, 10, 0))) == 3 and quantize.pick(5, 2, 0) == [0, 1]
    image = torch.ones(3, 40, 90)
    canvas = quantize.canvas(image, 65)
    assert canvas.shape == (3, 65, 65)
    assert canvas[:, :40, :65].eq(1).all() and canvas[:, 40:].eq(0).all()  # padded below, cut on the right


# --- evaluation and prediction


@pytest.mark.slow
def test_int8_evaluation_agrees_with_fp32_and_gives_the_same_masks_twice(checkpoint, synthetic_root, tmp_path,
                                                                          run_cli, run_process, monkeypatch):
    """The README's int8 evaluation command runs once as a fresh process, as a user's; the runs it is compared with
    in this process."""
    monkeypatch.chdir(tmp_path)
    common = [*EVAL, '--checkpoint', checkpoint, '--data_root', synthetic_root]
    results = {}
    for name, flags in (('fp32', []), ('int8', ['--quantize', 'int8', '--calibration', '4']),
                        ('again', ['--quantize', 'int8', '--calibration', '4'])):
        run = (lambda *a: run_process('main.py', *a)) if name == 'int8' else run_cli
        status, out, err = run(*common, '--output_dir', name, '--json', f'{name}.json', *flags)
        assert status == 0, err
        assert 'Traceback' not in out + err
        results[name] = masks(tmp_path / name / 'val'), json.load(open(tmp_path / f'{name}.json'))
        if name != 'fp32':
            assert 'int8 (PT2E, torchao X86InductorQuantizer): calibrated on 4 images of the training list' in out
            assert 'compiled in' in out
    assert results['fp32'][1]['precision'] == 'fp32'
    assert results['int8'][1]['precision'] == 'int8 (PT2E, 4 calibration images)'
    assert agreement(results['fp32'][0], results['int8'][0]) > 0.9
    assert agreement(results['int8'][0], results['again'][0]) == 1.0
    assert results['int8'][1]['mean_iou'] == results['again'][1]['mean_iou']


@pytest.mark.slow
def test_int8_prediction_agrees_with_fp32_and_puts_large_images_in_windows(checkpoint, tmp_path, run_cli,
                                                                           run_process):
    photos = tmp_path / 'photos'
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([(60, 50), (64, 40), (150, 70)]):  # the last one larger than the crop
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(photos / f'p{i}.png')
    common = ['--checkpoint', checkpoint, '--backbone', 'vovnet39', '--input', photos, '--crop_size', '65']
    status, out, err = run_cli(*common, '--output', tmp_path / 'fp32', '--amp', 'off', '--slide', module='predict')
    assert status == 0, err
    status, out, err = run_process('predict.py', *common, '--output', tmp_path / 'int8', '--quantize', 'int8')
    assert status == 0, err
    assert 'calibrated on 3 inputs' in out and 'int8' in out and '(150x70, windows)' in out
    fp32, int8 = masks(tmp_path / 'fp32'), masks(tmp_path / 'int8')
    assert fp32['p2.png'].shape == int8['p2.png'].shape == (70, 150)
    assert agreement(fp32, int8) > 0.9


def test_int8_is_refused_clearly_without_torchao_on_cuda_and_beside_amp(checkpoint, synthetic_root, tmp_path,
                                                                        run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = [*EVAL, '--checkpoint', checkpoint, '--data_root', synthetic_root, '--quantize', 'int8']
    predict = ['--checkpoint', checkpoint, '--input', synthetic_root, '--quantize', 'int8']
    cases = [(common + ['--device', 'cuda'], 'main', '--quantize int8 runs on the CPU'),
             (common + ['--amp', 'bf16'], 'main', '--quantize and --amp contradict each other'),
             ([*EVAL, '--train', '--quantize', 'int8'], 'main', '--train and --quantize contradict each other'),
             (predict + ['--amp', 'bf16'], 'predict', '--quantize int8 and --amp bf16 contradict'),
             (predict + ['--whole'], 'predict', 'drop --whole'),
             (['--configs', 'int8+fold', '--backbones', 'vovnet39'], 'benchmark', 'int8 folds BatchNorm itself'),
             (['--checkpoint', checkpoint, '--quantize', 'int8'], 'export', 'needs --calibration_input')]
    if torch.cuda.is_available():
        cases = cases[1:]
    for argv, module, needle in cases:
        status, out, err = run_cli(*argv, module=module)
        assert status != 0 and needle in err, (argv, err)
        assert 'Traceback' not in out + err
    monkeypatch.setitem(sys.modules, 'torchao', None)  # an import of it fails as when it is not installed
    for argv, module in ((common, 'main'), (predict, 'predict'), (['--configs', 'int8'], 'benchmark')):
        status, out, err = run_cli(*argv, module=module)
        assert status == 1 and 'pip install torchao' in err, err
        assert len(err.strip().splitlines()) == 1 and 'Traceback' not in err
    assert not os.path.exists(tmp_path / 'data' / 'val') and not os.path.exists('predictions')


# --- ONNX


@pytest.mark.slow
def test_export_writes_an_int8_onnx_model_and_reports_both_latencies(checkpoint, synthetic_root, tmp_path, run_cli):
    pytest.importorskip('onnxruntime')
    images = os.path.join(synthetic_root, 'VOC2012', 'JPEGImages')
    status, out, err = run_cli('--checkpoint', checkpoint, '--backbone', 'vovnet39', '--output', tmp_path / 'm.onnx',
                               '--height', '65', '--width', '65', '--quantize', 'int8', '--calibration_input', images,
                               '--calibration', '6', module='export')
    assert status == 0, err
    assert os.path.getsize(tmp_path / 'm_int8.onnx') < os.path.getsize(tmp_path / 'm.onnx') / 3  # int8 weights
    lines = {os.path.basename(line.split(':')[0]): line for line in out.splitlines() if 'ONNX Runtime' in line
             and 'argmax agreement with PyTorch fp32' in line}
    assert set(lines) == {'m.onnx', 'm_int8.onnx'}
    assert '100.00%' in lines['m.onnx']
    int8 = float(lines['m_int8.onnx'].split('fp32 ')[1].split('%')[0])
    assert 80 < int8 <= 100
    import onnxruntime
    session = onnxruntime.InferenceSession(str(tmp_path / 'm_int8.onnx'), providers=['CPUExecutionProvider'])
    assert session.run(['logits'], {'image': np.zeros((2, 3, 70, 90), np.float32)})[0].shape == (2, 21, 70, 90)
    assert [n for n in os.listdir(tmp_path) if n.startswith('.')] == []  # no temporary left


# --- the compiled training step


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 5, 1)

    def forward(self, x):
        return F.interpolate(self.head(F.relu(self.bn(self.conv(x)))), size=x.shape[-2:], mode='bilinear')


def tiny_run(compiled: bool, steps: int = 3, scale: float | None = None):
    torch.manual_seed(0)
    model = Tiny().train()
    execution = inference.Execution(torch.device('cpu'), torch.float16 if scale else None)
    criterion = engine.BatchCrossEntropy()
    scaler = torch.amp.GradScaler('cpu', init_scale=scale or 1.0, enabled=scale is not None)
    optimizer = engine.sgd([{'params': model.parameters()}], lr=0.1, momentum=0.9, weight_decay=1e-4)
    step = engine.CompiledStep(model, criterion, execution) if compiled else None
    images = torch.randn(steps, 2, 3, 16, 16)
    masks = torch.randint(0, 5, (steps, 2, 16, 16))
    masks[:, :, :4] = utils.IGNORE_INDEX
    losses, labelled = [], []
    for i in range(steps):
        loss = (step(optimizer, scaler, images[i], masks[i]) if compiled else
                engine.train_step(model, criterion, optimizer, scaler, images[i], masks[i], execution))
        losses.append(loss)  # kept on the device, as Monitor keeps them
        labelled.append(criterion.labelled)
    return [float(v) for v in losses], [int(v) for v in labelled], model, scaler


@pytest.mark.slow
def test_the_compiled_step_follows_the_eager_one():
    eager, labelled, eager_model, _ = tiny_run(False)
    compiled, labelled_c, compiled_model, _ = tiny_run(True)
    assert eager[0] != eager[1] != eager[2]  # each loss depends on the updates before it
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert labelled_c == labelled == [2 * 12 * 16] * 3
    for a, b in zip(eager_model.state_dict().values(), compiled_model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-4)


def test_the_compiled_step_replays_cuda_graphs_on_one_gpu_and_not_under_ddp(tmp_path):
    # Nothing runs here (no GPU): what the step is built with. DDP rewrites BatchNorm buffers before each forward
    # pass, which CUDA graphs skip or slow down.
    import torch.distributed as dist
    cuda = inference.Execution(torch.device('cuda'), torch.bfloat16, True)
    assert engine.CompiledStep(Tiny(), engine.BatchCrossEntropy(), cuda).cuda_graphs
    assert not engine.CompiledStep(Tiny(), engine.BatchCrossEntropy(), inference.Execution(torch.device('cpu'))
                                   ).cuda_graphs
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/store', rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(Tiny())
        assert not engine.CompiledStep(ddp, engine.BatchCrossEntropy(), cuda).cuda_graphs
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_the_compiled_step_under_fp16_gradient_scaling_skips_the_overflowing_steps():
    torch.manual_seed(0)
    before = Tiny().state_dict()
    losses, _, model, scaler = tiny_run(True, steps=2, scale=2.0 ** 60)  # fp16 gradients overflow at this scale
    assert all(np.isfinite(losses))
    assert scaler.get_scale() == 2.0 ** 58  # halved at each skipped step
    for name, value in model.state_dict().items():
        if not name.endswith(('running_mean', 'running_var', 'num_batches_tracked')):
            assert torch.equal(value, before[name]), name  # no step taken
    assert not any(model.state_dict()['bn.running_mean'] == before['bn.running_mean'])  # the forwards ran


def test_sustained_images_per_second_leaves_the_first_window_and_the_time_between_epochs_out(monkeypatch):
    import types
    # Progress's clock: its start and first epoch, 3 logged windows, a second epoch 1 s later, its first window.
    clock = iter([0.0, 0.0, 100.0, 102.0, 104.0, 105.0, 108.0])
    monkeypatch.setattr(utils, 'time', types.SimpleNamespace(time=lambda: next(clock)))

    class Sink:
        def write(self, *a, **k):
            pass
    progress = utils.Progress(epochs=2, iterations=6, batch_size=4, print_freq=2, first_iteration=0, metrics=Sink())
    for iteration in range(1, 3):
        progress.step(iteration, 0.1, 1.0)
    assert progress.sustained() is None  # one window: compilation and the loaders' start
    for iteration in range(3, 7):
        progress.step(iteration, 0.1, 1.0)
    progress.new_epoch()
    for iteration in range(7, 9):
        progress.step(iteration, 0.1, 1.0)
    # windows of 8 images: 100 s (left out), 2 s, 2 s, then 3 s after the epoch's start (the second between left out)
    assert progress.sustained() == pytest.approx(24 / 7)


def test_images_per_second_counts_the_images_of_an_epochs_shorter_last_batch(monkeypatch, synthetic_root, tmp_path,
                                                                            run_cli):
    import types
    clock = iter([0.0, 0.0, 1.0, 2.0])  # start, epoch, then a window of 2 steps ending at 1 s and 1 more at 2 s
    monkeypatch.setattr(utils, 'time', types.SimpleNamespace(time=lambda: next(clock)))

    rows = []

    class Rates:
        def write(self, iteration, **row):
            rows.append(row['images_per_s'])
    progress = utils.Progress(epochs=1, iterations=3, batch_size=4, print_freq=2, first_iteration=0,
                              metrics=Rates(), epoch_images=10)
    for iteration in range(1, 4):
        progress.step(iteration, 0.1, 1.0)
    assert rows == [8.0, 2.0]  # 4 + 4 images in the first second, the last 2 in the next
    # main.py tells it: 8 images at --batch_size 64 are one step of 8, not of 64.
    monkeypatch.undo()
    made, real = [], utils.Progress
    monkeypatch.setattr(utils, 'Progress', lambda *a, **k: made.append((a, k)) or real(*a, **k))
    monkeypatch.chdir(tmp_path)
    status, _, err = run_cli('--train', '--exp', 'b', '--epochs', '1', '--backbone', 'vovnet39', '--scratch',
                             '--crop_size', '65', '--batch_size', '64', '--workers', '0', '--data_root', synthetic_root)
    assert status == 0, err
    (args, kwargs), = made
    assert args[1:3] == (1, 64) and kwargs['epoch_images'] == 8


def test_training_on_a_gpu_loads_data_with_the_cpus_of_each_process_but_one(monkeypatch):
    monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
    for cpus, processes, expected in [(16, 1, 15), (64, 1, 16), (16, 8, 1), (2, 1, 1), (1, 1, 1)]:
        monkeypatch.setattr(os, 'sched_getaffinity', lambda pid, n=cpus: set(range(n)), raising=False)
        monkeypatch.setenv('LOCAL_WORLD_SIZE', str(processes))
        assert runs.default_workers(utils.dist_info(), gpu=True) == expected, (cpus, processes)
