"""int8 inference on x86 CPUs: post-training static quantization through PyTorch 2 export (PT2E) with torchao's
X86InductorQuantizer (per-channel int8 weights, per-tensor uint8 activations), calibrated on a few images, then
compiled by Inductor, which runs the quantized convolutions in oneDNN.

    model = quantize.int8(model, calibration_images)   # images: (3, crop, crop) tensors, normalised
    runner = inference.Runner(model, inference.Execution(torch.device('cpu')), crop)

main.py's evaluation and predict.py take `--quantize int8`, benchmark.py's `int8` configuration is this, and
export.py has its ONNX counterpart (ONNX Runtime's own static quantization, calibrated the same way).

Two things of the models need care, each handled at export, never in the models themselves:

- A module called more than once (the ASPP's `relu`, the ReLU of torchvision's Bottleneck) is one partition
  for the quantizer, which then refuses the conv-ReLU pattern ("Input partition has more than one output node").
  The exporter already tells the calls apart (`aspp.relu`, `aspp.relu@1`, ...): each call becomes its own.
- Inductor's int8 max pooling ignores `ceil_mode` (VoVNet's pools: a 66-pixel map pools to 32 instead of 33), so
  those pools stay in fp32, between a dequantize and a quantize.
"""
import contextlib
import logging
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import errors
import pascal
from errors import UserError

log = logging.getLogger(__name__)

DEFAULT_CALIBRATION = 32  # images
DEFAULT_SEED = 0  # which images calibrate, where the run gives no --seed


# Notices these libraries log on the way that say nothing about the run (an Enum registration torchao makes at
# import, "No CUDA runtime is found" when Inductor builds its CPU kernels).
QUIET = ('torch.utils._pytree', 'torch.utils.cpp_extension')


@contextlib.contextmanager
def quiet():
    levels = {name: logging.getLogger(name).level for name in QUIET}
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def require() -> None:
    """torchao, or the one-line message naming its pip install."""
    with quiet():
        errors.require('torchao', 'int8 quantization (--quantize int8)')


def check_device(device: torch.device) -> None:
    if device.type != 'cpu':
        raise UserError(f'--quantize int8 runs on the CPU (x86 int8 kernels), not on {device}: add --device cpu, or '
                        f'use --amp on the GPU.')


def pick(count: int, available: int, seed: int) -> list[int]:
    """`count` indices of `available` images, drawn with `seed` (all of them, in order, when there are fewer)."""
    if available <= count:
        return list(range(available))
    return sorted(torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:count].tolist())


def canvas(image: torch.Tensor, height: int, width: int | None = None) -> torch.Tensor:
    """An image (3, h, w) as the model sees it in evaluation and prediction: padded bottom/right to the crop size
    (height x width, default square), and cut to it where larger (the window at its top left)."""
    width = width or height
    h, w = image.shape[-2:]
    padded = torch.nn.functional.pad(image, (0, max(0, width - w), 0, max(0, height - h)))
    return padded[:, :height, :width]


def load_calibration(paths: Sequence[str], count: int, height: int, width: int,
                     flag: str = '--calibration_input') -> list[torch.Tensor]:
    """`count` of the images at `paths` (the same ones every run), normalised, on height x width canvases. Files
    that cannot be read are left out, each named in a warning; when none can be, a UserError names `flag` (the
    option that gave them) and the files."""
    images, unreadable = [], []
    for i in pick(count, len(paths), DEFAULT_SEED):
        try:
            photo = pascal.load_image(paths[i], exif=True)
        except UserError as e:
            unreadable.append(e.for_user().rstrip('.'))
            continue
        images.append(canvas(pascal.ToTensor()(photo, photo, None)[0], height, width))
    for reason in unreadable if images else ():
        log.warning('int8 calibration skips an image: %s', reason)
    if not images:
        shown = '; '.join(unreadable[:3]) + ('; ...' if len(unreadable) > 3 else '')
        raise UserError(f'none of the {len(unreadable)} images of {flag} that would calibrate int8 quantization '
                        f'could be read ({shown}): give images that open (JPEG, PNG, ...).')
    return images


def _one_partition_per_call(graph_module: torch.fx.GraphModule) -> None:
    """Give each call of a module called several times its own name in the nodes' module stacks, where the
    quantizer groups nodes into partitions (the exporter's keys already number the calls: `aspp.relu@2`)."""
    for node in graph_module.graph.nodes:
        stack = node.meta.get('nn_module_stack')
        if not stack:
            continue
        key, (name, cls) = list(stack.items())[-1]
        if '@' in key:
            stack[key] = (f'{name}@{key.rsplit("@", 1)[1]}', cls)


def quantizer_for(model: nn.Module):
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    for name, module in model.named_modules():
        if isinstance(module, nn.MaxPool2d) and module.ceil_mode:  # Inductor's int8 pool ignores ceil_mode
            quantizer.set_module_name_qconfig(name, None)
    return quantizer


class Int8Model(nn.Module):
    """The quantized, compiled model: called like the fp32 one, in inference only.

    Each input shape is a compilation of its own (tens of seconds; PyTorch's dynamic shapes recompile here for
    most new sizes too, on guards of the pooling and convolution sizes). Inputs up to the calibration canvas (the
    protocol's canvas: evaluation's and prediction's crop, one compilation) run compiled. A larger input runs at its
    own size through the same quantized graph uncompiled (int8 arithmetic simulated in fp32 kernels: the same
    scales, fp32's speed): padding it further to a compiled shape would change its logits everywhere, since the
    ASPP's image-level branch averages the whole canvas (on the demo, padding to a 128-pixel grid cost 2.7 points
    of mean IoU that int8 itself does not). `uncompiled` counts those calls; a --crop_size that covers the images
    runs them all compiled.
    """

    def __init__(self, compiled, reference, source: nn.Module, seconds: float, images: int,
                 canvas: tuple[int, int]):
        super().__init__()
        self.compiled, self.reference, self.quantize_seconds = compiled, reference, seconds
        self.images, self.canvas, self.uncompiled = images, canvas, 0
        self.name, self.output_stride = getattr(source, 'name', None), getattr(source, 'output_stride', None)

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError('an int8 model is for inference only')
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In inference mode, on an inference tensor, whatever the caller's mode and tensor: grad mode and a tensor's
        # dispatch keys are part of what a compilation fits, and a tensor made outside inference mode (a caller's
        # own, under no_grad) would otherwise be one more compilation than warm_up's. Contiguous: a window is a
        # strided slice of its padded image, whose strides (the image's width) would be one more per image size.
        with torch.inference_mode():
            x = x.contiguous()
            if not x.is_inference():
                x = x.clone()
            if all(n <= c for n, c in zip(x.shape[-2:], self.canvas)):
                return self.compiled(x)
            self.uncompiled += 1
            return self.reference(x)


class _Logits(nn.Module):
    """A DeepLab model's logits before their upsampling, which runs faster outside the compiled graph (PyTorch's
    eager kernel: 5 ms at 513x513 on two Zen 4 cores, Inductor's 9 ms)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_logits(x)


def int8(model: nn.Module, calibration: Sequence[torch.Tensor]) -> Int8Model:
    """`model` (fp32, eval) quantized to int8 after observing `calibration` (images (3, H, W) or batches
    (N, 3, H, W), all of one size: the canvas), and compiled with its weights frozen. Any batch size, height and
    width runs (exported with dynamic shapes); each compiles on its first call (Int8Model)."""
    require()
    from torch._inductor import config as inductor_config
    from torch.export import Dim
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    if not calibration:
        raise UserError('int8 quantization needs at least one calibration image.')
    batches = [image if image.dim() == 4 else image[None] for image in calibration]
    start = time.perf_counter()
    model = model.eval().cpu()
    upsamples = hasattr(model, 'forward_logits')  # DeepLab models; any other network is quantized whole
    net = _Logits(model) if upsamples else model
    example = torch.cat([batches[0], batches[0]])  # batch 2: a batch of 1 would be exported for 1 only
    dynamic = ({0: Dim('batch', min=1), 2: Dim.AUTO, 3: Dim.AUTO},)
    with torch.no_grad():
        exported = torch.export.export(net, (example,), dynamic_shapes=dynamic).module()
        _one_partition_per_call(exported)
        prepared = prepare_pt2e(exported, quantizer_for(net))
        for batch in batches:
            prepared(batch.float())
        converted = convert_pt2e(prepared)
    seconds = time.perf_counter() - start

    def upsampled(logits, x):
        if not upsamples:
            return logits
        return F.interpolate(logits, size=x.shape[-2:], mode='bilinear', align_corners=True)

    @torch.no_grad()
    def run(x):
        # Weights as constants (prepacked for oneDNN) and a C++ wrapper (less Python per call) for this model only:
        # Inductor reads the flags when it compiles.
        with inductor_config.patch(freezing=True, cpp_wrapper=True), quiet():
            return upsampled(compiled(x), x)

    @torch.no_grad()
    def reference(x):
        return upsampled(converted(x), x)

    compiled = torch.compile(converted, dynamic=False)
    return Int8Model(run, reference, model, seconds, len(calibration), tuple(batches[0].shape[-2:]))


def warm_up(model: Int8Model, shape: tuple[int, ...]) -> float:
    """Compile for inputs of `shape` now (seconds taken), so that the time is reported apart from the run's."""
    start = time.perf_counter()
    with torch.inference_mode():  # as evaluation and prediction run: grad mode is part of what a compilation fits
        model(torch.zeros(shape))
    return time.perf_counter() - start
