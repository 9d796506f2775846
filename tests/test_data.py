import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

import errors
import pascal


def build(root, split='val', transforms=None, **kwargs):
    return pascal.build_dataset('pascal', str(root), split, transforms or pascal.eval_transforms(65), **kwargs)


def test_voc_list_layout_is_parsed(synthetic_root):
    train, val = build(synthetic_root, 'train'), build(synthetic_root, 'val')
    assert len(train) == 8 and len(val) == 4
    assert val.num_classes == 21 and val.class_names == pascal.VOC_CLASSES
    image_path, mask_path = val.samples[0]
    assert image_path == os.path.join(str(synthetic_root), 'VOC2012', 'JPEGImages', 'synthetic_val_00000.jpg')
    assert mask_path.endswith(os.path.join('SegmentationClassAug', 'synthetic_val_00000.png'))
    assert val.name(0) == 'synthetic_val_00000'
    image, mask, info = val[0]
    w, h = Image.open(image_path).size
    assert info == {'index': 0, 'size': (h, w)}
    assert image.shape == (3, max(h, 65), max(w, 65)) and mask.shape == image.shape[1:]


def test_the_vocdevkit_root_or_the_voc2012_folder_itself_can_be_given(synthetic_root):
    assert build(synthetic_root / 'VOC2012').samples == build(synthetic_root).samples


def test_missing_root_list_and_files_are_reported_up_front(voc_copy, tmp_path):
    with pytest.raises(errors.UserError, match=f'{tmp_path / "nowhere"} does not exist.*--data_root'):
        build(tmp_path / 'nowhere')
    os.remove(voc_copy / 'VOC2012' / 'list' / 'val.txt')
    with pytest.raises(errors.UserError, match=r'list/val.txt does not exist.*list.zip'):
        build(voc_copy)
    for name in ('synthetic_train_00001.jpg', 'synthetic_train_00002.jpg'):
        os.remove(voc_copy / 'VOC2012' / 'JPEGImages' / name)
    with pytest.raises(errors.UserError) as e:
        build(voc_copy, 'train')
    assert '2 of the 16 files named by' in str(e.value) and 'synthetic_train_00001.jpg' in str(e.value)


def test_a_malformed_list_line_names_the_line(voc_copy):
    with open(voc_copy / 'VOC2012' / 'list' / 'val.txt', 'a') as f:
        f.write('/JPEGImages/a.jpg\n')
    with pytest.raises(errors.UserError, match='line 5 of .*val.txt holds 1 fields'):
        build(voc_copy)


def test_custom_class_count_and_names(voc_copy, tmp_path):
    names = tmp_path / 'names.txt'
    names.write_text('\n'.join(f'thing{i}' for i in range(21)) + '\n')
    dataset = build(voc_copy, class_names=pascal.read_class_names(str(names)))
    assert dataset.class_names[3] == 'thing3' and dataset.num_classes == 21
    with pytest.raises(errors.UserError) as e:
        build(voc_copy, num_classes=5, class_names=pascal.read_class_names(str(names)),
              names_source=f'{names} (--class_names)')
    assert f'{names} (--class_names) holds 21 class names, but --num_classes is 5' in str(e.value)


def label_coded_pair(seed=0, size=(90, 70), block=10):
    """An image whose grey level encodes the label of a mask of constant blocks (labels 0..20 and 255)."""
    rng = np.random.default_rng(seed)
    w, h = size
    blocks = rng.choice(list(range(21)) + [255], size=(h // block + 1, w // block + 1))
    labels = np.kron(blocks, np.ones((block, block), np.uint8))[:h, :w].astype(np.uint8)
    grey = np.where(labels == 255, 250, labels * 10).astype(np.uint8)
    return Image.fromarray(np.stack([grey] * 3, -1), 'RGB'), Image.fromarray(labels, 'L')


def decoded_grey(image: torch.Tensor) -> np.ndarray:
    return ((image[0] * pascal.STD[0] + pascal.MEAN[0]) * 255).numpy()  # undo the normalisation


def original_order_pad_crop(image, mask, rng, size):
    """The original's last steps as it ran them: normalise the whole image, pad it, then crop the tensors."""
    image, mask = pascal.PadTo(size)(*pascal.ToTensor()(image, mask, rng), rng)
    i, j = rng.randint(0, image.shape[1] - size), rng.randint(0, image.shape[2] - size)
    return image[:, i:i + size, j:j + size], mask[i:i + size, j:j + size]


@pytest.mark.parametrize('size', [(50, 40), (65, 65), (90, 80), (60, 100), (200, 150)])
def test_cropping_before_normalising_gives_the_original_orders_tensors_and_draws(size):
    image = Image.fromarray(np.random.default_rng(size[0]).integers(0, 256, (size[1], size[0], 3), np.uint8))
    mask = Image.fromarray(np.random.default_rng(size[1]).integers(0, 21, (size[1], size[0]), np.uint8), 'L')
    for seed in range(10):
        ours, theirs = random.Random(seed), random.Random(seed)
        got = pascal.NormalizePadCrop(65)(image, mask, ours)
        expected = original_order_pad_crop(image, mask, theirs, 65)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        assert ours.random() == theirs.random()  # the same number of draws


@pytest.mark.parametrize('seed', range(8))
@pytest.mark.parametrize('size', [(50, 40), (90, 80), (60, 100)])
def test_flip_pad_and_crop_keep_image_and_mask_aligned_to_the_pixel(seed, size):
    image, mask = label_coded_pair(seed, size=size)
    t = pascal.Compose([pascal.RandomHorizontalFlip(), pascal.NormalizePadCrop(65)])
    out_image, out_mask = t(image, mask, random.Random(seed))
    m = out_mask.numpy()
    valid = m != 255
    assert np.abs(decoded_grey(out_image)[valid] - m[valid] * 10).max() < 0.01


@pytest.mark.parametrize('seed', range(12))
def test_training_transforms_keep_image_and_mask_aligned(seed):
    image, mask = label_coded_pair(seed, size=(120, 100), block=20)
    crop = 65
    out_image, out_mask = pascal.train_transforms(crop)(image, mask, random.Random(seed))
    assert out_image.shape == (3, crop, crop) and out_mask.shape == (crop, crop) and out_mask.dtype == torch.int64
    assert set(out_mask.unique().tolist()) <= set(range(21)) | {255}
    grey, m = decoded_grey(out_image), out_mask.numpy()
    # Lanczos blurs a few pixels along block borders: compare pixels 3 or more pixels inside a block.
    inner = np.ones_like(m, bool)
    for dy in range(-3, 4):
        for dx in range(-3, 4):
            inner &= np.roll(np.roll(m, dy, 0), dx, 1) == m
    inner[:3] = inner[-3:] = inner[:, :3] = inner[:, -3:] = False
    inner &= m != 255
    assert inner.sum() > 50
    error = np.abs(grey[inner] - m[inner] * 10)
    assert np.mean(error < 3) > 0.95 and np.median(error) < 1  # Lanczos ringing reaches a little further


def test_padding_is_bottom_right_with_0_and_255():
    image, mask = label_coded_pair(size=(40, 30))
    out_image, out_mask = pascal.eval_transforms(65)(image, mask, random.Random(0))
    assert out_image.shape == (3, 65, 65)
    assert (out_mask[30:, :] == 255).all() and (out_mask[:, 40:] == 255).all()
    assert (out_image[:, 30:, :] == 0).all() and (out_image[:, :, 40:] == 0).all()
    assert torch.equal(out_mask[:30, :40], torch.from_numpy(np.asarray(mask, dtype=np.int64)))


def test_images_larger_than_the_crop_keep_their_size_for_evaluation():
    image, mask = label_coded_pair(size=(90, 70))
    out_image, out_mask = pascal.eval_transforms(65)(image, mask, random.Random(0))
    assert out_image.shape == (3, 70, 90) and out_mask.shape == (70, 90)


def test_scale_is_log_uniform_between_half_and_double():
    image, mask = label_coded_pair(size=(100, 100))
    sizes = [pascal.RandomScale()(image, mask, random.Random(i))[0].size[0] for i in range(400)]
    assert 50 <= min(sizes) < 55 and 190 < max(sizes) <= 200
    assert 0.4 < np.mean(np.array(sizes) < 100) < 0.6  # log-uniform: median scale 1


def test_augmentation_depends_on_seed_epoch_and_index_only(synthetic_root):
    dataset = build(synthetic_root, 'train', pascal.train_transforms(65))
    a, b = dataset[3][0], dataset[3][0]
    assert torch.equal(a, b)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[3][0], a)


def test_cityscapes_layout(tmp_path):
    for split, city, stem in (('val', 'frankfurt', 'frankfurt_000000_000294'), ('val', 'lindau', 'lindau_000001_1'),
                              ('train', 'aachen', 'aachen_000000_000019')):
        os.makedirs(tmp_path / 'leftImg8bit' / split / city, exist_ok=True)
        os.makedirs(tmp_path / 'gtFine' / split / city, exist_ok=True)
        Image.new('RGB', (64, 32)).save(tmp_path / 'leftImg8bit' / split / city / f'{stem}_leftImg8bit.png')
        Image.new('L', (64, 32), 18).save(tmp_path / 'gtFine' / split / city / f'{stem}_gtFine_labelTrainIds.png')
    val = pascal.build_dataset('cityscapes', str(tmp_path), 'val', pascal.eval_transforms(65))
    assert len(val) == 2 and val.num_classes == 19 and val.class_names[18] == 'bicycle'
    assert val.name(0) == 'frankfurt_000000_000294_gtFine_labelTrainIds'
    assert val[1][1][:32, :64].unique().tolist() == [18]
    os.remove(tmp_path / 'gtFine' / 'train' / 'aachen' / 'aachen_000000_000019_gtFine_labelTrainIds.png')
    with pytest.raises(errors.UserError, match='1 of the 2 files named by'):
        pascal.build_dataset('cityscapes', str(tmp_path), 'train', None)


@pytest.mark.parametrize('flags,message', [(['--train', '0'], 'argument --train: must be at least 1, not 0'),
                                           (['--min_size', '200'], '--min_size 200 is larger than --max_size 128')])
def test_synthetic_refuses_sizes_it_cannot_generate_before_writing_anything(flags, message, tmp_path, capsys):
    import synthetic
    with pytest.raises(SystemExit) as exit_:
        synthetic.main(['--root', str(tmp_path / 'out'), *flags])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / 'out')


def test_to_tensor_is_torchvisions_to_tensor_and_normalize_bit_for_bit():
    """pascal.ToTensor does what torchvision's to_tensor + normalize did, without importing torchvision at start."""
    import torchvision.transforms.functional as TF
    rng = np.random.default_rng(0)
    for shape in [(37, 53, 3), (130, 97, 3), (1, 1, 3)]:
        image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), 'RGB')
        ours = pascal.ToTensor()(image, Image.new('L', image.size), None)[0]
        assert torch.equal(ours, TF.normalize(TF.to_tensor(image), list(pascal.MEAN), list(pascal.STD)))
