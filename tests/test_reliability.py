"""Bad input gets a clear message, a non-zero exit and no traceback, and leaves no new checkpoint or output."""
import os
import pickle

import numpy as np
import pytest
import torch
from conftest import initial_model
from PIL import Image

import checkpoints
import engine
import errors
import utils

TRAIN = ['--train', '--exp', 'r', '--epochs', '1', '--backbone', 'vovnet39', '--scratch', '--crop_size', '65',
         '--batch_size', '4', '--seed', '0']
EVAL = ['--exp', 'r', '--epochs', '1', '--backbone', 'vovnet39', '--crop_size', '65', '--workers', '0']


def outputs(folder):
    """Checkpoints and predictions under a folder."""
    found = []
    for root, _, files in os.walk(folder):
        found += [os.path.join(root, f) for f in files if f.endswith('.pth') or os.sep + 'val' in root]
    return sorted(found)


def assert_clean_failure(result, *needles, status=1):
    code, out, err = result
    assert code == status, (out, err)
    for needle in needles:
        assert needle in err, (needle, err)
    assert 'Traceback' not in out + err


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def voc(root):
    return os.path.join(str(root), 'VOC2012')


# --- dataset files


def test_missing_dataset_root(workdir, run_cli):
    assert_clean_failure(run_cli(*TRAIN, '--workers', '0'), 'data/VOCdevkit does not exist', '--data_root')
    assert outputs(workdir) == []


def test_a_dataset_root_that_is_a_file_is_named_as_a_file(workdir, voc_copy, run_cli, released_checkpoint):
    listed = os.path.join(voc(voc_copy), 'list', 'val.txt')
    checkpoint = released_checkpoint(initial_model())
    for argv in (TRAIN, [*EVAL, '--checkpoint', checkpoint]):
        status, out, err = run_cli(*argv, '--data_root', listed, '--workers', '0')
        assert_clean_failure((status, out, err), f'the dataset folder {listed} is a file', 'VOC2012/ or list/')
        assert 'does not exist' not in err
    assert outputs(workdir) == [str(checkpoint)]


def test_missing_list_file(workdir, voc_copy, run_cli):
    os.remove(os.path.join(voc(voc_copy), 'list', 'train_aug.txt'))
    assert_clean_failure(run_cli(*TRAIN, '--data_root', voc_copy, '--workers', '0'), 'list/train_aug.txt')
    assert outputs(workdir) == []


def test_a_training_set_too_small_for_one_batch(workdir, voc_copy, run_cli):
    lists = os.path.join(voc(voc_copy), 'list', 'train_aug.txt')
    with open(lists) as f:
        first = f.readline()
    with open(lists, 'w') as f:
        f.write(first)
    assert_clean_failure(run_cli(*TRAIN, '--data_root', voc_copy, '--workers', '0'),
                         'the training set has 1 image, too few for a batch of two in each of 1 process;')
    assert outputs(workdir) == []


def test_files_named_in_a_list_that_do_not_exist(workdir, voc_copy, run_cli):
    for i in (1, 4, 6):
        os.remove(os.path.join(voc(voc_copy), 'SegmentationClassAug', f'synthetic_train_{i:05d}.png'))
    assert_clean_failure(run_cli(*TRAIN, '--data_root', voc_copy, '--workers', '0'),
                         '3 of the 16 files named by', 'synthetic_train_00001.png')
    assert outputs(workdir) == []


@pytest.mark.parametrize('workers', ['0', '1'])
@pytest.mark.parametrize('damage', ['truncated', 'not_an_image'])
@pytest.mark.slow
def test_an_image_that_cannot_be_decoded_is_named(workdir, voc_copy, run_cli, workers, damage):
    path = os.path.join(voc(voc_copy), 'JPEGImages', 'synthetic_train_00003.jpg')
    if damage == 'truncated':
        data = open(path, 'rb').read()
        open(path, 'wb').write(data[:len(data) // 2])
    else:
        open(path, 'w').write('this is not a JPEG\n')
    assert_clean_failure(run_cli(*TRAIN, '--data_root', voc_copy, '--workers', workers),
                         f'cannot read the image {path}')
    assert outputs(workdir) == []


@pytest.mark.slow
def test_a_mask_with_values_outside_the_classes_is_named_with_the_values(workdir, voc_copy, run_cli):
    path = os.path.join(voc(voc_copy), 'SegmentationClassAug', 'synthetic_train_00002.png')
    mask = np.asarray(Image.open(path)).copy()
    mask[0, :3] = [21, 40, 99]
    Image.fromarray(mask, 'L').save(path)
    assert_clean_failure(run_cli(*TRAIN, '--data_root', voc_copy, '--workers', '0'),
                         f'the mask {path} has values 21, 40, 99 outside the classes 0..20')
    assert outputs(workdir) == []


def test_a_mask_of_another_size_than_its_image_is_named_with_both_sizes(workdir, voc_copy, run_cli):
    path = os.path.join(voc(voc_copy), 'SegmentationClassAug', 'synthetic_val_00001.png')
    image = Image.open(path.replace('SegmentationClassAug', 'JPEGImages').replace('.png', '.jpg'))
    Image.open(path).resize((image.size[0] + 3, image.size[1])).save(path)
    torch.save(initial_model().state_dict(), workdir / 'w.pth')
    assert_clean_failure(run_cli(*EVAL, '--data_root', voc_copy, '--checkpoint', workdir / 'w.pth'),
                         f'the mask {path} is {image.size[0] + 3}x{image.size[1]} but its image')
    assert outputs(workdir) == [str(workdir / 'w.pth')]  # no predictions, not even of the images before it


def test_a_colour_mask_is_refused_with_advice(workdir, voc_copy, run_cli):
    path = os.path.join(voc(voc_copy), 'SegmentationClassAug', 'synthetic_train_00000.png')
    Image.open(path).convert('RGB').save(path)
    assert_clean_failure(run_cli(*TRAIN, '--data_root', voc_copy, '--workers', '0'),
                         f'the mask {path} is a RGB image')


@pytest.mark.slow
def test_images_in_unusual_modes_are_converted_and_used(workdir, voc_copy, run_cli):
    folder = os.path.join(voc(voc_copy), 'JPEGImages')
    rgb = [Image.open(os.path.join(folder, f'synthetic_train_{i:05d}.jpg')) for i in range(8)]
    lines = []
    for i, (image, mode) in enumerate(zip(rgb, ['L', 'RGBA', 'P', 'I;16', 'CMYK', 'LA', '1', 'RGB'])):
        if mode == 'I;16':
            converted = Image.fromarray(np.asarray(image.convert('L'), np.uint16) * 257)
        else:
            converted = image.convert(mode)
        name = f'mode{i}.{"jpg" if mode == "CMYK" else "png"}'
        converted.save(os.path.join(folder, name))
        lines.append(f'/JPEGImages/{name} /SegmentationClassAug/synthetic_train_{i:05d}.png\n')
    with open(os.path.join(voc(voc_copy), 'list', 'train_aug.txt'), 'w') as f:
        f.writelines(lines)
    status, out, err = run_cli(*TRAIN, '--data_root', voc_copy, '--workers', '0')
    assert status == 0, err
    assert os.path.isfile('data/deeplab_vovnet39_pascal_v3_r_epoch1.pth')


def test_image_modes_decode_to_rgb_with_the_right_values(tmp_path):
    import pascal
    grey = np.arange(64 * 48, dtype=np.uint8).reshape(48, 64) % 251
    cases = {'grey.png': Image.fromarray(grey, 'L'),
             'deep.png': Image.fromarray(grey.astype(np.uint16) * 257),
             'alpha.png': Image.fromarray(np.stack([grey] * 4, -1), 'RGBA')}
    for name, image in cases.items():
        image.save(tmp_path / name)
        decoded = np.asarray(pascal.load_image(str(tmp_path / name)))
        assert decoded.shape == (48, 64, 3)
        assert np.abs(decoded[..., 0].astype(int) - grey).max() <= 1, name


# --- checkpoints


def test_a_missing_checkpoint_lists_the_ones_that_exist(workdir, synthetic_root, run_cli):
    os.makedirs('data')
    for name in ('deeplab_vovnet39_pascal_v3_r_epoch10.pth', 'deeplab_vovnet39_pascal_v3_other_epoch50.pth',
                 'deeplab_resnet50_pascal_v3_r_epoch1.pth'):
        open(os.path.join('data', name), 'w').close()
    result = run_cli(*EVAL, '--data_root', synthetic_root)
    assert_clean_failure(result, 'data/deeplab_vovnet39_pascal_v3_r_epoch1.pth does not exist',
                         'deeplab_vovnet39_pascal_v3_other_epoch50.pth, deeplab_vovnet39_pascal_v3_r_epoch10.pth')
    assert 'resnet50' not in result[2]


def saved_checkpoint(model=None):
    model = model or initial_model()
    path = 'data/deeplab_vovnet39_pascal_v3_r_epoch1.pth'
    os.makedirs('data', exist_ok=True)
    torch.save({'epoch': 1, 'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()}}, path)
    return path


def test_a_truncated_checkpoint(workdir, synthetic_root, run_cli):
    path = saved_checkpoint()
    data = open(path, 'rb').read()
    open(path, 'wb').write(data[:len(data) // 3])
    assert_clean_failure(run_cli(*EVAL, '--data_root', synthetic_root), path, 'truncated or not a PyTorch')
    assert not os.path.exists('data/val')


def test_a_folder_given_as_checkpoint(workdir, synthetic_root, run_cli):
    os.makedirs('runs')
    assert_clean_failure(run_cli(*EVAL, '--data_root', synthetic_root, '--checkpoint', 'runs'),
                         'checkpoint runs is a folder; give the .pth file in it')


def test_a_file_that_is_not_a_checkpoint(workdir, synthetic_root, run_cli):
    os.makedirs('data')
    path = 'data/deeplab_vovnet39_pascal_v3_r_epoch1.pth'
    open(path, 'w').write('<html>404 Not Found</html>\n')
    assert_clean_failure(run_cli(*EVAL, '--data_root', synthetic_root), path)
    torch.save([1, 2, 3], path)
    assert_clean_failure(run_cli(*EVAL, '--data_root', synthetic_root), 'holds a list, not model weights')


@pytest.mark.parametrize('other,needle', [(lambda: initial_model('resnet50'),
                                           'holds a DeepLabV3-resnet50 with 21 classes'),
                                          (lambda: initial_model(num_classes=5), 'with 5 classes')])
@pytest.mark.slow
def test_a_checkpoint_of_another_backbone_or_class_count(workdir, synthetic_root, run_cli, other, needle):
    path = saved_checkpoint(other())
    assert_clean_failure(run_cli(*EVAL, '--data_root', synthetic_root), path, needle)
    assert not os.path.exists('data/val')


class Payload:
    """Unpickling this would run code: it creates a marker file."""

    def __reduce__(self):
        return (open, ('PWNED', 'w'))


def test_a_pickle_that_needs_code_is_never_executed(workdir, synthetic_root, run_cli):
    os.makedirs('data')
    path = 'data/deeplab_vovnet39_pascal_v3_r_epoch1.pth'
    torch.save({'state_dict': initial_model().state_dict(), 'extra': Payload()}, path, pickle_module=pickle)
    assert_clean_failure(run_cli(*EVAL, '--data_root', synthetic_root), path, 'weights_only=True')
    assert not os.path.exists('PWNED')


# --- flags


@pytest.mark.parametrize('flag,value', [('--epochs', '0'), ('--batch_size', '0'), ('--workers', '-1'),
                                        ('--base_lr', '0'), ('--base_lr', '-0.1'), ('--epochs', 'many'),
                                        ('--backbone', 'vovnet99'), ('--dataset', 'coco'),
                                        ('--output_stride', '4'), ('--amp', 'fp8')])
def test_flag_values_that_make_no_sense(workdir, run_cli, flag, value):
    assert_clean_failure(run_cli(*TRAIN, flag, value), f'argument {flag}', status=2)


def test_a_crop_too_small_for_the_output_stride(workdir, run_cli):
    assert_clean_failure(run_cli(*TRAIN, '--crop_size', '48'), '--crop_size 48 is too small for output stride 16')


def test_a_batch_size_that_does_not_divide_among_processes(workdir, run_cli, monkeypatch):
    for name, value in dict(WORLD_SIZE='3', RANK='0', LOCAL_RANK='0', LOCAL_WORLD_SIZE='3', MASTER_ADDR='127.0.0.1',
                            MASTER_PORT='29511').items():  # as torchrun sets them
        monkeypatch.setenv(name, value)
    assert_clean_failure(run_cli(*TRAIN, '--batch_size', '4'), '--batch_size 4 is the total over all processes',
                         'multiple of 3')


def test_fp16_without_cuda_is_refused(workdir, synthetic_root, run_cli):
    if torch.cuda.is_available():
        pytest.skip('a CUDA GPU is present')
    assert_clean_failure(run_cli(*TRAIN, '--data_root', synthetic_root, '--amp', 'fp16'), '--amp fp16 needs a CUDA')


@pytest.mark.parametrize('flags', [[], ['--groups', '16']])  # VoVNet's GroupNorm leaves the ASPP's BatchNorm
def test_batchnorm_with_one_image_per_process_is_refused(workdir, run_cli, flags):
    assert_clean_failure(run_cli(*TRAIN, '--batch_size', '1', *flags), 'at least 2 images per batch')


def test_a_bad_device(workdir, run_cli):
    assert_clean_failure(run_cli(*TRAIN, '--device', 'tpu'), '--device tpu')


@pytest.mark.parametrize('train', [True, False])
def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(workdir, synthetic_root, run_cli,
                                                                             train):
    (workdir / 'a_file').write_text('')  # nothing, not even root, can create a folder under a file
    flags = TRAIN + ['--data_root', synthetic_root] if train else EVAL + ['--checkpoint', 'x.pth']
    assert_clean_failure(run_cli(*flags, '--output_dir', 'a_file/out'), 'cannot write to the output folder a_file/out',
                         '--output_dir')


def test_predict_refuses_an_output_folder_it_cannot_write(workdir, run_cli):
    (workdir / 'a_file').write_text('')
    Image.new('RGB', (8, 8)).save(workdir / 'photo.png')
    assert_clean_failure(run_cli('--checkpoint', 'x.pth', '--input', 'photo.png', '--output', 'a_file/out',
                                 module='predict'), 'cannot write to the output folder a_file/out', '--output')


def test_a_refused_command_leaves_no_output_folder_it_created_and_keeps_those_it_did_not(workdir, synthetic_root,
                                                                                      run_cli):
    Image.new('RGB', (8, 8)).save(workdir / 'photo.png')
    predict = ['--checkpoint', 'missing.pth', '--input', 'photo.png', '--output']
    evaluate = EVAL + ['--data_root', synthetic_root, '--checkpoint', 'missing.pth', '--output_dir']
    for flags, module in ((predict, 'predict'), (evaluate, 'main')):
        assert_clean_failure(run_cli(*flags, 'new/deeper', module=module), 'missing.pth')
        assert not os.path.exists('new')  # created by the command, then removed with its parent
        os.makedirs('kept')
        assert_clean_failure(run_cli(*flags, 'kept/deeper', module=module), 'missing.pth')
        assert os.listdir('kept') == []  # the folder the user had stays; the one the command made goes
        os.rmdir('kept')


# --- faults


def test_a_failed_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    path = str(tmp_path / 'ckpt.pth')
    checkpoints.save({'state_dict': {'w': torch.ones(3)}, 'epoch': 1}, path)

    def failing_save(obj, f, *args, **kwargs):
        f.write(b'PK\x03\x04 half a checkpoint')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(torch, 'save', failing_save)
    with pytest.raises(errors.UserError, match='No space left on device.*unchanged'):
        checkpoints.save({'state_dict': {'w': torch.zeros(3)}, 'epoch': 2}, path)
    monkeypatch.undo()
    assert checkpoints.load(path)['epoch'] == 1
    assert os.listdir(tmp_path) == ['ckpt.pth']


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(workdir, synthetic_root, run_cli,
                                                                            monkeypatch):
    calls = []
    real = engine.BatchCrossEntropy.forward

    def poisoned(self, logits, target):
        calls.append(1)
        loss = real(self, logits, target)
        return loss * float('nan') if len(calls) == 3 else loss  # epoch 2, its first iteration
    monkeypatch.setattr(engine.BatchCrossEntropy, 'forward', poisoned)
    args = TRAIN[:3] + ['--epochs', '2', '--save_every', '1'] + TRAIN[5:] + ['--data_root', synthetic_root,
                                                                          '--workers', '0']
    assert_clean_failure(run_cli(*args), 'the loss became nan at epoch 2, iteration 1/2',
                         'data/deeplab_vovnet39_pascal_v3_r_epoch1.pth')
    assert outputs(workdir) == [str(workdir / 'data/deeplab_vovnet39_pascal_v3_r_epoch1.pth')]
    assert checkpoints.load('data/deeplab_vovnet39_pascal_v3_r_epoch1.pth')['epoch'] == 1


def test_a_dataloader_worker_that_dies_is_reported_with_its_cause(workdir, synthetic_root, run_cli, monkeypatch):
    import signal

    import pascal
    parent = os.getpid()
    real = pascal.load_image

    def dying(path, exif=False):
        if os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, exif)
    monkeypatch.setattr(pascal, 'load_image', dying)
    assert_clean_failure(run_cli(*TRAIN, '--data_root', synthetic_root, '--workers', '1'),
                         'a data-loading worker died', 'Killed', '--workers 0')
    assert outputs(workdir) == []


# --- third pass: impossible weights, contradictory flags, outputs that collide, huge allocations


@pytest.mark.parametrize('damage,needles', [
    ('negative_variance', ['negative variances in ', 'running_var']),
    ('int64_conv', ['stores stem.stem_1/conv.weight as int64']),
    ('complex_conv', ['stores stem.stem_1/conv.weight as complex64']),
    ('fractional_counter', ['num_batches_tracked = [2.5]', 'not a count of batches']),
])
@pytest.mark.slow
def test_finite_but_impossible_weights_are_refused_naming_the_file_and_tensor(workdir, synthetic_root, run_cli,
                                                                               damage, needles):
    model = initial_model()
    state = model.state_dict()
    bn = next(k for k in state if k.endswith('running_var'))
    if damage == 'negative_variance':
        state[bn] = state[bn] - 2
    elif damage == 'int64_conv':
        state['stem.stem_1/conv.weight'] = state['stem.stem_1/conv.weight'].long()
    elif damage == 'complex_conv':
        state['stem.stem_1/conv.weight'] = state['stem.stem_1/conv.weight'].to(torch.complex64)
    else:
        state[bn.replace('running_var', 'num_batches_tracked')] = torch.tensor(2.5)
    os.makedirs('data')
    path = 'data/deeplab_vovnet39_pascal_v3_r_epoch1.pth'
    torch.save({'epoch': 1, 'state_dict': state}, path)
    result = run_cli(*EVAL, '--data_root', synthetic_root)
    assert_clean_failure(result, path, *needles)
    assert 'Mean IoU' not in result[1] and not os.path.exists('data/val')
    # The same check guards ImageNet files given to training.
    backbone = {k: v for k, v in state.items() if not k.startswith('aspp.')}
    torch.save(backbone, 'imagenet.pth')
    result = run_cli(*TRAIN[:TRAIN.index('--scratch')], *TRAIN[TRAIN.index('--scratch') + 1:], '--data_root',
                     synthetic_root, '--pretrained_path', 'imagenet.pth', '--workers', '0')
    assert_clean_failure(result, 'imagenet.pth', *needles)
    assert outputs('data') == [path]


@pytest.mark.parametrize('model_args,needle', [({'backbone': 'vovnet39', 'decoder': 'x'}, "decoder='x'"),
                                             ({'num_classes': '21'}, "num_classes='21'"),
                                             ({'output_stride': True}, 'output_stride=True'),
                                             (['vovnet39'], "model_args=['vovnet39']")])
def test_recorded_model_arguments_that_cannot_build_a_model_are_refused(workdir, synthetic_root, run_cli,
                                                                        model_args, needle):
    os.makedirs('data')
    path = 'data/deeplab_vovnet39_pascal_v3_r_epoch1.pth'
    torch.save({'epoch': 1, 'state_dict': initial_model().state_dict(), 'model_args': model_args}, path)
    assert_clean_failure(run_cli(*EVAL, '--data_root', synthetic_root), path, needle, 'damaged')
    assert_clean_failure(run_cli('--checkpoint', path, '--output', 'm.onnx', module='export'), path, needle)


@pytest.mark.parametrize('flags,first,second', [
    (['--pretrained_path', 'imagenet.pth'], '--scratch', '--pretrained_path'),
    (['--checkpoint', 'some.pth'], '--train', '--checkpoint'),
    (['--eval_scales', '0.5,1'], '--train', '--eval_scales'),
    (['--flip'], '--train', '--flip'),
])
@pytest.mark.slow
def test_flags_that_contradict_each_other_are_refused_naming_both(workdir, synthetic_root, run_cli, flags, first,
                                                                  second):
    torch.save(initial_model().state_dict(), 'imagenet.pth')  # a file that would fit: still refused
    result = run_cli(*TRAIN, '--data_root', synthetic_root, *flags)
    assert_clean_failure(result, f'{first} and {second} contradict each other')
    assert outputs('data') == []


@pytest.mark.parametrize('mode,flag', [('inference', '--crop'), ('train', '--size')])
def test_benchmark_refuses_a_size_flag_of_the_other_mode(workdir, run_cli, mode, flag):
    result = run_cli('--mode', mode, flag, '65', '--backbones', 'vovnet39', '--device', 'cpu', module='benchmark')
    assert_clean_failure(result, f'{flag} does not apply to --mode {mode}')


def dataset_with_one_name_in_two_folders(synthetic_root, root, third=False):
    """A dataset in the VOC list layout whose validation masks a/x.png and b/x.png share a name (and, with
    `third`, a mask a__x.png whose flattened name is a/x's)."""
    src = os.path.join(synthetic_root, 'VOC2012')
    first = open(os.path.join(src, 'list', 'val.txt')).readline().split()
    lines = []
    for sub, name in [('a', 'x'), ('b', 'x')] + ([('', 'a__x')] if third else []):
        for kind, rel, ext in (('JPEGImages', first[0], '.jpg'), ('SegmentationClassAug', first[1], '.png')):
            os.makedirs(os.path.join(root, 'VOC2012', kind, sub), exist_ok=True)
            with open(os.path.join(src, rel.lstrip('/')), 'rb') as f:
                data = f.read()
            with open(os.path.join(root, 'VOC2012', kind, sub, name + ext), 'wb') as f:
                f.write(data)
        prefix = f'/{sub}' if sub else ''
        lines.append(f'/JPEGImages{prefix}/{name}.jpg /SegmentationClassAug{prefix}/{name}.png\n')
    os.makedirs(os.path.join(root, 'VOC2012', 'list'))
    with open(os.path.join(root, 'VOC2012', 'list', 'val.txt'), 'w') as f:
        f.writelines(lines + lines[:1])  # a sample listed twice is one sample, not a collision
    return root


@pytest.mark.slow
def test_masks_of_one_name_in_two_folders_give_two_predictions(workdir, synthetic_root, run_cli):
    root = dataset_with_one_name_in_two_folders(synthetic_root, workdir / 'mine')
    path = saved_checkpoint()
    status, out, err = run_cli(*EVAL, '--data_root', root, '--checkpoint', path)
    assert status == 0, err
    assert sorted(os.listdir('data/val')) == ['a__x.png', 'b__x.png']
    assert 'predictions are named by their path' in out + err


@pytest.mark.slow
def test_masks_whose_flattened_names_still_collide_are_refused_naming_both(workdir, synthetic_root, run_cli):
    root = dataset_with_one_name_in_two_folders(synthetic_root, workdir / 'mine', third=True)
    path = saved_checkpoint()
    result = run_cli(*EVAL, '--data_root', root, '--checkpoint', path)
    assert_clean_failure(result, 'two samples would write their predictions to one file a__x.png',
                         os.path.join('a', 'x.jpg'), 'a__x.jpg', '--no-save_predictions')
    assert not os.path.exists('data/val')
    status, _, err = run_cli(*EVAL, '--data_root', root, '--checkpoint', path, '--no-save_predictions')
    assert status == 0, err


@pytest.mark.parametrize('module,flags,needle', [
    ('main', TRAIN + ['--crop_size', '30000'], 'lower --batch_size or --crop_size'),
    ('main', EVAL + ['--checkpoint', 'ck.pth', '--crop_size', '20000'], 'lower --crop_size'),
    ('predict', ['--checkpoint', 'ck.pth', '--input', 'in', '--crop_size', '20000'],
     'lower --batch_size or --crop_size'),
    ('predict', ['--checkpoint', 'ck.pth', '--input', 'in', '--window_above', '100000'], 'lower --window_above'),
    ('export', ['--checkpoint', 'ck.pth', '--height', '40000', '--width', '40000'], 'lower --height and --width'),
    ('benchmark', ['--backbones', 'vovnet39', '--device', 'cpu', '--size', '30000'], 'lower --size or --batch'),
    ('benchmark', ['--backbones', 'vovnet39', '--device', 'cpu', '--mode', 'train', '--crop', '30000'],
     'lower --crop or --batch'),
])
def test_flags_that_would_need_far_more_memory_than_the_machine_has_are_refused_before_any_work(
        workdir, synthetic_root, run_cli, module, flags, needle):
    # Linux grants such allocations and kills the process when it uses them, without a word: refused up front.
    torch.save({'state_dict': initial_model().state_dict()}, 'ck.pth')
    os.makedirs('in')
    Image.new('RGB', (40, 30)).save('in/a.png')
    result = run_cli(*flags, '--data_root', synthetic_root, module=module) if module == 'main' else \
        run_cli(*flags, module=module)
    assert_clean_failure(result, 'GB of memory', 'GB free', needle)
    assert sorted(os.listdir(workdir)) == ['ck.pth', 'in']


def test_export_of_an_example_too_large_for_memory_names_the_flags(workdir, run_cli, monkeypatch):
    path = saved_checkpoint()
    argv = ['--checkpoint', path, '--output', 'm.onnx', '--height', '100000', '--width', '100000']
    assert_clean_failure(run_cli(*argv, module='export'), 'GB of memory', 'lower --height and --width')
    # Where the free memory cannot be told, the allocation itself fails (120 GB here): a message too.
    monkeypatch.setattr(errors, 'available_memory', lambda device: None)
    assert_clean_failure(run_cli(*argv, module='export'), 'out of memory exporting', 'lower --height and --width')
    assert not os.path.exists('m.onnx')


def test_the_demo_names_the_flag_that_makes_its_training_set_too_small(workdir, run_cli):
    result = run_cli('--root', 'syn', '--output_dir', 'out', '--train_images', '1', '--val_images', '1',
                     module='demo')
    assert_clean_failure(result, 'the training set has 1 image', '--train_images', '--root')
    assert outputs(workdir / 'out') == []


def test_the_first_non_finite_tensor_is_found_whatever_its_sum():
    big = torch.full((4,), 3e38)  # finite values whose sum overflows to infinity: not a reason to refuse
    half = torch.full((3,), 60000.0, dtype=torch.float16)  # the same in float16
    for bad in (float('nan'), float('inf'), -float('inf')):
        tensor = torch.ones(5)
        tensor[3] = bad
        assert utils.first_non_finite({'a': torch.ones(2), 'b': big, 'c': half, 'd': tensor, 'e': tensor}) == 'd'
    cancelling = torch.tensor([float('inf'), -float('inf'), 1.0])  # a sum of NaN
    assert utils.first_non_finite({'big': big, 'half': half, 'x': cancelling}) == 'x'
    assert utils.first_non_finite({'big': big, 'half': half, 'n': torch.tensor(7), 'empty': torch.zeros(0)}) is None
