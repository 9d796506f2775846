"""The whole job on a CPU in minutes: generate a synthetic dataset in the VOC layout (once), train a VoVNet-39
DeepLabV3 from scratch on it, evaluate it, and print the mean IoU and where the predictions are.

    python demo.py

It runs main.py's own training and evaluation, with the flags it prints, so what works here works on VOC.
"""
import argparse
import os
import shlex
import sys
import time

import main as deeplab_main
import synthetic
from utils import UserError, format_seconds

DEFAULTS = dict(root='data/synthetic', output_dir='data/demo', train_images=600, val_images=120, epochs=8,
                base_lr=0.02, batch_size=8, crop_size=81, workers=1)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--root', default=DEFAULTS['root'], help='synthetic dataset folder (default: %(default)s)')
    p.add_argument('--output_dir', default=DEFAULTS['output_dir'],
                   help='checkpoints, predictions and logs (default: %(default)s)')
    p.add_argument('--train_images', type=int, default=DEFAULTS['train_images'])
    p.add_argument('--val_images', type=int, default=DEFAULTS['val_images'])
    p.add_argument('--epochs', type=int, default=DEFAULTS['epochs'])
    p.add_argument('--base_lr', type=float, default=DEFAULTS['base_lr'])
    p.add_argument('--batch_size', type=int, default=DEFAULTS['batch_size'])
    p.add_argument('--crop_size', type=int, default=DEFAULTS['crop_size'])
    p.add_argument('--workers', type=int, default=DEFAULTS['workers'])
    p.add_argument('--device', default=None, help='default: CUDA when available, else CPU')
    return p


def run(argv) -> float | None:
    print('$ python main.py ' + shlex.join(argv), flush=True)
    return deeplab_main.main(deeplab_main.get_args_parser().parse_args(argv))


def demo(args) -> float:
    start = time.time()
    if not os.path.isfile(os.path.join(args.root, 'VOC2012', 'list', 'val.txt')):
        print(f'generating {args.train_images} + {args.val_images} synthetic images in {args.root} ...', flush=True)
        synthetic.generate(args.root, args.train_images, args.val_images)
    common = ['--exp', 'demo', '--backbone', 'vovnet39', '--epochs', str(args.epochs), '--crop_size',
              str(args.crop_size), '--data_root', args.root, '--output_dir', args.output_dir, '--workers',
              str(args.workers), '--channels_last'] + (['--device', args.device] if args.device else [])
    run(['--train', '--scratch', '--base_lr', str(args.base_lr), '--batch_size', str(args.batch_size),
         '--seed', '0', '--print_freq', '25', '--val_every', '2'] + common)
    miou = run(common)
    print(f'\ndemo finished in {format_seconds(time.time() - start)}: mean IoU {miou:.2f} on {args.val_images} '
          f'synthetic validation images; predictions in {os.path.join(args.output_dir, "val")}/')
    return miou


if __name__ == '__main__':
    try:
        demo(get_args_parser().parse_args())
    except UserError as e:
        print(f'error: {e.for_user()}', file=sys.stderr)
        sys.exit(1)
