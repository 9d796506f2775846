"""DeepLabV3+ (`--model deeplabv3plus`): the decoder on every backbone, its recipe, its checkpoints, and the
commands that train, resume, evaluate, predict and export it."""
import math
import os
import re

import numpy as np
import pytest
import torch
from conftest import initial_model, randomize
from PIL import Image
from torch import nn

import checkpoints
import deeplab
import engine
import errors
import weights

DECODER_KEYS = {'decoder.project.0.weight', 'decoder.fuse.0.weight', 'decoder.fuse.3.weight',
                'decoder.classifier.weight', 'decoder.classifier.bias'}
NORMS = ('decoder.project.1', 'decoder.fuse.1', 'decoder.fuse.4')


def _module(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


@pytest.mark.parametrize('output_stride', [16, 8])
@pytest.mark.parametrize('backbone', deeplab.BACKBONES)
def test_the_decoder_takes_each_backbones_stride_4_features_and_gives_logits_at_the_input_size(backbone,
                                                                                               output_stride):
    torch.manual_seed(0)
    plus = deeplab.build_model(backbone, num_classes=5, output_stride=output_stride, model='deeplabv3plus').eval()
    path, channels = plus.low_level
    # The published stride-4 features, untouched by the layers after them (a copy taken as the stage returns).
    copies = []
    _module(plus, path).register_forward_hook(lambda m, i, out: copies.append(out.clone()))
    x = torch.randn(2, 3, 97, 83)  # odd sizes
    with torch.no_grad():
        features, low = plus.forward_levels(x)
        logits = plus(x)
    assert torch.equal(low, copies[0])
    assert low.shape == (2, channels, math.ceil(97 / 4), math.ceil(83 / 4))
    assert features.shape[1] == plus.aspp.aspp1.in_channels
    with torch.device('meta'), torch.no_grad():  # shapes and keys only: no weights drawn, nothing computed
        v3 = deeplab.build_model(backbone, num_classes=5, output_stride=output_stride).eval()
        assert features.shape == v3.forward_features(x.to('meta')).shape  # the backbone is DeepLabV3's
    assert abs(features.shape[-2] - 97 / output_stride) < 1.5 and abs(features.shape[-1] - 83 / output_stride) < 1.5
    assert logits.shape == (2, 5, 97, 83) and torch.isfinite(logits).all()
    # The paper's decoder: 1x1 to 48 channels, two 3x3 of 256 on 256 + 48 channels, a 1x1 classifier.
    decoder = plus.decoder
    assert (decoder.project[0].in_channels, decoder.project[0].out_channels, decoder.project[0].kernel_size) == \
        (channels, 48, (1, 1))
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in decoder.fuse if
            isinstance(c, nn.Conv2d)] == [(256 + 48, 256, (3, 3), (1, 1)), (256, 256, (3, 3), (1, 1))]
    assert (decoder.classifier.in_channels, decoder.classifier.out_channels) == (256, 5)
    assert decoder.classifier.bias is not None and not any(c.bias is not None for c in decoder.fuse
                                                           if isinstance(c, nn.Conv2d))
    # Its keys are DeepLabV3's without the ASPP's classifier, plus the decoder's.
    v3_keys, plus_keys = set(v3.state_dict()), set(plus.state_dict())
    assert v3_keys - plus_keys == {'aspp.conv3.weight', 'aspp.conv3.bias'}
    assert {k for k in plus_keys - v3_keys if not k.startswith(NORMS)} == DECODER_KEYS
    assert weights.identify(plus.state_dict()) == (backbone, 5)
    assert weights.identify_model(plus.state_dict()) == 'deeplabv3plus'
    assert weights.identify_model(v3.state_dict()) == 'deeplabv3'


def test_deeplabv3_is_unchanged_by_the_model_option():
    torch.manual_seed(3)
    default = deeplab.vovnet39()
    torch.manual_seed(3)
    named = deeplab.build_model('vovnet39', model='deeplabv3')
    assert type(named) is deeplab.DeepLabV3 and 'model' not in named.model_args
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), named.state_dict().values()))
    assert not any(k.startswith('decoder.') for k in default.state_dict())
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        assert torch.equal(default.eval()(x), named.eval()(x))


def test_the_decoder_trains_in_the_heads_group_at_lr_times_last_mult():
    model = initial_model(model='deeplabv3plus')
    optimizer = engine.make_optimizer(model, 0.01)
    head = {id(p) for p in optimizer.param_groups[1]['params']}
    assert head == {id(p) for m in (model.aspp, model.decoder) for p in m.parameters()}
    assert not head & {id(p) for p in optimizer.param_groups[0]['params']}
    assert engine.PolySchedule(0.01, 100, last_mult=10.0)(0) == (0.01, pytest.approx(0.1))  # groups 0 and 1
    # --freeze_bn fixes the decoder's BatchNorm as it fixes the ASPP's.
    frozen = engine.make_optimizer(model, 0.01, freeze_bn=True)
    assert not any(p is model.decoder.project[1].weight for g in frozen.param_groups for p in g['params'])


def test_groupnorm_in_the_decoder_where_the_aspp_has_it_and_syncbatchnorm_converts_it():
    resnet = deeplab.build_model('resnet50', model='deeplabv3plus', num_groups=32)
    assert [_module(resnet, n).num_groups for n in NORMS] == [16, 32, 32]  # 48 channels: 16 groups
    assert not deeplab.uses_batchnorm('resnet50', 32)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in resnet.modules())
    vov = deeplab.build_model('vovnet39', model='deeplabv3plus', num_groups=32)
    assert all(type(_module(vov, n)) is nn.BatchNorm2d for n in NORMS)  # as its ASPP: BatchNorm
    assert isinstance(vov.stage2.OSA2_1.concat[1], nn.GroupNorm)
    for backbone in ('vovnet39', 'ese_vovnet39b'):
        synced = deeplab.convert_sync_batchnorm(initial_model(backbone, model='deeplabv3plus'))
        assert all(isinstance(_module(synced, n), nn.SyncBatchNorm) for n in NORMS)


def test_weight_standardisation_spares_the_decoders_classifier_only():
    model = deeplab.build_model('resnet50', model='deeplabv3plus', weight_std=True)
    assert type(model.decoder.classifier) is nn.Conv2d
    assert all(type(c) is deeplab.WSConv2d for c in (model.decoder.project[0], model.decoder.fuse[0],
                                                     model.aspp.conv2, model.layer1[0].conv1))


@pytest.mark.slow
def test_imagenet_weights_fill_the_backbone_and_leave_the_decoder_as_initialised(tmp_path):
    source = randomize(initial_model(), seed=8)
    path = tmp_path / 'vovnet39_imagenet.pth'
    torch.save({k: v for k, v in source.state_dict().items() if not k.startswith('aspp.')}, path)
    torch.manual_seed(1)
    random_init = deeplab.build_model('vovnet39', model='deeplabv3plus')
    torch.manual_seed(1)
    model = weights.build('vovnet39', model='deeplabv3plus', pretrained=True, pretrained_path=str(path))
    assert torch.equal(model.stage4.OSA4_2.concat[0].weight, source.stage4.OSA4_2.concat[0].weight)
    for name, tensor in model.decoder.state_dict().items():
        assert torch.equal(tensor, random_init.decoder.state_dict()[name]), name
    # A DeepLabV3+ state dict offered as ImageNet weights is a trained model: refused, pointing to --init (it
    # would have kept its backbone and dropped its decoder without a word).
    plus = randomize(initial_model(model='deeplabv3plus'), seed=9)
    torch.save(plus.state_dict(), tmp_path / 'plus.pth')
    with pytest.raises(errors.UserError, match=r'whole trained segmentation model \(its aspp and decoder tensors\)'
                                               r'.*--init'):
        weights.build('vovnet39', model='deeplabv3plus', pretrained=True, pretrained_path=str(tmp_path / 'plus.pth'))


def test_weights_of_one_model_are_refused_by_the_other_with_the_flag_to_pass():
    v3, plus = initial_model(), initial_model(model='deeplabv3plus')
    with pytest.raises(errors.UserError, match=r'v3\.pth holds a DeepLabV3 model \(it has no decoder\), but a '
                                               r'DeepLabV3\+ was asked for: pass --model deeplabv3'):
        weights.load_weights(plus, v3.state_dict(), 'v3.pth')
    with pytest.raises(errors.UserError, match=r'plus\.pth holds a DeepLabV3\+ model \(it has the DeepLabV3\+ '
                                               r'decoder .*pass --model deeplabv3plus'):
        weights.load_weights(v3, {f'module.{k}': v for k, v in plus.state_dict().items()}, 'plus.pth')


def test_recorded_model_rebuilds_and_an_unknown_one_is_refused(tmp_path):
    plus = randomize(initial_model(num_classes=4, model='deeplabv3plus'), seed=2)
    path = tmp_path / 'plus.pth'
    torch.save({'state_dict': plus.state_dict()}, path)  # no record: the keys tell
    rebuilt = weights.model_from_checkpoint(str(path)).eval()
    x = torch.randn(1, 3, 65, 71)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), plus.eval()(x))
    with pytest.raises(errors.UserError, match='holds a DeepLabV3\\+ model .*pass --model deeplabv3plus'):
        weights.model_from_checkpoint(str(path), model='deeplabv3')
    torch.save({'state_dict': plus.state_dict(), 'model_args': {**plus.model_args, 'model': 'deeplabv4'}}, path)
    with pytest.raises(errors.UserError, match="model='deeplabv4'.*damaged"):
        checkpoints.load(str(path))


# --- The commands, on the synthetic set

TRAIN = ['--train', '--exp', 'p', '--backbone', 'vovnet39', '--model', 'deeplabv3plus', '--scratch', '--crop_size',
         '65', '--batch_size', '4', '--workers', '0', '--seed', '0', '--base_lr', '0.01', '--last_mult', '10']
CKPT = 'data/deeplab_vovnet39_pascal_v3plus_p_epoch{}.pth'


@pytest.mark.slow
def test_deeplabv3plus_trains_resumes_evaluates_predicts_and_exports(synthetic_root, tmp_path, monkeypatch,
                                                                      run_cli, run_process):
    monkeypatch.chdir(tmp_path)
    # The README's training and evaluation commands of DeepLabV3+ run as fresh processes, as a user's.
    status, out, err = run_process('main.py', *TRAIN, '--epochs', '1', '--data_root', synthetic_root)
    assert status == 0, err
    assert 'training deeplab_vovnet39_pascal_v3plus_p' in out
    checkpoint = torch.load(CKPT.format(1), weights_only=True)
    assert checkpoint['model_args'] == dict(model='deeplabv3plus', backbone='vovnet39', num_classes=21,
                                            output_stride=16, num_groups=None, weight_std=False, beta=False)
    assert any(k.startswith('decoder.') for k in checkpoint['state_dict'])
    head = checkpoint['optimizer']['param_groups'][1]
    plus = initial_model(model='deeplabv3plus')
    assert len(head['params']) == len(list(plus.aspp.parameters())) + len(list(plus.decoder.parameters()))

    # Resumed with the same command: the second epoch; without --model, refused with the flag to add.
    status, _, err = run_cli(*TRAIN, '--epochs', '2', '--data_root', synthetic_root, '--resume', CKPT.format(1))
    assert status == 0, err
    assert torch.load(CKPT.format(2), weights_only=True)['epoch'] == 2
    plain = [a for a in TRAIN if a not in ('--model', 'deeplabv3plus')]
    status, _, err = run_cli(*plain, '--epochs', '3', '--data_root', synthetic_root, '--resume', CKPT.format(2))
    assert status == 1 and 'pass --model deeplabv3plus' in err and 'Traceback' not in err

    # Evaluation by name (the training command without --train), and by file without --model: the same figure.
    evaluate = ['--exp', 'p', '--epochs', '2', '--backbone', 'vovnet39', '--crop_size', '65', '--workers', '0',
                '--data_root', synthetic_root]
    status, out, err = run_process('main.py', *evaluate, '--model', 'deeplabv3plus')
    assert status == 0, err
    by_name = re.search(r'^Mean IoU: (\d+\.\d\d)$', out, re.M).group(1)
    status, out, err = run_cli(*evaluate, '--checkpoint', CKPT.format(2), '--no-save_predictions')
    assert status == 0, err
    assert re.search(r'^Mean IoU: (\d+\.\d\d)$', out, re.M).group(1) == by_name
    assert len(os.listdir('data/val')) == 4
    # Asked for the other model: refused, nothing evaluated.
    status, _, err = run_cli(*evaluate, '--checkpoint', CKPT.format(2), '--model', 'deeplabv3')
    assert status == 1 and 'holds a DeepLabV3+ model' in err and 'Traceback' not in err

    # predict.py and export.py rebuild it from the checkpoint alone.
    photos = tmp_path / 'photos'
    photos.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 91, 3), dtype=np.uint8)).save(photos / 'a.jpg')
    status, _, err = run_cli('--checkpoint', CKPT.format(2), '--input', photos, '--output', tmp_path / 'masks',
                             module='predict')
    assert status == 0, err
    assert Image.open(tmp_path / 'masks' / 'a.png').size == (91, 70)
    status, out, err = run_cli('--checkpoint', CKPT.format(2), '--output', tmp_path / 'plus.onnx', '--height', '65',
                               '--width', '65', module='export')
    assert status == 0, err
    assert 'DeepLabV3+-vovnet39' in out
    if 'ONNX Runtime is not installed' not in out:
        assert re.search(r'argmax agreement 100\.0000%', out), out
    status, _, err = run_cli('--checkpoint', CKPT.format(2), '--model', 'deeplabv3', '--input', photos,
                             '--output', tmp_path / 'other', module='predict')
    assert status == 1 and 'holds a DeepLabV3+ model' in err and not os.path.exists(tmp_path / 'other')
    # benchmark.py measures the checkpoint's model without being told.
    status, out, err = run_cli('--backbones', 'vovnet39', '--checkpoint', CKPT.format(2), '--size', '65', '--warmup',
                               '0', '--iters', '1', '--configs', 'fp32', '--no_isolate', module='benchmark')
    assert status == 0, err
    assert [line.split()[:2] for line in out.splitlines() if line.startswith('vovnet39')] == [
        ['vovnet39/v3plus', 'original'], ['vovnet39/v3plus', 'fp32']]


@pytest.mark.slow
def test_a_deeplabv3_checkpoint_asked_to_load_as_deeplabv3plus_is_refused(tmp_path, monkeypatch, run_cli,
                                                                         synthetic_root):
    monkeypatch.chdir(tmp_path)
    torch.save({'state_dict': initial_model().state_dict()}, 'v3.pth')
    os.makedirs('photos')
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save('photos/a.png')
    status, _, err = run_cli('--exp', 'e', '--backbone', 'vovnet39', '--model', 'deeplabv3plus', '--checkpoint',
                             'v3.pth', '--crop_size', '65', '--workers', '0', '--data_root', synthetic_root)
    assert status == 1 and 'v3.pth holds a DeepLabV3 model (it has no decoder)' in err and 'Traceback' not in err
    assert not os.path.exists('data/val')
    for module, flags in (('predict', ['--input', 'photos', '--output', 'out']), ('export', ['--output', 'm.onnx'])):
        status, _, err = run_cli('--checkpoint', 'v3.pth', '--model', 'deeplabv3plus', *flags, module=module)
        assert status == 1 and 'has no decoder' in err, (module, err)
    assert not os.path.exists('m.onnx') and not os.path.exists('out') and not os.path.exists('data')


@pytest.mark.slow
def test_benchmark_measures_each_backbone_with_and_without_the_decoder_in_one_run(tmp_path, run_cli):
    status, out, err = run_cli('--backbones', 'vovnet39', '--model', 'deeplabv3,deeplabv3plus', '--size', '65',
                               '--warmup', '0', '--iters', '1', '--configs', 'fp32', '--no_isolate', '--json',
                               tmp_path / 'b.json', module='benchmark')
    assert status == 0, err
    rows = [line.split()[:2] for line in out.splitlines() if line.startswith('vovnet39')]
    assert rows == [['vovnet39', 'original'], ['vovnet39', 'fp32'], ['vovnet39/v3plus', 'original'],
                    ['vovnet39/v3plus', 'fp32']]
    import json
    results = json.load(open(tmp_path / 'b.json'))['results']
    assert [r['model'] for r in results] == ['deeplabv3'] * 2 + ['deeplabv3plus'] * 2
    assert results[2]['params'] - results[0]['params'] == sum(
        p.numel() for p in initial_model(model='deeplabv3plus').decoder.parameters()) - sum(
        p.numel() for p in initial_model().aspp.conv3.parameters())
    assert results[2]['gflops'] > results[0]['gflops']
    status, _, err = run_cli('--model', 'deeplabv3,v4', module='benchmark')
    assert status == 1 and "--model 'deeplabv3,v4'" in err


@pytest.mark.slow
def test_the_demo_trains_and_evaluates_deeplabv3plus(tmp_path, run_cli):
    status, out, err = run_cli('--model', 'deeplabv3plus', '--root', tmp_path / 'synthetic', '--output_dir',
                               tmp_path / 'demo', '--train_images', '8', '--val_images', '4', '--epochs', '1',
                               '--batch_size', '4', '--crop_size', '65', '--workers', '0', module='demo')
    assert status == 0, err
    assert '--model deeplabv3plus' in out and re.search(r'demo finished in .*: mean IoU \d+\.\d\d', out)
    checkpoint = torch.load(tmp_path / 'demo' / 'deeplab_vovnet39_pascal_v3plus_demo_epoch1.pth', weights_only=True)
    assert checkpoint['model_args']['model'] == 'deeplabv3plus'
