"""Segmentation datasets (PASCAL VOC 2012 + SBD "SegmentationClassAug", Cityscapes, any dataset in VOC's list
layout) and the paired image/mask transforms of the original training recipe.

Every random choice of a transform is drawn from a `random.Random` seeded by (seed, epoch, sample index), so a
sample's augmentation does not depend on the number of workers or processes, and a resumed run sees exactly
the batches an uninterrupted one would have seen.
"""
import codecs
import glob
import logging
import math
import os
import random
import signal
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

import errors
from errors import Stopped, UserError
from utils import CITYSCAPES_CLASSES, DATASETS, DEFAULT_ROOTS, IGNORE_INDEX, MEAN, STD, VOC_CLASSES  # noqa: F401

log = logging.getLogger(__name__)

VOC_LISTS = {'train': 'train_aug.txt', 'val': 'val.txt'}
SCALE_RANGE = (0.5, 2.0)


# ---------------------------------------------------------------------------------------------------------------
# Reading files


IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
EXIF_ORIENTATION = 0x0112


def load_image(path: str, exif: bool = False) -> Image.Image:
    """Decode an image file into RGB, whatever its mode (grayscale, RGBA, palette, 16-bit, CMYK, ...)."""
    try:
        with Image.open(path) as img:
            img.load()
            if exif:
                img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except IMAGE_ERRORS as e:
        raise _unreadable(path, e) from None


def image_size(path: str, exif: bool = False) -> tuple[int, int]:
    """(width, height) of the image `load_image` would return, read from the file's header without decoding."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            if exif and img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # rotated by 90 degrees
                w, h = h, w
            return w, h
    except IMAGE_ERRORS as e:
        raise _unreadable(path, e) from None


def _unreadable(path: str, e: Exception) -> UserError:
    return UserError(f'cannot read the image {path} ({e}); replace or remove the file.')


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ('I;16', 'I;16B', 'I;16L', 'I', 'F'):  # 16/32-bit grayscale: keep the top 8 bits of range
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith('I;16') or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), 'L')
    elif img.mode in ('P', 'PA') and 'transparency' in img.info or img.mode == 'PA':
        img = img.convert('RGBA')
    return img if img.mode == 'RGB' else img.convert('RGB')


def load_mask(path: str, num_classes: int) -> Image.Image:
    """Decode a class-index mask (one channel, values 0..num_classes-1 and 255) and check its values."""
    try:
        with Image.open(path) as img:
            img.load()
            mask = img
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f'cannot read the mask {path} ({e}); replace or remove the file.') from None
    if mask.mode not in ('L', 'P', 'I', 'I;16', 'I;16B', 'I;16L'):
        raise UserError(f'the mask {path} is a {mask.mode} image; masks must hold one class index per pixel '
                        f'(0..{num_classes - 1}, {IGNORE_INDEX} = ignore), like SegmentationClassAug. Colour masks '
                        f'(VOC\'s SegmentationClass) must be converted to indices first.')
    array = np.asarray(mask)
    if array.dtype == np.uint8:  # a histogram is 10x faster than np.unique, and this runs for every sample
        values = np.flatnonzero(np.bincount(array.ravel(), minlength=256))
    else:
        values = np.unique(array)
    bad = values[(values >= num_classes) & (values != IGNORE_INDEX) | (values < 0)]
    if bad.size:
        shown = ', '.join(str(v) for v in bad[:8]) + (', ...' if bad.size > 8 else '')
        raise UserError(f'the mask {path} has values {shown} outside the classes 0..{num_classes - 1} and '
                        f'{IGNORE_INDEX} (ignore). Fix the mask, or set --num_classes to the dataset\'s class count.')
    if mask.mode != 'L' and mask.mode != 'P':
        mask = Image.fromarray(np.asarray(mask).astype(np.uint8), 'L')
    return mask


# ---------------------------------------------------------------------------------------------------------------
# Paired transforms: each takes and returns (image, mask), drawing its random choices from `rng`


class Compose:
    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, image, mask, rng: random.Random):
        for t in self.transforms:
            image, mask = t(image, mask, rng)
        return image, mask


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, mask, rng):
        if rng.random() < self.p:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image, mask


class RandomScale:
    """One scale for both axes, log-uniform in [low, high]: Lanczos for the image, nearest for the mask."""

    def __init__(self, low: float = SCALE_RANGE[0], high: float = SCALE_RANGE[1]):
        self.low, self.high = math.log2(low), math.log2(high)

    def __call__(self, image, mask, rng):
        scale = 2 ** (self.low + rng.random() * (self.high - self.low))
        w, h = image.size
        size = (int(round(w * scale)), int(round(h * scale)))
        return image.resize(size, Image.Resampling.LANCZOS), mask.resize(size, Image.Resampling.NEAREST)


class ToTensor:
    """PIL image to a normalised float tensor (3, H, W); mask to an int64 tensor (H, W)."""

    def __init__(self, mean: Sequence[float] = MEAN, std: Sequence[float] = STD):
        self.mean, self.std = list(mean), list(std)

    def __call__(self, image, mask, rng):
        # torchvision's to_tensor and normalize, step by step (the same arithmetic, so the same floats), without
        # importing torchvision, which imports torch._dynamo: a second of every process's start.
        pixels = torch.from_numpy(np.array(image.convert('RGB'), np.uint8)).permute(2, 0, 1).contiguous()
        mean = torch.as_tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        image = pixels.to(torch.float32).div(255).sub_(mean).div_(std)
        return image, torch.from_numpy(np.asarray(mask, dtype=np.int64).copy())


class PadTo:
    """Pad bottom/right to at least size x size: 0 for the (normalised) image, 255 for the mask."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image, mask, rng):
        h, w = image.shape[-2:]
        pad = (0, max(0, self.size - w), 0, max(0, self.size - h))
        if pad[1] or pad[3]:
            image = F.pad(image, pad, value=0.0)
            mask = F.pad(mask, pad, value=IGNORE_INDEX)
        return image, mask


class NormalizePadCrop:
    """The original's last three steps: normalise, pad bottom/right to at least size x size (0 for the image, 255
    for the mask), and take a random size x size crop. The crop is taken from the PIL image first and only its
    pixels are normalised: the same tensors and random draws as in the original's order, without normalising the
    whole rescaled image (a 500x375 VOC image at scale 2 is 2.9x the area of a 513x513 crop)."""

    def __init__(self, size: int, mean: Sequence[float] = MEAN, std: Sequence[float] = STD):
        self.size = size
        self.to_tensor, self.pad = ToTensor(mean, std), PadTo(size)

    def __call__(self, image, mask, rng):
        w, h = image.size
        i = rng.randint(0, max(h, self.size) - self.size)  # top-left corner on the padded canvas
        j = rng.randint(0, max(w, self.size) - self.size)
        box = (j, i, min(w, j + self.size), min(h, i + self.size))  # the part of the crop inside the image
        image, mask = self.to_tensor(image.crop(box), mask.crop(box), rng)
        return self.pad(image, mask, rng)


def train_transforms(crop_size: int) -> Compose:
    """The original's training augmentation: flip, scale 0.5-2, normalise, pad, random crop."""
    return Compose([RandomHorizontalFlip(), RandomScale(), NormalizePadCrop(crop_size)])


def eval_transforms(crop_size: int) -> Compose:
    """The original's evaluation input: normalised and padded bottom/right to the crop size. Images larger than
    the crop keep their size (the original cropped them at random)."""
    return Compose([ToTensor(), PadTo(crop_size)])


# ---------------------------------------------------------------------------------------------------------------
# Datasets


class SegmentationDataset(Dataset):
    """(image, mask) file pairs with paired transforms.

    Returns `(image, mask, info)`, where info holds the sample `index` and the image's own `size` (H, W) before
    any transform, so that predictions can be cropped back to it.

    Args:
        samples: (image path, mask path) pairs.
        num_classes: masks may hold 0..num_classes-1 and 255.
        transforms: a paired transform called as `transforms(image, mask, rng)`.
        class_names: one name per class.
        seed: with the epoch and index, seeds each sample's random choices.
    """

    def __init__(self, samples: Sequence[tuple[str, str]], num_classes: int, transforms, class_names: Sequence[str],
                 seed: int = 0):
        self.samples = list(samples)
        self.num_classes = num_classes
        self.transforms = transforms
        self.class_names = tuple(class_names)
        self.seed = seed
        self.epoch = 0
        self.source: str | None = None  # where the samples were listed (build_dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def name(self, index: int) -> str:
        """The sample's id: its mask's file name without extension (e.g. 2007_000033)."""
        return os.path.splitext(os.path.basename(self.samples[index][1]))[0]

    def output_names(self) -> list[str]:
        """A name per sample for the files made from it (predictions): its id; or, where two samples share an id
        (masks of one name in different folders), each sample's mask path below the masks' common folder, without
        extension, its folders joined by `__` (e.g. `a__x`), so that no prediction overwrites another."""
        names = [self.name(i) for i in range(len(self))]
        if len({name for name, _ in set(zip(names, self.samples))}) == len(set(self.samples)):
            return names  # one name per sample (a sample listed twice gives the same prediction twice)
        masks = [os.path.abspath(mask) for _, mask in self.samples]
        base = os.path.commonpath([os.path.dirname(mask) for mask in masks])
        names = [os.path.splitext(os.path.relpath(mask, base))[0].replace(os.sep, '__') for mask in masks]
        first = {}
        for i, name in enumerate(names):
            if name in first and self.samples[first[name]] != self.samples[i]:
                j = first[name]
                (image_a, mask_a), (image_b, mask_b) = self.samples[j], self.samples[i]
                raise UserError(f'two samples would write their predictions to one file {name}.png: {image_a} '
                                f'(mask {mask_a}) and {image_b} (mask {mask_b}). Rename one of them in the '
                                f'list, or evaluate with --no-save_predictions.')
            first.setdefault(name, i)
        log.warning('masks of the same name are in several folders: predictions are named by their path below %s, '
                    'folders joined by "__" (e.g. %s.png)', base, names[0])
        return names

    def __getitem__(self, index: int):
        image_path, mask_path = self.samples[index]
        image = load_image(image_path)
        mask = load_mask(mask_path, self.num_classes)
        if image.size != mask.size:
            raise UserError(f'the mask {mask_path} is {mask.size[0]}x{mask.size[1]} but its image {image_path} is '
                            f'{image.size[0]}x{image.size[1]}; a mask must have its image\'s size.')
        size = (image.size[1], image.size[0])
        rng = random.Random(f'{self.seed}/{self.epoch}/{index}')
        image, mask = self.transforms(image, mask, rng)
        return image, mask, {'index': index, 'size': size}


def collect_images(spec: str, flag: str) -> list[str]:
    """The files `spec` names: an image, a folder's files (hidden ones left out) or a glob pattern, sorted."""
    if os.path.isdir(spec):
        paths = [os.path.join(spec, f) for f in sorted(os.listdir(spec)) if not f.startswith('.')]
        paths = [f for f in paths if os.path.isfile(f)]
    elif os.path.isfile(spec):
        paths = [spec]
    else:
        paths = sorted(f for f in glob.glob(spec, recursive=True) if os.path.isfile(f))
    if not paths:
        raise UserError(f'{flag} {spec} names no file: give an image, a folder of images or a glob pattern.')
    return paths


def build_dataset(name: str, root: str | None, split: str, transforms, num_classes: int | None = None,
                  class_names: Sequence[str] | None = None, seed: int = 0,
                  names_source: str | None = None) -> SegmentationDataset:
    """The `split` ('train' or 'val') of dataset `name`, with every listed file checked up front.

    `pascal` reads VOC's list layout: `{root}/VOC2012/list/{train_aug,val}.txt` (or `{root}/list/...`), lines of
    two paths relative to that folder. Any dataset in that layout works with `num_classes` and `class_names`.
    """
    if name not in DATASETS:
        raise UserError(f'unknown dataset {name!r}; choose one of {", ".join(DATASETS)} '
                        f'(any dataset in VOC\'s list layout is read as pascal, see README).')
    root = root or DEFAULT_ROOTS[name]
    if os.path.exists(root) and not os.path.isdir(root):
        holding = 'VOC2012/ or list/' if name == 'pascal' else 'leftImg8bit/ and gtFine/'
        raise UserError(f'the dataset folder {root} is a file. Point --data_root at the folder holding {holding}.')
    if not os.path.isdir(root):
        what = ('PASCAL VOC 2012 with SBD\'s SegmentationClassAug and list.zip (see README, "PASCAL VOC 2012")'
                if name == 'pascal' else 'Cityscapes leftImg8bit and gtFine')
        raise UserError(f'the dataset folder {root} does not exist. Download {what} there, '
                        f'or point --data_root at it.')
    if name == 'pascal':
        samples, source = _voc_samples(root, split)
        default_names = VOC_CLASSES
    else:
        samples, source = _cityscapes_samples(root, split)
        default_names = CITYSCAPES_CLASSES
    if num_classes is None:
        num_classes = len(class_names) if class_names else len(default_names)
    if class_names is None:
        class_names = default_names if num_classes == len(default_names) else [
            f'class {i}' for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise UserError(f'{names_source or "--class_names"} holds {len(class_names)} class names, but --num_classes '
                        f'is {num_classes}: give one name per line for each class, background included, or pass '
                        f'--num_classes {len(class_names)}.')
    if not samples:
        raise UserError(f'{source} lists no images; it should hold one "image mask" pair per line.')
    missing = [p for pair in samples for p in pair if not os.path.isfile(p)]
    if missing:
        shown = '\n  '.join(missing[:5])
        raise UserError(f'{len(missing)} of the {2 * len(samples)} files named by {source} do not exist, e.g.\n'
                        f'  {shown}\nThe download or extraction is probably incomplete: redo it (README), '
                        f'or fix --data_root.')
    dataset = SegmentationDataset(samples, num_classes, transforms, class_names, seed)
    dataset.source = source  # the list file (VOC's layout) or the image folder (Cityscapes)
    return dataset


def read_lines(path: str, what: str) -> list[tuple[int, str]]:
    """The non-empty lines of a text file with their numbers (from 1), whatever its line ends (LF, CRLF, CR) and
    with or without a UTF-8 byte-order mark. Bytes that are not UTF-8 (a Latin-1 file) are kept as surrogate
    escapes, as Python names such files on disk, so that a list of Latin-1 file names still finds its files."""
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as e:
        raise UserError(f'cannot read {what} {path}: {e.strerror or e}.') from None
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # Windows' "Unicode"
        try:
            text = data.decode('utf-16')
        except UnicodeDecodeError as e:
            raise UserError(f'{what} {path} starts as UTF-16 but is not ({e.reason} at byte {e.start}); save it '
                            f'as UTF-8.') from None
    else:
        text = data.decode('utf-8-sig', errors='surrogateescape')
    return [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]


def _listed_path(base: str, field: str) -> str:
    """A list file's path field as a file path. A field with bytes that are not UTF-8 names a file of those very
    bytes; if there is none, the field may be Latin-1 text for a file named in UTF-8 (a list written on another
    system), which is tried next."""
    path = os.path.join(base, field.lstrip('/'))
    if os.path.exists(path) or not any('\udc80' <= c <= '\udcff' for c in field):
        return path
    latin1 = os.path.join(base, field.encode('utf-8', 'surrogateescape').decode('latin-1').lstrip('/'))
    return latin1 if os.path.exists(latin1) else path


def _voc_samples(root: str, split: str):
    base = os.path.join(root, 'VOC2012') if os.path.isdir(os.path.join(root, 'VOC2012')) else root
    list_file = os.path.join(base, 'list', VOC_LISTS[split])
    if not os.path.isfile(list_file):
        raise UserError(f'the list file {list_file} does not exist. For VOC, unzip list.zip inside '
                        f'{base} (README, "PASCAL VOC 2012"); for your own data, write list/{VOC_LISTS[split]} '
                        f'with lines "/images/x.jpg /masks/x.png".')
    samples = []
    for number, line in read_lines(list_file, 'the list file'):
        parts = line.split()
        if len(parts) != 2:
            raise UserError(f'line {number} of {list_file} holds {len(parts)} fields; each line must be '
                            f'"image_path mask_path", relative to {base}.')
        samples.append(tuple(_listed_path(base, p) for p in parts))
    return samples, list_file


def _cityscapes_samples(root: str, split: str):
    images = sorted(glob.glob(os.path.join(root, 'leftImg8bit', split, '*', '*_leftImg8bit.png')))
    samples = []
    for image in images:
        city = os.path.basename(os.path.dirname(image))
        stem = os.path.basename(image)[:-len('_leftImg8bit.png')]
        samples.append((image, os.path.join(root, 'gtFine', split, city, f'{stem}_gtFine_labelTrainIds.png')))
    if not samples:
        raise UserError(f'no images match {os.path.join(root, "leftImg8bit", split, "*", "*_leftImg8bit.png")}; '
                        f'extract leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip into {root} and create '
                        f'the labelTrainIds masks with cityscapesscripts.')
    return samples, os.path.join(root, 'leftImg8bit', split)


def read_class_names(path: str) -> list[str]:
    """One class name per line (blank lines skipped), in UTF-8 (with or without a byte-order mark) or, failing
    that, Latin-1, with a warning."""
    lines = read_lines(path, 'the class-names file')
    names = [line.strip() for _, line in lines]
    odd = next((number for number, line in lines if any('\udc80' <= c <= '\udcff' for c in line)), None)
    if odd is not None:
        log.warning('%s is not UTF-8 (line %d); its names are read as Latin-1', path, odd)
        names = [name.encode('utf-8', 'surrogateescape').decode('latin-1') for name in names]
    if not names:
        raise UserError(f'the class-names file {path} is empty; write one class name per line.')
    return names


# ---------------------------------------------------------------------------------------------------------------
# Loading: samplers, loaders and the iteration over their batches


class TrainSampler(torch.utils.data.Sampler):
    """Training order for one process: a permutation seeded by (seed, epoch), padded to a multiple of the number
    of processes and sharded across them as DistributedSampler does, and able to start mid-epoch (resume).

    With `drop_single`, a final per-process batch of a single image is dropped: BatchNorm cannot train on one
    value per channel, which the ASPP's image-pooling branch would then have. Without BatchNorm, or with it
    synchronised across processes, that batch is kept: 662 iterations per epoch on train_aug at batch 16, as the
    original, also on 8 GPUs.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 drop_single: bool = True):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size, self.drop_single = rank, world_size, drop_single
        self.epoch, self.start_batch = 0, 0
        per_process = -(-size // world_size)
        remainder = per_process % batch_size
        self.per_process = per_process - (1 if drop_single and remainder == 1 and batch_size > 1 else 0)
        self.batches_per_epoch = -(-self.per_process // batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=g).tolist()
        order += order[:self.world_size * -(-self.size // self.world_size) - self.size]
        shard = order[self.rank::self.world_size][:self.per_process]
        return iter(shard[self.start_batch * self.batch_size:])

    def __len__(self) -> int:
        return max(self.per_process - self.start_batch * self.batch_size, 0)


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation order for one process: every `world_size`-th index, so each image is seen exactly once over
    all processes (DistributedSampler would repeat some to even out the shards)."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, size, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def ignore_interrupts_in_worker(worker_id: int) -> None:
    """DataLoader worker init: leave Ctrl-C (sent to the whole process group) to the main process, which stops
    cleanly and then shuts its workers down; one thread per worker. SIGTERM keeps its default action: it is how
    workers are shut down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


def make_loader(dataset: Dataset, batch_size: int, sampler, workers: int, pin_memory: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      worker_init_fn=ignore_interrupts_in_worker)


class Batches:
    """A loader's batches, for training and evaluation alike; use with `contextlib.closing`, so that its workers
    shut down when the loop ends, however it ends. Fetching a batch fails with `errors.Stopped` once `stop` (a
    GracefulStop) has a request, and with a message naming the cause when a worker died or memory ran out.

    `current` is the batch the loop works on, `done` the number of batches it has finished with (for messages
    about where a loop stopped or failed)."""

    def __init__(self, loader: DataLoader, stop=None, out_of_memory_advice: str = 'lower --batch_size or --crop_size'):
        self.loader, self.stop, self.advice = loader, stop, out_of_memory_advice
        self.current, self.done, self._iterator = None, 0, None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self._iterator = iter(self.loader)
        while True:
            try:
                batch = next(self._iterator)
            except StopIteration:
                return
            except Exception as e:
                if self.stop is not None and self.stop.requested:  # the workers' pipes break: RuntimeError, ...
                    raise Stopped() from None
                errors.raise_for_loader(e, self._iterator, self.advice)
                raise
            self.current = batch
            yield batch
            self.done += 1

    def close(self) -> None:
        """Shut the workers down now. A worker killed by the signal that stopped the loop (SIGTERM to the process
        group: `kill -- -PGID`, a scheduler's cancel) makes PyTorch's SIGCHLD handler raise while they are joined;
        the loop has ended already, so that is no error of its own (left to `__del__`, it printed a traceback)."""
        try:
            iterator, self._iterator = self._iterator, None
            shutdown = getattr(iterator, '_shutdown_workers', None)  # absent without workers
            if shutdown is not None:
                shutdown()
        except RuntimeError as e:  # raised by the handler wherever it runs, not by shutdown() only
            if not errors.worker_died(e):
                raise
