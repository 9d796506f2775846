"""VoVNet backbones dilated for DeepLabV3: V1 (OSA blocks with identity mapping, no eSE), written here, and
VoVNetV2 (eSE-VoVNet), timm's own modules with their strides turned into dilations.

Lee, Hwang, Lee, Bae, Park, "An Energy and GPU-Computation Efficient Backbone Network for Real-Time Object
Detection", CVPR Workshops 2019 (arXiv:1904.09730); Lee, Park, "CenterMask: Real-Time Anchor-Free Instance
Segmentation", CVPR 2020 (arXiv:1911.06667) for V2. V1 is the backbone of the original VoVNet-DeepLabV3
(github.com/stigma0617/VoVNet-DeepLabV3); its module names match the released checkpoints
(`stem.stem_1/conv`, `stage2.OSA2_1.layers.0.OSA2_1_0/conv`, `stage2.OSA2_1.concat.OSA2_1_concat/norm`, ...).
V2 keeps timm's names (`stem.0.conv`, `stages.3.blocks.1.attn.fc`, ...), so timm's ImageNet weights load as
they are.
"""
import math
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from errors import require

NormLayer = Callable[[int], nn.Module]

# Stage specs keyed by model name. Stages are stage2..stage5; the stem brings the input to stride 4.
SPECS: dict[str, dict] = {
    'vovnet39': dict(stem_chs=(64, 64, 128), stage_conv_chs=(128, 160, 192, 224),
                     stage_out_chs=(256, 512, 768, 1024), block_per_stage=(1, 1, 2, 2), layer_per_block=5),
    'vovnet57': dict(stem_chs=(64, 64, 128), stage_conv_chs=(128, 160, 192, 224),
                     stage_out_chs=(256, 512, 768, 1024), block_per_stage=(1, 1, 4, 3), layer_per_block=5),
}
STEM_STRIDE = 4


def conv_norm_relu(in_channels: int, out_channels: int, name: str, norm_layer: NormLayer, kernel_size: int = 3,
                   stride: int = 1, dilation: int = 1) -> list[tuple[str, nn.Module]]:
    """A bias-free conv, its norm and an in-place ReLU, named `{name}/conv`, `{name}/norm`, `{name}/relu`."""
    padding = dilation * (kernel_size - 1) // 2
    return [
        (f'{name}/conv', nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                   dilation=dilation, bias=False)),
        (f'{name}/norm', norm_layer(out_channels)),
        (f'{name}/relu', nn.ReLU(inplace=True)),
    ]


class OSABlock(nn.Module):
    """One-shot aggregation: a chain of 3x3 convs whose outputs, with the block input, are concatenated once and
    aggregated by a 1x1 conv. Blocks after the first of a stage add their input to the result (identity mapping,
    after the aggregation's ReLU, with no ReLU after the sum).

    Args:
        in_channels: channels of the block input.
        stage_channels: channels of each 3x3 conv.
        out_channels: channels after the 1x1 aggregation.
        num_layers: number of 3x3 convs.
        name: module-name prefix, e.g. `OSA4_2`.
        norm_layer: builds a norm layer from a channel count.
        identity: add the block input to its output.
        dilation: dilation (and padding) of every 3x3 conv.
    """

    def __init__(self, in_channels: int, stage_channels: int, out_channels: int, num_layers: int, name: str,
                 norm_layer: NormLayer, identity: bool = False, dilation: int = 1):
        super().__init__()
        self.identity = identity
        self.layers = nn.ModuleList()
        channels = in_channels
        for i in range(num_layers):
            self.layers.append(nn.Sequential(OrderedDict(
                conv_norm_relu(channels, stage_channels, f'{name}_{i}', norm_layer, dilation=dilation))))
            channels = stage_channels
        self.concat = nn.Sequential(OrderedDict(conv_norm_relu(
            in_channels + num_layers * stage_channels, out_channels, f'{name}_concat', norm_layer, kernel_size=1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [x]
        for layer in self.layers:
            outputs.append(layer(outputs[-1]))
        out = self.concat(torch.cat(outputs, dim=1))
        return out + x if self.identity else out


class VoVNet(nn.Sequential):
    """VoVNet-39/57 feature extractor: `stem`, then `stage2`..`stage5`, returning the stage5 features.

    A stage that downsamples starts with `Pooling`, a 3x3/2 max pool in ceil mode. Once the output stride is
    reached, later stages keep the resolution and dilate their 3x3 convs instead (by 2, then 4): at output
    stride 16 stage5 is dilated by 2 (the original); at 8, stage4 by 2 and stage5 by 4.

    Args:
        name: `vovnet39` or `vovnet57` (a key of `SPECS`).
        norm_layer: builds a norm layer from a channel count (BatchNorm2d by default).
        output_stride: 8, 16 or 32 (32 is the undilated ImageNet network).
    """

    def __init__(self, name: str, norm_layer: NormLayer = nn.BatchNorm2d, output_stride: int = 16):
        if name not in SPECS:
            raise ValueError(f'unknown VoVNet {name!r}; known: {", ".join(SPECS)}')
        if output_stride not in (8, 16, 32):
            raise ValueError(f'output_stride must be 8, 16 or 32, not {output_stride}')
        spec = SPECS[name]
        s1, s2, s3 = spec['stem_chs']
        stem = nn.Sequential(OrderedDict(
            conv_norm_relu(3, s1, 'stem_1', norm_layer, stride=2)
            + conv_norm_relu(s1, s2, 'stem_2', norm_layer)
            + conv_norm_relu(s2, s3, 'stem_3', norm_layer, stride=2)))
        stages = [('stem', stem)]

        in_channels, stride, dilation = s3, STEM_STRIDE, 1
        for i, (conv_ch, out_ch, blocks) in enumerate(
                zip(spec['stage_conv_chs'], spec['stage_out_chs'], spec['block_per_stage'])):
            number = i + 2
            stage = nn.Sequential()
            if number > 2:  # every stage after stage2 halves the resolution, or dilates once that would overshoot
                if stride < output_stride:
                    stage.add_module('Pooling', nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True))
                    stride *= 2
                else:
                    dilation *= 2
            for b in range(blocks):
                block_name = f'OSA{number}_{b + 1}'
                stage.add_module(block_name, OSABlock(in_channels if b == 0 else out_ch, conv_ch, out_ch,
                                                      spec['layer_per_block'], block_name, norm_layer,
                                                      identity=b > 0, dilation=dilation))
            stages.append((f'stage{number}', stage))
            in_channels = out_ch
        super().__init__(OrderedDict(stages))
        self.out_channels = in_channels
        self.output_stride = stride
        init_weights(self)


def init_weights(module: nn.Module) -> None:
    """The original's init: conv weights from N(0, 2 / (k * k * out_channels)), norm layers weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.SyncBatchNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------------------------
# pytorchcv's VoVNet-39/57: the same network under other names


NORM_TENSORS = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')


def pytorchcv_names(name: str) -> dict[str, str]:
    """Our backbone's state-dict names -> pytorchcv's `vovnet39`/`vovnet57` names, unit by unit: the stem's
    `stem_i` is pytorchcv's `init_block.conv{i}`; stage s (2..5), block b is its `stage{s-1}.unit{b}`, whose
    3x3 layers are `branches.branch{i+1}` and whose aggregation is `concat_conv`; a unit's `/conv`, `/norm` are
    its `.conv`, `.bn`. pytorchcv pools at the start of a stage's first unit, where ours pools at the start of
    the stage: the same place, with no parameters."""
    spec = SPECS[name]
    units = [(f'stem.stem_{i}', f'features.init_block.conv{i}') for i in (1, 2, 3)]
    for s, blocks in enumerate(spec['block_per_stage'], start=2):
        for b in range(1, blocks + 1):
            ours, theirs = f'stage{s}.OSA{s}_{b}', f'features.stage{s - 1}.unit{b}'
            units += [(f'{ours}.layers.{i}.OSA{s}_{b}_{i}', f'{theirs}.branches.branch{i + 1}')
                      for i in range(spec['layer_per_block'])]
            units.append((f'{ours}.concat.OSA{s}_{b}_concat', f'{theirs}.concat_conv'))
    names = {}
    for ours, theirs in units:
        names[f'{ours}/conv.weight'] = f'{theirs}.conv.weight'
        names.update({f'{ours}/norm.{t}': f'{theirs}.bn.{t}' for t in NORM_TENSORS})
    return names


# ---------------------------------------------------------------------------------------------------------------
# VoVNetV2 (eSE-VoVNet): timm's model, dilated


# The ImageNet weights timm publishes for each depth (its default tag of each, named here so that the choice is
# recorded): ese_vovnet57b's were trained on inputs normalised with mean = std = 0.5 (timm's pretrained config).
TIMM_WEIGHTS = {'ese_vovnet39b': 'ese_vovnet39b.ra_in1k', 'ese_vovnet57b': 'ese_vovnet57b.ra4_e3600_r256_in1k'}


def timm_vovnet(name: str, norm_layer=None) -> nn.Module:
    """timm's VoVNetV2 classifier `name` with random weights (timm's init) and the pretrained config of
    `TIMM_WEIGHTS[name]`; `norm_layer` replaces its BatchNorm (a timm norm + activation layer)."""
    timm = require('timm', f'the {name} backbone')
    kwargs = {} if norm_layer is None else {'norm_layer': norm_layer}
    return timm.create_model(TIMM_WEIGHTS[name], pretrained=False, **kwargs)


def dilate_timm_vovnet(net: nn.Module, output_stride: int = 16) -> nn.Sequential:
    """timm VoVNet's `stem` and `stages` as a feature extractor at `output_stride` (8, 16 or 32), the way
    `VoVNet` above is: once the stride is reached, a stage's 3x3/2 max pool is dropped and its 3x3 convs are
    dilated instead (by 2, then 4). timm's modules and names are kept; its classifier is left out."""
    if output_stride not in (8, 16, 32):
        raise ValueError(f'output_stride must be 8, 16 or 32, not {output_stride}')
    stride, dilation = STEM_STRIDE, 1
    for stage in net.stages:
        if stage.pool is not None:
            if stride < output_stride:
                stride *= 2
            else:
                stage.pool = None
                dilation *= 2
        if dilation > 1:
            for block in stage.blocks:
                for unit in block.conv_mid:  # the 3x3 ConvNormAct layers; the aggregation and eSE are 1x1
                    unit.conv.dilation = unit.conv.padding = (dilation, dilation)
    backbone = nn.Sequential(OrderedDict(stem=net.stem, stages=net.stages))
    backbone.out_channels = net.num_features
    backbone.output_stride = stride
    return backbone
