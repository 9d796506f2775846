import functools
import os

import pytest
import reference
import torch
from conftest import initial_model, randomize
from torch import nn

import checkpoints
import deeplab
import errors
import weights

DATA = os.path.join(os.path.dirname(__file__), 'data')
PARAMS = {'vovnet39': 29_513_621, 'vovnet57': 43_553_621, 'resnet50': 39_048_533, 'resnet101': 58_040_661,
          'densenet161': 43_200_341, 'densenet201': 32_683_157}


def released_keys(backbone):
    rows = {}
    with open(os.path.join(DATA, f'keys_{backbone}.txt')) as f:
        for line in f:
            key, shape, _ = line.rstrip('\n').split('\t')
            rows[key] = tuple(int(d) for d in shape.strip('()').split(',') if d.strip())
    return rows


@pytest.mark.parametrize('backbone', deeplab.ORIGINAL_BACKBONES)
@pytest.mark.slow
def test_keys_shapes_and_parameter_count_match_the_released_checkpoints(backbone):
    model = getattr(deeplab, backbone)(pretrained=False, num_classes=21)
    have = {f'module.{k}': tuple(v.shape) for k, v in model.state_dict().items()}
    assert have == released_keys(backbone)
    assert list(have) == list(released_keys(backbone))  # same order too
    assert deeplab.count_parameters(model) == PARAMS[backbone]


@pytest.mark.parametrize('backbone', deeplab.ORIGINAL_BACKBONES)
@pytest.mark.slow
def test_logits_equal_an_independent_functional_forward_of_the_original(backbone):
    torch.manual_seed(0)
    model = randomize(initial_model(backbone)).eval()
    x = torch.randn(1, 3, 71, 66)
    with torch.no_grad():
        ours = model(x)
        ref = reference.deeplab(backbone, x, model.state_dict())
    assert ours.shape == (1, 21, 71, 66)
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_the_aspp_bn_quirk_changes_the_logits_so_the_reference_check_can_see_it():
    model = randomize(initial_model()).eval()
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        before = model(x)
        for m in model.aspp.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps = 1e-5
        after = model(x)
    assert (before - after).abs().max() > 1e-2 * before.abs().max()


@pytest.mark.parametrize('backbone,eps,momentum', [('vovnet39', 3e-4, 0.1), ('resnet50', 1e-5, 3e-4),
                                                   ('densenet201', 3e-4, 0.1)])
@pytest.mark.slow
def test_aspp_batchnorm_eps_and_momentum_follow_the_original(backbone, eps, momentum):
    model = deeplab.build_model(backbone)
    norms = [m for m in model.aspp.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 6
    assert all(m.eps == eps and m.momentum == momentum for m in norms)


def test_resnet_backbone_batchnorm_momentum_is_0_05_and_others_keep_defaults():
    resnet = deeplab.resnet50()
    backbone_norms = [m for n, m in resnet.named_modules() if isinstance(m, nn.BatchNorm2d) and 'aspp' not in n]
    assert backbone_norms and all(m.momentum == 0.05 and m.eps == 1e-5 for m in backbone_norms)
    vov = deeplab.vovnet57()
    backbone_norms = [m for n, m in vov.named_modules() if isinstance(m, nn.BatchNorm2d) and 'aspp' not in n]
    assert backbone_norms and all(m.momentum == 0.1 and m.eps == 1e-5 for m in backbone_norms)


def test_vovnet_layers_pool_only_where_a_stage_downsamples_and_dilate_stage5():
    model = deeplab.vovnet39()
    pools = {n: m for n, m in model.named_modules() if isinstance(m, nn.MaxPool2d)}
    assert sorted(pools) == ['stage3.Pooling', 'stage4.Pooling']
    assert all(m.kernel_size == 3 and m.stride == 2 and m.padding == 0 and m.ceil_mode for m in pools.values())
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and not name.startswith('aspp'):
            k = m.kernel_size[0]
            d = 2 if name.startswith('stage5') and k == 3 else 1
            assert m.dilation == (d, d) and m.padding == (d * (k // 2),) * 2, name
            assert m.stride == ((2, 2) if name in ('stem.stem_1/conv', 'stem.stem_3/conv') else (1, 1)), name
    assert [b.identity for b in model.stage5.children()] == [False, True]


def test_aspp_rates_and_output_stride_8_dilations():
    for os_, rates in ((16, (6, 12, 18)), (8, (12, 24, 36))):
        model = deeplab.vovnet39(output_stride=os_)
        got = tuple(getattr(model.aspp, f'aspp{i}').dilation[0] for i in (2, 3, 4))
        assert got == rates
        assert all(getattr(model.aspp, f'aspp{i}').padding[0] == r for i, r in zip((2, 3, 4), rates))
    model = deeplab.vovnet39(output_stride=8)
    assert [n for n, m in model.named_modules() if isinstance(m, nn.MaxPool2d)] == ['stage3.Pooling']
    assert model.stage4.OSA4_1.layers[0][0].dilation == (2, 2)
    assert model.stage5.OSA5_2.layers[4][0].dilation == (4, 4)


def test_densenet_transition3_keeps_resolution_and_denseblock4_is_dilated():
    model = deeplab.densenet161()
    assert not hasattr(model.features.transition3, 'pool')
    assert isinstance(model.features.transition2.pool, nn.AvgPool2d)
    for layer in model.features.denseblock4.children():
        assert layer.conv2.dilation == (2, 2) and layer.conv2.padding == (2, 2)
    for layer in model.features.denseblock3.children():
        assert layer.conv2.dilation == (1, 1)


def test_resnet_layer4_first_block_undilated_rest_dilated_by_2():
    model = deeplab.resnet101()
    assert model.layer4[0].conv2.dilation == (1, 1) and model.layer4[0].conv2.stride == (1, 1)
    assert all(b.conv2.dilation == (2, 2) and b.conv2.padding == (2, 2) for b in list(model.layer4)[1:])
    assert model.layer3[0].conv2.stride == (2, 2)


def test_vovnet_stage_sizes_at_513():
    backbone = initial_model()
    x = torch.zeros(1, 3, 513, 513)
    sizes = {}
    with torch.no_grad():
        for name, module in backbone.named_children():
            if name == 'aspp':
                break
            x = module(x)
            sizes[name] = x.shape[-1]
    assert sizes == {'stem': 129, 'stage2': 129, 'stage3': 64, 'stage4': 32, 'stage5': 32}
    assert x.shape[1] == deeplab.vovnet.SPECS['vovnet39']['stage_out_chs'][-1] == 1024


@pytest.mark.slow
def test_vovnet_output_stride_8_at_513():
    # 513 -> 257 -> 129 -> 64 with the ceil-mode pool of stage3; stage4 and stage5 keep 64 (dilated).
    model = deeplab.vovnet39(output_stride=8).eval()
    with torch.no_grad():
        assert model.forward_features(torch.zeros(1, 3, 513, 513)).shape == (1, 1024, 64, 64)


@pytest.mark.parametrize('backbone,os16,os8', [('vovnet39', 16, 32), ('resnet50', 17, 33), ('densenet201', 16, 32)])
@pytest.mark.slow
def test_feature_size_at_257_for_both_output_strides(backbone, os16, os8):
    # 257 -> 129 -> 65 is common; then VoVNet's 3x3/2 ceil-mode pools give 32, 16, ResNet's stride-2 convs
    # 33, 17 and DenseNet's 2x2 average pools 32, 16.
    for output_stride, size in ((16, os16), (8, os8)):
        model = deeplab.build_model(backbone, output_stride=output_stride).eval()
        with torch.no_grad():
            f = model.forward_features(torch.zeros(1, 3, 257, 257))
        assert f.shape[-2:] == (size, size)


@functools.lru_cache(maxsize=1)
def five_classes(backbone: str) -> deeplab.DeepLabV3:
    """One model per backbone for the sizes tried in turn (which only run it)."""
    return deeplab.build_model(backbone, num_classes=5).eval()


@pytest.mark.parametrize('size', [(64, 64), (65, 97), (81, 70)])
@pytest.mark.parametrize('backbone', deeplab.BACKBONES)
@pytest.mark.slow
def test_logits_have_the_input_size_for_odd_and_even_inputs(backbone, size):
    model = five_classes(backbone)
    with torch.no_grad():
        y = model(torch.randn(2, 3, *size))
    assert y.shape == (2, 5, *size)


@pytest.mark.slow
def test_group_norm_variants():
    vov = deeplab.vovnet39(num_groups=16)
    assert not any(isinstance(m, nn.BatchNorm2d) for n, m in vov.named_modules() if not n.startswith('aspp'))
    assert all(isinstance(m, nn.BatchNorm2d) for n, m in vov.aspp.named_children() if 'bn' in n)  # ASPP keeps BN
    res = deeplab.resnet50(num_groups=32)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in res.modules())
    assert isinstance(res.aspp.aspp1_bn, nn.GroupNorm) and res.aspp.aspp1_bn.num_groups == 32
    res.train()
    assert res(torch.randn(1, 3, 65, 65)).shape == (1, 21, 65, 65)  # GN trains at batch 1


def test_weight_std_standardises_every_resnet_conv_but_the_classifier():
    model = deeplab.resnet50(weight_std=True)
    convs = {n: type(m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert convs.pop('aspp.conv3') is nn.Conv2d
    assert set(convs.values()) == {deeplab.WSConv2d}
    conv = model.conv1
    x = torch.randn(1, 3, 9, 9)
    w = conv.weight - conv.weight.mean(dim=(1, 2, 3), keepdim=True)
    w = w / (w.view(64, -1).std(dim=1).view(-1, 1, 1, 1) + 1e-5)
    assert torch.allclose(conv(x), nn.functional.conv2d(x, w, None, 2, 3), atol=1e-5)


@pytest.mark.slow
def test_beta_stem_is_three_3x3_convs():
    model = deeplab.resnet101(beta=True).eval()
    keys = [k for k in model.state_dict() if k.startswith('conv1.')]
    assert keys == ['conv1.0.weight', 'conv1.1.weight', 'conv1.2.weight']
    assert model(torch.randn(1, 3, 65, 65)).shape == (1, 21, 65, 65)


@pytest.mark.parametrize('builder,kwargs,flag', [('vovnet39', dict(beta=True), '--beta'),
                                                 ('vovnet57', dict(weight_std=True), '--weight_std'),
                                                 ('densenet161', dict(num_groups=32), '--groups'),
                                                 ('densenet201', dict(beta=True), '--beta')])
def test_options_without_meaning_for_a_backbone_are_refused(builder, kwargs, flag):
    with pytest.raises(errors.UserError, match=flag):
        getattr(deeplab, builder)(**kwargs)


def test_unknown_backbone_and_bad_output_stride_are_clear_errors():
    with pytest.raises(errors.UserError, match='unknown backbone .*vovnet39'):
        deeplab.build_model('vovnet99')
    with pytest.raises(errors.UserError, match='output stride must be 8 or 16'):
        deeplab.vovnet39(output_stride=4)
    with pytest.raises(errors.UserError, match='does not divide'):
        deeplab.vovnet39(num_groups=7)


# --- checkpoints


@pytest.mark.parametrize('backbone', deeplab.BACKBONES)
@pytest.mark.slow
def test_released_checkpoint_loads_and_gives_the_same_logits(backbone, released_checkpoint):
    source = randomize(initial_model(backbone), seed=1).eval()
    path = released_checkpoint(source)
    checkpoint = checkpoints.load(str(path))
    assert checkpoint['epoch'] == 50
    assert all(k.startswith('module.') for k in checkpoint['state_dict'])
    assert any(k.endswith('num_batches_tracked') for k in checkpoint['state_dict'])
    model = deeplab.empty(backbone=backbone).eval()  # as weights.model_from_checkpoint builds it to load
    weights.load_weights(model, checkpoint['state_dict'], str(path))
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


@pytest.mark.parametrize('model', deeplab.MODELS)
@pytest.mark.slow
def test_every_tensor_of_a_model_is_in_its_state_dict_so_a_checkpoint_fills_an_uninitialised_one(model):
    """deeplab.empty builds a model without initial weights for load_weights to fill: a buffer left out of the
    state dict (persistent=False) would keep uninitialised memory."""
    variants = [(backbone, {}) for backbone in deeplab.SPECS] + [
        ('resnet50', {'num_groups': 32}), ('resnet50', {'weight_std': True, 'num_groups': 32}),
        ('resnet101', {'beta': True}), ('vovnet39', {'num_groups': 32})]
    for backbone, options in variants:
        with torch.device('meta'):
            built = deeplab.build_model(backbone, model=model, **options)
        held = set(built.state_dict())
        assert [n for n, _ in built.named_buffers() if n not in held] == [], backbone
        assert [n for n, _ in built.named_parameters() if n not in held] == [], backbone
    source = randomize(initial_model(num_classes=3, model=model), seed=2).eval()
    stream = torch.get_rng_state()
    empty = deeplab.empty(backbone='vovnet39', num_classes=3, model=model)
    assert torch.equal(torch.get_rng_state(), stream)  # no initial weights drawn: the random stream is untouched
    weights.load_weights(empty, source.state_dict(), 'source.pth')
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        assert torch.equal(empty.eval()(x), source(x))


def test_a_bare_state_dict_loads_too(tmp_path):
    source = randomize(initial_model(num_classes=3), seed=2)
    torch.save(source.state_dict(), tmp_path / 'bare.pth')
    model = deeplab.vovnet39(num_classes=3)
    weights.load_weights(model, checkpoints.load(str(tmp_path / 'bare.pth'))['state_dict'], 'bare.pth')
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))


@pytest.mark.slow
def test_a_checkpoint_is_rebuilt_at_the_output_stride_it_was_trained_with(tmp_path, released_checkpoint):
    x = torch.randn(1, 3, 65, 65)
    source = randomize(initial_model(output_stride=8), seed=4).eval()
    torch.save({'state_dict': source.state_dict(), 'model_args': {'backbone': 'vovnet39', 'output_stride': 8}},
               tmp_path / 'os8.pth')
    model = weights.model_from_checkpoint(str(tmp_path / 'os8.pth'))
    assert model.output_stride == 8
    with torch.no_grad():
        assert torch.equal(model.eval()(x), source(x))
    assert weights.model_from_checkpoint(str(tmp_path / 'os8.pth'), output_stride=16).output_stride == 16
    released = released_checkpoint(randomize(initial_model(), seed=5))  # records no stride: the original's 16
    assert weights.model_from_checkpoint(str(released)).output_stride == 16


def released_state(model):
    return {f'module.{k}': v for k, v in model.state_dict().items()}


@pytest.mark.parametrize('held,wanted', [('resnet50', 'vovnet39'), ('vovnet57', 'vovnet39'),
                                         ('densenet161', 'densenet201'), ('resnet101', 'resnet50')])
@pytest.mark.slow
def test_a_checkpoint_of_another_backbone_is_refused_with_what_it_holds(held, wanted):
    model = initial_model(wanted)
    with pytest.raises(errors.UserError) as e:
        weights.load_weights(model, released_state(initial_model(held)), 'x.pth')
    assert f'x.pth holds a DeepLabV3-{held} with 21 classes' in str(e.value)
    assert f'--backbone {held}' in str(e.value)


def test_a_checkpoint_with_another_class_count_is_refused():
    with pytest.raises(errors.UserError, match='19 classes.*21 classes'):
        weights.load_weights(initial_model(), released_state(initial_model(num_classes=19)), 'x.pth')


def test_a_group_norm_checkpoint_offered_to_a_batchnorm_model_says_so():
    with pytest.raises(errors.UserError, match='--groups'):
        weights.load_weights(initial_model(), released_state(initial_model(num_groups=16)), 'x.pth')


def test_weights_that_are_not_a_deeplab_state_dict_are_refused():
    with pytest.raises(errors.UserError, match='holds no DeepLabV3 weights'):
        weights.load_weights(initial_model(), {'conv.weight': torch.zeros(1)}, 'x.pth')


# --- ImageNet initialisation


def imagenet_vovnet_state(seed=3, prefix='', classifier=True):
    model = randomize(initial_model(), seed=seed)
    state = {f'{prefix}{k}': v for k, v in model.state_dict().items() if not k.startswith('aspp.')}
    if classifier:
        state[f'{prefix}classifier.weight'] = torch.randn(1000, 1024)
        state[f'{prefix}classifier.bias'] = torch.randn(1000)
    return model, state


@pytest.mark.parametrize('prefix', ['', 'module.'])
@pytest.mark.parametrize('classifier', [True, False])
@pytest.mark.parametrize('wrapped', [True, False])
@pytest.mark.slow
def test_vovnet_imagenet_weights_load_with_or_without_prefix_and_classifier(tmp_path, prefix, classifier, wrapped,
                                                                            caplog):
    source, state = imagenet_vovnet_state(prefix=prefix, classifier=classifier)
    path = tmp_path / 'vovnet39_statedict_norm.pth'
    torch.save({'state_dict': state} if wrapped else state, path)
    model = weights.vovnet39(pretrained=True, pretrained_path=str(path))
    ours, theirs = model.state_dict(), source.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs if not k.startswith('aspp.'))
    assert not any(torch.equal(ours[k], theirs[k]) for k in theirs if k.startswith('aspp.') and k.endswith('weight'))
    assert 'match nothing' not in caplog.text and 'keep their initialisation' not in caplog.text


@pytest.mark.slow
def test_imagenet_weights_default_path_and_missing_file_message(tmp_path, monkeypatch, offline):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(errors.UserError) as e:
        weights.vovnet57(pretrained=True)
    message = str(e.value)
    assert 'data/pretrained/vovnet57_statedict_norm.pth' in message and '--scratch' in message
    _, state = imagenet_vovnet_state()
    os.makedirs('data/pretrained')
    torch.save(state, 'data/pretrained/vovnet39_statedict_norm.pth')
    weights.vovnet39(pretrained=True)


@pytest.mark.slow
def test_imagenet_weights_that_do_not_fit_are_reported_not_merged_silently(tmp_path, caplog):
    _, state = imagenet_vovnet_state(classifier=False)
    del state['stem.stem_1/conv.weight']
    state['extra.weight'] = torch.zeros(3)
    torch.save(state, tmp_path / 'w.pth')
    weights.vovnet39(pretrained=True, pretrained_path=str(tmp_path / 'w.pth'))
    assert '1 backbone tensors are not in' in caplog.text and 'stem.stem_1/conv.weight' in caplog.text
    assert '1 tensors of' in caplog.text and 'extra.weight' in caplog.text
    torch.save(initial_model('resnet50').state_dict(), tmp_path / 'r.pth')
    with pytest.raises(errors.UserError, match='none of the weights of vovnet39'):
        weights.vovnet39(pretrained=True, pretrained_path=str(tmp_path / 'r.pth'))


@pytest.mark.slow
def test_torchvision_imagenet_weights_come_from_the_hub_cache_or_a_clear_error(tmp_path, monkeypatch):
    import torchvision
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    resnet_weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V1

    def offline(*args, **kwargs):
        raise OSError('network unreachable')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    with pytest.raises(errors.UserError) as e:
        weights.resnet50(pretrained=True)
    cached = os.path.join(str(tmp_path), 'hub', 'checkpoints', os.path.basename(resnet_weights.url))
    assert cached in str(e.value) and resnet_weights.url in str(e.value) and '--scratch' in str(e.value)

    imagenet = randomize(torchvision.models.resnet50(), seed=4)
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    torch.save(imagenet.state_dict(), cached)
    model = weights.resnet50(pretrained=True)
    assert torch.equal(model.layer3[2].conv2.weight, imagenet.layer3[2].conv2.weight)
    assert torch.equal(model.bn1.running_var, imagenet.bn1.running_var)


@pytest.mark.slow
def test_densenet_imagenet_weights_in_torchvisions_legacy_key_format_load(tmp_path, monkeypatch):
    import re

    import torchvision
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    url = torchvision.models.DenseNet201_Weights.IMAGENET1K_V1.url
    imagenet = randomize(torchvision.models.densenet201(), seed=5)
    # torchvision's files name the layers norm.1, conv.2, ... (the module names are norm1, conv2)
    legacy = {re.sub(r'(denselayer\d+\.(?:norm|conv))([12])\.', r'\1.\2.', k): v
              for k, v in imagenet.state_dict().items() if not k.endswith('num_batches_tracked')}
    assert 'features.denseblock1.denselayer1.norm.1.weight' in legacy
    os.makedirs(tmp_path / 'hub' / 'checkpoints')
    torch.save(legacy, tmp_path / 'hub' / 'checkpoints' / os.path.basename(url))
    model = weights.densenet201(pretrained=True)
    assert torch.equal(model.features.denseblock4.denselayer7.conv2.weight,
                       imagenet.features.denseblock4.denselayer7.conv2.weight)
    torch.save({'features.conv0.weight': torch.zeros(1)}, tmp_path / 'hub' / 'checkpoints' / os.path.basename(url))
    with pytest.raises(errors.UserError, match='do not fit torchvision.s densenet201.*delete'):
        weights.densenet201(pretrained=True)
