"""An independent, functional forward pass of the original's six DeepLabV3 models, written from the facts in the
spec (ORIGINAL.md) with `torch.nn.functional` only, reading weights from a state dict. The tests compare the
project's modules with it, so a wrong dilation, pooling mode, BN eps, identity placement or interpolation mode
in either shows up as different logits. Evaluation mode (running statistics) only."""

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
BLOCKS = {'vovnet39': (1, 1, 2, 2), 'vovnet57': (1, 1, 4, 3), 'resnet50': (3, 4, 6, 3), 'resnet101': (3, 4, 23, 3),
          'densenet161': (6, 12, 36, 24), 'densenet201': (6, 12, 48, 32)}


def bn(x: Tensor, sd: dict[str, Tensor], name: str, eps: float = 1e-5) -> Tensor:
    return F.batch_norm(x, sd[f'{name}.running_mean'], sd[f'{name}.running_var'], sd[f'{name}.weight'],
                        sd[f'{name}.bias'], False, 0.0, eps)


def conv(x: Tensor, sd, name: str, stride: int = 1, dilation: int = 1) -> Tensor:
    w = sd[f'{name}.weight']
    pad = dilation * (w.shape[-1] // 2)
    return F.conv2d(x, w, sd.get(f'{name}.bias'), stride, pad, dilation)


def vovnet(x: Tensor, sd, blocks) -> Tensor:
    def unit(x, name, stride=1, dilation=1):
        return F.relu(bn(conv(x, sd, f'{name}/conv', stride, dilation), sd, f'{name}/norm'))

    x = unit(x, 'stem.stem_1', stride=2)
    x = unit(x, 'stem.stem_2')
    x = unit(x, 'stem.stem_3', stride=2)
    for s, n in zip(range(2, 6), blocks):
        if s in (3, 4):
            x = F.max_pool2d(x, 3, 2, 0, ceil_mode=True)
        dilation = 2 if s == 5 else 1
        for b in range(1, n + 1):
            p = f'stage{s}.OSA{s}_{b}'
            outs = [x]
            for i in range(5):
                outs.append(unit(outs[-1], f'{p}.layers.{i}.OSA{s}_{b}_{i}', dilation=dilation))
            y = unit(torch.cat(outs, 1), f'{p}.concat.OSA{s}_{b}_concat')
            x = y + x if b > 1 else y
    return x


def resnet(x: Tensor, sd, blocks) -> Tensor:
    x = F.relu(bn(conv(x, sd, 'conv1', stride=2), sd, 'bn1'))
    x = F.max_pool2d(x, 3, 2, 1)
    for layer, n in zip(range(1, 5), blocks):
        for b in range(n):
            p = f'layer{layer}.{b}'
            stride = 2 if layer in (2, 3) and b == 0 else 1
            dilation = 2 if layer == 4 and b > 0 else 1
            y = F.relu(bn(conv(x, sd, f'{p}.conv1'), sd, f'{p}.bn1'))
            y = F.relu(bn(conv(y, sd, f'{p}.conv2', stride, dilation), sd, f'{p}.bn2'))
            y = bn(conv(y, sd, f'{p}.conv3'), sd, f'{p}.bn3')
            if f'{p}.downsample.0.weight' in sd:
                x = bn(conv(x, sd, f'{p}.downsample.0', stride), sd, f'{p}.downsample.1')
            x = F.relu(y + x)
    return x


def densenet(x: Tensor, sd, blocks) -> Tensor:
    f = 'features'
    x = F.relu(bn(conv(x, sd, f'{f}.conv0', stride=2), sd, f'{f}.norm0'))
    x = F.max_pool2d(x, 3, 2, 1)
    for i, n in enumerate(blocks, 1):
        dilation = 2 if i == 4 else 1
        for j in range(1, n + 1):
            p = f'{f}.denseblock{i}.denselayer{j}'
            y = conv(F.relu(bn(x, sd, f'{p}.norm1')), sd, f'{p}.conv1')
            y = conv(F.relu(bn(y, sd, f'{p}.norm2')), sd, f'{p}.conv2', dilation=dilation)
            x = torch.cat([x, y], 1)
        if i < 4:
            p = f'{f}.transition{i}'
            x = conv(F.relu(bn(x, sd, f'{p}.norm')), sd, f'{p}.conv')
            if i < 3:
                x = F.avg_pool2d(x, 2, 2)
    return F.relu(bn(x, sd, f'{f}.norm5'))


def aspp(x: Tensor, sd, eps: float) -> Tensor:
    def branch(y, i, dilation=1):
        return F.relu(bn(conv(y, sd, f'aspp.aspp{i}', dilation=dilation), sd, f'aspp.aspp{i}_bn', eps))

    pooled = branch(F.adaptive_avg_pool2d(x, 1), 5)
    pooled = F.interpolate(pooled, size=x.shape[2:], mode='bilinear', align_corners=True)
    y = torch.cat([branch(x, 1), branch(x, 2, 6), branch(x, 3, 12), branch(x, 4, 18), pooled], 1)
    y = F.relu(bn(conv(y, sd, 'aspp.conv2'), sd, 'aspp.bn2', eps))
    return conv(y, sd, 'aspp.conv3')


def deeplab(backbone: str, x: Tensor, sd: dict[str, Tensor]) -> Tensor:
    """Logits of the original's DeepLabV3-`backbone` (output stride 16) for `x`, from state dict `sd`."""
    body = {'vovnet': vovnet, 'resnet': resnet, 'densenet': densenet}[backbone.rstrip('0123456789')]
    eps = 1e-5 if backbone.startswith('resnet') else 0.0003  # the ASPP BN quirk
    logits = aspp(body(x, sd, BLOCKS[backbone]), sd, eps)
    return F.interpolate(logits, size=x.shape[2:], mode='bilinear', align_corners=True)
