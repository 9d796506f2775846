"""Export a checkpoint to ONNX with dynamic batch, height and width, and check it against PyTorch.

    python export.py --checkpoint data/deeplab_vovnet39_pascal_v3_bn_lr7e-3_epoch50.pth --output vovnet39.onnx

The graph takes `image`, a normalised float32 batch (N, 3, H, W) (ImageNet mean/std, as in training), and returns
`logits` (N, classes, H, W). When ONNX Runtime is installed (pip install onnxruntime), the exported model is run
on a sample input of another size than the one traced and compared with PyTorch: the agreement is printed.
"""
import argparse
import logging
import os
import sys
import warnings

import numpy as np
import torch

import deeplab
import utils
from utils import UserError

log = logging.getLogger('export')

# Resize with align_corners=True (the ASPP's and the output's upsampling) needs opset 11.
MIN_OPSET = 11


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    deeplab.add_checkpoint_args(p)
    p.add_argument('--output', default=None, help='ONNX file to write (default: the checkpoint name with .onnx)')
    p.add_argument('--height', type=utils.number(int, 32), default=513,
                   help='height of the example traced (default 513)')
    p.add_argument('--width', type=utils.number(int, 32), default=513, help='width of the example traced (default 513)')
    p.add_argument('--opset', type=utils.number(int, MIN_OPSET), default=17,
                   help=f'ONNX opset, {MIN_OPSET} or later (default 17)')
    p.add_argument('--no_check', action='store_true', help='skip the ONNX Runtime comparison')
    return p


def export(model: deeplab.DeepLabV3, path: str, height: int, width: int, opset: int) -> None:
    """Trace `model` on a (1, 3, height, width) example and write it with dynamic batch, height and width."""
    example = torch.randn(1, 3, height, width)
    axes = {'image': {0: 'batch', 2: 'height', 3: 'width'}, 'logits': {0: 'batch', 2: 'height', 3: 'width'}}

    def write(f):
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # the TorchScript exporter's deprecation notices
            torch.onnx.export(model, (example,), f, input_names=['image'], output_names=['logits'],
                              dynamic_axes=axes, opset_version=opset, dynamo=False)

    utils.atomic_write(path, write, flag='--output')


def check(model: deeplab.DeepLabV3, path: str, height: int, width: int) -> dict | None:
    """Run the ONNX file with ONNX Runtime and PyTorch on one input; None when ONNX Runtime is absent."""
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    x = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model(x).numpy()
    got = session.run(['logits'], {'image': x.numpy()})[0]
    return dict(shape=got.shape, max_abs_diff=float(np.abs(got - expected).max()),
                argmax_agreement=float((got.argmax(1) == expected.argmax(1)).mean() * 100))


def run(args) -> None:
    output = args.output or os.path.splitext(args.checkpoint)[0] + '.onnx'
    utils.check_name_fits(output, '--output')
    utils.refuse_overwrite({output: '--output'}, {args.checkpoint: 'the checkpoint (--checkpoint)'})
    model = deeplab.model_from_checkpoint(args.checkpoint, args.backbone, args.output_stride).eval()
    try:
        export(model, output, args.height, args.width, args.opset)
    except (torch.onnx.errors.OnnxExporterError, RuntimeError) as e:
        if 'opset' not in str(e):
            raise
        raise UserError(f'PyTorch {torch.__version__} cannot export opset {args.opset}: '
                        f'{str(e).splitlines()[0]}. Use an opset from {MIN_OPSET} up to the newest it '
                        f'supports (default 17).') from None
    log.info('wrote %s (%s, %d classes, dynamic batch/height/width)', output, model.backbone_name, model.num_classes)
    if args.no_check:
        return
    # Another size than the traced one, odd on one side, exercises the dynamic axes.
    height, width = args.height + 32, args.width + 31
    result = check(model, output, height, width)
    if result is None:
        log.info('ONNX Runtime is not installed, so the export was not checked (pip install onnxruntime).')
        return
    log.info('ONNX Runtime vs PyTorch on a %dx%d input: logits %s, max |difference| %.2e, argmax agreement %.4f%%',
             height, width, result['shape'], result['max_abs_diff'], result['argmax_agreement'])


def cli(argv=None) -> int:
    return utils.run_command(get_args_parser(), run, argv)


if __name__ == '__main__':
    sys.exit(cli())
