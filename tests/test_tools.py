"""predict.py, export.py, multi-scale evaluation, resume, logs, custom datasets."""
import json
import os
import re

import numpy as np
import pytest
import torch
from conftest import cli_in, initial_model, randomize, run_clis
from PIL import Image

import files
import weights

TRAIN = ['--train', '--exp', 'x', '--backbone', 'vovnet39', '--scratch', '--crop_size', '65', '--batch_size', '4',
         '--workers', '0', '--seed', '3', '--base_lr', '0.01']


@pytest.fixture(scope='module')
def run3(synthetic_root, tmp_path_factory):
    """An uninterrupted 3-epoch run with a checkpoint every epoch and validation every 2 epochs."""
    folder = tmp_path_factory.mktemp('run3')
    cli_in(folder, TRAIN + ['--epochs', '3', '--save_every', '1', '--val_every', '2', '--print_freq', '1',
                              '--data_root', synthetic_root])
    return folder


def state_of(path):
    return torch.load(path, weights_only=True)['state_dict']


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_checkpoints_every_save_every_epochs_and_the_best_one(run3):
    names = sorted(os.listdir(run3 / 'data'))
    assert names == ['deeplab_vovnet39_pascal_v3_x_best.pth', 'deeplab_vovnet39_pascal_v3_x_epoch1.pth',
                     'deeplab_vovnet39_pascal_v3_x_epoch2.pth', 'deeplab_vovnet39_pascal_v3_x_epoch3.pth', 'logs']
    best = torch.load(run3 / 'data' / names[0], weights_only=True)
    assert best['epoch'] in (2, 3) and best['best_miou'] is not None


def builds(monkeypatch) -> list[bool]:
    """main.py's model builds from here on, each as `filled` (built without its initial draws) or not."""
    import main
    built, real = [], main.model_for
    monkeypatch.setattr(main, 'model_for', lambda *a, **k: built.append(k['filled']) or real(*a, **k))
    return built


@pytest.mark.slow
def test_resuming_from_an_intermediate_epoch_gives_the_uninterrupted_weights(run3, synthetic_root, tmp_path,
                                                                             monkeypatch, run_cli):
    monkeypatch.chdir(tmp_path)
    built = builds(monkeypatch)  # the model's initial draws left out (the checkpoint holds its random state)
    status, out, err = run_cli(*TRAIN, '--epochs', '3', '--data_root', synthetic_root, '--val_every', '2',
                               '--resume', run3 / 'data' / 'deeplab_vovnet39_pascal_v3_x_epoch1.pth')
    assert status == 0, err
    assert 'resuming from' in out and 'at epoch 2, iteration 2' in out and built == [True]
    assert_same_weights(state_of('data/deeplab_vovnet39_pascal_v3_x_epoch3.pth'),
                        state_of(run3 / 'data' / 'deeplab_vovnet39_pascal_v3_x_epoch3.pth'))
    resumed = torch.load('data/deeplab_vovnet39_pascal_v3_x_epoch3.pth', weights_only=True)
    assert resumed['iteration'] == 6 and resumed['epoch'] == 3


@pytest.mark.slow
def test_a_resumed_model_is_built_without_the_initial_draws_its_checkpoint_replaces(run3, synthetic_root, tmp_path,
                                                                                 monkeypatch, run_cli):
    """A checkpoint with its random state replaces every weight and the state the initial draws leave: they are
    left out. A file without that state (an older one) is resumed on the weights drawn as before."""
    import main
    monkeypatch.chdir(tmp_path)
    real = main.model_for
    built = builds(monkeypatch)
    older = torch.load(run3 / 'data' / 'deeplab_vovnet39_pascal_v3_x_epoch2.pth', weights_only=True)
    del older['rng']
    torch.save(older, 'older.pth')
    status, out, err = run_cli(*TRAIN, '--epochs', '3', '--data_root', synthetic_root, '--resume', 'older.pth')
    assert status == 0, err
    assert 'at epoch 3, iteration 4' in out and built == [False]
    # the model main.py builds with the file's random state: nothing drawn, every tensor then loaded
    args = main.get_args_parser().parse_args([*TRAIN, '--epochs', '3'])
    stream = torch.get_rng_state()
    model = real(args, 21, older, resume=True, filled=True)
    assert torch.equal(torch.get_rng_state(), stream)
    weights.load_weights(model, older['state_dict'], 'older.pth')
    real(args, 21, older, resume=True, filled=False)
    assert not torch.equal(torch.get_rng_state(), stream)


@pytest.mark.slow
def test_an_epoch_checkpoint_resumes_with_another_batch_size_on_the_new_schedule(run3, synthetic_root, tmp_path,
                                                                                  monkeypatch, run_cli):
    monkeypatch.chdir(tmp_path)
    flags = TRAIN + ['--epochs', '3', '--data_root', synthetic_root, '--resume',
                     run3 / 'data' / 'deeplab_vovnet39_pascal_v3_x_epoch1.pth']
    flags[flags.index('--batch_size') + 1] = '2'  # 8 images: 4 batches per epoch instead of 2
    status, out, err = run_cli(*flags)
    assert status == 0, err
    assert 'trained with 2 batches per epoch, this run has 4' in err and 'at epoch 2, iteration 4' in out
    resumed = torch.load('data/deeplab_vovnet39_pascal_v3_x_epoch3.pth', weights_only=True)
    assert (resumed['epoch'], resumed['iteration'], resumed['batches_per_epoch']) == (3, 12, 4)


@pytest.mark.parametrize('recorded', [True, False])
@pytest.mark.slow
def test_a_mid_epoch_checkpoint_refuses_another_number_of_batches_per_epoch(run3, synthetic_root, tmp_path,
                                                                            monkeypatch, run_cli, recorded):
    monkeypatch.chdir(tmp_path)
    checkpoint = torch.load(run3 / 'data' / 'deeplab_vovnet39_pascal_v3_x_epoch1.pth', weights_only=True)
    checkpoint['iteration'] = 3  # one of the 2 batches of epoch 2 done, as an interrupted run saves it
    if not recorded:  # as checkpoints written before batches_per_epoch was
        del checkpoint['batches_per_epoch']
    torch.save(checkpoint, 'interrupted.pth')
    flags = TRAIN + ['--epochs', '3', '--data_root', synthetic_root, '--resume', 'interrupted.pth']
    flags[flags.index('--batch_size') + 1] = '2'
    status, out, err = run_cli(*flags)
    needle = ('stopped 1 of 2 batches into epoch 2, but this run has 4 batches per epoch' if recorded
              else '(3 iterations in 1 epoch) was trained with another number of batches per epoch')
    assert status == 1 and needle in err and 'Traceback' not in err, err
    assert not os.path.exists('data/deeplab_vovnet39_pascal_v3_x_epoch3.pth')
    flags[flags.index('--batch_size') + 1] = '4'  # the batches per epoch it was trained with: it continues
    status, out, err = run_cli(*flags)
    assert status == 0 and 'at epoch 2, iteration 3' in out, err


@pytest.mark.slow
def test_a_run_stopped_after_the_last_batch_of_an_epoch_resumes_at_the_next_one(run3, synthetic_root, tmp_path,
                                                                               monkeypatch, run_cli):
    monkeypatch.chdir(tmp_path)
    checkpoint = torch.load(run3 / 'data' / 'deeplab_vovnet39_pascal_v3_x_epoch2.pth', weights_only=True)
    checkpoint['epoch'] = 1  # as an interrupted run saves it: both batches of epoch 2 done, epoch 2 not closed
    torch.save(checkpoint, 'interrupted.pth')
    flags = TRAIN + ['--epochs', '3', '--data_root', synthetic_root, '--resume', 'interrupted.pth']
    status, out, err = run_cli(*flags)  # the same batches per epoch: epoch 2 has nothing left
    assert status == 0, err
    resumed = torch.load('data/deeplab_vovnet39_pascal_v3_x_epoch3.pth', weights_only=True)
    assert (resumed['epoch'], resumed['iteration']) == (3, 6)
    flags[flags.index('--batch_size') + 1] = '2'  # 4 batches per epoch: epoch 3 on the new schedule
    status, out, err = run_cli(*flags)
    assert status == 0 and 'continues from epoch 3' in err and 'at epoch 2, iteration 8' in out, (out, err)
    resumed = torch.load('data/deeplab_vovnet39_pascal_v3_x_epoch3.pth', weights_only=True)
    assert (resumed['epoch'], resumed['iteration']) == (3, 12)


@pytest.mark.slow
def test_metrics_log_and_curves_after_training(run3):
    folder = run3 / 'data' / 'logs' / 'deeplab_vovnet39_pascal_v3_x'
    rows = [json.loads(line) for line in open(folder / 'metrics.jsonl')]
    train = [r for r in rows if 'loss' in r]
    assert [r['iteration'] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all(r['lr'] > 0 and r['images_per_s'] > 0 and np.isfinite(r['loss']) for r in train)
    assert [r['epoch'] for r in rows if 'miou' in r] == [2, 3]
    curves = Image.open(folder / 'curves.png')
    assert curves.format == 'PNG' and curves.size[0] > 600
    assert any(f.startswith('events.out.tfevents') for f in os.listdir(folder))


def test_tensorboard_absent_degrades_to_a_message(tmp_path, monkeypatch, caplog):
    import builtins
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith('torch.utils.tensorboard'):
            raise ImportError('No module named tensorboard')
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, '__import__', no_tensorboard)
    caplog.set_level('INFO')
    writer = files.MetricsWriter(str(tmp_path))
    writer.write(1, loss=0.5)
    assert 'TensorBoard is not installed' in caplog.text
    assert os.listdir(tmp_path) == ['metrics.jsonl']


@pytest.mark.slow
def test_multi_scale_and_flip_evaluation_is_reported_beside_single_scale(run3, synthetic_root, monkeypatch,
                                                                          run_cli):
    monkeypatch.chdir(run3)
    status, out, err = run_cli('--exp', 'x', '--epochs', '3', '--backbone', 'vovnet39', '--crop_size', '65',
                               '--data_root', synthetic_root, '--workers', '0', '--eval_scales', '0.75,1,1.25',
                               '--flip')
    assert status == 0, err
    single = re.search(r'^Mean IoU: (\d+\.\d\d)$', out, re.M)
    multi = re.search(r'^Mean IoU \(scales 0.75,1,1.25 \+ flip\): (\d+\.\d\d)$', out, re.M)
    assert single and multi
    assert 'single scale | scales 0.75,1,1.25 + flip' in out
    assert len(os.listdir('data/val_ms')) == 4 and len(os.listdir('data/val')) == 4
    assert os.path.isfile('data/deeplab_vovnet39_pascal_v3_x_epoch3_iou.png')


@pytest.mark.slow
def test_output_stride_8_trains_and_evaluates(synthetic_root, tmp_path, monkeypatch, run_cli):
    monkeypatch.chdir(tmp_path)
    status, _, err = run_cli(*TRAIN, '--epochs', '1', '--output_stride', '8', '--data_root', synthetic_root)
    assert status == 0, err
    checkpoint = torch.load('data/deeplab_vovnet39_pascal_v3_x_epoch1.pth', weights_only=True)
    assert checkpoint['model_args']['output_stride'] == 8
    evaluate = ['--exp', 'x', '--epochs', '1', '--backbone', 'vovnet39', '--crop_size', '65', '--data_root',
                synthetic_root, '--workers', '0', '--no-save_predictions']
    found = []
    for flag in ([], ['--output_stride', '8'], ['--output_stride', '16']):
        status, out, err = run_cli(*evaluate, *flag)
        assert status == 0, err
        found.append((re.search(r'output stride (\d+)\)', out).group(1),
                      re.search(r'^Mean IoU: (\S+)$', out, re.M).group(1)))
    # Without the flag, the checkpoint's stride (the same model as with --output_stride 8); 16 on request.
    assert found[0] == found[1] and found[0][0] == '8' and found[2][0] == '16'
    # Resumed without the flag, training goes on at the stride it was trained with.
    status, _, err = run_cli(*TRAIN, '--epochs', '2', '--data_root', synthetic_root, '--resume',
                             'data/deeplab_vovnet39_pascal_v3_x_epoch1.pth')
    assert status == 0, err
    checkpoint = torch.load('data/deeplab_vovnet39_pascal_v3_x_epoch2.pth', weights_only=True)
    assert checkpoint['model_args']['output_stride'] == 8


@pytest.mark.slow
def test_a_custom_dataset_with_its_own_classes(voc_copy, tmp_path, monkeypatch):
    """The custom-dataset commands of docs/usage.md (training, then evaluation) in a fresh process, one after the
    other (conftest.run_clis): nothing imported beforehand, one import of the library for both."""
    masks = voc_copy / 'VOC2012' / 'SegmentationClassAug'
    for name in os.listdir(masks):
        m = np.asarray(Image.open(masks / name))
        Image.fromarray(np.where(m == 255, 255, m % 4).astype(np.uint8), 'L').save(masks / name)
    names = tmp_path / 'classes.txt'
    names.write_text('sky\nroad\ncar\ntree\n')
    monkeypatch.chdir(tmp_path)
    common = ['--exp', 'mine', '--backbone', 'vovnet39', '--epochs', '1', '--crop_size', '65', '--workers', '0',
              '--data_root', voc_copy, '--num_classes', '4', '--class_names', names]
    train = ('main', ['--train', '--scratch', '--batch_size', '4', *common])
    (status, _, err), (evaluated, out, errors) = run_clis([train, ('main', common)], tmp_path)
    assert status == 0, err
    assert evaluated == 0, errors
    assert all(f'IoU {n}: ' in out for n in ('sky', 'road', 'car', 'tree')) and 'IoU aeroplane' not in out


# --- predict.py


def write_inputs(folder):
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8), 'RGB')
    rgb.save(folder / 'photo.jpg')
    rgb.convert('RGBA').resize((40, 33)).save(folder / 'transparent.png')
    rgb.convert('L').resize((90, 110)).save(folder / 'large_grey.png')  # beyond the 65 crop
    rgb.convert('P').save(folder / 'palette.gif')
    Image.fromarray(np.asarray(rgb.convert('L'), np.uint16) * 200).save(folder / 'sixteen_bit.png')
    rgb.convert('CMYK').save(folder / 'print.jpg')
    (folder / 'notes.txt').write_text('not an image')
    return {'photo.jpg': (70, 50), 'transparent.png': (40, 33), 'large_grey.png': (90, 110),
            'palette.gif': (70, 50), 'sixteen_bit.png': (70, 50), 'print.jpg': (70, 50)}


@pytest.fixture(scope='module')
def small_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp('ckpt') / 'vov.pth'
    torch.manual_seed(0)
    model = randomize(initial_model(num_classes=21), seed=7)
    with torch.no_grad():
        model.aspp.conv3.bias.copy_(torch.linspace(-1, 1, 21))
    torch.save({'epoch': 50, 'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()}}, path)
    return path


@pytest.mark.parametrize('slide', [False, True])
@pytest.mark.slow
def test_predict_on_a_folder_of_mixed_images(small_checkpoint, tmp_path, run_cli, slide):
    expected = write_inputs(tmp_path / 'in')
    args = ['--checkpoint', small_checkpoint, '--input', tmp_path / 'in', '--output', tmp_path / 'out',
            '--crop_size', '65', '--batch_size', '3', '--device', 'cpu'] + (['--slide'] if slide else [])
    status, out, err = run_cli(*args, module='predict')
    assert status == 0, err
    assert 'notes.txt' in err and 'skipping' in err and 'Traceback' not in err
    for name, size in expected.items():
        stem = os.path.splitext(name)[0]
        mask = Image.open(tmp_path / 'out' / f'{stem}.png')
        assert mask.mode == 'P' and mask.size == size, name
        assert Image.open(tmp_path / 'out' / f'{stem}_overlay.jpg').size == size
    assert '[6/6]' in out


def test_predicted_masks_equal_the_evaluation_protocol(small_checkpoint, tmp_path, run_cli):
    import pascal
    os.makedirs(tmp_path / 'in')
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 60, 3), dtype=np.uint8), 'RGB')
    image.save(tmp_path / 'in' / 'a.png')
    status, _, err = run_cli('--checkpoint', small_checkpoint, '--input', str(tmp_path / 'in' / '*.png'),
                             '--output', tmp_path / 'out', '--crop_size', '65', '--amp', 'off', module='predict')
    assert status == 0, err
    model = weights.model_from_checkpoint(str(small_checkpoint)).eval()
    x, _ = pascal.eval_transforms(65)(image, Image.new('L', image.size), None)
    with torch.no_grad():
        expected = model(x[None]).argmax(1)[0, :40, :60].numpy()
    assert np.array_equal(np.asarray(Image.open(tmp_path / 'out' / 'a.png')), expected)
    assert len(np.unique(expected)) > 1


def test_predict_sizes_rotated_photos_from_the_header_and_skips_files_that_fail_to_decode(small_checkpoint, tmp_path,
                                                                                           run_cli):
    os.makedirs(tmp_path / 'in')
    rgb = Image.fromarray(np.random.default_rng(2).integers(0, 255, (30, 50, 3), dtype=np.uint8), 'RGB')
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 50x30, shown rotated: 30x50
    rgb.save(tmp_path / 'in' / 'rotated.jpg', exif=exif)
    rgb.resize((200, 30)).save(tmp_path / 'in' / 'wide.jpg')
    data = (tmp_path / 'in' / 'wide.jpg').read_bytes()
    (tmp_path / 'in' / 'truncated.jpg').write_bytes(data[:len(data) // 3])  # its header still reads
    import pascal
    assert pascal.image_size(tmp_path / 'in' / 'rotated.jpg', exif=True) == (30, 50)
    assert pascal.image_size(tmp_path / 'in' / 'truncated.jpg') == (200, 30)
    status, out, err = run_cli('--checkpoint', small_checkpoint, '--input', tmp_path / 'in', '--output',
                               tmp_path / 'out', '--crop_size', '65', module='predict')
    assert status == 0, err
    assert Image.open(tmp_path / 'out' / 'rotated.png').size == (30, 50)
    assert Image.open(tmp_path / 'out' / 'wide.png').size == (200, 30)
    assert 'skipping' in err and 'truncated.jpg' in err and 'Traceback' not in err
    assert not os.path.exists(tmp_path / 'out' / 'truncated.png')
    assert '[2/2]' in out and '1 skipped' in out


@pytest.mark.parametrize('flag,value,message', [('--opacity', '1.5', 'must be at most 1, not 1.5'),
                                                ('--batch_size', '0', 'must be at least 1, not 0'),
                                                ('--crop_size', '16', 'must be at least 32, not 16'),
                                                ('--opacity', 'nan', 'must be a finite number')])
def test_predict_refuses_numbers_out_of_range_before_loading_anything(flag, value, message, tmp_path, run_cli):
    status, _, err = run_cli('--checkpoint', tmp_path / 'absent.pth', '--input', tmp_path, flag, value,
                             module='predict')
    assert status == 2 and f'argument {flag}: {message}' in err, err


def test_predict_refuses_a_backbone_that_contradicts_the_checkpoint(small_checkpoint, tmp_path, run_cli):
    Image.new('RGB', (30, 20)).save(tmp_path / 'a.png')
    status, _, err = run_cli('--checkpoint', small_checkpoint, '--input', tmp_path, '--backbone', 'resnet50',
                             '--output', tmp_path / 'out', module='predict')  # not the default, in the repository
    assert status == 1 and 'holds a DeepLabV3-vovnet39' in err


# --- export.py


@pytest.mark.slow
def test_export_refuses_sizes_and_opsets_it_cannot_trace_with_a_message(small_checkpoint, tmp_path, run_cli):
    output = tmp_path / 'm.onnx'
    for flags, status_wanted, message in ((['--height', '8'], 2, '--height: must be at least 32, not 8'),
                                          (['--opset', '9'], 2, '--opset: must be at least 11, not 9'),
                                          (['--opset', '99'], 1, 'cannot export opset 99')):
        status, _, err = run_cli('--checkpoint', small_checkpoint, '--output', output, '--no_check', *flags,
                                 module='export')
        assert status == status_wanted and message in err and 'Traceback' not in err, err
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_export_without_onnxruntime_says_it_did_not_check(small_checkpoint, tmp_path, run_cli, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == 'onnxruntime':
            raise ImportError('No module named onnxruntime')
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, '__import__', no_onnxruntime)
    # The TorchScript exporter (4 s here instead of 11): the check left out is the same after either exporter, and
    # the default one's file is checked by test_onnx_export_matches_pytorch_argmax_on_every_pixel.
    status, out, _ = run_cli('--checkpoint', small_checkpoint, '--output', tmp_path / 'm.onnx', '--height', '65',
                             '--width', '65', '--exporter', 'torchscript', '--opset', '17', module='export')
    assert status == 0 and 'ONNX Runtime is not installed' in out
    assert os.path.getsize(tmp_path / 'm.onnx') > 10**6


# --- demo.py


@pytest.mark.slow
def test_the_demo_generates_trains_evaluates_and_reports_the_evaluations_mean_iou(tmp_path, run_process, run_cli):
    """The quick start's command, in a fresh process as a user runs it (smaller); its second run in this process."""
    flags = ['--root', tmp_path / 'synthetic', '--output_dir', tmp_path / 'demo', '--train_images', '8',
             '--val_images', '4', '--epochs', '1', '--batch_size', '4', '--crop_size', '65', '--workers', '0']
    status, out, err = run_process('demo.py', *flags)
    assert status == 0, err
    assert 'generating 8 + 4 synthetic images' in out
    miou = re.search(r'^Mean IoU: (\d+\.\d\d)$', out, re.M).group(1)
    assert re.search(rf'demo finished in .*: mean IoU {miou} on 4 synthetic validation images', out), out
    assert len(os.listdir(tmp_path / 'demo' / 'val')) == 4
    assert os.path.isfile(tmp_path / 'demo' / 'deeplab_vovnet39_pascal_v3_demo_epoch1.pth')
    # A second run keeps the dataset it finds, and says so when other sizes were asked for.
    flags[flags.index('--val_images') + 1] = '6'
    status, out, err = run_cli(*flags, module='demo')
    assert status == 0, err
    assert 'using the dataset already in' in out and '8 + 4 images' in out and 'generating' not in out
    assert 'on 4 synthetic validation images' in out


def test_an_interrupted_demo_says_which_command_resumes_without_a_traceback(tmp_path, run_cli, monkeypatch):
    import signal

    import main

    def interrupted(args, rt):
        raise main.Interrupted(signal.SIGINT, 'stopped by signal 2; Resume with the same command plus --resume x')
    monkeypatch.setattr(main, 'train', interrupted)
    status, out, err = run_cli('--root', tmp_path, '--train_images', '2', '--val_images', '1', '--output_dir',
                               tmp_path / 'out', module='demo')
    assert status == 128 + signal.SIGINT
    assert '--resume x (the command printed above); python demo.py starts the demo over' in err
    assert 'Traceback' not in err and '$ python main.py --train' in out


def test_ctrl_c_in_a_script_is_a_line_and_status_130_not_a_traceback(tmp_path, run_cli, monkeypatch):
    import predict

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(predict, 'run', interrupted)
    status, _, err = run_cli('--checkpoint', 'x.pth', '--input', tmp_path, module='predict')
    assert status == 130 and err.strip() == 'interrupted', err
