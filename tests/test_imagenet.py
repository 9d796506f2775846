"""ImageNet initialisation from the libraries that still host VoVNet weights (pytorchcv for VoVNet-39/57, timm
for eSE-VoVNet-39/57), the record of it in checkpoints, and the eSE-VoVNet backbones. Offline: the libraries'
download functions are replaced (conftest), their caches, checksums and loaders run."""
import copy
import hashlib
import os
import sys

import pytest
import torch
from conftest import cli_in, initial_model, randomize

import deeplab
import errors
import imagenet
import vovnet
import weights


def pytorchcv_model(name, seed=0):
    from pytorchcv.models import vovnet as cv
    torch.manual_seed(seed)
    return randomize(getattr(cv, name)(), seed=seed).eval()


def timm_model(name, seed=0):
    torch.manual_seed(seed)
    return randomize(vovnet.timm_vovnet(name), seed=seed).eval()


# --- pytorchcv's VoVNet-39/57


@pytest.mark.parametrize('name', ['vovnet39', 'vovnet57'])
@pytest.mark.slow
def test_pytorchcv_weights_give_its_features_bit_for_bit_at_stride_32_and_its_tensors_at_16_and_8(name, tmp_path):
    theirs = pytorchcv_model(name)
    state = theirs.state_dict()
    torch.save(state, tmp_path / 'cv.pth')
    names = vovnet.pytorchcv_names(name)
    ours32 = vovnet.VoVNet(name, output_stride=32).eval()
    # Every tensor of both networks is mapped, one to one.
    assert set(names) == set(ours32.state_dict())
    assert set(names.values()) == {k for k in state if k.startswith('features.')}
    ours32.load_state_dict(imagenet.from_pytorchcv(state, name, ours32.state_dict(), 'cv.pth'))
    x = torch.randn(2, 3, 97, 83)
    with torch.no_grad():
        assert torch.equal(ours32(x), theirs.features[:-1](x))  # all but the classifier's 7x7 pooling
    for output_stride in (16, 8):
        model = weights.build(name, output_stride=output_stride, pretrained=True,
                                    pretrained_path=str(tmp_path / 'cv.pth'))
        ours = model.state_dict()
        assert all(torch.equal(ours[k], state[v]) for k, v in names.items()), output_stride
        assert model.initial_weights['format'] == 'pytorchcv'


@pytest.mark.parametrize('damage', ['missing', 'shape', 'depth'])
@pytest.mark.slow
def test_a_pytorchcv_file_with_a_missing_or_misshapen_tensor_is_refused(damage, tmp_path):
    state = pytorchcv_model('vovnet39').state_dict()
    if damage == 'missing':
        del state['features.stage3.unit2.branches.branch4.conv.weight']
        message = 'lacks features.stage3.unit2.branches.branch4.conv.weight'
    elif damage == 'shape':
        state['features.stage2.unit1.concat_conv.bn.weight'] = torch.ones(7)
        message = 'features.stage2.unit1.concat_conv.bn.weight has shape (7,), where vovnet39 has (512,)'
    else:
        state = pytorchcv_model('vovnet57').state_dict()
        message = 'is it the other depth'
    torch.save(state, tmp_path / 'cv.pth')
    with pytest.raises(errors.UserError) as e:
        weights.vovnet39(pretrained=True, pretrained_path=str(tmp_path / 'cv.pth'))
    assert message in str(e.value) and str(tmp_path / 'cv.pth') in str(e.value)


@pytest.mark.slow
def test_without_the_originals_file_vovnet_starts_from_pytorchcvs_weights_and_records_them(
        pytorchcv_serves, synthetic_root, tmp_path, monkeypatch, run_cli):
    state = pytorchcv_model('vovnet39', seed=3).state_dict()
    sha1, urls = pytorchcv_serves(state)
    monkeypatch.chdir(tmp_path)
    args = ['--exp', 'cv', '--epochs', '1', '--backbone', 'vovnet39', '--crop_size', '65', '--batch_size', '4',
            '--workers', '0', '--seed', '0', '--base_lr', '1e-9', '--data_root', synthetic_root]
    status, out, err = run_cli('--train', *args)
    assert status == 0, err
    cache = os.path.join(str(tmp_path / 'home'), '.torch', 'models')
    assert len(urls) == 1 and urls[0].startswith('https://github.com/osmr/imgclsmob/releases/download/')
    files = os.listdir(cache)
    assert len(files) == 1 and files[0].startswith('vovnet39-') and files[0].endswith(f'-{sha1[:8]}.pth')
    assert f'pytorchcv\'s vovnet39 ImageNet weights ({os.path.join(cache, files[0])}, sha1 {sha1})' in out
    checkpoint = torch.load('data/deeplab_vovnet39_pascal_v3_cv_epoch1.pth', weights_only=True)
    assert checkpoint['initial_weights'] == {'source': 'pytorchcv', 'model': 'vovnet39',
                                             'file': os.path.join(cache, files[0]), 'sha1': sha1}
    # A learning rate of 1e-9 leaves the weights where they started: pytorchcv's, under our names.
    trained = checkpoint['state_dict']
    for ours, theirs in vovnet.pytorchcv_names('vovnet39').items():
        if ours.endswith('conv.weight'):
            assert torch.allclose(trained[ours], state[theirs], atol=1e-6), ours
    status, out, err = run_cli(*args)
    assert status == 0, err
    assert 'initial weights of its training: pytorchcv\'s vovnet39 ImageNet weights' in out
    # The second run finds pytorchcv's cached file: nothing is fetched again.
    status, _, err = run_cli('--train', *args, '--exp', 'cv2')
    assert status == 0, err
    assert len(urls) == 1


@pytest.mark.slow
def test_the_originals_file_wins_over_pytorchcv(pytorchcv_serves, tmp_path, monkeypatch):
    from pytorchcv.models.common import model_store

    def must_not_be_called(*args, **kwargs):
        raise AssertionError('pytorchcv was asked although the original file exists')
    monkeypatch.setattr(model_store, 'get_model_file', must_not_be_called)
    monkeypatch.chdir(tmp_path)
    source = randomize(initial_model(), seed=8)
    os.makedirs('data/pretrained')
    torch.save({k: v for k, v in source.state_dict().items() if not k.startswith('aspp.')},
               'data/pretrained/vovnet39_statedict_norm.pth')
    model = weights.vovnet39(pretrained=True)
    assert torch.equal(model.stage4.OSA4_2.concat[0].weight, source.stage4.OSA4_2.concat[0].weight)
    record = model.initial_weights
    assert record['source'] == 'original file' and record['file'] == 'data/pretrained/vovnet39_statedict_norm.pth'
    assert record['sha256'] == hashlib.sha256(open(record['file'], 'rb').read()).hexdigest()


def test_offline_or_without_pytorchcv_the_message_says_what_was_tried_and_what_to_do(offline, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(errors.UserError) as e:
        weights.vovnet57(pretrained=True)
    message = str(e.value)
    for needle in ('data/pretrained/vovnet57_statedict_norm.pth does not exist', 'could not be fetched from '
                   'https://github.com/osmr/imgclsmob/releases/download/', 'Failed to resolve',
                   os.path.join(str(offline), '.torch', 'models'), '--pretrained_path', '--scratch'):
        assert needle in message
    monkeypatch.setitem(sys.modules, 'pytorchcv', None)  # not installed
    monkeypatch.setitem(sys.modules, 'pytorchcv.models', None)
    monkeypatch.setitem(sys.modules, 'pytorchcv.models.common', None)
    with pytest.raises(errors.UserError) as e:
        weights.vovnet39(pretrained=True)
    assert 'pip install pytorchcv' in str(e.value) and '--scratch' in str(e.value)
    assert '\n' not in str(e.value)


# --- eSE-VoVNet from timm


@pytest.mark.parametrize('name', [pytest.param(n, marks=pytest.mark.slow) for n in ('ese_vovnet39b', 'ese_vovnet57b')])
def test_ese_vovnet_is_timms_network_bit_for_bit_at_stride_32_and_dilated_at_16_and_8(name, tmp_path):
    theirs = timm_model(name)
    state = theirs.state_dict()
    torch.save(state, tmp_path / 'timm.pth')
    backbone = vovnet.dilate_timm_vovnet(vovnet.timm_vovnet(name), output_stride=32).eval()
    backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith('head.')})
    x = torch.randn(2, 3, 97, 83)
    with torch.no_grad():
        assert torch.equal(backbone(x), theirs.forward_features(x))
    for output_stride, size in ((16, 16), (8, 32)):  # 257 -> 129 -> 65 (stem), then 3x3/2 ceil-mode pools
        model = weights.build(name, output_stride=output_stride, pretrained=True,
                                    pretrained_path=str(tmp_path / 'timm.pth')).eval()
        ours = model.state_dict()
        assert all(torch.equal(ours[k], v) for k, v in state.items() if not k.startswith('head.'))
        with torch.no_grad():
            assert model.forward_features(torch.zeros(1, 3, 257, 257)).shape[-2:] == (size, size)
        dilations = {m.dilation[0] for m in model.stages.modules() if isinstance(m, torch.nn.Conv2d)
                     and m.kernel_size == (3, 3)}
        assert dilations == ({1, 2} if output_stride == 16 else {1, 2, 4})


@pytest.mark.slow
def test_ese_vovnet_starts_from_timms_hub_weights_and_then_from_the_hub_cache(timm_hub_serves, tmp_path):
    theirs = timm_model('ese_vovnet39b', seed=5)
    downloads = timm_hub_serves('timm/ese_vovnet39b.ra_in1k', theirs.state_dict())
    model = weights.ese_vovnet39b(pretrained=True)
    ours = model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in theirs.state_dict().items() if not k.startswith('head.'))
    record = model.initial_weights
    assert record['source'] == 'timm' and record['model'] == 'ese_vovnet39b.ra_in1k'
    assert record['sha256'] == hashlib.sha256(open(record['file'], 'rb').read()).hexdigest()
    assert downloads == ['model.safetensors']
    weights.ese_vovnet39b(pretrained=True)  # from the cache, without asking the hub
    assert downloads == ['model.safetensors']
    with pytest.raises(errors.UserError, match='timm has no GroupNorm ImageNet weights'):
        weights.ese_vovnet39b(pretrained=True, num_groups=32)


@pytest.mark.slow
def test_ese_vovnet_offline_or_without_timm_is_a_clear_message(offline, tmp_path, monkeypatch, run_cli):
    with pytest.raises(errors.UserError) as e:
        weights.ese_vovnet57b(pretrained=True)
    message = str(e.value)
    for needle in ('ese_vovnet57b.ra4_e3600_r256_in1k', 'https://huggingface.co/timm/ese_vovnet57b.ra4_e3600_r256_in1k',
                   'check your connection', str(offline / 'huggingface'), '--pretrained_path', '--scratch'):
        assert needle in message
    monkeypatch.setitem(sys.modules, 'timm', None)  # not installed
    monkeypatch.chdir(tmp_path)
    status, out, err = run_cli('--train', '--exp', 'x', '--backbone', 'ese_vovnet39b')
    assert status == 1 and 'pip install timm' in err and 'Traceback' not in err
    assert len(err.strip().splitlines()) == 1
    for name in deeplab.ORIGINAL_BACKBONES:  # the original six do not need it
        deeplab.build_model(name)


@pytest.mark.slow
def test_imagenet_files_for_another_family_or_with_non_finite_values_are_refused(tmp_path):
    torch.save(timm_model('ese_vovnet39b').state_dict(), tmp_path / 'timm.pth')
    with pytest.raises(errors.UserError, match='holds timm ImageNet weights, which fit --backbone ese_vovnet39b'):
        weights.vovnet39(pretrained=True, pretrained_path=str(tmp_path / 'timm.pth'))
    torch.save(pytorchcv_model('vovnet39').state_dict(), tmp_path / 'cv.pth')
    with pytest.raises(errors.UserError, match='holds pytorchcv ImageNet weights, which fit --backbone vovnet39'):
        weights.ese_vovnet39b(pretrained=True, pretrained_path=str(tmp_path / 'cv.pth'))
    for path, key, build in (('cv.pth', 'features.stage4.unit1.branches.branch2.bn.running_var', weights.vovnet39),
                             ('timm.pth', 'stages.1.blocks.0.attn.fc.weight', weights.ese_vovnet39b)):
        state = torch.load(tmp_path / path, weights_only=True)
        state[key][0] = float('nan')
        torch.save(state, tmp_path / path)
        with pytest.raises(errors.UserError, match='non-finite values'):
            build(pretrained=True, pretrained_path=str(tmp_path / path))


@pytest.mark.slow
def test_a_timm_model_safetensors_file_is_accepted_by_pretrained_path(tmp_path):
    from safetensors.torch import save_file
    theirs = timm_model('ese_vovnet57b', seed=2)
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, tmp_path / 'model.safetensors')
    model = weights.ese_vovnet57b(pretrained=True, pretrained_path=str(tmp_path / 'model.safetensors'))
    assert torch.equal(model.stages[2].blocks[3].conv_mid[4].conv.weight,
                       theirs.stages[2].blocks[3].conv_mid[4].conv.weight)
    assert model.initial_weights['format'] == 'timm'


@pytest.mark.slow
def test_ese_vovnet_options_group_norm_freeze_bn_and_sync_batchnorm():
    import engine
    import main
    gn = deeplab.ese_vovnet39b(num_groups=32)
    assert type(gn.stages[3].blocks[1].conv_mid[0].bn).__name__ == 'GroupNormAct'
    assert isinstance(gn.aspp.aspp1_bn, torch.nn.BatchNorm2d)  # the ASPP keeps BatchNorm, as VoVNet's does
    assert deeplab.uses_batchnorm('ese_vovnet39b', 32)
    with pytest.raises(errors.UserError, match='does not divide'):
        deeplab.ese_vovnet39b(num_groups=7)
    for flag in ('weight_std', 'beta'):
        with pytest.raises(errors.UserError, match='ResNet option'):
            deeplab.ese_vovnet39b(**{flag: True})
    model = deeplab.ese_vovnet39b()
    args = main.get_args_parser().parse_args(['--exp', 'x', '--freeze_bn'])
    optimizer = engine.make_optimizer(model, args.base_lr, args.freeze_bn)
    trained = {id(p) for g in optimizer.param_groups for p in g['params']}
    bn = model.stages[1].blocks[0].conv_mid[2].bn
    assert id(bn.weight) not in trained and id(model.stages[1].blocks[0].attn.fc.weight) in trained
    # timm's converter keeps the activation fused into timm's BatchNorm layers (PyTorch's would drop it).
    randomize(model).eval()
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        before = model(x)
        synced = deeplab.convert_sync_batchnorm(copy.deepcopy(model)).eval()
        assert type(synced.stem[0].bn).__name__ == 'SyncBatchNormAct'
        assert torch.equal(synced(x), before)


@pytest.fixture(scope='module')
def ese_run(synthetic_root, tmp_path_factory):
    """ese_vovnet39b trained for one epoch from a timm state dict given with --pretrained_path."""
    folder = tmp_path_factory.mktemp('ese')
    torch.save(timm_model('ese_vovnet39b', seed=1).state_dict(), folder / 'timm.pth')
    cli_in(folder, ['--train', '--exp', 'e', '--epochs', '1', '--backbone', 'ese_vovnet39b', '--crop_size', '65',
                      '--batch_size', '4', '--workers', '0', '--seed', '0', '--base_lr', '0.01', '--data_root',
                      synthetic_root, '--pretrained_path', folder / 'timm.pth'])
    return folder


@pytest.mark.slow
def test_ese_vovnet_trains_evaluates_predicts_and_exports(ese_run, synthetic_root, tmp_path, monkeypatch, run_cli):
    checkpoint = ese_run / 'data' / 'deeplab_ese_vovnet39b_pascal_v3_e_epoch1.pth'
    saved = torch.load(checkpoint, weights_only=True)
    assert saved['model_args']['backbone'] == 'ese_vovnet39b'
    assert saved['initial_weights']['format'] == 'timm'
    monkeypatch.chdir(ese_run)
    status, out, err = run_cli('--exp', 'e', '--epochs', '1', '--backbone', 'ese_vovnet39b', '--crop_size', '65',
                               '--workers', '0', '--data_root', synthetic_root)
    assert status == 0, err
    assert 'Mean IoU: ' in out and 'initial weights of its training: timm weights from' in out
    assert len(os.listdir(ese_run / 'data' / 'val')) == 4
    images = synthetic_root / 'VOC2012' / 'JPEGImages'
    status, out, err = run_cli('--checkpoint', checkpoint, '--input', images, '--output', tmp_path / 'pred',
                               '--crop_size', '65', module='predict')
    assert status == 0, err
    assert len([f for f in os.listdir(tmp_path / 'pred') if f.endswith('.png')]) == 12
    status, out, err = run_cli('--checkpoint', checkpoint, '--output', tmp_path / 'ese.onnx', '--height', '65',
                               '--width', '65', module='export')
    assert status == 0, err
    assert 'argmax agreement 100.0000%' in out or 'argmax agreement 99.9' in out


# --- damaged files in a library's cache are named, not blamed on the network


@pytest.mark.slow
def test_a_pytorchcv_cache_file_that_fails_its_checksum_offline_is_named_as_damaged(pytorchcv_serves, monkeypatch):
    import requests
    from pytorchcv.models.common import model_store
    sha1, urls = pytorchcv_serves(pytorchcv_model('vovnet39').state_dict())
    weights.vovnet39(pretrained=True)  # downloads it into pytorchcv's cache
    cached = weights.vovnet39(pretrained=True).initial_weights['file']
    with open(cached, 'r+b') as f:  # a bit flipped on disk
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))

    def offline(url, *args, **kwargs):
        raise requests.exceptions.ConnectionError('Max retries exceeded')
    monkeypatch.setattr(model_store, '_download', offline)
    with pytest.raises(errors.UserError) as e:
        weights.vovnet39(pretrained=True)
    message = str(e.value)
    for needle in (cached, 'damaged', sha1, 'Delete that file', '--pretrained_path', '--scratch'):
        assert needle in message, (needle, message)


@pytest.mark.parametrize('damage', ['wrong_shape', 'int64', 'truncated'])
@pytest.mark.slow
def test_a_damaged_timm_file_in_the_hub_cache_is_named(timm_hub_serves, damage):
    from safetensors.torch import load_file, save_file
    theirs = timm_model('ese_vovnet39b')
    timm_hub_serves('timm/ese_vovnet39b.ra_in1k', theirs.state_dict())
    cached = weights.ese_vovnet39b(pretrained=True).initial_weights['file']
    blob = os.path.realpath(cached)
    if damage == 'truncated':
        data = open(blob, 'rb').read()
        open(blob, 'wb').write(data[:len(data) // 2])
    else:
        tensors = load_file(blob)
        key = 'stages.1.blocks.0.conv_mid.0.conv.weight'
        tensors[key] = tensors[key][:, :2].contiguous() if damage == 'wrong_shape' else tensors[key].long()
        save_file(tensors, blob)
    with pytest.raises(errors.UserError) as e:
        weights.ese_vovnet39b(pretrained=True)
    message = str(e.value)
    for needle in (cached, 'damaged', 'Delete that file', '--pretrained_path'):
        assert needle in message, (needle, message)
    assert 'could not be loaded from https' not in message
    if damage != 'truncated':
        assert 'stages.1.blocks.0.conv_mid.0.conv.weight' in message


@pytest.mark.parametrize('damage', ['truncated', 'int64', 'negative_variance'])
@pytest.mark.slow
def test_a_damaged_torchvision_file_in_the_hub_cache_is_named(offline, damage):
    import torchvision
    resnet_weights = torchvision.models.get_model_weights('resnet50').IMAGENET1K_V1
    cached = os.path.join(str(offline), 'torch', 'hub', 'checkpoints', os.path.basename(resnet_weights.url))
    os.makedirs(os.path.dirname(cached))
    state = torchvision.models.resnet50().state_dict()
    if damage == 'int64':
        state['layer1.0.conv1.weight'] = state['layer1.0.conv1.weight'].long()
    elif damage == 'negative_variance':
        state['layer1.0.bn1.running_var'] = -torch.ones_like(state['layer1.0.bn1.running_var'])
    torch.save(state, cached)
    if damage == 'truncated':
        data = open(cached, 'rb').read()
        open(cached, 'wb').write(data[:len(data) // 2])
    with pytest.raises(errors.UserError) as e:
        weights.resnet50(pretrained=True)
    message = str(e.value)
    for needle in (cached, 'damaged', 'Delete that file', '--pretrained_path'):
        assert needle in message, (needle, message)
    if damage != 'truncated':
        assert 'layer1.0.' in message
