"""The ML path of DeepLabV3 training and evaluation, as the original's recipe has it: cross entropy ignoring 255,
SGD (momentum 0.9, weight decay 1e-4) with the head at lr x last_mult, the poly schedule set every iteration, one
training step, an epoch, and the evaluation protocol (pad to the crop, argmax, dataset-level IoU).

It raises typed exceptions (`Diverged`, `errors.Stopped`); the scripts turn them, and out-of-memory, into
messages. Reading a loss is a host-device synchronisation, so the losses are read every few steps (`Monitor`).
"""
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from errors import Stopped, UserError
from utils import IGNORE_INDEX, ConfusionMatrix, Pace, class_map, first_non_finite

log = logging.getLogger(__name__)

MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
POLY_POWER = 0.9
# Rough memory of a training step per pixel of its crops (docs/benchmarks.md: 2-4 KB for VoVNet-39 in fp32,
# DenseNets more), for refusing flags far beyond the machine's memory.
BYTES_PER_PIXEL = 2000


class BatchCrossEntropy(nn.Module):
    """Cross entropy ignoring 255, averaged over the labelled pixels of the whole batch as the original's (its
    DataParallel gathered the logits of all GPUs before the loss), also when processes split the batch.

    The mean of each process's own mean would weigh a pixel by how many labelled pixels its process happens to
    have (scale augmentation pads small images with 255). So each process divides its sum by the count over all
    processes, times their number, which DDP's gradient averaging divides out. In one process this is
    `nn.CrossEntropyLoss`'s mean, bit for bit (loss and gradients), except for a batch without a labelled pixel
    (all 255): its mean is 0 / 0, NaN; here it is 0, with zero gradients. `labelled` keeps the last batch's count
    of labelled pixels (over all processes), on the device.
    """

    def __init__(self, world_size: int = 1):
        super().__init__()
        self.world_size = world_size
        self.labelled = torch.zeros((), dtype=torch.int64)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction='sum')
        count = (target != IGNORE_INDEX).sum()  # int64: exact for any batch
        if self.world_size > 1:
            torch.distributed.all_reduce(count)
            total = total * self.world_size
        self.labelled = count
        return total / count.clamp(min=1)


# ---------------------------------------------------------------------------------------------------------------
# Optimizer and schedule


FUSED_DEVICES = ('cpu', 'cuda')


def sgd(groups: list[dict], lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD with PyTorch's fused kernel where it has one (CPU, CUDA): the same update as the original's loop over
    tensors, in one kernel per tensor instead of four. Under fp16's gradient scaler the kernel takes the scale and
    the overflow flag as tensors, so the host never waits for the flag (the loop reads it every step).

    The momentum buffers start at zero, which gives the loop's first update (buffer = gradient, as dampening is
    0): the kernel's own first step allocates them and, when the scaler skips an overflowing first step, leaves
    them uninitialised."""
    groups = [dict(group, params=list(group['params'])) for group in groups]  # parameters() is an iterator
    fused = all(p.device.type in FUSED_DEVICES and p.is_floating_point() for g in groups for p in g['params'])
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused or None)
    zero_momentum(optimizer)
    return optimizer


def zero_momentum(optimizer: torch.optim.SGD) -> None:
    """A zero momentum buffer for every parameter that has none (see `sgd`)."""
    for group in optimizer.param_groups:
        for p in group['params'] if group['momentum'] else []:
            state = optimizer.state[p]
            if state.get('momentum_buffer') is None:
                state['momentum_buffer'] = torch.zeros_like(p, memory_format=torch.preserve_format)


def keep_fused(optimizer: torch.optim.Optimizer) -> None:
    """After `load_state_dict`, which restores each group's flags: a state saved by an unfused optimizer (older
    checkpoints, PyTorch 1.1's released ones) would switch the fused kernel off; keep this run's choice, and its
    zero momentum buffers where the state has none."""
    fused = optimizer.defaults.get('fused')
    for group in optimizer.param_groups:
        group['fused'] = fused
        if fused:
            group['foreach'] = None
    zero_momentum(optimizer)


def frozen_batchnorm(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers --freeze_bn keeps fixed (statistics and affine parameters)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    model.train()
    for m in frozen_batchnorm(model) if freeze_bn else []:
        m.eval()


def make_optimizer(model: nn.Module, base_lr: float, freeze_bn: bool = False) -> torch.optim.SGD:
    """SGD with two parameter groups, as the original: the backbone, and the head (the ASPP, and the decoder of
    DeepLabV3+), which the schedule sets to lr x last_mult."""
    for m in frozen_batchnorm(model) if freeze_bn else []:
        m.weight.requires_grad_(False)
        m.bias.requires_grad_(False)
    head_params = [p for module in model.head() for p in module.parameters()]
    head_ids = {id(p) for p in head_params}
    backbone = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    head = [p for p in head_params if p.requires_grad]
    return sgd([{'params': backbone}, {'params': head}], lr=base_lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def poly_lr(base_lr: float, iteration: int, max_iterations: int, power: float = POLY_POWER) -> float:
    """The original's poly schedule: base_lr * (1 - it / max_it) ** 0.9."""
    return base_lr * (1 - iteration / max_iterations) ** power


@dataclass(frozen=True)
class PolySchedule:
    """The learning rates of the two parameter groups at an iteration: the poly schedule's, and the head's at
    `last_mult` times it."""
    base_lr: float
    max_iterations: int
    last_mult: float = 1.0

    def __call__(self, iteration: int) -> tuple[float, float]:
        lr = poly_lr(self.base_lr, iteration, self.max_iterations)
        return lr, lr * self.last_mult


# ---------------------------------------------------------------------------------------------------------------
# Training


class Diverged(Exception):
    """The loss of a step was not finite: `iteration` of the run, its value, and its batch's labelled pixels."""

    def __init__(self, iteration: int, loss: float, labelled: int):
        super().__init__(f'loss {loss} at iteration {iteration}')
        self.iteration, self.loss, self.labelled = iteration, loss, labelled


class Monitor:
    """What the training loop watches: the losses, kept on the device and read every `every` steps (each read is
    a host-device synchronisation) and before anything is saved; and stop requests, which all processes agree on
    when they read (one process alone acts on its own at once).

    `read` passes each step's (iteration, lr, loss) to `log`, raises Diverged at the first loss that is not
    finite, and, with `stops`, `errors.Stopped` when any process was asked to stop.
    """

    def __init__(self, stop, log, every: int = 1, world_size: int = 1):
        self.stop, self.log, self.every, self.world_size = stop, log, every, world_size
        self.pending = []  # (iteration, lr, loss on the device, labelled pixels on the device)

    def step(self, iteration: int, lr: float, loss: torch.Tensor, labelled: torch.Tensor) -> None:
        self.pending.append((iteration, lr, loss, labelled))
        if iteration % self.every == 0 or (self.world_size == 1 and self.stop.requested):
            self.read()

    def read(self, stops: bool = True) -> None:
        if not self.pending:
            return
        losses = torch.stack([loss.float() for _, _, loss, _ in self.pending])
        stop = torch.tensor([float(self.stop.requested)], device=losses.device)
        values = torch.cat([losses, stop])
        if self.world_size > 1:
            torch.distributed.all_reduce(values)
        *losses, stop_requests = values.tolist()  # note: the host waits for the device here
        pending, self.pending = self.pending, []
        for (iteration, lr, _, labelled), loss in zip(pending, losses):
            loss /= self.world_size
            if not math.isfinite(loss):
                raise Diverged(iteration, loss, int(labelled))
            self.log(iteration, lr, loss)
        if stops and stop_requests > 0:
            raise Stopped()


def train_step(net: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               images: torch.Tensor, masks: torch.Tensor, execution) -> torch.Tensor:
    """One SGD step on a batch: forward under autocast, the loss in fp32 on the upsampled logits, backward and
    step through the gradient scaler (fp16; a no-op otherwise). Returns the loss, still on the device."""
    with execution.autocast():
        logits = net(execution.input(images))
    loss = criterion(logits.float(), masks.to(execution.device, non_blocking=True))
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


class CompiledStep:
    """`train_step` with the forward pass and the loss compiled as one graph, which AOTAutograd differentiates into
    one forward and one backward graph (torch.compile of the model alone would leave the loss and its gradient
    outside). On CUDA the graphs are replayed as CUDA graphs (mode "reduce-overhead"): crops and batches have fixed
    shapes, so each step launches two graphs instead of a thousand kernels. The optimizer's step stays PyTorch's
    (fused SGD), outside the graphs, as the learning rate changes every step.

    Under DistributedDataParallel (torchrun) the graphs are compiled without CUDA graphs: DDP rewrites the
    BatchNorm buffers before each forward pass, a mutation CUDA graphs skip or slow down
    (pytorch/pytorch#139207).

    Called like `train_step`, without the net and criterion it was built with. A CUDA graph's outputs are
    overwritten by its next replay: the loss and the labelled-pixel count, kept over several steps by `Monitor`,
    are copied out.
    """

    def __init__(self, net: nn.Module, criterion: nn.Module, execution):
        self.criterion, self.execution = criterion, execution
        distributed = isinstance(net, nn.parallel.DistributedDataParallel)
        self.cuda_graphs = execution.device.type == 'cuda' and not distributed

        def loss_of(images, masks):
            with execution.autocast():
                logits = net(images)
            return criterion(logits.float(), masks), criterion.labelled

        self.loss_of = torch.compile(loss_of, mode='reduce-overhead' if self.cuda_graphs else None)

    def __call__(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, images: torch.Tensor,
                 masks: torch.Tensor) -> torch.Tensor:
        # The last step's gradients live in the graphs' memory, which this replay reuses: drop them first.
        optimizer.zero_grad(set_to_none=True)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss, labelled = self.loss_of(self.execution.input(images),
                                      masks.to(self.execution.device, non_blocking=True))
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        self.criterion.labelled = labelled.clone()
        return loss.detach().clone()


def train_one_epoch(net: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, batches, execution, schedule: PolySchedule, state,
                    monitor: Monitor, step: CompiledStep | None = None) -> None:
    """Train on `batches`, the rest of an epoch, from the run's iteration `state.iteration`, which counts the
    completed steps (a checkpoint saved at any moment resumes from it). Each step is `train_step`, or `step` (a
    CompiledStep of the same net and criterion)."""
    for images, masks, _ in batches:
        for group, lr in zip(optimizer.param_groups, schedule(state.iteration)):
            group['lr'] = lr
        if step is None:
            loss = train_step(net, criterion, optimizer, scaler, images, masks, execution)
        else:
            loss = step(optimizer, scaler, images, masks)
        state.iteration += 1
        monitor.step(state.iteration, optimizer.param_groups[0]['lr'], loss, criterion.labelled)
    monitor.read()  # the epoch's last losses, before its checkpoint is written


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class MultiScale:
    """Multi-scale and/or flip evaluation beside the protocol's single scale."""
    scales: list[float]
    flip: bool = False


@torch.inference_mode()
def evaluate(runner, batches, num_classes: int, save=None, multi_scale: MultiScale | None = None, stop=None):
    """The original's protocol, one image a batch: the image padded bottom/right to the crop size, argmax, cropped
    back to the image; IoU accumulated over the dataset, then summed over all processes (each sees its share).
    With `multi_scale`, its prediction is scored beside it. `save(index, prediction, multi_scale)` receives each
    class map. Returns (ConfusionMatrix, ConfusionMatrix or None); a stop requested ends it with Stopped."""
    runner.model.eval()
    device = runner.execution.device
    confusion = ConfusionMatrix(num_classes, device)
    confusion_ms = ConfusionMatrix(num_classes, device) if multi_scale else None
    pace = Pace(len(batches))
    for image, mask, info in batches:
        if stop is not None and stop.requested:
            raise Stopped()
        index, (h, w) = int(info['index']), (int(info['size'][0]), int(info['size'][1]))
        target = mask[0, :h, :w].to(device, non_blocking=True)
        logits = runner.logits(image, (h, w))  # (1, C, h, w)
        pred = class_map(logits[0], 0)
        confusion.update(target, pred)
        if save:
            save(index, pred, False)
        if multi_scale:
            probs = runner.multi_scale_probs(image[..., :h, :w], multi_scale.scales, multi_scale.flip, logits)
            pred = class_map(probs[0], 0)
            confusion_ms.update(target, pred)
            if save:
                save(index, pred, True)
        if pace.step():
            log.info('evaluating  image %d/%d  %s  eta %s', pace.done, pace.total, pace.rate(), pace.eta())
    confusion.reduce_from_all_processes()
    if confusion_ms is not None:
        confusion_ms.reduce_from_all_processes()
    return confusion, confusion_ms


def validate(runner, batches, num_classes: int, stop=None) -> float:
    """Validation during training: the protocol's mean IoU (percent) of the model as it is now."""
    confusion, _ = evaluate(runner, batches, num_classes, stop=stop)
    return confusion.mean_iou()


def restore_optimizer(optimizer, scaler, checkpoint: dict, path: str) -> None:
    if checkpoint.get('optimizer') is None:
        log.warning('%s holds no optimizer state; momentum starts from zero', path)
        return
    momentum = {f'{name} of parameter {index}': value
                for index, state in (checkpoint['optimizer'].get('state') or {}).items()
                for name, value in state.items() if isinstance(value, torch.Tensor)}
    bad = first_non_finite(momentum)
    if bad is not None:
        raise UserError(f'{path} has non-finite values (NaN or infinity) in its optimizer state ({bad}): it was '
                        f'written by a run that diverged, or is damaged. Resume from an earlier checkpoint.')
    try:
        optimizer.load_state_dict(checkpoint['optimizer'])
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(f'the optimizer state in {path} does not fit this run ({e}); it was trained with other '
                        f'options (e.g. --freeze_bn). Resume with the same flags.') from None
    keep_fused(optimizer)
    if checkpoint.get('scaler') and scaler.is_enabled():
        scaler.load_state_dict(checkpoint['scaler'])
