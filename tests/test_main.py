import glob
import os
import re

import numpy as np
import pytest
import reference
import torch
import torch.nn.functional as F
from conftest import cli_in, initial_model, randomize
from PIL import Image
from test_metrics import original_inter_and_union

import checkpoints
import pascal
import runs
import utils
import weights

CKPT = 'data/deeplab_vovnet39_pascal_v3_t_epoch1.pth'
TRAIN = ['--train', '--exp', 't', '--epochs', '1', '--backbone', 'vovnet39', '--scratch', '--crop_size', '65',
         '--batch_size', '4', '--workers', '0', '--seed', '0', '--base_lr', '0.01']


@pytest.fixture(scope='module')
def trained(synthetic_root, tmp_path_factory):
    """A folder in which a 1-epoch training run has written its checkpoint."""
    folder = tmp_path_factory.mktemp('run')
    cli_in(folder, TRAIN + ['--data_root', synthetic_root])
    return folder


@pytest.mark.slow
def test_training_writes_the_checkpoint_under_the_original_name_at_the_last_epoch(trained):
    path = trained / CKPT
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint['epoch'] == 1 and checkpoint['iteration'] == 2  # 8 images, batch 4
    assert checkpoint['model_args'] == dict(backbone='vovnet39', num_classes=21, output_stride=16, num_groups=None,
                                            weight_std=False, beta=False)
    assert not any(k.startswith('module.') for k in checkpoint['state_dict'])
    assert len(checkpoint['optimizer']['param_groups']) == 2
    model = initial_model()
    weights.load_weights(model, checkpoint['state_dict'], str(path))
    assert sorted(os.listdir(trained / 'data')) == ['deeplab_vovnet39_pascal_v3_t_epoch1.pth', 'logs']


@pytest.mark.slow
def test_training_progress_shows_epoch_iteration_lr_loss_speed_and_eta(synthetic_root, tmp_path, monkeypatch,
                                                                         run_cli):
    monkeypatch.chdir(tmp_path)
    status, out, err = run_cli(*TRAIN, '--data_root', synthetic_root, '--print_freq', '1')
    assert status == 0, err
    lines = [line for line in out.splitlines() if line.startswith('epoch 1/1')]
    assert len(lines) == 2
    assert re.match(r'epoch 1/1  iter 1/2  lr 0\.010000  loss \d+\.\d{4} \(\d+\.\d{4}\)  \d+\.\d img/s  eta \d+:\d\d$',
                    lines[0])
    assert 'lr 0.005359' in lines[1]  # poly: 0.01 * (1 - 1/2) ** 0.9


@pytest.mark.slow
def test_evaluation_prints_the_original_lines_and_writes_predictions_at_each_images_size(trained, synthetic_root,
                                                                                        monkeypatch, run_cli):
    monkeypatch.chdir(trained)
    status, out, err = run_cli('--exp', 't', '--epochs', '1', '--backbone', 'vovnet39', '--crop_size', '65',
                               '--data_root', synthetic_root, '--workers', '0')
    assert status == 0, err
    for name in pascal.VOC_CLASSES:
        assert re.search(rf'^IoU {name}: \d+\.\d\d$', out, re.M), name
    assert re.search(r'^Mean IoU: \d+\.\d\d$', out, re.M)
    dataset = pascal.build_dataset('pascal', str(synthetic_root), 'val', None)
    pngs = sorted(glob.glob(str(trained / 'data' / 'val' / '*.png')))
    assert [os.path.basename(p) for p in pngs] == [f'{dataset.name(i)}.png' for i in range(4)]
    for i, png in enumerate(pngs):
        prediction = Image.open(png)
        assert prediction.mode == 'P' and prediction.getpalette()[:6] == [0, 0, 0, 128, 0, 0]
        assert prediction.size == Image.open(dataset.samples[i][0]).size
        assert np.asarray(prediction).max() <= 20
    assert os.path.isfile(trained / 'data' / 'deeplab_vovnet39_pascal_v3_t_epoch1_iou.png')


SEED_EVAL = '--exp bn_lr7e-3 --epochs 50 --base_lr 0.007 --backbone vovnet39'.split()


def seed_folder(tmp_path, synthetic_root, monkeypatch):
    """A folder laid out as the seed README says: data/VOCdevkit and the released checkpoint in data/."""
    os.makedirs(tmp_path / 'data')
    os.symlink(synthetic_root, tmp_path / 'data' / 'VOCdevkit')
    monkeypatch.chdir(tmp_path)


@pytest.mark.slow
def test_seed_evaluation_command_on_a_released_checkpoint_follows_the_original_protocol(
        synthetic_root, tmp_path, monkeypatch, run_cli, released_checkpoint):
    seed_folder(tmp_path, synthetic_root, monkeypatch)
    torch.manual_seed(0)
    model = randomize(initial_model(), seed=5).eval()
    with torch.no_grad():  # spread the classifier's biases so that the random model predicts several classes
        model.aspp.conv3.bias.copy_(torch.linspace(-1, 1, 21))
    path = released_checkpoint(model, name='data/deeplab_vovnet39_pascal_v3_bn_lr7e-3_epoch50.pth')
    assert os.path.isfile(path)

    status, out, err = run_cli(*SEED_EVAL)
    assert status == 0, err
    printed = re.search(r'^Mean IoU: (\d+\.\d\d)$', out, re.M).group(1)

    # The original protocol, computed here with the independent functional forward: pad to 513 (image 0,
    # mask 255), argmax over the padded canvas, per-image histograms summed over the dataset.
    dataset = pascal.build_dataset('pascal', 'data/VOCdevkit', 'val', None)
    state = checkpoints.strip_prefixes(torch.load(path, weights_only=True)['state_dict'])
    inter, union = np.zeros(21), np.zeros(21)
    for i, (image_path, mask_path) in enumerate(dataset.samples):
        image = Image.open(image_path).convert('RGB')
        x = F.pad(pascal.ToTensor()(image, image, None)[0], (0, 513 - image.size[0], 0, 513 - image.size[1]))
        mask = np.full((513, 513), 255, np.uint8)
        mask[:image.size[1], :image.size[0]] = np.asarray(Image.open(mask_path))
        with torch.no_grad():
            pred = reference.deeplab('vovnet39', x[None], state).argmax(1)[0].numpy().astype(np.uint8)
        a, b = original_inter_and_union(pred, mask, 21)
        inter += a
        union += b
        saved = np.asarray(Image.open(f'data/val/{dataset.name(i)}.png'))
        assert np.array_equal(saved, pred[:image.size[1], :image.size[0]])
    assert len(np.unique(pred)) > 1
    assert printed == f'{(inter / (union + 1e-10)).mean() * 100:.2f}'


def test_seed_training_command_without_imagenet_weights_is_a_clear_message(synthetic_root, tmp_path, monkeypatch,
                                                                           run_cli, offline):
    seed_folder(tmp_path, synthetic_root, monkeypatch)
    # The seed command's 16 crops of 513 need about 8 GB: where less than 4 GB is free at this moment (another test
    # worker's training, the tests' folders in memory), that refusal comes first (tests/test_reliability.py checks
    # it). The free memory is not what this test is about.
    import errors
    monkeypatch.setattr(errors, 'available_memory', lambda device: None)
    status, out, err = run_cli('--train', *SEED_EVAL, '--workers', '0')
    assert status == 1
    assert 'data/pretrained/vovnet39_statedict_norm.pth' in err and '--scratch' in err
    assert 'Traceback' not in out + err
    assert os.listdir('data') == ['VOCdevkit']


def test_default_workers_are_the_originals_4_or_the_cpus_each_process_has(monkeypatch):
    import main
    monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
    for cpus, processes, expected in [(16, 1, 4), (2, 1, 2), (2, 4, 1), (16, 8, 2), (1, 1, 1)]:
        monkeypatch.setattr(os, 'sched_getaffinity', lambda pid, n=cpus: set(range(n)), raising=False)
        monkeypatch.setenv('LOCAL_WORLD_SIZE', str(processes))
        assert runs.default_workers(utils.dist_info()) == expected, (cpus, processes)
    assert main.get_args_parser().parse_args(['--exp', 'x', '--workers', '3']).workers == 3  # explicit: kept
