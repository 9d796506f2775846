"""Export a checkpoint to ONNX with dynamic batch, height and width, and check it against PyTorch.

    python export.py --checkpoint data/deeplab_vovnet39_pascal_v3_bn_lr7e-3_epoch50.pth --output vovnet39.onnx

The graph takes `image`, a normalised float32 batch (N, 3, H, W) (ImageNet mean/std, as in training), and returns
`logits` (N, classes, H, W). It is written by PyTorch's dynamo-based exporter (torch.export, then onnxscript;
opset 18 and later); `--exporter torchscript` uses the TorchScript exporter, deprecated in current PyTorch, for
older opsets. When ONNX Runtime is installed (pip install onnxruntime), the exported model is run on a sample
input of another size than the one traced and compared with PyTorch: the agreement is printed.
"""
import argparse
import contextlib
import logging
import os
import sys
import warnings

import numpy as np
import torch

import checkpoints
import deeplab
import errors
import files
import hub
import inference
from errors import UserError

log = logging.getLogger('export')

# Resize with align_corners=True (the ASPP's and the output's upsampling) needs opset 11; the dynamo exporter
# writes 18 and later (it cannot convert this graph to older ones).
MIN_OPSET = 11
DYNAMO_MIN_OPSET = 18


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    checkpoints.add_arguments(p, deeplab.BACKBONES, deeplab.OUTPUT_STRIDES)
    p.add_argument('--output', default=None, help='ONNX file to write (default: the checkpoint name with .onnx)')
    p.add_argument('--height', type=errors.number(int, 32), default=513,
                   help='height of the example traced (default 513)')
    p.add_argument('--width', type=errors.number(int, 32), default=513,
                   help='width of the example traced (default 513)')
    p.add_argument('--opset', type=errors.number(int, MIN_OPSET), default=DYNAMO_MIN_OPSET,
                   help=f'ONNX opset (default {DYNAMO_MIN_OPSET}; {DYNAMO_MIN_OPSET} or later with the dynamo '
                        f'exporter, {MIN_OPSET} or later with the TorchScript one)')
    p.add_argument('--exporter', choices=('dynamo', 'torchscript'), default='dynamo',
                   help='PyTorch\'s exporter: dynamo (default, torch.export + onnxscript) or torchscript (deprecated '
                        'in current PyTorch; for opsets below 18)')
    p.add_argument('--no_check', action='store_true', help='skip the ONNX Runtime comparison')
    return p


def export(model: deeplab.DeepLabV3, path: str, height: int, width: int, opset: int,
           exporter: str = 'dynamo') -> None:
    """Export `model` traced on a (1, 3, height, width) example, with dynamic batch, height and width."""
    example = torch.randn(1, 3, height, width)
    if exporter == 'torchscript':
        axes = {'image': {0: 'batch', 2: 'height', 3: 'width'}, 'logits': {0: 'batch', 2: 'height', 3: 'width'}}

        def write(f):
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')  # the TorchScript exporter's deprecation notices
                torch.onnx.export(model, (example,), f, input_names=['image'], output_names=['logits'],
                                  dynamic_axes=axes, opset_version=opset, dynamo=False)
        files.atomic_write(path, write, flag='--output')
        return
    errors.require('onnxscript', 'the dynamo ONNX exporter')
    if opset < DYNAMO_MIN_OPSET:
        raise UserError(f'the dynamo exporter writes opset {DYNAMO_MIN_OPSET} and later, not {opset}: pass --opset '
                        f'{DYNAMO_MIN_OPSET} or later, or --exporter torchscript (deprecated) for older opsets.')
    with warnings.catch_warnings(), _quiet('torch.onnx', 'onnxscript'):
        warnings.simplefilter('ignore')
        program = torch.onnx.export(model, (example,), input_names=['image'], output_names=['logits'], dynamo=True,
                                    dynamic_shapes=({0: 'batch', 2: 'height', 3: 'width'},), opset_version=opset,
                                    verbose=False)
    # The exporter falls back to the opset it translated to when it cannot convert to the one asked for.
    written = next(o.version for o in program.model_proto.opset_import if o.domain in ('', 'ai.onnx'))
    if written != opset:
        raise UserError(f'PyTorch {torch.__version__} cannot export opset {opset} with the dynamo exporter (its graph '
                        f'is opset {written}); use an opset from {DYNAMO_MIN_OPSET} up to the newest ONNX defines, '
                        f'or --exporter torchscript.')
    files.atomic_write(path, program.save, flag='--output', by_path=True)


@contextlib.contextmanager
def _quiet(*loggers):
    """Silence libraries' loggers for a while (the exporter logs a traceback when an opset conversion fails,
    which this script reports as one message)."""
    levels = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


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
    output = args.output or (os.path.basename(hub.stem(args.checkpoint)) if args.checkpoint.startswith(hub.PREFIX)
                             else hub.stem(args.checkpoint)) + '.onnx'
    files.check_name_fits(output, '--output')
    files.refuse_overwrite({output: '--output'}, {args.checkpoint: 'the checkpoint (--checkpoint)'})
    example = 3 * 4 * args.height * args.width  # traced on the example; checked on a slightly larger input
    checked = 0 if args.no_check else inference.BYTES_PER_PIXEL * (args.height + 32) * (args.width + 31)
    errors.refuse_if_huge(example + checked, torch.device('cpu'), f'exporting with a {args.width}x{args.height} '
                          f'example' + ('' if args.no_check else ' and checking it'), '--height and --width')
    model = deeplab.model_from_checkpoint(args.checkpoint, args.backbone, args.output_stride, args.model).eval()
    try:
        with errors.out_of_memory_is(lambda e: f'out of memory exporting with a {args.width}x{args.height} example '
                                               f'({errors.first_line(e)}): lower --height and --width; the ONNX '
                                               f'model takes any size whatever the example\'s.'):
            export(model, output, args.height, args.width, args.opset, args.exporter)
    except (torch.onnx.errors.OnnxExporterError, RuntimeError) as e:
        if 'opset' not in str(e):
            raise
        raise UserError(f'PyTorch {torch.__version__} cannot export opset {args.opset}: '
                        f'{str(e).splitlines()[0]}. Use an opset from {MIN_OPSET} up to the newest it '
                        f'supports (default {DYNAMO_MIN_OPSET}).') from None
    log.info('wrote %s (%s-%s, %d classes, dynamic batch/height/width, opset %d, %s exporter)', output,
             model.title, model.backbone_name, model.num_classes, args.opset, args.exporter)
    if args.no_check:
        return
    # Another size than the traced one, odd on one side, exercises the dynamic axes.
    height, width = args.height + 32, args.width + 31
    with errors.out_of_memory_is(lambda e: f'out of memory checking the ONNX file on a {width}x{height} input '
                                           f'({errors.first_line(e)}): lower --height and --width, or pass '
                                           f'--no_check; {output} is written.'):
        result = check(model, output, height, width)
    if result is None:
        log.info('ONNX Runtime is not installed, so the export was not checked (pip install onnxruntime).')
        return
    log.info('ONNX Runtime vs PyTorch on a %dx%d input: logits %s, max |difference| %.2e, argmax agreement %.4f%%',
             height, width, result['shape'], result['max_abs_diff'], result['argmax_agreement'])


def cli(argv=None) -> int:
    return errors.run_command(get_args_parser(), run, argv, 'lower --height and --width')


if __name__ == '__main__':
    sys.exit(cli())
