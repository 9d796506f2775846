"""Speed, memory and energy of the DeepLabV3 models: the columns of the original's table, measured here for its six
backbones and the two eSE-VoVNets.

    python benchmark.py                                   # inference, all backbones, 513x513, batch 1
    python benchmark.py --backbones vovnet39 --configs fp32+cl,bf16+cl,bf16+cl+compile
    python benchmark.py --mode train --crop 321 --batch 4 --backbones vovnet39
    python benchmark.py --backbones vovnet39,resnet50 --model deeplabv3,deeplabv3plus   # with and without decoder

Every backbone is first measured as the original ran it (`original`: eager fp32, NCHW, and in inference mode
with the autograd graph built, as its evaluation did), then in each configuration of `--configs`, under
`torch.inference_mode()`. A configuration joins tokens with `+`: a precision (`fp32`, `bf16`, `fp16` autocast,
or `int8`: post-training static quantization for x86 CPUs through PT2E, calibrated on 4 sample images and always
compiled, quantize.py's, as `--quantize int8` runs it), `cl` (channels-last), `compile` (torch.compile, with
weights frozen) and `fold` (BatchNorm folded into the convolutions). `ov` runs the model in OpenVINO, converted in
memory as `export.py --format openvino` converts it: `ov` in OpenVINO's default precision for the CPU, `ov+fp32`,
`ov+bf16`, or `ov+int8` (NNCF on the 4 images the PyTorch int8 configuration calibrates on). Columns:
median latency in ms after warm-up (CUDA-synchronised), peak memory in MB (CUDA: max allocated; CPU: the
process's peak resident set, each measurement in a fresh process), energy in J/frame from NVML's energy counter
on NVIDIA GPUs, parameters, GFLOPs (2 x multiply-adds), the argmax agreement with fp32, and each figure's ratio
to `original`.

`--mode train` times a training step (forward with autocast, cross entropy, backward, SGD step: PyTorch's
default implementation for `original`, engine.py's fused one for the configurations) at `--crop` and `--batch`;
`compile` there is main.py's `--train --compile` step (engine.CompiledStep: forward and loss compiled with their
backward, CUDA graphs on GPUs).

On CUDA every configuration but `original` runs with `cudnn.benchmark` (as main.py does; the original did not
set it), and "fp32" convolutions use TF32, PyTorch's default on Ampere and later GPUs. CUDA measurements run in
this process one after the other (the peak-memory counter is reset for each, the last model freed first); CPU
measurements each run in a fresh process, since the resident-set peak cannot be reset across models.
"""
import argparse
import gc
import importlib.util
import itertools
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

import checkpoints
import deeplab
import deployed
import engine
import errors
import files
import inference
import pascal
import quantize
import synthetic
import utils
import weights
from errors import UserError

PRECISIONS = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


@dataclass
class Config:
    name: str
    amp: str = 'fp32'
    channels_last: bool = False
    compile: bool = False
    fold: bool = False
    int8: bool = False
    openvino: bool = False  # run by OpenVINO (deployed.py), converted from the model in memory
    exported: bool = False  # --checkpoint is an exported file (.onnx, .xml): measured as it is, in its runtime
    grad: bool = False  # the original's evaluation: autograd graph built

    @classmethod
    def parse(cls, text: str) -> 'Config':
        config = cls(text)
        tokens = text.split('+')
        precisions = [t for t in tokens if t in PRECISIONS or t == 'int8']
        if 'int8' in tokens and 'fold' in tokens:
            raise argparse.ArgumentTypeError(f'configuration {text!r}: int8 folds BatchNorm itself; drop +fold')
        if len(precisions) > 1:
            raise argparse.ArgumentTypeError(f'configuration {text!r} names {len(precisions)} precisions '
                                             f'({", ".join(precisions)}); give one of fp32, bf16, fp16, int8')
        repeated = sorted({t for t in tokens if tokens.count(t) > 1})
        if repeated:
            raise argparse.ArgumentTypeError(f'configuration {text!r} repeats {", ".join(repeated)}')
        if 'ov' in tokens:
            others = sorted(set(tokens) - {'ov', 'fp32', 'bf16', 'int8'})
            if others:
                raise argparse.ArgumentTypeError(f'configuration {text!r}: OpenVINO (ov) takes a precision only '
                                                 f'(ov, ov+fp32, ov+bf16, ov+int8), not {", ".join(others)}')
        for token in tokens:
            if token == 'ov':
                config.openvino = True
                config.amp = 'default'  # OpenVINO's own for this CPU, unless a precision follows
            elif token in PRECISIONS:
                config.amp = token
            elif token == 'cl':
                config.channels_last = True
            elif token == 'compile':
                config.compile = True
            elif token == 'fold':
                config.fold = True
            elif token == 'int8':
                config.int8 = True
            else:
                raise argparse.ArgumentTypeError(f'unknown token {token!r} in configuration {text!r}; use fp32, '
                                                 f'bf16, fp16, int8, cl, compile, fold, ov joined by +')
        if config.openvino and 'fp32' not in tokens and 'bf16' not in tokens:
            config.amp = 'default'
        return config


ORIGINAL = Config('original', grad=True)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--mode', choices=('inference', 'train'), default='inference')
    p.add_argument('--backbones', default=None,
                   help='comma-separated (default: all eight; the original six where timm is not installed)')
    p.add_argument('--model', default=None,
                   help='deeplabv3, deeplabv3plus, or both comma-separated: each backbone is measured with each, in '
                        'one run (default: deeplabv3, or the model of --checkpoint)')
    p.add_argument('--configs', default=None,
                   help='comma-separated configurations (default: fp32,fp32+cl,bf16+cl on CPU; '
                        'fp32,fp32+cl,fp16+cl,bf16+cl on CUDA)')
    p.add_argument('--device', default=None, help='cpu or cuda (default: CUDA when available)')
    p.add_argument('--size', type=errors.number(int, 32), default=None,
                   help='inference input height and width (default 513)')
    p.add_argument('--batch', type=errors.number(int, 1), default=None,
                   help='batch size (default: 1 for inference, 4 for train)')
    p.add_argument('--crop', type=errors.number(int, 64), default=None, help='training crop (default 321)')
    p.add_argument('--warmup', type=errors.number(int, 0), default=3, help='untimed runs first (default 3)')
    p.add_argument('--iters', type=errors.number(int, 1), default=10,
                   help='timed runs; the median is reported (default 10)')
    p.add_argument('--min_time', type=errors.number(float, 0), default=None,
                   help='keep timing past --iters until this many seconds have passed, so that the energy '
                        'counter (updated every few ms) spans many updates (default: 1 on CUDA, 0 on CPU)')
    p.add_argument('--checkpoint', default=None, help='weights to use (one backbone); default: random weights '
                                                       'with BatchNorm statistics calibrated on the sample image')
    p.add_argument('--threads', type=errors.number(int, 1), default=None, help='CPU threads (default: PyTorch\'s)')
    p.add_argument('--no_isolate', action='store_true',
                   help='CPU: measure in this process (the memory peak then spans all measurements)')
    p.add_argument('--json', default=None, metavar='FILE', help='also write the results as JSON')
    return p


# ---------------------------------------------------------------------------------------------------------------


def sample_batch(size: int, batch: int) -> torch.Tensor:
    """Normalised synthetic photos (objects on textured backgrounds) of size x size."""
    rng = np.random.default_rng(0)
    images = []
    for i in range(batch):
        image, _ = synthetic.make_sample(rng, 1 + i % 20, size, size)
        images.append(pascal.ToTensor()(image, image, None)[0])
    return torch.stack(images)


def build(backbone: str, model_name: str, args, x: torch.Tensor) -> deeplab.DeepLabV3:
    """The model on x's device: loaded from --checkpoint, or random weights with BatchNorm statistics of x."""
    if args.checkpoint:
        return weights.model_from_checkpoint(args.checkpoint, backbone, model=model_name).to(x.device).eval()
    torch.manual_seed(0)
    model = deeplab.build_model(backbone, model=model_name).to(x.device)
    with torch.no_grad():  # realistic activation scales: BN statistics of the sample image
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = None
        model.train()
        model(torch.cat([x, x.flip(-1)]))
        model.classifier.bias.copy_(torch.linspace(-0.5, 0.5, model.num_classes))
    return model.eval()


class OpenVINOModel:
    """A model converted to OpenVINO in memory, compiled in the configuration's precision: a batch tensor in,
    logits out, as the PyTorch model (inference.Runner runs it)."""

    def __init__(self, model, config: Config, size: int):
        ir = deployed.to_openvino(model, size, size)
        if config.int8:  # NNCF's defaults, on the calibration images of the PyTorch int8 configuration
            ir = deployed.quantize_openvino(ir, list(sample_batch(size, 4)))
        self.run, self.precision = deployed.compile_openvino(ir, {'fp32': 'f32', 'bf16': 'bf16'}.get(config.amp))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run(x.float().contiguous().numpy()))


def prepare(model, config: Config, device: torch.device, size: int):
    if config.openvino:
        if device.type != 'cpu':
            raise ValueError('OpenVINO configurations run on the CPU')
        return OpenVINOModel(model, config, size)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = config.name != ORIGINAL.name
    if config.int8:  # quantized and compiled: BatchNorm folded, weights frozen (quantize.py)
        if device.type != 'cpu':
            raise ValueError('int8 is a CPU configuration')
        calibration = sample_batch(size, 4)
        return quantize.int8(model, list(calibration))
    if config.fold:
        import torch.fx.experimental.optimization as fx_opt
        model = fx_opt.fuse(model.eval(), inplace=True)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if config.compile:
        from torch._inductor import config as inductor_config
        inductor_config.freezing = not config.grad  # weights as constants: BN folded, weights prepacked
        return torch.compile(model)
    return model


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory over a block: CUDA max allocated, or the process's peak resident set (VmHWM, reset first)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                with open('/proc/self/clear_refs', 'w') as f:
                    f.write('5')
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        if self.device.type == 'cuda':
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        else:
            self.mb = _vm_hwm_mb()
        return False


def _vm_hwm_mb() -> float | None:
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Energy:
    """GPU energy over a block from NVML's total-energy counter (millijoules), where available."""

    def __init__(self, device):
        self.device, self.joules, self.why = device, None, None
        if device.type != 'cuda':
            self.why = 'CPU run (no energy counter)'
            return
        try:
            import pynvml
            pynvml.nvmlInit()
            index = device.index if device.index is not None else torch.cuda.current_device()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.read = lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            self.read()
        except ImportError:
            self.why = 'NVML not installed (pip install nvidia-ml-py)'
        except Exception as e:  # no NVIDIA driver, or a GPU without the counter
            self.why = f'NVML energy counter unavailable ({e})'

    def __enter__(self):
        if self.why is None:
            self.start = self.read()
        return self

    def __exit__(self, *exc):
        if self.why is None:
            self.joules = (self.read() - self.start) / 1000
        return False


def flops(model, x) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 1e9


def warm_up_gpu(device, seconds: float = 2.0) -> None:
    """Keep the GPU busy for a while so that it leaves its idle clocks before the first measurement (an idle GPU
    reads slower: docs/benchmarks.md, "NVIDIA H200")."""
    a = torch.randn(4096, 4096, device=device)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            a = torch.tanh(a @ a)
        _sync(device)


def time_runs(fn, device, args):
    """Run `fn` args.warmup times, then at least args.iters timed times and args.min_time seconds
    (CUDA-synchronised) under the memory and energy meters; returns (warm-up seconds, per-run milliseconds,
    PeakMemory, Energy)."""
    start = time.perf_counter()
    for _ in range(args.warmup):
        fn()
    _sync(device)
    warmup_s = time.perf_counter() - start
    times = []
    with PeakMemory(device) as memory, Energy(device) as energy:
        start = time.perf_counter()
        while len(times) < args.iters or time.perf_counter() - start < args.min_time:
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times.append((time.perf_counter() - t) * 1000)
    return warmup_s, times, memory, energy


def label(backbone: str, model_name: str) -> str:
    """The first column: the backbone, with `/v3plus` for DeepLabV3+."""
    return backbone if model_name == 'deeplabv3' else f'{backbone}/{checkpoints.FILE_TAGS[model_name]}'


def measure_inference(backbone: str, model_name: str, config: Config, args) -> dict:
    device = torch.device(args.device)
    x = sample_batch(args.size, args.batch).to(device)
    if config.exported:
        model, params, gflops = deployed.read(args.checkpoint), None, None
    else:
        model = build(backbone, model_name, args, x)
        params = deeplab.count_parameters(model)
        gflops = flops(model, x) / args.batch if config.name == ORIGINAL.name else None
    runner = inference.Runner(model if config.exported else prepare(model, config, device, args.size),
                              inference.Execution(device, PRECISIONS.get(config.amp), config.channels_last), args.size)
    fmt = torch.channels_last if config.channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    context = torch.enable_grad if config.grad else torch.inference_mode

    def forward():
        with context():
            return runner.forward(x)

    warmup_s, times, memory, energy = time_runs(forward, device, args)
    out = forward()
    pred = utils.class_map(out.float()).to(torch.uint8).cpu().numpy()
    return dict(backbone=backbone, model=model_name, config=config.name, latency_ms=statistics.median(times),
                peak_mb=memory.mb, joules_per_frame=None if energy.joules is None else
                energy.joules / (len(times) * args.batch), energy_note=energy.why, params=params, gflops=gflops,
                warmup_s=warmup_s, pred=pred)


def measure_training(backbone: str, model_name: str, config: Config, args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = config.name != ORIGINAL.name
    model = deeplab.build_model(backbone, model=model_name).to(device).train()
    fmt = torch.channels_last if config.channels_last else torch.contiguous_format
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    execution = inference.Execution(device, PRECISIONS[config.amp], config.channels_last)
    scaler = torch.amp.GradScaler(device.type, enabled=execution.amp == torch.float16)
    if config.name == ORIGINAL.name:  # PyTorch's default implementation
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    else:  # main.py's: fused where PyTorch has the kernel
        optimizer = engine.sgd([{'params': model.parameters()}], lr=1e-3, momentum=engine.MOMENTUM,
                               weight_decay=engine.WEIGHT_DECAY)
    x = sample_batch(args.crop, args.batch).to(device, memory_format=fmt)
    target = torch.randint(0, 21, (args.batch, args.crop, args.crop), device=device)
    criterion = engine.BatchCrossEntropy()
    compiled = engine.CompiledStep(model, criterion, execution) if config.compile else None  # main.py --compile's

    def step():
        if compiled is None:
            engine.train_step(model, criterion, optimizer, scaler, x, target, execution)
        else:
            compiled(optimizer, scaler, x, target)

    warmup_s, times, memory, _ = time_runs(step, device, args)
    ms = statistics.median(times)
    return dict(backbone=backbone, model=model_name, config=config.name, step_ms=ms,
                images_per_s=args.batch / ms * 1000,
                peak_mb=memory.mb, warmup_s=warmup_s)


def _measure_here(fn, backbone, model_name, config, args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return fn(backbone, model_name, config, args)
    except Exception as e:  # reported in the table, the other measurements go on
        if errors.out_of_memory(e):
            sizes = '--size or --batch' if args.mode == 'inference' else '--crop or --batch'
            return dict(backbone=backbone, model=model_name, config=config.name,
                        error=f'out of memory ({errors.first_line(e)}): lower {sizes}')
        return dict(backbone=backbone, model=model_name, config=config.name, error=f'{type(e).__name__}: {e}')


def _child(queue, fn, backbone, model_name, config, args):
    queue.put(_measure_here(fn, backbone, model_name, config, args))


def measure(fn, backbone, model_name, config, args) -> dict:
    # OpenVINO runs in this process: in a child spawned by multiprocessing from this script it ran 5-6x slower
    # (VoVNet-39 at 513: 500 ms against 88 ms here and in a forked child; cause not found), so its peak memory
    # spans this process's.
    if args.no_isolate or args.device.startswith('cuda') or config.openvino or config.exported:
        gc.collect()  # the last measurement's model and activations
        if args.device.startswith('cuda'):
            torch.cuda.empty_cache()
        if config.compile:
            torch._dynamo.reset()  # a fresh compilation per model, not a recompilation of the last one's
        return _measure_here(fn, backbone, model_name, config, args)
    ctx = mp.get_context('spawn')
    queue = ctx.Queue()
    process = ctx.Process(target=_child, args=(queue, fn, backbone, model_name, config, args))
    process.start()
    result = queue.get()
    process.join()
    return result


# ---------------------------------------------------------------------------------------------------------------


def default_backbones() -> tuple[str, ...]:
    """All eight backbones, or the original six where timm, which the eSE-VoVNets need, is not installed."""
    if importlib.util.find_spec('timm') is None:
        print(f'# {", ".join(deeplab.TIMM_BACKBONES)} left out: they need timm (pip install timm)', flush=True)
        return deeplab.ORIGINAL_BACKBONES
    return deeplab.BACKBONES


def check_args(args) -> tuple[torch.device, list[str], list[str], list[Config]]:
    """Check before measuring what can be checked (a bad flag found, or a results file that cannot be written,
    after an hour of measurements would waste them); each failure a message. Returns the device, the backbones,
    the models and the configurations to measure."""
    _, device = utils.init_distributed(args.device)  # main.py's checks of --device
    default = 'fp32,fp32+cl,fp16+cl,bf16+cl' if device.type == 'cuda' else 'fp32,fp32+cl,bf16+cl'
    try:
        configs = [Config.parse(c.strip()) for c in (args.configs or default).split(',') if c.strip()]
    except argparse.ArgumentTypeError as e:
        raise UserError(f'--configs: {e}.') from None
    if not configs:
        raise UserError(f'--configs {args.configs!r} names no configuration; give e.g. fp32+cl,bf16+cl.')
    backbones = [b.strip() for b in (args.backbones or ','.join(default_backbones())).split(',') if b.strip()]
    if not backbones:
        raise UserError(f'--backbones {args.backbones!r} names no backbone; give e.g. vovnet39,resnet50.')
    for b in backbones:
        if b not in deeplab.BACKBONES:
            raise UserError(f'unknown backbone {b!r} in --backbones; choose from {", ".join(deeplab.BACKBONES)}.')
        if b in deeplab.TIMM_BACKBONES:
            errors.require('timm', f'the {b} backbone')
    models = [m.strip() for m in (args.model or 'deeplabv3').split(',') if m.strip()]
    if not models or any(m not in deeplab.MODELS for m in models) or len(set(models)) != len(models):
        raise UserError(f'--model {args.model!r}: give deeplabv3, deeplabv3plus, or both comma-separated.')
    if args.mode == 'train' and args.batch < 2:
        raise UserError('a training step needs --batch 2 or more: BatchNorm normalises the ASPP\'s image-pooling '
                        'branch over the images of the batch.')
    unused = '--crop' if args.mode == 'inference' and args.crop else '--size' if args.mode == 'train' and args.size \
        else None
    if unused:
        raise UserError(f'{unused} does not apply to --mode {args.mode} (--size sets the input of inference, --crop '
                        f'the crop of a training step): drop it, or use the other flag.')
    size, crop = args.size or 513, args.crop or 321
    if args.mode == 'inference':
        errors.refuse_if_huge(inference.BYTES_PER_PIXEL * args.batch * size ** 2, device,
                              f'inference on batches of {args.batch} at {size}x{size}', '--size or --batch')
    else:
        errors.refuse_if_huge(engine.BYTES_PER_PIXEL * args.batch * crop ** 2, device,
                              f'a training step on {args.batch} crops of {crop}x{crop}', '--crop or --batch')
    if any(c.int8 for c in configs):
        if device.type != 'cpu':
            raise UserError('int8 configurations run on the CPU (x86 int8 kernels); add --device cpu.')
        if any(c.int8 and not c.openvino for c in configs):
            quantize.require()
    if any(c.openvino for c in configs):
        if device.type != 'cpu':
            raise UserError('OpenVINO configurations (ov) run on the CPU; add --device cpu.')
        if args.mode == 'train':
            raise UserError('OpenVINO configurations (ov) measure inference; drop them from --configs, or use '
                            '--mode inference.')
        deployed.require_openvino('the OpenVINO configurations (ov)')
        if any(c.openvino and c.int8 for c in configs):
            errors.require('nncf', 'the OpenVINO int8 configuration (ov+int8)')
    if device.type != 'cuda' and any(c.amp == 'fp16' for c in configs):
        raise UserError('fp16 configurations need CUDA; use bf16 on the CPU.')
    if deployed.kind(args.checkpoint):  # an exported file: measured as it is, in its runtime, on the CPU
        net = deployed.read(args.checkpoint, what='--checkpoint')
        if args.configs or args.mode == 'train' or device.type != 'cpu':
            raise UserError(f'{args.checkpoint} is an exported file, measured as it is (inference on the CPU, in '
                            f'its runtime\'s default precision): drop --configs, --mode train and --device cuda, or '
                            f'give the PyTorch checkpoint to compare configurations.')
        if args.backbones and backbones != [net.backbone_name] or args.model and models != [net.name]:
            raise UserError(f'{args.checkpoint} holds a {net.title}-{net.backbone_name}: drop --backbones and '
                            f'--model, or give that one.')
        backbones, models = [net.backbone_name], [net.name]
        configs = [Config(f'{net.runtime} ({net.precision})', exported=True)]
    elif args.checkpoint:
        if len(backbones) != 1 or len(models) != 1:
            raise UserError('--checkpoint needs exactly one backbone in --backbones and one --model.')
        # A message now, not one per row later; without --model, the model the checkpoint holds.
        model = weights.model_from_checkpoint(args.checkpoint, backbones[0], model=args.model and models[0])
        models = [model.name]
    if args.json:
        files.make_output_folder(os.path.dirname(os.path.abspath(args.json)), '--json')
        files.check_name_fits(args.json, '--json')
        files.refuse_overwrite({args.json: '--json'},
                               deployed.inputs_of(args.checkpoint, 'the checkpoint (--checkpoint)'))
        if os.path.isdir(args.json):
            raise UserError(f'--json {args.json} is a folder; give a file name, e.g. {args.json}/results.json.')
    return device, backbones, models, configs


def run(args) -> list[dict]:
    args.device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    args.batch = args.batch or (1 if args.mode == 'inference' else 4)
    device, backbones, models, configs = check_args(args)
    args.size, args.crop = args.size or 513, args.crop or 321
    cuda = device.type == 'cuda'
    if args.min_time is None:
        args.min_time = 1.0 if cuda else 0.0
    device_name = torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine())
    threads = args.threads or torch.get_num_threads()
    if cuda:
        device_name += f' (TF32 convolutions {"on" if torch.backends.cudnn.allow_tf32 else "off"})'
    what = (f'inference {args.size}x{args.size}, batch {args.batch}' if args.mode == 'inference'
            else f'training step, crop {args.crop}, batch {args.batch}')
    print(f'# {what} on {device_name} ({args.device}, {threads} threads), torch {torch.__version__}, '
          f'median of {args.iters} after {args.warmup} warm-up', flush=True)
    fn = measure_inference if args.mode == 'inference' else measure_training
    if cuda:
        warm_up_gpu(device)
    results = []
    key = 'latency_ms' if args.mode == 'inference' else 'step_ms'
    for backbone, model_name in itertools.product(backbones, models):
        base = {}  # the original's row, the reference of the ratios and of argmax agreement
        for config in ([] if configs[0].exported else [ORIGINAL]) + configs:
            row = measure(fn, backbone, model_name, config, args)
            results.append(row)
            if 'error' in row:
                print(f'{label(backbone, model_name):<12} {row["config"]:<22} failed: {row["error"]}', flush=True)
                continue
            if config is ORIGINAL:
                base = row
            if 'pred' in base and 'pred' in row:
                row['argmax_agreement'] = float((row['pred'] == base['pred']).mean() * 100)
            if 'gflops' in row:
                row['gflops'] = row['gflops'] or base.get('gflops')
            if key in base:
                row['time_ratio'] = row[key] / base[key]
            if row.get('peak_mb') and base.get('peak_mb'):
                row['memory_ratio'] = row['peak_mb'] / base['peak_mb']
            print(_row(row, args.mode), flush=True)
    for row in results:
        row.pop('pred', None)
    if all('error' in row for row in results):
        raise UserError(f'no measurement succeeded; the first failed with {results[0]["error"]}.')
    notes = {r.get('energy_note') for r in results if r.get('energy_note')}
    for note in notes:
        print(f'# energy: {note}')
    if args.mode == 'inference' and not args.checkpoint:
        print('# argmax agreement of random weights is pessimistic (their logits are nearly tied); '
              'use --checkpoint for a trained model\'s')
    if args.json:
        text = json.dumps(dict(device=device_name, torch=torch.__version__, threads=threads, mode=args.mode,
                               size=args.size, crop=args.crop, batch=args.batch, results=results,
                               configs=[asdict(c) for c in configs]), indent=1)
        files.atomic_write(args.json, lambda f: f.write(text.encode()), flag='--json',
                           keeps='The results are printed above')
    return results


def _row(r, mode) -> str:
    """One result's line; a figure that was not measured (energy on a CPU, the ratios and agreement of a run
    without the original's row, the parameters of an exported file) is left out rather than shown as a dash."""
    def part(prefix, value, spec, unit, ratio=None):
        if value is None:
            return None
        return f'{prefix}{format(value, spec)}{unit}' + ('' if ratio is None else f' (x{ratio:.2f})')
    if mode == 'inference':
        parts = [part('', r.get('latency_ms'), '9.1f', ' ms', r.get('time_ratio')),
                 part('peak ', r.get('peak_mb'), '7.0f', ' MB', r.get('memory_ratio')),
                 part('', r.get('joules_per_frame'), '6.2f', ' J/frame'),
                 part('', r['params'] and r['params'] / 1e6, '5.1f', ' M params'),
                 part('', r.get('gflops'), '6.1f', ' GFLOPs'),
                 part('argmax agreement ', r.get('argmax_agreement'), '6.2f', '%')]
    else:
        parts = [part('', r['step_ms'], '9.1f', ' ms/step', r.get('time_ratio')),
                 part('', r['images_per_s'], '7.2f', ' img/s'),
                 part('peak ', r.get('peak_mb'), '7.0f', ' MB', r.get('memory_ratio'))]
    shown = '  '.join(p for p in parts if p is not None)
    return f'{label(r["backbone"], r["model"]):<12} {r["config"]:<22} {shown}  (warm-up {r["warmup_s"]:.1f} s)'


def cli(argv=None) -> int:
    return utils.run_command(get_args_parser(), run, argv, 'lower --size, --batch or --crop')


if __name__ == '__main__':
    sys.exit(cli())
