"""A small synthetic segmentation dataset in the exact PASCAL VOC + SBD layout, for the demo and the tests.

    python synthetic.py --root data/synthetic --train 600 --val 120

writes `{root}/VOC2012/{JPEGImages, SegmentationClassAug, list/train_aug.txt, list/val.txt}`. Each image shows
one to three objects of the 20 VOC classes on a textured, low-saturation background. A class has its own
colour, shape and texture (solid, stripes or checks), so a network can learn it; masks are palettised PNGs of
class indices with a 255 ("ignore") band along object borders, as VOC's.
"""
import argparse
import os
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from errors import number
from files import atomic_write, save_image, write_error
from utils import IGNORE_INDEX, exit_status, voc_palette

NUM_OBJECT_CLASSES = 20
# Saturated colours, one per class, at least 100 apart in RGB (farthest-point picks among colours with a
# channel spread of 120 or more), so that none is near another or the greyish backgrounds.
COLOURS = [(230, 20, 20), (0, 255, 255), (0, 0, 165), (90, 255, 0), (255, 135, 255), (255, 255, 105), (150, 0, 255),
           (0, 150, 90), (105, 150, 225), (210, 165, 0), (255, 15, 165), (120, 255, 135), (0, 90, 255),
           (240, 135, 120), (150, 0, 105), (0, 255, 135), (135, 255, 255), (105, 150, 30), (90, 45, 180), (0, 195, 0)]
SHAPES = ('ellipse', 'rectangle', 'triangle', 'diamond', 'hexagon')
TEXTURES = ('solid', 'stripes', 'checks')


def class_style(c: int):
    """Colour, shape and texture of object class c (1..20)."""
    return COLOURS[c - 1], SHAPES[(c - 1) % len(SHAPES)], TEXTURES[(c - 1) % len(TEXTURES)]


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    base = rng.uniform(70, 190)
    tint = rng.uniform(-18, 18, size=3)
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * gx / w + np.sin(angle) * gy / h) * rng.uniform(-50, 50)
    img = base + ramp[..., None] + tint + rng.normal(0, 10, size=(h, w, 3))
    return img


def _silhouette(shape: str, w: int, h: int, box) -> Image.Image:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    sil = Image.new('L', (w, h), 0)
    draw = ImageDraw.Draw(sil)
    if shape == 'ellipse':
        draw.ellipse(box, fill=255)
    elif shape == 'rectangle':
        draw.rectangle(box, fill=255)
    elif shape == 'triangle':
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=255)
    elif shape == 'diamond':
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=255)
    else:
        rx, ry = (x1 - x0) / 2, (y1 - y0) / 2
        draw.polygon([(cx + rx * np.cos(a), cy + ry * np.sin(a)) for a in np.arange(6) * np.pi / 3], fill=255)
    return sil


def _texture(texture: str, w: int, h: int, period: int) -> np.ndarray:
    gy, gx = np.mgrid[0:h, 0:w]
    if texture == 'stripes':
        return np.where((gx + gy) // period % 2 == 0, 1.0, 0.7)
    if texture == 'checks':
        return np.where((gx // period + gy // period) % 2 == 0, 1.0, 0.7)
    return np.ones((h, w))


def make_sample(rng: np.random.Generator, first_class: int, min_size: int, max_size: int):
    """One (RGB image, mask) pair; the first object is of `first_class`."""
    w, h = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    img = _background(rng, w, h)
    mask = np.zeros((h, w), np.uint8)
    border = np.zeros((h, w), bool)
    classes = [first_class] + [int(c) for c in rng.integers(1, NUM_OBJECT_CLASSES + 1, size=rng.integers(0, 3))]
    for c in classes:
        colour, shape, texture = class_style(c)
        ow, oh = (int(rng.uniform(0.35, 0.7) * s) for s in (w, h))
        x0, y0 = int(rng.integers(0, w - ow + 1)), int(rng.integers(0, h - oh + 1))
        sil_img = _silhouette(shape, w, h, (x0, y0, x0 + ow - 1, y0 + oh - 1))
        sil = np.asarray(sil_img) > 127
        shade = _texture(texture, w, h, int(rng.integers(3, 6)))
        jitter = rng.uniform(0.9, 1.05)
        obj = np.asarray(colour, np.float32) * jitter * shade[..., None] + rng.normal(0, 8, size=(h, w, 3))
        img[sil] = obj[sil]
        mask[sil] = c
        grown, shrunk = sil_img.filter(ImageFilter.MaxFilter(3)), sil_img.filter(ImageFilter.MinFilter(3))
        edge = np.asarray(grown) != np.asarray(shrunk)
        border |= edge
        border[sil & ~edge] = False  # a later object hides the borders beneath it
    mask[border] = IGNORE_INDEX
    image = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), 'RGB')
    label = Image.fromarray(mask, 'P')
    label.putpalette(voc_palette())
    return image, label


def generate(root: str, num_train: int = 600, num_val: int = 120, seed: int = 0, min_size: int = 72,
             max_size: int = 128) -> str:
    """Write the dataset under `root` (the --data_root to give main.py) and return the VOC2012 folder."""
    base = os.path.join(root, 'VOC2012')
    for sub in ('JPEGImages', 'SegmentationClassAug', 'list'):
        try:
            os.makedirs(os.path.join(base, sub), exist_ok=True)
        except OSError as e:
            raise write_error(os.path.join(base, sub), e, '--root') from None
    rng = np.random.default_rng(seed)
    splits = {'train_aug.txt': ('train', num_train), 'val.txt': ('val', num_val)}
    for list_name, (split, count) in splits.items():
        lines = []
        for i in range(count):
            name = f'synthetic_{split}_{i:05d}'
            image, label = make_sample(rng, 1 + i % NUM_OBJECT_CLASSES, min_size, max_size)
            save_image(image, os.path.join(base, 'JPEGImages', f'{name}.jpg'), '--root')
            save_image(label, os.path.join(base, 'SegmentationClassAug', f'{name}.png'), '--root')
            lines.append(f'/JPEGImages/{name}.jpg /SegmentationClassAug/{name}.png\n')
        text = ''.join(lines).encode()
        atomic_write(os.path.join(base, 'list', list_name), lambda f, text=text: f.write(text), '--root')
    return base


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--root', default='data/synthetic', help='folder to write (default: %(default)s)')
    parser.add_argument('--train', type=number(int, 1), default=600, help='training images (default: %(default)s)')
    parser.add_argument('--val', type=number(int, 1), default=120, help='validation images (default: %(default)s)')
    parser.add_argument('--seed', type=number(int, 0), default=0)
    parser.add_argument('--min_size', type=number(int, 16), default=72,
                        help='smallest image side (default: %(default)s)')
    parser.add_argument('--max_size', type=number(int, 16), default=128,
                        help='largest image side (default: %(default)s)')
    args = parser.parse_args(argv)
    if args.min_size > args.max_size:
        parser.error(f'--min_size {args.min_size} is larger than --max_size {args.max_size}')

    def run():
        base = generate(args.root, args.train, args.val, args.seed, args.min_size, args.max_size)
        print(f'wrote {args.train} training and {args.val} validation images to {base}')
    return exit_status(run)


if __name__ == '__main__':
    sys.exit(main())
