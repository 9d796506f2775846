#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run (about 13 minutes on one H200), most important first:
#   1. the benchmark table of all six backbones: inference 513x513 batch 1, original + fp32/fp16/bf16 rows
#   2. training throughput of all six: crop 513, batch 16 (the published recipe's step)
#   3. the demo on the GPU, for its mean IoU; then the benchmark of its trained VoVNet-39 checkpoint in fp16,
#      bf16 and fp16 + torch.compile, whose argmax agreement with fp32 is meaningful (random weights have
#      near-tied logits)
#   4. torchrun + main.py with --amp fp16 --channels_last; distributed evaluation equals a single process's
#   5. DDP + SyncBatchNorm + NCCL on this GPU at world size 1 (a several-GPU machine is needed for more)
#   6. where the host CPU has bf16 units (AVX-512 BF16 or AMX), VoVNet-39's CPU rows: inference 513
#      (cpu-inference) and the training step at crop 321, batch 4 (cpu-train), fp32 against bf16
#   7. (v3plus) DeepLabV3 against DeepLabV3+ for VoVNet-39 and ResNet-50: inference 513 and the training step
#      at batch 16, crop 513, in fp16 + channels-last (written without a GPU lease: not yet run on one)
#   8. (compiled_train) the compiled training step (forward, loss and backward compiled together, CUDA graphs)
#      of VoVNet-39 at batch 16, crop 513 in bf16 and fp16 + channels-last beside the eager one (target: 25 ms or
#      less), then main.py --train --compile with the real loader on 513-pixel synthetic images, whose sustained
#      images/s is compared with the benchmark's (target: 90 % or more); fp16's fused SGD after a skipped first
#      step against PyTorch's default, and the host synchronisations of 10 eager and compiled steps (target: 0).
#      Written without a GPU lease: not yet run.
# The output goes to OUT/gpu_check.log (and the benchmarks' JSON beside it); a step that fails or runs past its
# time limit is reported and the next one runs. On one H200 the steps took about 2, 8 (1.2 per VoVNet or ResNet,
# 1.5 per DenseNet), 2.5, 1, 0.2 and 4 minutes (3 of them cpu-train, whose compiled step takes 2): on a lease of
# 10 minutes per command, run them as several commands, e.g. STEPS="inference demo torchrun ddp", then
# STEPS=train with BACKBONES=vovnet39,vovnet57,resnet50,resnet101, then the DenseNets with STEPS="train cpu".
#
#     scripts/gpu_check.sh [OUT]                        # OUT defaults to gpu_check/
#     STEPS="inference demo" scripts/gpu_check.sh       # some steps only: inference train demo torchrun ddp
#                                                       # cpu-inference cpu-train (cpu: both) v3plus
#                                                       # compiled_train
#     BACKBONES=densenet161,densenet201 STEPS=train ... # the GPU tables for some backbones only
#     QUICK=1 scripts/gpu_check.sh                      # tiny sizes on the CPU, to try the script itself
set -u
OUT=${1:-${OUT:-gpu_check}}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if [ "${QUICK:-0}" = 1 ]; then
    SIZE=65; CROP=65; BATCH=2; ITERS=2; BACKBONES=vovnet39,resnet50; DEVICE=cpu; CONFIGS=fp32,fp32+cl,bf16+cl
    DEMO_EPOCHS=1; DEMO=(--train_images 16 --val_images 4 --epochs 1 --batch_size 4 --crop_size 65); NPROC=1
    TCONFIGS=fp32+cl; CCONF=fp32+cl,bf16+cl,fp32+cl+compile
else
    SIZE=513; CROP=513; BATCH=16; ITERS=50
    BACKBONES=${BACKBONES:-vovnet39,vovnet57,resnet50,resnet101,densenet161,densenet201}
    DEVICE=cuda; CONFIGS=fp32,fp32+cl,fp16+cl,bf16+cl; DEMO=(--workers 8); NPROC=1
    TCONFIGS=fp32+cl,fp16+cl,bf16+cl; CCONF=fp32+cl,fp16+cl,bf16+cl,fp16+cl+compile
fi

STEPS=${STEPS:-inference train demo torchrun ddp cpu v3plus compiled_train}
STEPS=${STEPS//cpu-/cpu_}; [[ " $STEPS " == *" cpu "* ]] && STEPS="$STEPS cpu_inference cpu_train"
LOG=$OUT/gpu_check.log
want() { [[ " $STEPS " == *" $1 "* ]]; }
step() { { echo; echo "=== $1 ($(date +%T))"; } | tee -a "$LOG"; }
# run NAME SECONDS CMD...: the command's output goes to the terminal and to the log; NAME.out keeps it for grep
run() { local name=$1 limit=$2; shift 2; timeout "$limit" "$@" 2>&1 | tee -a "$LOG" "$WORK/$name.out"
        local rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || echo "!!! $name exited with $rc" | tee -a "$LOG"; return "$rc"; }

step environment
{ nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit,clocks.max.sm --format=csv 2>&1
  grep -m1 'model name' /proc/cpuinfo
  $PY -c 'import torch, torchvision, platform, os
print("torch", torch.__version__, "torchvision", torchvision.__version__, "python", platform.python_version(),
      "cpus", os.cpu_count())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0), "cudnn", torch.backends.cudnn.version(), "bf16", torch.cuda.is_bf16_supported())
try:
    import pynvml; pynvml.nvmlInit(); print("NVML", pynvml.nvmlSystemGetDriverVersion())
except Exception as e:
    print("NVML unavailable:", e)'; } 2>&1 | tee -a "$LOG"

if want inference; then
step "benchmark: inference"
run bench_inference 170 $PY benchmark.py --device $DEVICE --backbones $BACKBONES --size $SIZE --configs $CONFIGS \
    --warmup 5 --iters $ITERS --json "$OUT/bench_inference.json"
fi

if want train; then
step "benchmark: training"
run bench_train 420 $PY benchmark.py --mode train --device $DEVICE --backbones $BACKBONES --crop $CROP \
    --batch $BATCH --configs $TCONFIGS --warmup 2 --iters 8 --min_time 0 --json "$OUT/bench_train.json"
fi

if want v3plus; then
step "DeepLabV3 and DeepLabV3+: inference 513 and the training step at batch 16, crop 513 (VoVNet-39, ResNet-50)"
run v3plus_inference 120 $PY benchmark.py --device $DEVICE --backbones vovnet39,resnet50 --model deeplabv3,deeplabv3plus \
    --size $SIZE --configs fp16+cl --warmup 5 --iters $ITERS --json "$OUT/v3plus_inference.json"
run v3plus_train 240 $PY benchmark.py --mode train --device $DEVICE --backbones vovnet39,resnet50 \
    --model deeplabv3,deeplabv3plus --crop $CROP --batch $BATCH --configs fp16+cl --warmup 2 --iters 8 --min_time 0 \
    --json "$OUT/v3plus_train.json"
fi

if want compiled_train; then
step "compiled training step of VoVNet-39, batch $BATCH, crop $CROP; then main.py --train --compile with the real loader"
TC=fp16+cl,bf16+cl,fp16+cl+compile,bf16+cl+compile; [ "$DEVICE" = cpu ] && TC=fp32+cl,fp32+cl+compile
run compiled_step 300 $PY benchmark.py --mode train --device $DEVICE --backbones vovnet39 --crop $CROP --batch $BATCH \
    --configs $TC --warmup 5 --iters 20 --min_time 0 --json "$OUT/compiled_train.json"
$PY synthetic.py --root "$WORK/synthetic513" --train $((BATCH * 40)) --val 4 --min_size $CROP \
    --max_size $((CROP * 5 / 4)) | tee -a "$LOG"
run step_syncs 150 $PY - "$DEVICE" <<'PY'
# fp16's fused SGD after an overflowing first step against PyTorch's default; host synchronisations per step
import sys, warnings, torch, torch.nn as nn
import engine, inference
device = torch.device(sys.argv[1])
amp = torch.float16 if device.type == 'cuda' else None
weights = []
for make in (engine.sgd, torch.optim.SGD):
    w = nn.Parameter(torch.linspace(-1, 1, 4096, device=device))
    optimizer = make([{'params': [w]}], lr=0.1, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 10)
    for coefficient in (float('inf'), 3.0, 5.0):
        optimizer.zero_grad()
        scaler.scale((w * coefficient).square().sum()).backward()
        scaler.step(optimizer); scaler.update()
    weights.append(w.detach())
print(f'fused SGD after a skipped first step: largest |w| {weights[0].abs().max():.4f} against the default '
      f'{weights[1].abs().max():.4f}, largest difference {(weights[0] - weights[1]).abs().max():.2e}')
net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 21, 1)).to(device)
net = net.to(memory_format=torch.channels_last)
for dtype in (torch.float16, torch.bfloat16) if amp else (None,):
    execution = inference.Execution(device, dtype, True)
    criterion = engine.BatchCrossEntropy()
    optimizer = engine.sgd([{'params': net.parameters()}], lr=0.01, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    for compiled in (False, True):
        step = engine.CompiledStep(net, criterion, execution) if compiled else None
        x, y = torch.randn(8, 3, 129, 129), torch.randint(0, 21, (8, 129, 129))
        if device.type == 'cuda':
            x, y = x.pin_memory(), y.pin_memory()
        def one():
            if step is None:
                return engine.train_step(net, criterion, optimizer, scaler, x, y, execution)
            return step(optimizer, scaler, x, y)
        for _ in range(5):  # compilation, CUDA graph recording
            one()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            if device.type == 'cuda':
                torch.cuda.set_sync_debug_mode('warn')
            for _ in range(10):
                one()
            if device.type == 'cuda':
                torch.cuda.set_sync_debug_mode('default')
        syncs = [str(c.message).splitlines()[0] for c in caught if 'synchroniz' in str(c.message)]
        print(f'{dtype} {"compiled" if compiled else "eager"} step: {len(syncs)} host synchronisations in 10 '
              f'steps', *sorted(set(syncs))[:3], sep='\n  ' if syncs else '')
PY
AMP=bf16; [ "$DEVICE" = cpu ] && AMP=off
run compiled_loader 300 $PY main.py --train --scratch --exp compiled --backbone vovnet39 --epochs 2 --crop_size $CROP \
    --batch_size $BATCH --base_lr 0.007 --seed 0 --print_freq 10 --device $DEVICE --amp $AMP --channels_last --compile \
    --data_root "$WORK/synthetic513" --output_dir "$WORK/compiled"
fi

if want demo; then
step "demo"
run demo 150 $PY demo.py --device $DEVICE --root "$WORK/synthetic" --output_dir "$WORK/demo" "${DEMO[@]}"

step "benchmark: the demo's trained VoVNet-39 (fp16, bf16, compile)"
run bench_checkpoint 150 $PY benchmark.py --device $DEVICE --backbones vovnet39 --size $SIZE --configs $CCONF \
    --checkpoint "$WORK/demo/deeplab_vovnet39_pascal_v3_demo_epoch${DEMO_EPOCHS:-8}.pth" --warmup 5 --iters $ITERS \
    --json "$OUT/bench_checkpoint.json"
fi

if want torchrun; then
[ -f "$WORK/synthetic/VOC2012/list/val.txt" ] || $PY synthetic.py --root "$WORK/synthetic" | tee -a "$LOG"
step "torchrun, fp16 + channels-last, distributed and single evaluation"
AMP=fp16; [ "$DEVICE" = cpu ] && AMP=off
COMMON=(--exp gpu --backbone vovnet39 --epochs 2 --crop_size 129 --data_root "$WORK/synthetic"
        --output_dir "$WORK/run" --device $DEVICE --amp $AMP --channels_last --workers 4)
run torchrun_train 90 $PY -m torch.distributed.run --standalone --nproc_per_node=$NPROC main.py --train --scratch \
    --batch_size 8 --seed 0 --base_lr 0.02 "${COMMON[@]}"
run torchrun_eval 45 $PY -m torch.distributed.run --standalone --nproc_per_node=$NPROC main.py "${COMMON[@]}" \
    --no-save_predictions
run single_eval 45 $PY main.py "${COMMON[@]}" --no-save_predictions
echo "mean IoU: torchrun $(grep -h '^Mean IoU' "$WORK/torchrun_eval.out")  single $(grep -h '^Mean IoU' \
    "$WORK/single_eval.out")" | tee -a "$LOG"
fi

if want ddp; then
step "DDP + SyncBatchNorm + $( [ "$DEVICE" = cuda ] && echo nccl || echo gloo ) at world size 1"
run ddp_syncbn 45 $PY - "$DEVICE" <<'PY'
import os, sys, torch, torch.distributed as dist, torch.nn as nn, torch.nn.functional as F
import deeplab, utils
os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT='29533')
device = torch.device(sys.argv[1])
dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo', rank=0, world_size=1)
torch.manual_seed(0)
model = deeplab.vovnet39().to(device)
if device.type == 'cuda':
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
model = model.to(memory_format=torch.channels_last)
net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index or 0] if device.type == 'cuda' else None)
opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
amp = torch.float16 if device.type == 'cuda' else None  # fp16 + gradient scaler on the GPU, fp32 on the CPU
scaler = torch.amp.GradScaler(device.type, enabled=amp is not None)
x = torch.randn(4, 3, 129, 129, device=device).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 21, (4, 129, 129), device=device)
for step in range(8):  # the scaler skips the first steps while it lowers its scale
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        loss = F.cross_entropy(net(x).float(), y)
    opt.zero_grad(); scaler.scale(loss).backward(); scaler.step(opt); scaler.update()
    print(f'step {step}: loss {loss.item():.4f}, gradient scale {scaler.get_scale() if amp else 1:g}')
confusion = utils.ConfusionMatrix(21, device)
with torch.inference_mode():
    confusion.update(y, net(x).argmax(1))
confusion.reduce_from_all_processes()
print('SyncBatchNorm layers:', sum(isinstance(m, nn.SyncBatchNorm) for m in net.modules()),
      'confusion total', int(confusion.mat.sum()), 'finite loss', bool(torch.isfinite(loss)))
dist.destroy_process_group()
PY
fi

CPU_BF16=$(grep -o -w -E 'avx512_bf16|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')
if want cpu_inference || want cpu_train; then
step "CPU with bf16 units: ${CPU_BF16:-none}"
fi
if [ -n "$CPU_BF16" ] || [ "${QUICK:-0}" = 1 ]; then
    want cpu_inference && run cpu_inference 200 $PY benchmark.py --device cpu --backbones vovnet39 --size $SIZE --iters 10 \
        --configs fp32+cl,bf16+cl,bf16+cl+compile --json "$OUT/cpu_inference.json"
    want cpu_train && run cpu_train 300 $PY benchmark.py --mode train --device cpu --backbones vovnet39 --crop $((CROP < 321 ? CROP : 321)) \
        --batch 4 --configs fp32+cl,bf16+cl,bf16+cl+compile --warmup 2 --iters 5 --json "$OUT/cpu_train.json"
fi

step done
grep -h -E '^(vovnet|resnet|densenet)|^# |demo finished|^mean IoU|^SyncBatchNorm|^!!!|sustained|synchronisations|^fused SGD' "$LOG"
