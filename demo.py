"""The whole job on a CPU in minutes: generate a synthetic dataset in the VOC layout (once), train a VoVNet-39
DeepLabV3 from scratch on it, evaluate it, and print the mean IoU and where the predictions are.

    python demo.py
    python demo.py --model deeplabv3plus      # the same with the DeepLabV3+ decoder

It runs main.py's own training and evaluation, with the flags it prints, so what works here works on VOC.
"""
import argparse
import os
import shlex
import sys
import time

import deeplab
import inference
import main as deeplab_main
import pascal
import synthetic
from errors import Interrupted, UserError, number
from utils import exit_status, format_seconds, init_distributed

DEFAULTS = dict(root='data/synthetic', output_dir='data/demo', train_images=600, val_images=120, epochs=8,
                base_lr=0.02, batch_size=8, crop_size=81, workers=1)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--root', default=DEFAULTS['root'], help='synthetic dataset folder (default: %(default)s)')
    p.add_argument('--output_dir', default=DEFAULTS['output_dir'],
                   help='checkpoints, predictions and logs (default: %(default)s)')
    p.add_argument('--train_images', type=number(int, 1), default=DEFAULTS['train_images'])
    p.add_argument('--val_images', type=number(int, 1), default=DEFAULTS['val_images'])
    p.add_argument('--epochs', type=number(int, 1), default=DEFAULTS['epochs'])
    p.add_argument('--base_lr', type=number(float, 0, inclusive=False), default=DEFAULTS['base_lr'])
    p.add_argument('--batch_size', type=number(int, 2), default=DEFAULTS['batch_size'])
    p.add_argument('--crop_size', type=number(int, 64), default=DEFAULTS['crop_size'])
    p.add_argument('--workers', type=number(int, 0), default=DEFAULTS['workers'])
    p.add_argument('--model', default='deeplabv3', choices=tuple(deeplab.MODELS),
                   help='deeplabv3 (default) or deeplabv3plus: DeepLabV3+, with the decoder')
    p.add_argument('--device', default=None, help='default: CUDA when available, else CPU')
    p.add_argument('--amp', default='auto', choices=('auto', 'off', 'bf16', 'fp16'),
                   help='mixed precision of the training; auto (default): bf16 on a CPU with bf16 units (AVX-512 BF16, '
                        'AMX) or a GPU (fp16 on one without bf16), fp32 elsewhere. Evaluation stays fp32.')
    return p


def run(argv) -> float | None:
    print('$ python main.py ' + shlex.join(argv), flush=True)
    try:
        return deeplab_main.main(deeplab_main.get_args_parser().parse_args(argv))
    except deeplab_main.TooFewImages as e:  # main.py names no demo flag
        raise UserError(f'{e} In the demo, the training set is --train_images (an existing dataset in --root is '
                        f'kept: delete it or give another --root to generate another).') from None
    except Interrupted as e:  # its "same command" is main.py's, not the demo's
        raise Interrupted(e.signum, f'{e} (the command printed above); python demo.py starts the demo over') \
            from None


def count_lines(path: str) -> int:
    if not os.path.isfile(path):  # main.py names what is missing
        return 0
    return len(pascal.read_lines(path, 'the list file'))


def demo(args) -> float:
    start = time.time()
    for flag, folder in (('--root', args.root), ('--output_dir', args.output_dir)):
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise UserError(f'{flag} {folder} is a file, not a folder; give a folder (it is created if missing).')
    lists = os.path.join(args.root, 'VOC2012', 'list')
    if not os.path.isfile(os.path.join(lists, 'val.txt')):  # written last: a dataset cut short is made again
        print(f'generating {args.train_images} + {args.val_images} synthetic images in {args.root} ...', flush=True)
        synthetic.generate(args.root, args.train_images, args.val_images)
    found = count_lines(os.path.join(lists, 'train_aug.txt')), count_lines(os.path.join(lists, 'val.txt'))
    if found != (args.train_images, args.val_images):
        print(f'using the dataset already in {args.root}: {found[0]} + {found[1]} images (to generate '
              f'{args.train_images} + {args.val_images}, delete it or give another --root)', flush=True)
    common = ['--exp', 'demo', '--backbone', 'vovnet39'] + (
        ['--model', args.model] if args.model != 'deeplabv3' else []) + ['--epochs', str(args.epochs), '--crop_size',
              str(args.crop_size), '--data_root', args.root, '--output_dir', args.output_dir, '--workers',
              str(args.workers), '--channels_last'] + (['--device', args.device] if args.device else [])
    amp = args.amp
    if amp == 'auto':  # main.py's --amp takes no 'auto': the demo names the precision it trains in
        amp = inference.fast_amp(init_distributed(args.device)[1])
    run(['--train', '--scratch', '--base_lr', str(args.base_lr), '--batch_size', str(args.batch_size),
         '--seed', '0', '--print_freq', '25', '--val_every', '2', '--amp', amp] + common)
    miou = run(common)
    print(f'\ndemo finished in {format_seconds(time.time() - start)}: mean IoU {miou:.2f} on {found[1]} '
          f'synthetic validation images; predictions in {os.path.join(args.output_dir, "val")}/')
    return miou


def cli(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    return exit_status(lambda: demo(args), 'lower --crop_size or --batch_size')


if __name__ == '__main__':
    sys.exit(cli())
