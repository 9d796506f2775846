"""DeepLabV3 with VoVNet, ResNet and DenseNet backbones, faithful to the released checkpoints, and DeepLabV3+.

Chen, Papandreou, Schroff, Adam, "Rethinking Atrous Convolution for Semantic Image Segmentation"
(arXiv:1706.05587); the V3+ decoder is that of Chen, Zhu, Papandreou, Schroff, Adam, "Encoder-Decoder with Atrous
Separable Convolution for Semantic Image Segmentation" (arXiv:1802.02611). Reimplements the models of
github.com/stigma0617/VoVNet-DeepLabV3 (itself built on github.com/chenxi116/DeepLabv3.pytorch): the same module
names, so `state_dict` keys equal those of the released `.pth` files once their `module.` prefix is removed, and
the same arithmetic, so they give the same logits.

`SPECS` is the table of backbones (how each body is built, its ASPP's norm, its options, which library has its
ImageNet weights); `build_model(name, ...)` builds any of them with random weights. No file is read here: weights of
every kind come in through weights.py. `MODELS` names the two models: `deeplabv3` (the
original's) and `deeplabv3plus` (the same encoder, its ASPP without a classifier, and `Decoder`). The original's
builders (`vovnet39`, ..., `densenet201`) and `ese_vovnet39b`/`ese_vovnet57b` (timm's VoVNetV2, dilated like VoVNet)
are thin wrappers.
"""
import functools
import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import vovnet
from errors import UserError

log = logging.getLogger(__name__)

OUTPUT_STRIDES = (8, 16)
ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}
ASPP_DEPTH = 256
DECODER_DEPTH = 256  # the V3+ decoder's 3x3 convs
LOW_LEVEL_DEPTH = 48  # the stride-4 features, projected (the paper's Table 1 best)
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
        num_classes: output channels of the final 1x1 conv (the only conv with a bias); None: no classifier, the
            ASPP returns its `depth` features (DeepLabV3+, whose decoder classifies).
        rates: dilations of the three 3x3 branches.
        norm_layer: builds the norm after each conv from a channel count.
        depth: channels of each branch and of the projection.
    """

    def __init__(self, in_channels: int, num_classes: int | None, rates: tuple[int, int, int], norm_layer: NormLayer,
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
        if num_classes is not None:
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
        return self.conv3(x) if hasattr(self, 'conv3') else x


class Decoder(nn.Module):
    """The DeepLabV3+ decoder (arXiv:1802.02611, section 3.2, the best decoder of its Table 3): the backbone's
    stride-4 features projected to 48 channels (1x1 conv, norm, ReLU), the ASPP's features upsampled bilinearly to
    their size and concatenated, two 3x3 convs (norm, ReLU), a 1x1 classifier. Plain convolutions.

    Args:
        low_channels: channels of the backbone's stride-4 features.
        num_classes: output channels of the classifier (with a bias, as the ASPP's).
        norm_layer: builds the norm after each conv from a channel count.
        in_channels: channels of the ASPP's features.
    """

    def __init__(self, low_channels: int, num_classes: int, norm_layer: NormLayer, in_channels: int = ASPP_DEPTH,
                 depth: int = DECODER_DEPTH, low_depth: int = LOW_LEVEL_DEPTH):
        super().__init__()
        self.project = nn.Sequential(nn.Conv2d(low_channels, low_depth, 1, bias=False), norm_layer(low_depth),
                                     nn.ReLU(inplace=True))
        self.fuse = nn.Sequential(
            nn.Conv2d(in_channels + low_depth, depth, 3, padding=1, bias=False), norm_layer(depth),
            nn.ReLU(inplace=True),
            nn.Conv2d(depth, depth, 3, padding=1, bias=False), norm_layer(depth), nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(depth, num_classes, 1)
        vovnet.init_weights(self)

    def forward(self, features: torch.Tensor, low_level: torch.Tensor) -> torch.Tensor:
        low_level = self.project(low_level)  # (N, 48, H/4, W/4)
        features = F.interpolate(features, size=low_level.shape[-2:], mode='bilinear', align_corners=True)
        return self.classifier(self.fuse(torch.cat([features, low_level], dim=1)))


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


HEADS = ('aspp', 'decoder')  # the top-level modules that are not the backbone's


class DeepLabV3(nn.Sequential):
    """DeepLabV3 on a named backbone: the backbone's stages, then `aspp`, then bilinear upsampling of the logits to
    the input size (align_corners), as the original.

    The stages are registered at the top level, as in the original, so the state-dict keys read `stem.*`/`stage2.*`
    (VoVNet), `conv1.*`/`layer1.*` (ResNet), `features.*` (DenseNet) or `stem.*`/`stages.*` (eSE-VoVNet), then
    `aspp.*`. `model_args` are the arguments that rebuild it (checkpoints record them); `initial_weights` is the
    record of `initialize`, None until then.

    Args:
        backbone: a name of `SPECS`.
        num_classes: number of output classes.
        output_stride: 16 (the original) or 8; picks the dilations and the ASPP rates.
        num_groups: GroupNorm with this many groups instead of BatchNorm (where the backbone has the option).
        weight_std: weight standardisation in every conv but the classifier (ResNet).
        beta: a stem of three 3x3 convs in place of the 7x7 one (ResNet).
    """
    name = 'deeplabv3'
    title = 'DeepLabV3'

    def __init__(self, backbone: str, num_classes: int = 21, output_stride: int = 16, num_groups: int | None = None,
                 weight_std: bool = False, beta: bool = False):
        spec = check_options(backbone, num_classes, output_stride, num_groups, weight_std, beta)
        body = spec.body(backbone, output_stride, num_groups, beta)
        layers = OrderedDict(body.named_children())
        layers.update(self.make_head(body, spec, num_classes, output_stride, num_groups))
        super().__init__(layers)
        if weight_std:
            convert_weight_std(self, skip=(self.classifier,))
        self.backbone_name, self.num_classes, self.output_stride = backbone, num_classes, output_stride
        self.low_level = body.low_level  # (path of the stride-4 stage, its channels)
        self.model_args = dict(backbone=backbone, num_classes=num_classes, output_stride=output_stride,
                               num_groups=num_groups, weight_std=weight_std, beta=beta)
        if self.name != DeepLabV3.name:  # a DeepLabV3 records none, as every checkpoint before DeepLabV3+ did
            self.model_args = dict(model=self.name, **self.model_args)
        self.initial_weights: dict | None = None

    @staticmethod
    def make_head(body: nn.Sequential, spec: 'BackboneSpec', num_classes: int, output_stride: int,
                  num_groups: int | None) -> dict[str, nn.Module]:
        return dict(aspp=ASPP(body.out_channels, num_classes, ASPP_RATES[output_stride], spec.aspp_norm(num_groups)))

    @property
    def classifier(self) -> nn.Conv2d:
        """The last 1x1 conv, which gives the logits."""
        return self.aspp.conv3

    def head(self) -> tuple[nn.Module, ...]:
        """The modules trained at lr x last_mult: the ASPP and its classifier."""
        return (self.aspp,)

    def backbone_stages(self) -> list[tuple[str, nn.Module]]:
        return [(name, module) for name, module in self.named_children() if name not in HEADS]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features, (N, C, H/os, W/os)."""
        for _name, module in self.backbone_stages():
            x = module(x)
        return x

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The logits before their upsampling to the input size, (N, classes, H/os, W/os)."""
        return self.aspp(self.forward_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.forward_logits(x), size=x.shape[-2:], mode='bilinear', align_corners=True)


class DeepLabV3Plus(DeepLabV3):
    """DeepLabV3+: DeepLabV3's backbone and ASPP (without its classifier), then `decoder` (`Decoder`) on the ASPP's
    features and the backbone's stride-4 features (`low_level`: VoVNet `stage2`, eSE-VoVNet `stages.0`, ResNet
    `layer1`, DenseNet `features.denseblock1`), then bilinear upsampling of its logits to the input size.

    The decoder's norm is the ASPP's kind (GroupNorm with --groups where the ASPP has it, i.e. ResNet; else
    BatchNorm with PyTorch's defaults: the original's eps quirk stays in the original's modules). The keys are
    DeepLabV3's but `aspp.conv3.*`, plus `decoder.*`. Arguments as DeepLabV3.
    """
    name = 'deeplabv3plus'
    title = 'DeepLabV3+'

    @staticmethod
    def make_head(body: nn.Sequential, spec: 'BackboneSpec', num_classes: int, output_stride: int,
                  num_groups: int | None) -> dict[str, nn.Module]:
        return dict(aspp=ASPP(body.out_channels, None, ASPP_RATES[output_stride], spec.aspp_norm(num_groups)),
                    decoder=Decoder(body.low_level[1], num_classes, spec.decoder_norm(num_groups)))

    @property
    def classifier(self) -> nn.Conv2d:
        return self.decoder.classifier

    def head(self) -> tuple[nn.Module, ...]:
        """The modules trained at lr x last_mult: the ASPP and the decoder."""
        return (self.aspp, self.decoder)

    def forward_levels(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The backbone's features (N, C, H/os, W/os) and its stride-4 features (N, C4, ~H/4, ~W/4)."""
        return _forward_tapped(self.backbone_stages(), x, self.low_level[0])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_levels(x)[0]

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The decoder's logits, (N, classes, ~H/4, ~W/4)."""
        features, low_level = self.forward_levels(x)
        return self.decoder(self.aspp(features), low_level)


def _forward_tapped(modules, x: torch.Tensor, tap: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the (name, module) pairs in turn; return the output and the output of the module at the dotted path
    `tap`, going down into the Sequential that holds it (DenseNet's `features.denseblock1`)."""
    head, _, rest = tap.partition('.')
    tapped = None
    for name, module in modules:
        if name == head and rest:
            x, tapped = _forward_tapped(module.named_children(), x, rest)
        else:
            x = module(x)
            if name == head:
                tapped = x
    return x, tapped


MODELS = {cls.name: cls for cls in (DeepLabV3, DeepLabV3Plus)}  # checkpoints.FILE_TAGS names their files


# ---------------------------------------------------------------------------------------------------------------
# Backbones: each body is a Sequential of named stages with `out_channels`, and `low_level`: the path of the
# module giving its stride-4 features and their channels (the DeepLabV3+ decoder's input)


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


def _vovnet_body(name: str, output_stride: int, num_groups: int | None, beta: bool) -> nn.Sequential:
    norm = nn.BatchNorm2d if num_groups is None else functools.partial(_group_norm, num_groups)
    body = vovnet.VoVNet(name, norm_layer=norm, output_stride=output_stride)
    body.low_level = ('stage2', vovnet.SPECS[name]['stage_out_chs'][0])
    return body


def _ese_vovnet_body(name: str, output_stride: int, num_groups: int | None, beta: bool) -> nn.Sequential:
    norm = None if num_groups is None else functools.partial(_timm_group_norm, num_groups=num_groups)
    net = vovnet.timm_vovnet(name, norm)
    stride4 = next(f for f in net.feature_info if f['reduction'] == 4)  # its first stage
    body = vovnet.dilate_timm_vovnet(net, output_stride)
    body.low_level = (stride4['module'], stride4['num_chs'])
    return body


def _resnet_body(name: str, output_stride: int, num_groups: int | None, beta: bool) -> nn.Sequential:
    norm = (functools.partial(nn.BatchNorm2d, momentum=RESNET_BN_MOMENTUM) if num_groups is None
            else functools.partial(_group_norm, num_groups))
    import torchvision  # here, not at the top: it imports torch._dynamo, a second of every process's start
    net = getattr(torchvision.models, name)(norm_layer=norm,
                                            replace_stride_with_dilation=[False, output_stride == 8, True])
    vovnet.init_weights(net)
    if beta:  # three 3x3 convs, no norm between them, in place of the 7x7
        net.conv1 = nn.Sequential(nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False),
                                  nn.Conv2d(64, 64, 3, padding=1, bias=False),
                                  nn.Conv2d(64, 64, 3, padding=1, bias=False))
        vovnet.init_weights(net.conv1)
    body = nn.Sequential(OrderedDict((n, m) for n, m in net.named_children() if n not in ('avgpool', 'fc')))
    body.out_channels = net.fc.in_features
    body.low_level = ('layer1', net.layer1[-1].conv3.out_channels)
    return body


def _densenet_body(name: str, output_stride: int, num_groups: int | None, beta: bool) -> nn.Sequential:
    import torchvision
    features = getattr(torchvision.models, name)().features
    # The last transition keeps the resolution and the last block is dilated (output stride 16); at output
    # stride 8 the one before too.
    dilated = {'transition3': ('denseblock4', 2)} if output_stride == 16 else {
        'transition2': ('denseblock3', 2), 'transition3': ('denseblock4', 4)}
    for transition, (block, dilation) in dilated.items():
        del getattr(features, transition).pool
        for layer in getattr(features, block).children():
            layer.conv2.dilation = (dilation, dilation)
            layer.conv2.padding = (dilation, dilation)
    body = nn.Sequential(OrderedDict(features=features, relu=nn.ReLU(inplace=True)))
    body.out_channels = features.norm5.num_features
    body.low_level = ('features.denseblock1', features.transition1.norm.num_features)
    return body


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone: how its body is built, the norm settings of its ASPP, the options it has, and which library
    has its ImageNet weights."""
    family: str
    body: Callable[[str, int, int | None, bool], nn.Sequential]  # (name, output stride, groups, beta)
    aspp_bn: dict
    options: tuple[str, ...]  # of 'num_groups', 'weight_std', 'beta'
    library: str  # who provides its ImageNet weights when no file is given (imagenet.py loads them)
    groupnorm_head: bool = False  # with --groups, the ASPP takes GroupNorm too (ResNet)

    def aspp_norm(self, num_groups: int | None) -> NormLayer:
        if num_groups is not None and self.groupnorm_head:
            return functools.partial(_group_norm, num_groups)
        return functools.partial(nn.BatchNorm2d, **self.aspp_bn)

    def decoder_norm(self, num_groups: int | None) -> NormLayer:
        """The V3+ decoder's: GroupNorm where the ASPP has it, else BatchNorm with PyTorch's defaults. The 48
        channels of the projection take the largest group count dividing them that is not above --groups (16 for
        --groups 32)."""
        if num_groups is not None and self.groupnorm_head:
            return lambda channels: _group_norm(math.gcd(num_groups, channels), channels)
        return nn.BatchNorm2d


_VOVNET = BackboneSpec('vovnet', _vovnet_body, OTHER_ASPP_BN, ('num_groups',), 'pytorchcv')
_ESE_VOVNET = BackboneSpec('ese_vovnet', _ese_vovnet_body, OTHER_ASPP_BN, ('num_groups',), 'timm')
_RESNET = BackboneSpec('resnet', _resnet_body, RESNET_ASPP_BN, ('num_groups', 'weight_std', 'beta'), 'torchvision',
                       groupnorm_head=True)
_DENSENET = BackboneSpec('densenet', _densenet_body, OTHER_ASPP_BN, (), 'torchvision')
SPECS = {'vovnet39': _VOVNET, 'vovnet57': _VOVNET, 'resnet50': _RESNET, 'resnet101': _RESNET,
         'densenet161': _DENSENET, 'densenet201': _DENSENET, 'ese_vovnet39b': _ESE_VOVNET,
         'ese_vovnet57b': _ESE_VOVNET}
BACKBONES = tuple(SPECS)
ORIGINAL_BACKBONES = BACKBONES[:6]  # the original's six; the eSE-VoVNets need timm
TIMM_BACKBONES = tuple(name for name, spec in SPECS.items() if spec.library == 'timm')
OPTION_FLAGS = {'num_groups': '--groups', 'weight_std': '--weight_std', 'beta': '--beta'}


def check_options(backbone: str, num_classes: int, output_stride: int, num_groups: int | None, weight_std: bool,
                  beta: bool) -> BackboneSpec:
    """The spec of `backbone`, once the options are ones it has; else a message naming the flag."""
    if backbone not in SPECS:
        raise UserError(f'unknown backbone {backbone!r}; choose one of {", ".join(BACKBONES)}.')
    if output_stride not in OUTPUT_STRIDES:
        raise UserError(f'output stride must be 8 or 16, not {output_stride}.')
    if num_classes < 1:
        raise UserError(f'the number of classes must be positive, not {num_classes}.')
    if num_groups is not None and num_groups < 1:
        raise UserError(f'--groups must be a positive number of groups, not {num_groups}.')
    spec = SPECS[backbone]
    given = dict(num_groups=num_groups is not None, weight_std=weight_std, beta=beta)
    for option, flag in OPTION_FLAGS.items():
        if given[option] and option not in spec.options:
            raise UserError(f'{flag} is a ResNet option of the original; {backbone} has no such variant. '
                            f'Drop {flag}, or use --backbone resnet50/resnet101.')
    return spec


def uses_batchnorm(backbone: str, num_groups: int | None) -> bool:
    """Whether the model has BatchNorm layers: every one but a ResNet with GroupNorm (`num_groups`), since a
    VoVNet's GroupNorm stops at the backbone and its ASPP keeps BatchNorm, as in the original."""
    return num_groups is None or not SPECS[backbone].groupnorm_head


# ---------------------------------------------------------------------------------------------------------------
# Building and initialising


def build_model(backbone: str, num_classes: int = 21, output_stride: int = 16, model: str = 'deeplabv3',
                **options) -> DeepLabV3:
    """The DeepLabV3 (`model='deeplabv3plus'`: DeepLabV3+) of `backbone` (`options`: num_groups, weight_std,
    beta), with random weights; weights.build_model loads its backbone's ImageNet weights too."""
    if model not in MODELS:
        raise UserError(f'unknown model {model!r}; choose one of {", ".join(MODELS)}.')
    return MODELS[model](backbone, num_classes, output_stride, **options)


class _NoInit(torch.overrides.TorchFunctionMode):
    """Initialisation left out: torch.nn.init's functions and the tensors' random fills return their tensor as it is
    (memory from torch.empty), each a no-op."""

    DRAWS = {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.bernoulli_, torch.Tensor.random_,
             torch.Tensor.exponential_, torch.Tensor.log_normal_, torch.Tensor.cauchy_, torch.Tensor.geometric_}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.DRAWS or getattr(func, '__module__', None) == 'torch.nn.init':
            return args[0] if args else kwargs['tensor']
        return func(*args, **(kwargs or {}))


def empty(**args) -> DeepLabV3:
    """`build_model(**args)` without drawing the initial weights that a checkpoint's then replace (its tensors keep
    the uninitialised memory they were made with): 0.009 s instead of 0.196 s for VoVNet-39, 0.024 s instead of
    0.567 s for ResNet-101 (medians of 5, one thread). Only for a model that weights.load_weights then fills: it refuses
    a state dict missing any tensor, and the models keep no buffer outside their state dict. (Not the meta device
    and `to_empty`: in a fresh process their first use imported torch._dynamo and sympy, 1.1 s.)"""
    with _NoInit():
        return build_model(**args)


# The original's API: one builder per backbone, e.g. deeplab.vovnet39(num_classes=21). Options: num_classes=21,
# output_stride=16, num_groups=None, weight_std=False, beta=False (the last two ResNet only). The models are built
# here with random weights; `weights.vovnet39(pretrained=True)` (the same builders in the weights layer) loads the
# ImageNet weights, as the original's pretrained=True did.


def _builder(backbone: str, description: str):
    def builder(pretrained: bool = False, **kwargs) -> DeepLabV3:
        if pretrained:
            raise UserError(f'deeplab.{backbone} builds the model with random weights; its ImageNet weights come '
                            f'through the weights layer: weights.{backbone}(pretrained=True).')
        return build_model(backbone, **kwargs)
    builder.__name__ = builder.__qualname__ = backbone
    builder.__doc__ = f'DeepLabV3 with {description}.'
    return builder


vovnet39 = _builder('vovnet39', 'VoVNet-39 (29,513,621 parameters at 21 classes)')
vovnet57 = _builder('vovnet57', 'VoVNet-57 (43,553,621 parameters at 21 classes)')
resnet50 = _builder('resnet50', 'a dilated ResNet-50 (39,048,533 parameters at 21 classes)')
resnet101 = _builder('resnet101', 'a dilated ResNet-101 (58,040,661 parameters at 21 classes)')
densenet161 = _builder('densenet161', 'a dilated DenseNet-161 (43,200,341 parameters at 21 classes)')
densenet201 = _builder('densenet201', 'a dilated DenseNet-201 (32,683,157 parameters at 21 classes)')
ese_vovnet39b = _builder('ese_vovnet39b', "timm's eSE-VoVNet-39 (VoVNetV2), dilated as VoVNet-39 is; needs timm")
ese_vovnet57b = _builder('ese_vovnet57b', "timm's eSE-VoVNet-57 (VoVNetV2), dilated as VoVNet-57 is; needs timm")


def describe(backbone: str | None, num_classes: int | None, model: str | None = 'deeplabv3') -> str:
    title = MODELS[model].title if model in MODELS else 'DeepLabV3'
    return (f'a {title}-{backbone or "(unknown backbone)"}'
            + (f' with {num_classes} classes' if num_classes is not None else ' without a classifier'))


def convert_sync_batchnorm(model: DeepLabV3) -> DeepLabV3:
    """The model with SyncBatchNorm for BatchNorm. timm's layers fuse BatchNorm and activation
    (BatchNormAct2d), which PyTorch's converter would turn into a plain SyncBatchNorm, dropping the activation;
    timm's converter keeps it (and converts the ASPP's plain BatchNorm as PyTorch's does)."""
    if SPECS[model.backbone_name].library == 'timm':
        from timm.layers import convert_sync_batchnorm as timm_convert
        return timm_convert(model)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
