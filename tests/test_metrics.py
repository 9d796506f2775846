import numpy as np
import pytest
import torch

import engine
import utils


def original_inter_and_union(pred, mask, num_classes):
    """The original's per-image counts (np.histogram over label + 1; 255 wraps to 0 and is dropped)."""
    pred = np.asarray(pred, dtype=np.uint8).copy() + 1
    mask = np.asarray(mask, dtype=np.uint8).copy() + 1
    pred = pred * (mask > 0)
    inter = pred * (pred == mask)
    area_inter, _ = np.histogram(inter, bins=num_classes, range=(1, num_classes))
    area_pred, _ = np.histogram(pred, bins=num_classes, range=(1, num_classes))
    area_mask, _ = np.histogram(mask, bins=num_classes, range=(1, num_classes))
    return area_inter, area_pred + area_mask - area_inter


def test_confusion_matrix_on_a_hand_counted_example():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])
    cm = utils.ConfusionMatrix(3)
    cm.update(target, pred)
    # rows: label, columns: prediction; the 255 pixel is left out.
    assert cm.mat.tolist() == [[1, 1, 0], [0, 2, 1], [1, 0, 1]]
    # IoU: class 0: 1 / (2 + 2 - 1); class 1: 2 / (3 + 3 - 2); class 2: 1 / (2 + 2 - 1)
    assert np.allclose(cm.iou(), [1 / 3, 2 / 4, 1 / 3])
    assert cm.mean_iou() == pytest.approx(100 * (1 / 3 + 1 / 2 + 1 / 3) / 3)
    assert cm.pixel_accuracy() == pytest.approx(100 * 4 / 7)


def test_confusion_matrix_equals_the_original_dataset_level_iou_on_random_data():
    rng = np.random.default_rng(0)
    n = 21
    cm = utils.ConfusionMatrix(n)
    inter_sum, union_sum = np.zeros(n), np.zeros(n)
    for _ in range(6):
        h, w = rng.integers(20, 60, size=2)
        mask = rng.integers(0, n, size=(h, w))
        mask[rng.random((h, w)) < 0.1] = 255
        pred = np.where(rng.random((h, w)) < 0.6, np.minimum(mask, n - 1), rng.integers(0, n, size=(h, w)))
        cm.update(torch.from_numpy(mask), torch.from_numpy(pred))
        inter, union = original_inter_and_union(pred, mask, n)
        inter_sum += inter
        union_sum += union
    expected = inter_sum / (union_sum + 1e-10)
    assert np.array_equal(cm.iou(), expected)
    assert f'{cm.mean_iou():.2f}' == f'{expected.mean() * 100:.2f}'


def test_confusion_matrix_against_an_independent_numpy_count():
    rng = np.random.default_rng(1)
    n = 5
    target = rng.integers(0, n, size=(3, 17, 19))
    target[rng.random(target.shape) < 0.2] = 255
    pred = rng.integers(0, n, size=target.shape)
    cm = utils.ConfusionMatrix(n)
    cm.update(torch.from_numpy(target), torch.from_numpy(pred))
    expected = np.zeros((n, n), np.int64)
    for t, p in zip(target.ravel(), pred.ravel()):
        if t != 255:
            expected[t, p] += 1
    assert np.array_equal(cm.mat.numpy(), expected)


def test_classes_absent_from_labels_and_predictions_count_as_zero_in_the_mean():
    cm = utils.ConfusionMatrix(3)
    cm.update(torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1]))
    assert cm.iou().tolist() == pytest.approx([1, 1, 0])
    assert cm.mean_iou() == pytest.approx(200 / 3)


@pytest.mark.parametrize('iteration,lr', [(0, 0.007), (662, 0.006874), (16550, 0.003751), (33099, 6e-7)])
def test_poly_lr_of_the_published_schedule(iteration, lr):
    value = engine.poly_lr(0.007, iteration, 33100)
    assert value == pytest.approx(lr, rel=1e-3 if iteration < 33099 else 0.1)


def test_voc_palette():
    palette = utils.voc_palette()
    assert len(palette) == 768
    assert palette[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]
    assert palette[15 * 3:15 * 3 + 3] == [192, 128, 128]  # person
    assert palette[255 * 3:] == [224, 224, 192]  # the ignore colour


def test_throughput_reads_as_seconds_per_image_when_below_one_image_a_second():
    assert utils.format_rate(3, 1.0) == '3.0 img/s'
    assert utils.format_rate(2, 30.0) == '15.0 s/img'  # not '0.1 img/s'
    assert utils.format_rate(0, 0.0) == '- img/s'



def test_counts_read_in_the_singular_for_one():
    assert utils.plural(1, 'epoch') == '1 epoch' and utils.plural(0, 'epoch') == '0 epochs'
    assert utils.plural(2, 'process', 'processes') == '2 processes'
    assert utils.plural(1, 'process', 'processes') == '1 process'


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_class_map_is_argmax_with_the_first_class_on_ties(dtype):
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (2, 21, 37, 41), generator=g).to(dtype)  # many ties
    scores[0, 4, 0, 0] = float('nan')
    view = scores[..., :30, 1:]  # cropped like the evaluation's logits, not contiguous
    for x, dim in ((view, 1), (view[1], 0), (view.contiguous(memory_format=torch.channels_last), 1)):
        assert torch.equal(utils.class_map(x, dim), x.argmax(dim))
    tied = torch.zeros(21, 2, 2)
    tied[[3, 7]] = 1
    assert utils.class_map(tied, 0).eq(3).all()
