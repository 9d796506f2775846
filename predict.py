"""Segment your own images with a checkpoint (this project's or a released one).

    python predict.py --checkpoint data/deeplab_vovnet39_pascal_v3_bn_lr7e-3_epoch50.pth --input photos/ --output out/

For each image it writes, at the image's own size, the class mask as a palettised PNG (`{name}.png`) and a
colour overlay on the photo (`{name}_overlay.jpg`). `--input` is an image, a folder or a glob pattern; files
that cannot be read are reported and skipped. Images up to the crop size are padded to it, as in evaluation, and
batched; larger ones are predicted whole, or tile by tile with `--slide`.
"""
import argparse
import glob
import logging
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import deeplab
import pascal
import utils
from utils import UserError

log = logging.getLogger('predict')


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    deeplab.add_checkpoint_args(p)
    p.add_argument('--input', required=True, help='an image, a folder of images, or a glob such as "photos/*.jpg"')
    p.add_argument('--output', default='predictions', help='output folder (default: %(default)s)')
    p.add_argument('--crop_size', type=utils.number(int, 32), default=513,
                   help='canvas smaller images are padded to (default 513)')
    p.add_argument('--batch_size', type=utils.number(int, 1), default=4, help='images per forward pass (default 4)')
    p.add_argument('--opacity', type=utils.number(float, 0, maximum=1), default=0.5,
                   help='opacity of the overlay colours, 0-1 (default 0.5)')
    p.add_argument('--slide', action='store_true',
                   help='predict images larger than the crop tile by tile (overlapping crop_size windows) '
                        'instead of whole')
    p.add_argument('--device', default=None, help='cpu, cuda or cuda:N (default: CUDA when available)')
    p.add_argument('--amp', default='off', choices=tuple(utils.AMP_DTYPES), help='mixed precision')
    return p


def collect_inputs(spec: str) -> list[str]:
    if os.path.isdir(spec):
        files = [os.path.join(spec, f) for f in sorted(os.listdir(spec)) if not f.startswith('.')]
        files = [f for f in files if os.path.isfile(f)]
    elif os.path.isfile(spec):
        files = [spec]
    else:
        files = sorted(f for f in glob.glob(spec, recursive=True) if os.path.isfile(f))
    if not files:
        raise UserError(f'--input {spec} names no file: give an image, a folder of images or a glob pattern.')
    return files


class Predictor:
    """Logits for batches of normalised images, padded like evaluation; tiles for large images with `slide`."""

    def __init__(self, model, device, crop_size: int, amp, slide: bool):
        self.model, self.device, self.crop, self.amp, self.slide = model, device, crop_size, amp, slide

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            return self.model(x.to(self.device)).float()

    def batch(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Class maps for images of at most crop x crop, predicted together on one padded canvas each."""
        canvas = torch.zeros(len(images), 3, self.crop, self.crop)
        for i, image in enumerate(images):
            canvas[i, :, :image.shape[1], :image.shape[2]] = image
        pred = utils.class_map(self._forward(canvas)).cpu()
        return [pred[i, :image.shape[1], :image.shape[2]] for i, image in enumerate(images)]

    def large(self, image: torch.Tensor) -> torch.Tensor:
        """The class map of an image larger than the crop on some side: padded to at least the crop on each
        side, predicted whole, or window by window (averaged softmax) with `slide`."""
        h, w = image.shape[1:]
        padded = F.pad(image, (0, max(0, self.crop - w), 0, max(0, self.crop - h)))
        if not self.slide:
            return utils.class_map(self._forward(padded[None]))[0, :h, :w].cpu()
        ph, pw = padded.shape[1:]
        crop, stride = self.crop, max(1, self.crop * 2 // 3)
        total, count = None, torch.zeros(1, ph, pw)
        for y in _starts(ph, crop, stride):
            for x in _starts(pw, crop, stride):
                probs = self._forward(padded[None, :, y:y + crop, x:x + crop]).softmax(1)[0].cpu()
                if total is None:
                    total = torch.zeros(probs.shape[0], ph, pw)
                total[:, y:y + crop, x:x + crop] += probs
                count[:, y:y + crop, x:x + crop] += 1
        return utils.class_map(total / count, 0)[:h, :w]


def _starts(length: int, window: int, stride: int) -> list[int]:
    if length <= window:
        return [0]
    n = math.ceil((length - window) / stride) + 1
    return sorted({min(i * stride, length - window) for i in range(n)})


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


def run(args) -> int:
    """Predict every readable input; returns the number of files skipped."""
    files = collect_inputs(args.input)
    utils.make_output_folder(args.output, '--output')
    _, device = utils.init_distributed(args.device)
    amp = utils.amp_dtype(args.amp, device)
    model = deeplab.model_from_checkpoint(args.checkpoint, args.backbone, args.output_stride).to(device).eval()
    predictor = Predictor(model, device, args.crop_size, amp, args.slide)
    to_tensor = pascal.ToTensor()
    palette = utils.voc_palette()

    # Sizes come from the file headers, so that the images up to the crop size can be batched while only one
    # batch is decoded at a time; what cannot be read is reported and skipped.
    skipped, small, large = 0, [], []
    for path in files:
        try:
            w, h = pascal.image_size(path, exif=True)
        except UserError as e:
            log.warning('skipping: %s', e)
            skipped += 1
            continue
        (small if w <= args.crop_size and h <= args.crop_size else large).append(path)
    chunks = ([(True, small[i:i + args.batch_size]) for i in range(0, len(small), args.batch_size)]
              + [(False, [path]) for path in large])

    used, done, total, start = set(), 0, len(small) + len(large), time.time()
    with torch.inference_mode():
        for batched, chunk in chunks:
            photos = {}
            for path in chunk:
                try:
                    photos[path] = pascal.load_image(path, exif=True)
                except UserError as e:  # a header that reads, a body that does not (a truncated file)
                    log.warning('skipping: %s', e)
                    skipped, total = skipped + 1, total - 1
            if not photos:
                continue
            tensors = [to_tensor(photo, photo, None)[0] for photo in photos.values()]
            masks = predictor.batch(tensors) if batched else [predictor.large(tensors[0])]
            for (path, photo), mask in zip(photos.items(), masks):
                mask = mask.numpy().astype(np.uint8)
                stem = unique_stem(path, used)
                utils.save_mask(mask, os.path.join(args.output, f'{stem}.png'), palette)
                utils.save_image(overlay(photo, mask, args.opacity, palette),
                                 os.path.join(args.output, f'{stem}_overlay.jpg'))
                done += 1
                log.info('[%d/%d] %s (%dx%d) -> %s.png  %s', done, total, path, photo.size[0], photo.size[1],
                         os.path.join(args.output, stem), utils.format_rate(done, time.time() - start))
    log.info('%s segmented into %s/%s', utils.plural(done, 'image'), args.output,
             f'; {skipped} skipped (see the warnings above)' if skipped else '')
    return skipped


def cli(argv=None) -> int:
    return utils.run_command(get_args_parser(), run, argv)


if __name__ == '__main__':
    sys.exit(cli())
