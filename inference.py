"""Running a model: where and in which precision and memory format (`Execution`, decided once from the flags), and
the one way images go through it (`Runner`): padded bottom/right to the crop size as the original's evaluation
protocol does, forwarded under autocast, cropped back; large images in overlapping windows.

Evaluation, multi-scale evaluation (main.py), prediction (predict.py) and the benchmark all run models through
`Runner`; training uses the same `Execution` for its autocast and input layout.
"""
import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from errors import UserError
from utils import class_map

AMP_DTYPES = {'off': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}  # --amp
# Rough memory of inference per pixel of its canvas (about 0.5 GB per megapixel, VoVNet-39 in fp32), for refusing
# flags far beyond the machine's memory.
BYTES_PER_PIXEL = 400


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX): without, PyTorch emulates it, several
    times slower than fp32 (docs/benchmarks.md)."""
    with contextlib.suppress(AttributeError, RuntimeError):
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def fast_amp(device: torch.device) -> str:
    """The mixed precision this device runs fastest: bf16 on a CPU with bf16 units or a GPU that has it, fp16 on an
    older GPU, else 'off'."""
    if device.type == 'cuda':
        return 'bf16' if torch.cuda.is_bf16_supported() else 'fp16'
    return 'bf16' if device.type == 'cpu' and cpu_has_bf16() else 'off'


def amp_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `--amp name` on `device` ('auto': `fast_amp`); a UserError where the device cannot run
    it."""
    if name == 'auto':
        name = fast_amp(device)
    amp = AMP_DTYPES[name]
    if amp == torch.float16 and device.type != 'cuda':
        raise UserError('--amp fp16 needs a CUDA GPU (fp16 kernels and a gradient scaler); on the CPU use '
                        '--amp bf16, or --amp off.')
    if amp == torch.bfloat16 and device.type == 'cuda' and not torch.cuda.is_bf16_supported():
        raise UserError('this GPU has no bf16 support; use --amp fp16 or --amp off.')
    return amp


def speed_hint(device: torch.device) -> str | None:
    """One line naming the flags that make an evaluation faster on this device, where it has units for them."""
    amp = fast_amp(device)
    if amp == 'off':
        return None
    units = 'bf16 units' if device.type == 'cpu' else 'a GPU'
    return (f'this machine has {units}: --amp {amp} --channels_last evaluates faster (its mean IoU may differ from '
            f'the fp32 protocol\'s in the last digits)')


@dataclass(frozen=True)
class Execution:
    """Where and how a model runs: the device, the autocast dtype (None: fp32) and the memory format."""
    device: torch.device
    amp: torch.dtype | None = None
    channels_last: bool = False

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.to(self.device, non_blocking=True, memory_format=fmt)

    def prepare(self, model: nn.Module) -> nn.Module:
        """The model on this device, in this memory format (weights stay fp32)."""
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model


def pad(x: torch.Tensor, size: int) -> torch.Tensor:
    """(..., H, W) padded bottom/right with zeros (the mean colour, once normalised) to at least size x size."""
    h, w = x.shape[-2:]
    if h >= size and w >= size:
        return x
    return F.pad(x, (0, max(0, size - w), 0, max(0, size - h)))


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows of `window` every `stride` along `length`, the last one flush with the end."""
    if length <= window:
        return [0]
    n = math.ceil((length - window) / stride) + 1
    return sorted({min(i * stride, length - window) for i in range(n)})


class Runner:
    """A model in inference, run with an `Execution`: the original's evaluation protocol (each image padded
    bottom/right to the crop size, logits cropped back), batches of small images, windows for large ones.

    Args:
        model: returns logits (N, C, H, W) for a normalised batch (N, 3, H, W).
        execution: device, precision and memory format.
        crop: the canvas images are padded to, and the window size.
    """

    def __init__(self, model: nn.Module, execution: Execution, crop: int):
        self.model, self.execution, self.crop = model, execution, crop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output for a batch, under autocast, in the execution's memory format."""
        with self.execution.autocast():
            return self.model(self.execution.input(x))

    def logits(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """fp32 logits of a batch padded to at least the crop on each side, cropped back to `size` (default: the
        batch's own): (N, C, h, w)."""
        h, w = size or x.shape[-2:]
        return self.forward(pad(x, self.crop)).float()[..., :h, :w]

    def class_maps(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Class maps (h, w) of images (3, h, w) of at most crop x crop, predicted together, each on its canvas."""
        canvas = torch.zeros(len(images), 3, self.crop, self.crop)
        for i, image in enumerate(images):
            canvas[i, :, :image.shape[1], :image.shape[2]] = image
        pred = class_map(self.logits(canvas)).cpu()
        return [pred[i, :image.shape[1], :image.shape[2]] for i, image in enumerate(images)]

    def whole(self, image: torch.Tensor) -> torch.Tensor:
        """The class map of one image (3, h, w), predicted in one pass on a canvas of at least the crop."""
        return class_map(self.logits(image[None]))[0].cpu()

    def windows(self, image: torch.Tensor) -> torch.Tensor:
        """The class map of an image larger than the crop, from overlapping crop x crop windows (stride 2/3 of the
        crop) whose softmax probabilities are averaged, one window a pass. Rows are finished band by band: a row
        of windows ends the rows above the next one, so the sums span one band (classes x crop x width), not the
        image."""
        h, w = image.shape[1:]
        padded = pad(image, self.crop)
        ph, pw = padded.shape[1:]
        crop, stride = self.crop, max(1, self.crop * 2 // 3)
        ys, xs = window_starts(ph, crop, stride), window_starts(pw, crop, stride)
        classes = torch.empty(ph, pw, dtype=torch.int64)
        total = count = None  # the band of rows [ys[i], ys[i] + crop)
        for i, y in enumerate(ys):
            for x in xs:
                probs = self.logits(padded[None, :, y:y + crop, x:x + crop]).softmax(1)[0].cpu()
                if total is None:
                    total, count = torch.zeros(probs.shape[0], crop, pw), torch.zeros(1, crop, pw)
                total[:, :, x:x + crop] += probs
                count[:, :, x:x + crop] += 1
            done = (ys[i + 1] - y) if i + 1 < len(ys) else crop  # rows no later window reaches
            classes[y:y + done] = class_map(total[:, :done] / count[:, :done], 0)
            total = torch.cat([total[:, done:], torch.zeros_like(total[:, :done])], 1)
            count = torch.cat([count[:, done:], torch.zeros_like(count[:, :done])], 1)
        return classes[:h, :w]

    def multi_scale_probs(self, image: torch.Tensor, scales: Sequence[float], flip: bool,
                          logits_at_1: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax probabilities (1, C, h, w) of an image (1, 3, h, w) summed over input scales (and flips), at the
        image's size. Each scaled image is padded to the crop size like the single-scale protocol, whose logits
        (`logits_at_1`, cropped to the image) stand in for scale 1 unflipped."""
        image = image.to(self.execution.device)
        h, w = image.shape[-2:]
        total = 0
        for scale in scales:
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            scaled = F.interpolate(image, size=size, mode='bilinear', align_corners=True) if scale != 1 else image
            for flipped in ((False, True) if flip else (False,)):
                if scale == 1 and not flipped and logits_at_1 is not None:
                    total = total + logits_at_1.softmax(1)
                    continue
                logits = self.logits(scaled.flip(-1) if flipped else scaled)
                if flipped:
                    logits = logits.flip(-1)
                logits = F.interpolate(logits, size=(h, w), mode='bilinear', align_corners=True)
                total = total + logits.softmax(1)
        return total
