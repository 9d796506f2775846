"""Segment your own images with a checkpoint (this project's or a released one).

    python predict.py --checkpoint data/deeplab_vovnet39_pascal_v3_bn_lr7e-3_epoch50.pth --input photos/ --output out/

For each image it writes, at the image's own size, the class mask as a palettised PNG (`{name}.png`) and a
colour overlay on the photo (`{name}_overlay.jpg`). `--input` is an image, a folder or a glob pattern; files
that cannot be read are reported and skipped. Images up to the crop size are padded to it, as in evaluation, and
batched; larger ones up to `--window_above` megapixels are predicted whole, and larger still in overlapping
crop-sized windows, so that memory stays bounded (`--whole`, `--slide` choose one way for all).
"""
import argparse
import logging
import os
import sys

import numpy as np
import torch
from PIL import Image

import checkpoints
import deeplab
import deployed
import errors
import files
import inference
import pascal
import quantize
import runs
import utils
import weights
from errors import Interrupted, UserError

log = logging.getLogger('predict')

# Whole-image inference costs about 0.5 GB per megapixel on top of the model (VoVNet-39, fp32 + channels-last,
# CPU; README): images above this size go in windows unless --whole says otherwise.
WINDOW_ABOVE_MP = 2.5


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    checkpoints.add_arguments(p, deeplab.BACKBONES, deeplab.OUTPUT_STRIDES)
    p.add_argument('--input', required=True, help='an image, a folder of images, or a glob such as "photos/*.jpg"')
    p.add_argument('--output', default='predictions', help='output folder (default: %(default)s)')
    p.add_argument('--crop_size', type=errors.number(int, 32), default=513,
                   help='canvas smaller images are padded to, and window size (default 513)')
    p.add_argument('--batch_size', type=errors.number(int, 1), default=4,
                   help='images up to the crop size per forward pass (default 4)')
    p.add_argument('--opacity', type=errors.number(float, 0, maximum=1), default=0.5,
                   help='opacity of the overlay colours, 0-1 (default 0.5)')
    size = p.add_mutually_exclusive_group()
    size.add_argument('--window_above', type=errors.number(float, 0, inclusive=False), default=WINDOW_ABOVE_MP,
                      metavar='MEGAPIXELS', help='predict images larger than this in overlapping crop-sized windows, '
                      f'smaller ones whole (default {WINDOW_ABOVE_MP}: about 2 GB at most on a CPU in fp32)')
    size.add_argument('--slide', action='store_true',
                      help='predict every image larger than the crop in overlapping crop-sized windows')
    size.add_argument('--whole', action='store_true',
                      help='predict every image whole, however large (memory grows with the image)')
    p.add_argument('--device', default=None, help='cpu, cuda or cuda:N (default: CUDA when available)')
    p.add_argument('--amp', default='auto', choices=('auto',) + tuple(inference.AMP_DTYPES),
                   help='mixed precision; auto (default): bf16 on a CPU with bf16 units (AVX-512 BF16, AMX) or a '
                        'GPU (fp16 on one without bf16), fp32 elsewhere; off: fp32')
    p.add_argument('--channels_last', action=argparse.BooleanOptionalAction, default=None,
                   help='NHWC memory layout (default: on with mixed precision)')
    p.add_argument('--quantize', default=None, choices=('int8',),
                   help='int8: quantize the model (PT2E through torchao) and compile it, CPU only; faster, its masks '
                        'differ from fp32\'s on a few pixels. Images go one at a time on the crop-sized canvas, '
                        'larger ones in windows: one shape, compiled once (README, "int8 inference")')
    p.add_argument('--calibration', type=errors.number(int, 1), default=quantize.DEFAULT_CALIBRATION, metavar='N',
                   help=f'--quantize: inputs that calibrate it, always the same ones (default '
                        f'{quantize.DEFAULT_CALIBRATION})')
    return p


def overlay(photo: Image.Image, mask: np.ndarray, opacity: float, palette) -> Image.Image:
    colours = np.asarray(palette, np.uint8).reshape(-1, 3)[mask]
    blended = np.asarray(photo, np.float32) * (1 - opacity) + colours.astype(np.float32) * opacity
    keep = mask == 0  # leave the background as it is
    blended[keep] = np.asarray(photo, np.float32)[keep]
    return Image.fromarray(blended.round().astype(np.uint8), 'RGB')


def unique_stem(path: str, used: set) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    if stem in used:
        stem = os.path.basename(path).replace('.', '_')
    while stem in used:
        stem += '_'
    used.add(stem)
    return stem


def plan(inputs: list[str], args) -> tuple[list[tuple[str, list[str]]], int]:
    """The work in order, from the file headers (only one batch is decoded at a time): ('batch', paths) for
    images up to the crop size, ('whole' or 'windows', [path]) for larger ones; and the number of unreadable
    files, reported and skipped."""
    skipped, small, large = 0, [], []
    for path in inputs:
        try:
            w, h = pascal.image_size(path, exif=True)
        except UserError as e:
            log.warning('skipping: %s', e)
            skipped += 1
            continue
        if w <= args.crop_size and h <= args.crop_size:
            small.append(path)
        else:
            whole = not args.quantize and (args.whole or (not args.slide and w * h <= args.window_above * 1e6))
            large.append(('whole' if whole else 'windows', [path]))
    size = 1 if args.quantize else args.batch_size
    batches = [('batch', small[i:i + size]) for i in range(0, len(small), size)]
    return batches + large, skipped


def advice(how: str, device) -> str:
    if how == 'whole':
        ways = 'predict it in windows (a smaller --window_above, or --slide)'
    else:
        ways = 'lower --batch_size or --crop_size'
    return ways + (', or use --amp bf16' if device.type == 'cpu' else ', --amp fp16, or --device cpu')


def check_quantize(args, device) -> None:
    if not args.quantize:
        return
    quantize.check_device(device)
    if args.amp not in ('auto', 'off'):
        raise UserError(f'--quantize int8 and --amp {args.amp} contradict each other (int8 computes in its own '
                        f'precision): drop one of them.')
    if args.whole:
        raise UserError('--quantize int8 predicts on crop-sized canvases (one compiled shape), larger images in '
                        'windows: drop --whole, or --quantize.')
    quantize.require()
    args.amp = 'off'


def int8_model(model, work, crop: int, count: int, flag: str) -> quantize.Int8Model:
    """The model quantized after observing `count` of the inputs (the same ones every run), on the canvas they are
    predicted on, and compiled for it."""
    images = quantize.load_calibration([path for _, paths in work for path in paths], count, crop, crop, flag)
    net = quantize.int8(model, images)
    seconds = quantize.warm_up(net, (1, 3, crop, crop))
    log.info('int8 (PT2E, torchao X86InductorQuantizer): calibrated on %s in %.1f s, compiled in %.1f s',
             utils.plural(len(images), 'input'), net.quantize_seconds, seconds)
    return net


def nothing_read(args, skipped: int) -> UserError:
    return UserError(f'no image of --input {args.input} could be read ({utils.plural(skipped, "file")} skipped, see '
                     f'the warnings above); nothing was written.')


def run(args) -> int:
    """Predict every readable input; returns the number of files skipped."""
    _, device = utils.init_distributed(args.device)
    check_quantize(args, device)
    canvas = f'{args.crop_size}x{args.crop_size}'
    errors.refuse_if_huge(inference.BYTES_PER_PIXEL * args.batch_size * args.crop_size ** 2, device,
                          f'predicting batches of {args.batch_size} images on {canvas} canvases',
                          '--batch_size or --crop_size')
    if not args.slide and not args.whole:
        errors.refuse_if_huge(inference.BYTES_PER_PIXEL * args.window_above * 1e6, device,
                              f'predicting images up to {args.window_above:g} megapixels whole', '--window_above')
    inputs = pascal.collect_images(args.input, '--input')
    with files.output_folder(args.output, '--output'):
        return predict(args, inputs, device)


def predict(args, inputs: list[str], device: torch.device) -> int:
    exported = deployed.kind(args.checkpoint) is not None  # an .onnx or OpenVINO .xml: its runtime's precision
    amp = None if exported else inference.amp_dtype(args.amp, device)
    execution = inference.Execution(device, amp, not exported and (amp is not None if args.channels_last is None
                                                                   else args.channels_last))
    work, skipped = plan(inputs, args)
    if not work:
        raise nothing_read(args, skipped)
    used, stems = set(), {}
    for _, paths in work:
        for path in paths:
            stems[path] = unique_stem(path, used)
    outputs = {os.path.join(args.output, name): '--output'
               for stem in stems.values() for name in (f'{stem}.png', f'{stem}_overlay.jpg')}
    files.refuse_overwrite(outputs, {**{path: 'an input image' for path in inputs},
                                     **deployed.inputs_of(args.checkpoint, 'the checkpoint (--checkpoint)')})
    if exported:
        model = runs.exported_model(args.checkpoint, args, device, backbone=args.backbone)
        how = f'{model.runtime}, {model.precision}'
    else:
        model = weights.model_from_checkpoint(args.checkpoint, args.backbone, args.output_stride, args.model)
        model = execution.prepare(model).eval()
        if args.quantize:
            model = int8_model(model, work, args.crop_size, args.calibration, f'--input {args.input}')
        how = 'int8' if args.quantize else {None: 'fp32', torch.bfloat16: 'bf16', torch.float16: 'fp16'}[amp]
    runner = inference.Runner(model, execution, args.crop_size)
    log.info('predicting %s with %s (%s, %s%s)', utils.plural(len(stems), 'image'), args.checkpoint, device, how,
             ', channels last' if execution.channels_last else '')
    to_tensor = pascal.ToTensor()
    palette = utils.voc_palette()

    done, total, pace = 0, len(stems), utils.Pace(len(stems))
    with torch.inference_mode(), errors.GracefulStop(repeat_raises=True) as stop:
        for how, paths in work:
            if stop.requested:
                raise Interrupted(stop.signal, f'stopped by signal {stop.signal} after {done} of {total} images; '
                                               f'their masks and overlays are in {args.output}/ (each file whole), '
                                               f'the others were not predicted')
            photos = {}
            for path in paths:
                try:
                    photos[path] = pascal.load_image(path, exif=True)
                except UserError as e:  # a header that reads, a body that does not (a truncated file)
                    log.warning('skipping: %s', e)
                    skipped, total = skipped + 1, total - 1
                    pace.total = total
            if not photos:
                continue
            tensors = [to_tensor(photo, photo, None)[0] for photo in photos.values()]
            try:
                masks = runner.class_maps(tensors) if how == 'batch' else [getattr(runner, how)(tensors[0])]
            except Exception as e:
                if not errors.out_of_memory(e):
                    raise
                sizes = ', '.join(f'{p} ({photo.size[0]}x{photo.size[1]})' for p, photo in photos.items())
                raise UserError(f'out of memory predicting {sizes} on {device} ({errors.first_line(e)}): '
                                f'{advice(how, device)}. Masks of the {done} images before it are in '
                                f'{args.output}/.') from None
            for (path, photo), mask in zip(photos.items(), masks):
                mask = mask.numpy().astype(np.uint8)
                stem = stems[path]
                files.save_mask(mask, os.path.join(args.output, f'{stem}.png'), palette, '--output')
                files.save_image(overlay(photo, mask, args.opacity, palette),
                                 os.path.join(args.output, f'{stem}_overlay.jpg'), '--output')
                done += 1
                if pace.step():
                    log.info('[%d/%d] %s (%dx%d%s) -> %s.png  %s  eta %s', done, total, path, photo.size[0],
                             photo.size[1], ', windows' if how == 'windows' else '', os.path.join(args.output, stem),
                             pace.rate(), pace.eta())
    if done == 0:
        raise nothing_read(args, skipped)
    if isinstance(model, quantize.Int8Model) and model.uncompiled:
        log.info('%s larger than the %dx%d canvas ran int8 uncompiled at their own size (padding them to a compiled '
                 'shape would change their masks), at about fp32\'s speed; --slide, or a larger --crop_size, runs '
                 'them compiled', utils.plural(model.uncompiled, 'image'), *model.canvas[::-1])
    log.info('%s segmented into %s/%s', utils.plural(done, 'image'), args.output,
             f'; {skipped} skipped (see the warnings above)' if skipped else '')
    return skipped


def cli(argv=None) -> int:
    return utils.run_command(get_args_parser(), run, argv, 'lower --batch_size, --crop_size or --window_above')


if __name__ == '__main__':
    sys.exit(cli())
