"""DeepLabV3 with VoVNet, ResNet and DenseNet backbones, faithful to the released checkpoints.

Chen, Papandreou, Schroff, Adam, "Rethinking Atrous Convolution for Semantic Image Segmentation"
(arXiv:1706.05587). Reimplements the models of github.com/stigma0617/VoVNet-DeepLabV3 (itself built on
github.com/chenxi116/DeepLabv3.pytorch): the same module names, so `state_dict` keys equal those of the released
`.pth` files once their `module.` prefix is removed, and the same arithmetic, so they give the same logits.

One public builder per backbone, with the original's signature: `vovnet39`, `vovnet57`, `resnet50`,
`resnet101`, `densenet161`, `densenet201` (the original's six), and `ese_vovnet39b`, `ese_vovnet57b` (VoVNetV2,
timm's modules, dilated like VoVNet; needs timm). `imagenet.py` holds where their ImageNet weights come from.
"""
import argparse
import functools
import logging
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import imagenet
import vovnet
from utils import UserError, check_finite, few, load_checkpoint, short_error, strip_prefixes

log = logging.getLogger(__name__)

ORIGINAL_BACKBONES = ('vovnet39', 'vovnet57', 'resnet50', 'resnet101', 'densenet161', 'densenet201')
TIMM_BACKBONES = tuple(vovnet.TIMM_WEIGHTS)  # ese_vovnet39b, ese_vovnet57b
BACKBONES = ORIGINAL_BACKBONES + TIMM_BACKBONES
FAMILIES = {'vovnet39': 'vovnet', 'vovnet57': 'vovnet', 'resnet50': 'resnet', 'resnet101': 'resnet',
            'densenet161': 'densenet', 'densenet201': 'densenet', 'ese_vovnet39b': 'ese_vovnet',
            'ese_vovnet57b': 'ese_vovnet'}
OUTPUT_STRIDES = (8, 16)
ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}
ASPP_DEPTH = 256
RESNET_BN_MOMENTUM = 0.05
# The original ASPP calls `norm(channels, 0.0003)`. For ResNet `norm` is a lambda whose second parameter is the
# momentum; for VoVNet and DenseNet it is BatchNorm2d itself, whose second parameter is eps. The released
# checkpoints were trained (and their running statistics accumulated) with exactly these settings.
# eSE-VoVNet has no released checkpoint; its ASPP is VoVNet's, quirk included, so that the two differ in the
# backbone only.
RESNET_ASPP_BN = dict(eps=1e-5, momentum=0.0003)
OTHER_ASPP_BN = dict(eps=0.0003, momentum=0.1)

NormLayer = Callable[[int], nn.Module]


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling and the classifier, as in the original (`aspp1`..`aspp5`, `conv2`, `conv3`).

    Args:
        in_channels: channels of the backbone features.
        num_classes: output channels of the final 1x1 conv (the only conv with a bias).
        rates: dilations of the three 3x3 branches.
        norm_layer: builds the norm after each conv from a channel count.
        depth: channels of each branch and of the projection.
    """

    def __init__(self, in_channels: int, num_classes: int, rates: tuple[int, int, int], norm_layer: NormLayer,
                 depth: int = ASPP_DEPTH):
        super().__init__()
        self.aspp1 = nn.Conv2d(in_channels, depth, 1, bias=False)
        self.aspp2, self.aspp3, self.aspp4 = (
            nn.Conv2d(in_channels, depth, 3, padding=r, dilation=r, bias=False) for r in rates)
        self.aspp5 = nn.Conv2d(in_channels, depth, 1, bias=False)  # image pooling branch
        for i in range(1, 6):
            self.add_module(f'aspp{i}_bn', norm_layer(depth))
        self.conv2 = nn.Conv2d(5 * depth, depth, 1, bias=False)
        self.bn2 = norm_layer(depth)
        self.conv3 = nn.Conv2d(depth, num_classes, 1)
        self.relu = nn.ReLU(inplace=True)
        vovnet.init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.relu(self.aspp1_bn(self.aspp1(x))),
                    self.relu(self.aspp2_bn(self.aspp2(x))),
                    self.relu(self.aspp3_bn(self.aspp3(x))),
                    self.relu(self.aspp4_bn(self.aspp4(x)))]
        pooled = self.relu(self.aspp5_bn(self.aspp5(F.adaptive_avg_pool2d(x, 1))))  # (N, depth, 1, 1)
        # The original upsamples the 1x1 map bilinearly with align_corners=True, which copies it exactly.
        branches.append(pooled.expand(-1, -1, x.shape[2], x.shape[3]))
        x = self.relu(self.bn2(self.conv2(torch.cat(branches, dim=1))))
        return self.conv3(x)


class WSConv2d(nn.Conv2d):
    """Conv2d with weight standardisation (Qiao et al., arXiv:1903.10520), as the original's `--weight_std`:
    the kernel minus its mean, divided by its (unbiased) standard deviation plus 1e-5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = w - w.mean(dim=(1, 2, 3), keepdim=True)
        w = w / (w.flatten(1).std(dim=1).view(-1, 1, 1, 1) + 1e-5)
        return self._conv_forward(x, w, self.bias)


def convert_weight_std(module: nn.Module, skip: tuple[nn.Module, ...] = ()) -> nn.Module:
    """Turn every plain Conv2d below `module` (except those in `skip`) into a WSConv2d sharing its parameters."""
    for _name, child in module.named_children():
        if type(child) is nn.Conv2d and child not in skip:
            child.__class__ = WSConv2d  # same attributes and parameters, standardised forward
        else:
            convert_weight_std(child, skip)
    return module


class DeepLabV3(nn.Sequential):
    """Backbone stages, then `aspp`, then bilinear upsampling of the logits to the input size (align_corners).

    The backbone's stages are registered at the top level, as in the original, so the state-dict keys read
    `stem.*`/`stage2.*` (VoVNet), `conv1.*`/`layer1.*` (ResNet) or `features.*` (DenseNet), then `aspp.*`.

    Args:
        backbone: a Sequential of named stages with an `out_channels` attribute.
        num_classes: number of output classes.
        aspp_norm: builds the ASPP's norm layers from a channel count.
        output_stride: 8 or 16; picks the ASPP rates.
        name: backbone name, kept for checkpoints and messages.
    """

    def __init__(self, backbone: nn.Sequential, num_classes: int, aspp_norm: NormLayer, output_stride: int,
                 name: str):
        layers = OrderedDict(backbone.named_children())
        layers['aspp'] = ASPP(backbone.out_channels, num_classes, ASPP_RATES[output_stride], aspp_norm)
        super().__init__(layers)
        self.backbone_name = name
        self.num_classes = num_classes
        self.output_stride = output_stride

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features, (N, C, H/os, W/os)."""
        for name, module in self.named_children():
            if name != 'aspp':
                x = module(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.aspp(self.forward_features(x))  # (N, classes, H/os, W/os)
        return F.interpolate(logits, size=x.shape[-2:], mode='bilinear', align_corners=True)


# ---------------------------------------------------------------------------------------------------------------
# Backbones


def _vovnet_backbone(name: str, num_groups: int | None, output_stride: int) -> nn.Sequential:
    norm = nn.BatchNorm2d if num_groups is None else functools.partial(_group_norm, num_groups)
    return vovnet.VoVNet(name, norm_layer=norm, output_stride=output_stride)


def _resnet_backbone(name: str, imagenet_state: dict | None, num_groups: int | None, beta: bool,
                     output_stride: int) -> nn.Sequential:
    norm = (functools.partial(nn.BatchNorm2d, momentum=RESNET_BN_MOMENTUM) if num_groups is None
            else functools.partial(_group_norm, num_groups))
    net = getattr(torchvision.models, name)(norm_layer=norm,
                                            replace_stride_with_dilation=[False, output_stride == 8, True])
    vovnet.init_weights(net)
    if imagenet_state is not None:
        imagenet.load_torchvision(net, imagenet_state, name)
    if beta:  # three 3x3 convs, no norm between them, in place of the 7x7
        net.conv1 = nn.Sequential(nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False),
                                  nn.Conv2d(64, 64, 3, padding=1, bias=False),
                                  nn.Conv2d(64, 64, 3, padding=1, bias=False))
        vovnet.init_weights(net.conv1)
        if imagenet_state is not None:
            log.warning('the --beta stem starts from random weights: the ImageNet weights have a 7x7 conv1')
    stages = OrderedDict((n, m) for n, m in net.named_children() if n not in ('avgpool', 'fc'))
    backbone = nn.Sequential(stages)
    backbone.out_channels = net.fc.in_features
    return backbone


def _densenet_backbone(name: str, imagenet_state: dict | None, output_stride: int) -> nn.Sequential:
    net = getattr(torchvision.models, name)()
    if imagenet_state is not None:
        imagenet.load_torchvision(net, imagenet_state, name)
    features = net.features
    # The last transition keeps the resolution and the last block is dilated (output stride 16); at output
    # stride 8 the one before too.
    dilated = {'transition3': ('denseblock4', 2)} if output_stride == 16 else {
        'transition2': ('denseblock3', 2), 'transition3': ('denseblock4', 4)}
    for transition, (block, dilation) in dilated.items():
        del getattr(features, transition).pool
        for layer in getattr(features, block).children():
            layer.conv2.dilation = (dilation, dilation)
            layer.conv2.padding = (dilation, dilation)
    backbone = nn.Sequential(OrderedDict(features=features, relu=nn.ReLU(inplace=True)))
    backbone.out_channels = features.norm5.num_features
    return backbone


def _group_norm(num_groups: int, channels: int) -> nn.GroupNorm:
    if channels % num_groups:
        raise UserError(f'--groups {num_groups} does not divide the {channels} channels of a layer; '
                        f'choose a number of groups that divides 64, 128, 256, ... (e.g. 16 or 32).')
    return nn.GroupNorm(num_groups, channels)


def _timm_group_norm(num_channels: int, num_groups: int, **kwargs) -> nn.Module:
    """timm's GroupNorm + activation layer, with `_group_norm`'s check of the group count."""
    from timm.layers import GroupNormAct
    _group_norm(num_groups, num_channels)
    return GroupNormAct(num_channels, num_groups=num_groups, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Builders


def uses_batchnorm(backbone: str, num_groups: int | None) -> bool:
    """Whether the model has BatchNorm layers: every one but a ResNet with GroupNorm (`num_groups`), since a
    VoVNet's GroupNorm stops at the backbone and its ASPP keeps BatchNorm, as in the original."""
    return num_groups is None or FAMILIES[backbone] != 'resnet'


def _create_deeplab(backbone: str, pretrained: bool = False, num_classes: int = 21, num_groups: int | None = None,
                    weight_std: bool = False, beta: bool = False, output_stride: int = 16,
                    pretrained_path: str | None = None) -> DeepLabV3:
    if backbone not in BACKBONES:
        raise UserError(f'unknown backbone {backbone!r}; choose one of {", ".join(BACKBONES)}.')
    if output_stride not in OUTPUT_STRIDES:
        raise UserError(f'output stride must be 8 or 16, not {output_stride}.')
    if num_classes < 1:
        raise UserError(f'the number of classes must be positive, not {num_classes}.')
    if num_groups is not None and num_groups < 1:
        raise UserError(f'--groups must be a positive number of groups, not {num_groups}.')
    family = FAMILIES[backbone]
    refused = {'vovnet': ('weight_std', 'beta'), 'ese_vovnet': ('weight_std', 'beta'),
               'densenet': ('num_groups', 'weight_std', 'beta')}.get(family, ())
    options = dict(num_groups=num_groups is not None, weight_std=weight_std, beta=beta)
    for option in refused:
        if options[option]:
            flag = '--groups' if option == 'num_groups' else f'--{option}'
            raise UserError(f'{flag} is a ResNet option of the original; {backbone} has no such variant. '
                            f'Drop {flag}, or use --backbone resnet50/resnet101.')
    # Without a file, ImageNet weights come from a library: torchvision (ResNet, DenseNet), timm (eSE-VoVNet),
    # or, for VoVNet, the original's file or pytorchcv (imagenet.load_vovnet). None has GroupNorm weights.
    from_library = pretrained and pretrained_path is None and family in ('resnet', 'densenet', 'ese_vovnet')
    if from_library and num_groups is not None:
        library = 'timm' if family == 'ese_vovnet' else 'torchvision'
        raise UserError(f'{library} has no GroupNorm ImageNet weights for {backbone}: pass the path of a '
                        f'GroupNorm state dict with --pretrained_path, or add --scratch.')
    initial = imagenet.SCRATCH
    imagenet_state = None
    if from_library and family != 'ese_vovnet':
        imagenet_state, initial = imagenet.torchvision_weights(backbone)

    if family == 'vovnet':
        body = _vovnet_backbone(backbone, num_groups, output_stride)
    elif family == 'ese_vovnet':
        net = vovnet.timm_vovnet(backbone, None if num_groups is None
                                 else functools.partial(_timm_group_norm, num_groups=num_groups))
        if from_library:
            initial = imagenet.load_timm(net, backbone)
        body = vovnet.dilate_timm_vovnet(net, output_stride)
    elif family == 'resnet':
        body = _resnet_backbone(backbone, imagenet_state, num_groups, beta, output_stride)
    else:
        body = _densenet_backbone(backbone, imagenet_state, output_stride)
    if family == 'resnet':
        aspp_norm = (functools.partial(nn.BatchNorm2d, **RESNET_ASPP_BN) if num_groups is None
                     else functools.partial(_group_norm, num_groups))
    else:
        aspp_norm = functools.partial(nn.BatchNorm2d, **OTHER_ASPP_BN)
    model = DeepLabV3(body, num_classes, aspp_norm, output_stride, backbone)
    if weight_std:
        convert_weight_std(model, skip=(model.aspp.conv3,))
    if pretrained and pretrained_path is not None:
        initial = imagenet.load_file(model, family, pretrained_path, num_groups)
    elif pretrained and family == 'vovnet':
        initial = imagenet.load_vovnet(model, backbone, num_groups)
    model.initial_weights = initial
    model.model_args = dict(backbone=backbone, num_classes=num_classes, output_stride=output_stride,
                            num_groups=num_groups, weight_std=weight_std, beta=beta)
    if pretrained:
        log.info('initial weights: %s', imagenet.describe(initial))
    return model


def vovnet39(pretrained: bool = False, num_classes: int = 21, num_groups: int | None = None,
             weight_std: bool = False, beta: bool = False, output_stride: int = 16, **kwargs) -> DeepLabV3:
    """DeepLabV3 with VoVNet-39 (29,513,621 parameters at 21 classes).

    Args:
        pretrained: initialise the backbone from ImageNet weights
            (`data/pretrained/vovnet39_statedict_norm.pth`, or `pretrained_path=`).
        num_classes: number of output classes.
        num_groups: GroupNorm with this many groups in the backbone instead of BatchNorm.
        weight_std, beta: ResNet-only options of the original; refused here.
        output_stride: 16 (the original) or 8.
    """
    return _create_deeplab('vovnet39', pretrained, num_classes, num_groups, weight_std, beta, output_stride, **kwargs)


def vovnet57(pretrained: bool = False, num_classes: int = 21, num_groups: int | None = None,
             weight_std: bool = False, beta: bool = False, output_stride: int = 16, **kwargs) -> DeepLabV3:
    """DeepLabV3 with VoVNet-57 (43,553,621 parameters at 21 classes); arguments as `vovnet39`."""
    return _create_deeplab('vovnet57', pretrained, num_classes, num_groups, weight_std, beta, output_stride, **kwargs)


def resnet50(pretrained: bool = False, num_classes: int = 21, num_groups: int | None = None,
             weight_std: bool = False, beta: bool = False, output_stride: int = 16, **kwargs) -> DeepLabV3:
    """DeepLabV3 with a dilated ResNet-50 (39,048,533 parameters at 21 classes).

    Args:
        pretrained: initialise the backbone from torchvision's ImageNet weights (or `pretrained_path=`).
        num_classes: number of output classes.
        num_groups: GroupNorm with this many groups in place of every BatchNorm, the ASPP's included.
        weight_std: weight standardisation in every conv except the final classifier.
        beta: a stem of three 3x3 convs in place of the 7x7 conv.
        output_stride: 16 (the original) or 8.
    """
    return _create_deeplab('resnet50', pretrained, num_classes, num_groups, weight_std, beta, output_stride, **kwargs)


def resnet101(pretrained: bool = False, num_classes: int = 21, num_groups: int | None = None,
              weight_std: bool = False, beta: bool = False, output_stride: int = 16, **kwargs) -> DeepLabV3:
    """DeepLabV3 with a dilated ResNet-101 (58,040,661 parameters at 21 classes); arguments as `resnet50`."""
    return _create_deeplab('resnet101', pretrained, num_classes, num_groups, weight_std, beta, output_stride,
                           **kwargs)


def densenet161(pretrained: bool = False, num_classes: int = 21, num_groups: int | None = None,
                weight_std: bool = False, beta: bool = False, output_stride: int = 16, **kwargs) -> DeepLabV3:
    """DeepLabV3 with a dilated DenseNet-161 (43,200,341 parameters at 21 classes).

    Args:
        pretrained: initialise the backbone from torchvision's ImageNet weights (or `pretrained_path=`).
        num_classes: number of output classes.
        num_groups, weight_std, beta: ResNet-only options of the original; refused here.
        output_stride: 16 (the original) or 8.
    """
    return _create_deeplab('densenet161', pretrained, num_classes, num_groups, weight_std, beta, output_stride,
                           **kwargs)


def densenet201(pretrained: bool = False, num_classes: int = 21, num_groups: int | None = None,
                weight_std: bool = False, beta: bool = False, output_stride: int = 16, **kwargs) -> DeepLabV3:
    """DeepLabV3 with a dilated DenseNet-201 (32,683,157 parameters at 21 classes); arguments as `densenet161`."""
    return _create_deeplab('densenet201', pretrained, num_classes, num_groups, weight_std, beta, output_stride,
                           **kwargs)


def ese_vovnet39b(pretrained: bool = False, num_classes: int = 21, num_groups: int | None = None,
                  weight_std: bool = False, beta: bool = False, output_stride: int = 16, **kwargs) -> DeepLabV3:
    """DeepLabV3 with timm's eSE-VoVNet-39 (VoVNetV2: an eSE channel attention on the last block of each stage),
    dilated as VoVNet-39 is, with VoVNet's ASPP. Needs timm.

    Args:
        pretrained: initialise the backbone from timm's ImageNet weights (`ese_vovnet39b.ra_in1k`, through its
            hub cache), or from `pretrained_path=` (a timm state dict).
        num_classes: number of output classes.
        num_groups: GroupNorm (timm's GroupNormAct) with this many groups in the backbone instead of BatchNorm.
        weight_std, beta: ResNet-only options of the original; refused here.
        output_stride: 16 or 8.
    """
    return _create_deeplab('ese_vovnet39b', pretrained, num_classes, num_groups, weight_std, beta, output_stride,
                           **kwargs)


def ese_vovnet57b(pretrained: bool = False, num_classes: int = 21, num_groups: int | None = None,
                  weight_std: bool = False, beta: bool = False, output_stride: int = 16, **kwargs) -> DeepLabV3:
    """DeepLabV3 with timm's eSE-VoVNet-57 (ImageNet weights `ese_vovnet57b.ra4_e3600_r256_in1k`); arguments as
    `ese_vovnet39b`."""
    return _create_deeplab('ese_vovnet57b', pretrained, num_classes, num_groups, weight_std, beta, output_stride,
                           **kwargs)


def build_model(backbone: str, **kwargs) -> DeepLabV3:
    """The builder named `backbone`, called with `kwargs`; an unknown name is a clear error."""
    if backbone not in BACKBONES:
        raise UserError(f'unknown backbone {backbone!r}; choose one of {", ".join(BACKBONES)}.')
    return globals()[backbone](**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Weights


# A key that only this backbone's state dict holds, tried in order.
_SIGNATURES = (
    ('ese_vovnet57b', 'stages.2.blocks.3.conv_concat.conv.weight'),
    ('ese_vovnet39b', 'stages.0.blocks.0.conv_concat.conv.weight'),
    ('vovnet57', 'stage4.OSA4_4.concat.OSA4_4_concat/conv.weight'),
    ('vovnet39', 'stem.stem_1/conv.weight'),
    ('resnet101', 'layer3.22.conv1.weight'),
    ('resnet50', 'layer4.0.conv1.weight'),
    ('densenet201', 'features.denseblock3.denselayer48.conv1.weight'),
    ('densenet161', 'features.denseblock3.denselayer36.conv1.weight'),
)


def identify(state_dict: dict[str, torch.Tensor]) -> tuple[str | None, int | None]:
    """(backbone, number of classes) of a DeepLabV3 state dict without prefix, None where unknown."""
    backbone = next((name for name, key in _SIGNATURES if key in state_dict), None)
    classifier = state_dict.get('aspp.conv3.weight')
    return backbone, (int(classifier.shape[0]) if classifier is not None else None)


def describe(backbone: str | None, num_classes: int | None) -> str:
    return (f'a DeepLabV3-{backbone or "(unknown backbone)"}'
            + (f' with {num_classes} classes' if num_classes is not None else ' without a classifier'))


def load_weights(model: DeepLabV3, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load a full DeepLabV3 state dict (prefix `module.` or none) strictly, or explain why it does not fit."""
    state_dict = strip_prefixes(state_dict)
    backbone, classes = identify(state_dict)
    if backbone is None and classes is None:
        raise UserError(f'{source} holds no DeepLabV3 weights (e.g. {_first(state_dict)}); '
                        f'give a checkpoint written by main.py --train or a released one.')
    if (backbone, classes) != (model.backbone_name, model.num_classes):
        raise UserError(f'{source} holds {describe(backbone, classes)}, but the model is '
                        f'{describe(model.backbone_name, model.num_classes)}. '
                        f'Pass --backbone {backbone or "..."} and --num_classes {classes}, or pick the matching '
                        f'checkpoint.')
    check_finite(state_dict, source)
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise UserError(f'{source} does not fit the model: {short_error(e)}') from None
    if missing or unexpected:
        hint = ''
        if any(k.endswith('running_mean') for k in list(missing) + list(unexpected)):
            hint = (' Its norm layers differ from the model\'s (BatchNorm vs GroupNorm): '
                    'pass the --groups it was trained with.')
        raise UserError(f'{source} does not fit the model: {len(missing)} missing keys {few(missing)}, '
                        f'{len(unexpected)} unexpected keys {few(unexpected)}.{hint}')


def checkpoint_parser(description: str) -> argparse.ArgumentParser:
    """The command line of a script that rebuilds a model with `model_from_checkpoint` (predict.py, export.py):
    its description, and the flags that name the checkpoint."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--checkpoint', required=True, help='a checkpoint of main.py --train, or a released one')
    parser.add_argument('--backbone', default=None, choices=BACKBONES,
                        help='only needed when the checkpoint does not tell (it usually does)')
    parser.add_argument('--output_stride', type=int, default=None, choices=OUTPUT_STRIDES,
                        help='default: the one the checkpoint was trained with (16 for the released ones)')
    return parser


# What `build_model` needs to rebuild a model, with the original's values where nothing says otherwise.
MODEL_DEFAULTS = dict(num_classes=21, output_stride=16, num_groups=None, weight_std=False, beta=False)


def rebuild_args(checkpoint: dict, fixed: dict | None = None, defaults: dict | None = None) -> dict:
    """The arguments of `build_model` that rebuild the model a checkpoint holds; the one rule of every script.

    Each comes from, in order: `fixed`, what the caller requires (an --output_stride asked for, or main.py's
    --backbone and dataset classes, which `load_weights` then checks against the weights); what the checkpoint
    recorded (`model_args`, written by the builder into this project's checkpoints); what its keys tell (a released
    checkpoint: backbone and classes); `defaults` (flags); the original's (`MODEL_DEFAULTS`). The backbone may stay
    None where nothing tells it.
    """
    fixed, defaults = fixed or {}, defaults or {}
    recorded = dict(checkpoint.get('model_args') or {})
    backbone, classes = identify(strip_prefixes(checkpoint['state_dict']))
    told = {k: v for k, v in dict(backbone=backbone, num_classes=classes).items() if v is not None}
    args = {}
    for key, default in dict(backbone=None, **MODEL_DEFAULTS).items():
        source = next((s for s in (fixed, recorded, told, defaults) if key in s), {key: default})
        args[key] = source[key]
    return args


def model_from_checkpoint(path: str, backbone: str | None = None, output_stride: int | None = None) -> DeepLabV3:
    """Rebuild and load the model a checkpoint holds (`rebuild_args`): a released one is recognised by its keys
    and has stride 16; `backbone` is needed only when nothing tells, and must agree with it when given;
    `output_stride` overrides the recorded one (the weights fit either)."""
    checkpoint = load_checkpoint(path)
    args = rebuild_args(checkpoint, fixed={'output_stride': output_stride} if output_stride else None)
    held = args['backbone']
    if held is None and backbone is None:
        raise UserError(f'cannot tell which backbone {path} was trained with; pass --backbone.')
    if backbone and held and backbone != held:
        raise UserError(f'{path} holds {describe(held, args["num_classes"])}, not a {backbone}; ask for {held} '
                        f'(predict.py and export.py need no --backbone) or pick the matching checkpoint.')
    args['backbone'] = held or backbone
    model = build_model(**args)
    load_weights(model, checkpoint['state_dict'], path)
    return model


def convert_sync_batchnorm(model: DeepLabV3) -> DeepLabV3:
    """The model with SyncBatchNorm for BatchNorm. timm's layers fuse BatchNorm and activation
    (BatchNormAct2d), which PyTorch's converter would turn into a plain SyncBatchNorm, dropping the activation;
    timm's converter keeps it (and converts the ASPP's plain BatchNorm as PyTorch's does)."""
    if FAMILIES[model.backbone_name] == 'ese_vovnet':
        from timm.layers import convert_sync_batchnorm as timm_convert
        return timm_convert(model)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _first(state_dict) -> str:
    return next(iter(state_dict), '(nothing)')
