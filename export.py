"""Export a checkpoint to ONNX with dynamic batch, height and width, and check it against PyTorch.

    python export.py --checkpoint data/deeplab_vovnet39_pascal_v3_bn_lr7e-3_epoch50.pth --output vovnet39.onnx

The graph takes `image`, a normalised float32 batch (N, 3, H, W) (ImageNet mean/std, as in training), and returns
`logits` (N, classes, H, W). It is written by PyTorch's dynamo-based exporter (torch.export, then onnxscript;
opset 18 and later); `--exporter torchscript` uses the TorchScript exporter, deprecated in current PyTorch, for
older opsets. When ONNX Runtime is installed (pip install onnxruntime), the exported model is run on a sample
input of another size than the one traced and compared with PyTorch: the agreement is printed. `--quantize int8`
also writes `{output}_int8.onnx`, quantized statically by ONNX Runtime's own tools on `--calibration_input`, and
prints both files' ONNX Runtime latency and argmax agreement with PyTorch.

`--format openvino` (or an `--output` ending in .xml) writes an OpenVINO IR instead, converted from the model
itself by `openvino.convert_model` (`.xml` + `.bin`, fp32 weights, dynamic batch, height and width), checked
against PyTorch with OpenVINO; with `--quantize int8` also `{output}_int8.xml/.bin`, quantized by NNCF
(`nncf.quantize`) on the same calibration images.

Every file carries this project's metadata (model, backbone, classes and their names, output stride, input
normalisation, precision, the checkpoint), so that `main.py --checkpoint FILE` evaluates it and `predict.py
--checkpoint FILE` predicts with it under the same protocol as the checkpoint (deployed.py).
"""
import argparse
import contextlib
import logging
import os
import statistics
import sys
import time
import warnings

import numpy as np
import torch

import checkpoints
import deeplab
import deployed
import errors
import files
import inference
import pascal
import quantize
import utils
import weights
from errors import UserError

log = logging.getLogger('export')

# Resize with align_corners=True (the ASPP's and the output's upsampling) needs opset 11; the dynamo exporter
# writes 18 and later (it cannot convert this graph to older ones).
MIN_OPSET = 11
DYNAMO_MIN_OPSET = 18
# Per-channel int8 weights are QuantizeLinear/DequantizeLinear with an axis, which ONNX defines from opset 13.
INT8_MIN_OPSET = 13
FORMATS = ('onnx', 'openvino')
EXTENSIONS = {'onnx': '.onnx', 'openvino': '.xml'}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    checkpoints.add_arguments(p, deeplab.BACKBONES, deeplab.OUTPUT_STRIDES)
    p.add_argument('--output', default=None,
                   help='file to write: .onnx, or .xml for an OpenVINO IR (its .bin beside it); default: the '
                        'checkpoint\'s name with the format\'s extension')
    p.add_argument('--format', choices=FORMATS, default=None,
                   help='onnx (default) or openvino (an IR, .xml + .bin); by default the --output\'s extension tells')
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
    p.add_argument('--quantize', default=None, choices=('int8',),
                   help='int8: also write {output}_int8.onnx, statically quantized by ONNX Runtime (QDQ, per-channel '
                        'int8 weights, uint8 activations), or {output}_int8.xml quantized by NNCF, after observing '
                        '--calibration_input, and report both files\' latency and argmax agreement with PyTorch')
    p.add_argument('--calibration_input', default=None, metavar='IMAGES',
                   help='--quantize: the images that calibrate it, an image, a folder or a glob (photos like the ones '
                        'it will segment); each on a --height x --width canvas')
    p.add_argument('--calibration', type=errors.number(int, 1), default=quantize.DEFAULT_CALIBRATION, metavar='N',
                   help=f'--quantize: how many of them calibrate, always the same ones (default '
                        f'{quantize.DEFAULT_CALIBRATION})')
    return p


def int8_path(output: str) -> str:
    stem, ext = os.path.splitext(output)
    return f'{stem}_int8{ext or ".onnx"}'


def quantize_onnx(source: str, path: str, images: list[torch.Tensor]) -> None:
    """Write `path`, `source` statically quantized by ONNX Runtime: its pre-processing (shape inference, graph
    optimisation), then QDQ int8 with per-channel weights, activation ranges from `images` (MinMax)."""
    from onnxruntime import quantization as ortq

    class Reader(ortq.CalibrationDataReader):
        def __init__(self):
            self.batches = iter([image[None].numpy() for image in images])

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {'image': batch}

    def write(tmp):
        prepared = tmp + '.pre.onnx'
        try:
            with _quiet('root', 'onnxruntime'):
                ortq.quant_pre_process(source, prepared, skip_symbolic_shape=True)
                ortq.quantize_static(prepared, tmp, Reader(), quant_format=ortq.QuantFormat.QDQ, per_channel=True,
                                     activation_type=ortq.QuantType.QUInt8, weight_type=ortq.QuantType.QInt8)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(prepared)
    files.atomic_write(path, write, flag='--output', by_path=True)


def compare(model: deeplab.DeepLabV3, paths: list[str], images: list[torch.Tensor], runs: int = 5) -> list[dict]:
    """Each exported file's median latency on one image (after a warm-up run; OpenVINO in its default precision
    for this CPU) and argmax agreement with PyTorch fp32 over `images`."""
    with torch.inference_mode():
        expected = [model(image[None]).argmax(1) for image in images]
    results = []
    for path in paths:
        net = deployed.read(path)
        agree = [(net(image[None]).argmax(1) == e).float().mean() for image, e in zip(images, expected)]
        times = []
        for _ in range(runs + 1):
            start = time.perf_counter()
            net(images[0][None])
            times.append((time.perf_counter() - start) * 1000)
        results.append(dict(path=path, runtime=net.runtime, precision=net.precision,
                            latency_ms=statistics.median(times[1:]), argmax_agreement=float(np.mean(agree) * 100)))
    return results


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
    """Run the exported file (ONNX Runtime, or OpenVINO in f32) and PyTorch on one input; None when ONNX Runtime,
    needed for an ONNX file, is absent."""
    if deployed.kind(path) == 'ONNX':
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return None
    net = deployed.read(path, precision=None if deployed.kind(path) == 'ONNX' else 'f32')
    x = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model(x).numpy()
    got = net(x).numpy()
    return dict(runtime=net.runtime, shape=got.shape, max_abs_diff=float(np.abs(got - expected).max()),
                argmax_agreement=float((got.argmax(1) == expected.argmax(1)).mean() * 100))


def newest_opset() -> int | None:
    """The newest opset the installed ONNX package defines (None without it: the exporter then says)."""
    try:
        import onnx
    except ImportError:
        return None
    return onnx.defs.onnx_opset_version()


def output_format(args) -> tuple[str, str]:
    """The format (--format, else the --output's extension) and the file to write."""
    ext = os.path.splitext(args.output or '')[1].lower()
    fmt = args.format or ('openvino' if ext == '.xml' else 'onnx')
    output = args.output or weights.stem(args.checkpoint) + EXTENSIONS[fmt]  # hf://org/name: name.onnx
    if fmt == 'openvino' and os.path.splitext(output)[1].lower() != '.xml':
        raise UserError(f'--output {output}: an OpenVINO IR is an .xml file (its weights go beside it in a .bin of '
                        f'the same name); give a name ending in .xml.')
    if fmt == 'onnx' and ext == '.xml':
        raise UserError(f'--output {output} is the name of an OpenVINO IR, but --format onnx was asked for: give a '
                        f'name ending in .onnx, or pass --format openvino.')
    return fmt, output


def written_files(fmt: str, output: str) -> list[str]:
    """The files one export writes: the ONNX file, or the IR's .xml and .bin."""
    return [output, deployed.weights_path(output)] if fmt == 'openvino' else [output]


def run(args) -> None:
    fmt, output = output_format(args)
    int8_output = int8_path(output)
    files.check_name_fits(output, '--output')
    calibration = []
    if args.quantize:
        if not args.calibration_input:
            raise UserError('--quantize int8 needs --calibration_input: a few photos like the ones the model will '
                            'segment (a folder or a glob), whose activation ranges set the int8 scales.')
        if fmt == 'onnx' and args.opset < INT8_MIN_OPSET:
            raise UserError(f'--quantize int8 writes per-channel int8 weights, which ONNX defines from opset '
                            f'{INT8_MIN_OPSET}: with --opset {args.opset} (--exporter {args.exporter}) ONNX Runtime '
                            f'would reject the int8 file. Pass --opset {INT8_MIN_OPSET} or later, or drop --quantize; '
                            f'nothing was written.')
        if fmt == 'onnx':
            errors.require('onnxruntime', 'int8 ONNX quantization (--quantize int8)')
        else:
            errors.require('nncf', 'int8 OpenVINO quantization (--format openvino --quantize int8)')
        calibration = pascal.collect_images(args.calibration_input, '--calibration_input')
        files.check_name_fits(int8_output, '--output')
    elif args.calibration_input:
        raise UserError('--calibration_input calibrates --quantize int8: add --quantize int8, or drop it.')
    if fmt == 'openvino':
        deployed.require_openvino('export.py --format openvino')
    else:
        newest = newest_opset()
        if newest is not None and args.opset > newest:  # refused before the model is built and traced
            raise UserError(f'PyTorch {torch.__version__} cannot export opset {args.opset}: the installed ONNX '
                            f'defines opsets up to {newest}. Use an opset from {MIN_OPSET} up to {newest} (default '
                            f'{DYNAMO_MIN_OPSET}).')
    paths = written_files(fmt, output) + (written_files(fmt, int8_output) if args.quantize else [])
    outputs = {path: '--output' for path in paths}
    files.refuse_overwrite(outputs, {**files.inputs_of(args.checkpoint, 'the checkpoint (--checkpoint)'),
                                     **{path: 'a calibration image (--calibration_input)' for path in calibration}})
    example = 3 * 4 * args.height * args.width  # traced on the example; checked on a slightly larger input
    checked = 0 if args.no_check else inference.BYTES_PER_PIXEL * (args.height + 32) * (args.width + 31)
    errors.refuse_if_huge(example + checked, torch.device('cpu'), f'exporting with a {args.width}x{args.height} '
                          f'example' + ('' if args.no_check else ' and checking it'), '--height and --width')
    for path in outputs:  # before any work: a folder, or a folder that takes no file, fails only when written
        if os.path.isdir(path):
            example_name = os.path.join(path, 'model' + EXTENSIONS[fmt])
            raise UserError(f'--output {path} is a folder; give a file name, e.g. {example_name}.')
    with files.output_folder(os.path.dirname(os.path.abspath(output)), '--output'):
        checkpoint = weights.read(args.checkpoint)
        model = weights.model_from_checkpoint(args.checkpoint, args.backbone, args.output_stride, args.model,
                                              checkpoint=checkpoint).eval()
        # Read before anything is written: images that cannot be read are a message, not a half-done export.
        images = quantize.load_calibration(calibration, args.calibration, args.height, args.width,
                                           f'--calibration_input {args.calibration_input}') if calibration else []
        meta = deployed.metadata(model, args.checkpoint, checkpoint.get('class_names'), 'fp32')
        with files.staged_files(list(outputs), '--output') as staged:
            if fmt == 'openvino':
                write_openvino(args, model, output, staged, images, meta)
            else:
                write(args, model, output, staged, images, meta)
        log.info('wrote %s', ', '.join(outputs))
    if args.quantize:
        for r in compare(model, [output, int8_output], images[:4]):
            log.info('%s: %s %.1f ms per %dx%d image (%s), argmax agreement with PyTorch fp32 %.2f%% (%s)',
                     r['path'], r['runtime'], r['latency_ms'], args.width, args.height, r['precision'],
                     r['argmax_agreement'], utils.plural(min(4, len(images)), 'calibration image'))
    if args.no_check:
        return
    # Another size than the traced one, odd on one side, exercises the dynamic axes.
    height, width = args.height + 32, args.width + 31
    with errors.out_of_memory_is(lambda e: f'out of memory checking the exported file on a {width}x{height} input '
                                           f'({errors.first_line(e)}): lower --height and --width, or pass '
                                           f'--no_check; {output} is written.'):
        result = check(model, output, height, width)
    if result is None:
        log.info('ONNX Runtime is not installed, so the export was not checked (pip install onnxruntime).')
        return
    log.info('%s vs PyTorch on a %dx%d input: logits %s, max |difference| %.2e, argmax agreement %.4f%%',
             result['runtime'], height, width, result['shape'], result['max_abs_diff'], result['argmax_agreement'])


def write(args, model, output: str, staged: dict[str, str], images: list[torch.Tensor], meta: dict) -> None:
    """The ONNX file (and with --quantize its int8 counterpart, quantized from it), each at its staged path, with
    the metadata evaluation and prediction read."""
    try:
        with errors.out_of_memory_is(lambda e: f'out of memory exporting with a {args.width}x{args.height} example '
                                               f'({errors.first_line(e)}): lower --height and --width; the ONNX '
                                               f'model takes any size whatever the example\'s.'):
            export(model, staged[output], args.height, args.width, args.opset, args.exporter)
    except (torch.onnx.errors.OnnxExporterError, RuntimeError) as e:
        if 'opset' not in str(e):
            raise
        raise UserError(f'PyTorch {torch.__version__} cannot export opset {args.opset}: '
                        f'{str(e).splitlines()[0]}. Use an opset from {MIN_OPSET} up to the newest it '
                        f'supports (default {DYNAMO_MIN_OPSET}).') from None
    deployed.stamp_onnx(staged[output], meta)
    log.info('exported %s (%s-%s, %d classes, dynamic batch/height/width, opset %d, %s exporter)', output,
             model.title, model.backbone_name, model.num_classes, args.opset, args.exporter)
    if not args.quantize:
        return
    start = time.perf_counter()
    try:
        quantize_onnx(staged[output], staged[int8_path(output)], images)
    except UserError:
        raise
    except Exception as e:  # ONNX Runtime's quantization tools raise what their passes raise
        raise UserError(f'ONNX Runtime could not quantize {output} to int8 ({errors.first_line(e)}); nothing was '
                        f'written. Export without --quantize, or with another --opset.') from None
    deployed.stamp_onnx(staged[int8_path(output)], {**meta, 'precision': int8_precision('ONNX Runtime', images)})
    log.info('quantized %s (int8 QDQ by ONNX Runtime, calibrated on %s in %.1f s)', int8_path(output),
             utils.plural(len(images), 'image'), time.perf_counter() - start)


def int8_precision(tool: str, images: list) -> str:
    return f'int8 ({tool}, {utils.plural(len(images), "calibration image")})'


def write_openvino(args, model, output: str, staged: dict[str, str], images: list[torch.Tensor],
                   meta: dict) -> None:
    """The OpenVINO IR converted from the model itself (and with --quantize its int8 counterpart, quantized by
    NNCF on `images`), each .xml and .bin at its staged path."""
    start = time.perf_counter()
    with errors.out_of_memory_is(lambda e: f'out of memory converting with a {args.width}x{args.height} example '
                                           f'({errors.first_line(e)}): lower --height and --width; the IR takes '
                                           f'any size whatever the example\'s.'):
        ir = deployed.to_openvino(model, args.height, args.width)
    int8_output = int8_path(output)
    deployed.save_ir(ir, staged[output], staged[deployed.weights_path(output)], meta)
    log.info('exported %s and %s (%s-%s, %d classes, dynamic batch/height/width, OpenVINO %s, fp32 weights, in '
             '%.1f s)', output, deployed.weights_path(output), model.title, model.backbone_name, model.num_classes,
             deployed.openvino_version(), time.perf_counter() - start)
    if not args.quantize:
        return
    start = time.perf_counter()
    quantized = deployed.quantize_openvino(ir, images)
    deployed.save_ir(quantized, staged[int8_output], staged[deployed.weights_path(int8_output)],
                     {**meta, 'precision': int8_precision('NNCF', images)})
    log.info('quantized %s (int8 by NNCF, calibrated on %s in %.1f s)', int8_output,
             utils.plural(len(images), 'image'), time.perf_counter() - start)


def cli(argv=None) -> int:
    return utils.run_command(get_args_parser(), run, argv, 'lower --height and --width')


if __name__ == '__main__':
    sys.exit(cli())
