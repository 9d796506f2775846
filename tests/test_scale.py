"""torchrun/DDP on CPU (gloo), mixed precision, channels-last, the fused optimizer, and the benchmark's smoke test."""
import contextlib
import copy
import functools
import io
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import initial_model

import engine
import main
import pascal
import runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, 'main.py')
COMMON = ['--exp', 'ddp', '--backbone', 'vovnet39', '--epochs', '1', '--crop_size', '65', '--workers', '0']


def torchrun(nproc, args, cwd, script=MAIN):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                           f'--nproc_per_node={nproc}', script] + [str(a) for a in args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@contextlib.contextmanager
def one_thread():
    """This process's PyTorch on one thread for a while, as torchrun's workers run here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_torchrun_two_processes_train_and_evaluate_like_one(synthetic_root, tmp_path, monkeypatch, run_cli):
    """DeepLabV3+, whose decoder DDP must find in the gradient too (moved here from test_decoder, whose own torchrun
    training it was): DDP fails on a parameter left out of the loss."""
    common = [*COMMON, '--model', 'deeplabv3plus']
    name = 'deeplab_vovnet39_pascal_v3plus_ddp_epoch1.pth'
    train = torchrun(2, ['--train', '--scratch', '--batch_size', '4', '--seed', '0', '--data_root', synthetic_root]
                     + common, tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    assert '(2 per process x 2)' in train.stdout
    assert train.stdout.count(f'saved data/{name}') == 1  # rank 0 only
    assert sorted(os.listdir(tmp_path / 'data')) == [name, 'logs']
    checkpoint = torch.load(tmp_path / 'data' / name, weights_only=True)
    assert not any(k.startswith('module.') for k in checkpoint['state_dict'])
    assert not any('SyncBatchNorm' in type(v).__name__ for v in checkpoint['state_dict'].values())
    model = initial_model(model='deeplabv3plus')
    model.load_state_dict(checkpoint['state_dict'])  # a plain model, strict
    assert int(checkpoint['state_dict']['decoder.project.1.num_batches_tracked']) == 2  # 2 steps, each process's

    evaluation = torchrun(2, common + ['--data_root', synthetic_root, '--no-save_predictions'], tmp_path)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    # its progress printed once, from rank 0 (moved here from test_inference, whose own torchrun evaluation it was)
    assert re.findall(r'^evaluating  image (\d+)/2 ', evaluation.stdout, re.M) == ['1', '2']  # rank 0's share
    assert 'evaluating  image' not in evaluation.stderr
    distributed = re.findall(r'^Mean IoU: (\d+\.\d\d)$', evaluation.stdout, re.M)
    monkeypatch.chdir(tmp_path)
    status, out, err = run_cli(*common, '--data_root', synthetic_root)
    single = re.findall(r'^Mean IoU: (\d+\.\d\d)$', out, re.M)
    assert status == 0, err
    assert distributed == single and len(single) == 1  # printed once, by rank 0
    per_class = re.findall(r'^IoU .*$', out, re.M)
    assert per_class == re.findall(r'^IoU .*$', evaluation.stdout, re.M)


@pytest.mark.slow
def test_two_processes_compute_the_loss_and_update_of_one_over_the_whole_batch(synthetic_root, tmp_path,
                                                                               monkeypatch, run_cli):
    # GroupNorm everywhere (ResNet --groups), so that nothing but the loss depends on how the batch is split:
    # then 2 processes x 2 images must train as 1 x 4 (main.py without torchrun, in this process). Averaging each
    # process's own mean loss instead weighs pixels by how many labelled pixels their process has (rel. difference
    # 3e-4 here, against 5e-9 now). Both runs use one thread per process (torchrun's workers here do): the thread
    # count alone changes the weights by 1e-6 on some CPUs and 3e-5 on others (AMD EPYC Zen 5: 1 vs 2 threads).
    args = ['--train', '--scratch', '--exp', 'split', '--backbone', 'resnet50', '--groups', '32', '--epochs', '1',
            '--crop_size', '65', '--workers', '0', '--batch_size', '4', '--seed', '0', '--base_lr', '0.007',
            '--print_freq', '1', '--data_root', synthetic_root]
    runs = {}
    for nproc in (1, 2):
        folder = tmp_path / str(nproc)
        folder.mkdir()
        if nproc == 1:
            monkeypatch.chdir(folder)
            with one_thread():
                status, _, err = run_cli(*args)
            assert status == 0, err
        else:
            result = torchrun(nproc, args, folder)
            assert result.returncode == 0, result.stderr[-3000:]
        weights = torch.load(folder / 'data' / 'deeplab_resnet50_pascal_v3_split_epoch1.pth',
                             weights_only=True)['state_dict']
        lines = (folder / 'data' / 'logs' / 'deeplab_resnet50_pascal_v3_split' / 'metrics.jsonl').read_text()
        runs[nproc] = weights, [json.loads(line)['loss'] for line in lines.splitlines()]
    (one, one_losses), (two, two_losses) = runs[1], runs[2]
    assert len(one_losses) == len(two_losses) == 2
    assert two_losses == pytest.approx(one_losses, rel=1e-5)
    difference = sum(((one[k] - two[k]).double() ** 2).sum() for k in one) ** 0.5
    assert difference / sum((one[k].double() ** 2).sum() for k in one) ** 0.5 < 2e-5


@pytest.mark.slow
def test_without_seed_every_process_shards_the_same_random_permutation(tmp_path):
    # Each process drawing its own seed would shuffle the training set its own way: their shards would overlap
    # and miss images. The seed main.py draws is rank 0's on every process, and so is the permutation.
    script = tmp_path / 'seeds.py'
    script.write_text('import json, pascal, runs, utils\n'
                      'info, _ = utils.init_distributed("cpu")\n'
                      'seed = runs.initial_seed(None)\n'
                      'shard = list(pascal.TrainSampler(11, 1, seed, info.rank, info.world_size))\n'
                      'with open(f"rank{info.rank}.json", "w") as f:\n'
                      '    json.dump({"seed": seed, "shard": shard}, f)\n'
                      'utils.cleanup_distributed()\n')
    result = torchrun(2, [], tmp_path, script=str(script))
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in range(2)]
    assert len({r['seed'] for r in ranks}) == 1
    seen = [i for r in ranks for i in r['shard']]
    assert len(seen) == 12 and set(seen) == set(range(11))  # all eleven, padded to 2 x 6 as DistributedSampler does


def test_distributed_evaluation_sees_every_image_exactly_once():
    for size, world in ((4, 2), (5, 2), (7, 3), (1449, 8)):
        seen = sorted(i for r in range(world) for i in pascal.ShardSampler(size, r, world))
        assert seen == list(range(size))


def test_training_sampler_shards_a_global_batch_and_resumes_mid_epoch():
    # 10 images, global batch 4 over 2 processes: 2 per process, 5 images each (one batch of 1 dropped).
    samplers = [pascal.TrainSampler(10, 2, seed=1, rank=r, world_size=2) for r in range(2)]
    assert [s.batches_per_epoch for s in samplers] == [2, 2]
    first = [list(s) for s in samplers]
    assert not set(first[0]) & set(first[1]) and all(len(f) == 4 for f in first)
    samplers[0].set_epoch(0, start_batch=1)
    assert list(samplers[0]) == first[0][2:]
    samplers[0].set_epoch(1)
    assert list(samplers[0]) != first[0]
    single = pascal.TrainSampler(10582, 16, seed=0)
    assert single.batches_per_epoch == 662  # the original's iterations per epoch on train_aug
    # 8 processes x 2: 1323 images each, the last alone in its batch; kept where BatchNorm is synchronised
    eight = [pascal.TrainSampler(10582, 2, seed=0, rank=r, world_size=8, drop_single=False) for r in range(8)]
    assert {s.batches_per_epoch for s in eight} == {662}
    assert set().union(*(list(s) for s in eight)) == set(range(10582))
    assert pascal.TrainSampler(10582, 2, seed=0, rank=0, world_size=8).batches_per_epoch == 661


@pytest.mark.parametrize('backbone, flags, iterations', [('vovnet39', [], '1 iteration'),
                                                         ('vovnet39', ['--freeze_bn'], '2 iterations'),
                                                         ('resnet50', ['--groups', '32'], '2 iterations')])
@pytest.mark.slow
def test_a_last_batch_of_one_image_is_kept_unless_batchnorm_trains_on_it(synthetic_root, tmp_path, monkeypatch,
                                                                          run_cli, backbone, flags, iterations):
    monkeypatch.chdir(tmp_path)
    status, out, err = run_cli('--train', '--scratch', '--exp', 'last', '--backbone', backbone, '--epochs', '1',
                               '--crop_size', '65', '--workers', '0', '--batch_size', '7', '--seed', '0',
                               '--data_root', synthetic_root, *flags)  # 8 images: 7 + 1
    assert status == 0, err
    assert f'1 epoch x {iterations}, batch 7' in out


@pytest.mark.parametrize('flags', [['--amp', 'bf16'], ['--channels_last'], ['--amp', 'bf16', '--channels_last']])
@pytest.mark.slow
def test_bf16_and_channels_last_train_and_evaluate_on_cpu(synthetic_root, tmp_path, monkeypatch, run_cli, flags):
    monkeypatch.chdir(tmp_path)
    status, out, err = run_cli('--train', '--scratch', '--batch_size', '4', '--seed', '0', '--data_root',
                               synthetic_root, '--device', 'cpu', *COMMON, *flags)
    assert status == 0, err
    checkpoint = torch.load('data/deeplab_vovnet39_pascal_v3_ddp_epoch1.pth', weights_only=True)
    assert all(v.dtype != torch.bfloat16 for v in checkpoint['state_dict'].values())  # weights stay fp32
    status, out, err = run_cli(*COMMON, '--data_root', synthetic_root, '--device', 'cpu', *flags)
    assert status == 0 and re.search(r'^Mean IoU: \d+\.\d\d$', out, re.M), err


def _sgd_run(optimizer_class, steps, resume=None):
    """A tiny model after `steps` SGD steps in two groups with the poly schedule's changing lr, optionally resumed
    from `resume` = (model state, optimizer state) as main.py resumes."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 2, 1))
    optimizer = optimizer_class([{'params': model[:2].parameters()}, {'params': model[2].parameters()}],
                                lr=0.01, momentum=0.9, weight_decay=0.01)  # decay large enough to be seen
    if resume is not None:
        model.load_state_dict(resume[0])
        engine.restore_optimizer(optimizer, None, {'optimizer': copy.deepcopy(resume[1])}, 'x.pth')
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        for group, lr in zip(optimizer.param_groups, (0.01, 0.1)):
            group['lr'] = lr * (1 - step / 10) ** 0.9
        optimizer.zero_grad()
        model(torch.randn(2, 3, 9, 9, generator=g)).square().mean().backward()
        optimizer.step()
    return model.state_dict(), optimizer


def test_fused_sgd_updates_as_the_original_loop_and_stays_fused_on_resume():
    fused, opt_fused = _sgd_run(engine.sgd, 5)
    loop, opt_loop = _sgd_run(torch.optim.SGD, 5)  # PyTorch's loop over tensors on the CPU, as the original's
    assert all(g['fused'] for g in opt_fused.param_groups) and not any(g['fused'] for g in opt_loop.param_groups)
    for k in loop:  # the same update; the fused kernel may round the last bit differently (fused multiply-add)
        torch.testing.assert_close(fused[k], loop[k], rtol=1e-6, atol=1e-7)

    # resumed from an unfused optimizer's state (older checkpoints, the released ones): still fused, still the same
    saved = opt_loop.state_dict()
    for group in saved['param_groups']:
        del group['fused'], group['foreach']  # as PyTorch 1.1 saved them
    fused, opt_fused = _sgd_run(engine.sgd, 3, (loop, saved))
    loop, _ = _sgd_run(torch.optim.SGD, 3, (loop, saved))
    assert all(g['fused'] for g in opt_fused.param_groups)
    for k in loop:  # the same update; the fused kernel may round the last bit differently (fused multiply-add)
        torch.testing.assert_close(fused[k], loop[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('overflow', [0, 1])  # 0: the first step, as at the scaler's initial scale in training
def test_sgd_under_the_fp16_gradient_scaler_skips_overflowing_steps_as_the_loop_does(overflow):
    # main.py's --amp fp16 (CUDA) path; the scaler's logic is the same with a CPU scaler. PyTorch's fused kernel
    # skips an overflowing first step without initialising the momentum buffers it allocated, so the next step
    # would add whatever memory they got: engine.sgd's buffers start at zero.

    def run(optimizer_class, **kwargs):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(512))
        optimizer = optimizer_class([{'params': [w]}], lr=0.1, momentum=0.9, weight_decay=0.01, **kwargs)
        scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 10)
        weights = [w.detach().clone()]  # before each step, then after the last
        for step in range(4):
            optimizer.zero_grad()
            coefficients = torch.linspace(1, 5, 512)
            coefficients[-1] = float('inf') if step == overflow else 5
            scaler.scale((w * coefficients).sum()).backward()
            garbage = torch.full_like(w, float('nan'))  # freed memory that an uninitialised buffer may reuse
            del garbage
            scaler.step(optimizer)
            scaler.update()
            weights.append(w.detach().clone())
        return weights, scaler.get_scale()

    scaled, scaled_scale = run(engine.sgd)
    loop, loop_scale = run(torch.optim.SGD)
    assert scaled_scale == loop_scale == 2.0 ** 9
    assert torch.equal(scaled[overflow + 1], scaled[overflow])  # the overflowing step is skipped
    assert not torch.equal(scaled[overflow + 2], scaled[overflow + 1])  # and the next one steps
    for a, b in zip(scaled, loop):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_main_fuses_sgd_also_under_the_fp16_gradient_scaler_which_then_reads_nothing_on_the_host(monkeypatch):
    model = initial_model(num_classes=3)
    for amp in ('off', 'bf16', 'fp16'):
        args = main.get_args_parser().parse_args(['--exp', 'x', '--amp', amp])
        optimizer = engine.make_optimizer(model, args.base_lr, args.freeze_bn)
        assert [g['fused'] for g in optimizer.param_groups] == [True, True]
        assert optimizer._step_supports_amp_scaling  # a scaler hands it the scale and the overflow flag as tensors
        assert all(not optimizer.state[p]['momentum_buffer'].any()
                   for g in optimizer.param_groups for p in g['params'])

    # Steps under the scaler, one of them overflowing, read no tensor on the host (the loop reads the flag with
    # .item(), a host-device synchronisation on a GPU).
    w = torch.nn.Parameter(torch.ones(4))
    optimizer = engine.sgd([{'params': [w]}], lr=0.1, momentum=0.9, weight_decay=0.0)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 10, enabled=runs.scales_gradients(args))
    reads = []
    monkeypatch.setattr(torch.Tensor, 'item', lambda t: reads.append(t) or float('nan'))
    for coefficient in (float('inf'), 1.0):
        optimizer.zero_grad()
        scaler.scale((w * coefficient).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
    monkeypatch.undo()
    assert reads == []
    assert scaler.get_scale() == 2.0 ** 9  # the first step overflowed
    assert torch.allclose(w.detach(), torch.full((4,), 0.9))  # skipped, then one step of lr 0.1 on gradient 1


@pytest.mark.slow
def test_compile_trains_and_evaluates_as_eager(synthetic_root, tmp_path, monkeypatch, run_cli):
    # Inductor's code generation takes a minute and a half on two cores; aot_eager traces the same graphs
    # (dynamo, and AOT autograd for the backward pass) and runs them without generating code.
    import functools
    import json

    from torch._dynamo.backends.registry import lookup_backend
    from torch._inductor import config as inductor_config
    freezing = []  # Inductor's freezing flag at each compilation

    def aot_eager(graph, inputs):
        freezing.append(inductor_config.freezing)
        return lookup_backend('aot_eager')(graph, inputs)
    monkeypatch.setattr(torch, 'compile', functools.partial(torch.compile, backend=aot_eager))
    train = ['--train', '--scratch', '--batch_size', '4', '--seed', '0', '--base_lr', '0.01', '--print_freq', '1',
             '--data_root', synthetic_root, *COMMON]
    losses, keys = {}, {}
    for name, flags in (('eager', []), ('compiled', ['--compile'])):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        status, out, err = run_cli(*train, *flags)
        assert status == 0, err
        with open('data/logs/deeplab_vovnet39_pascal_v3_ddp/metrics.jsonl') as f:
            losses[name] = [json.loads(row)['loss'] for row in f]
        checkpoint = torch.load('data/deeplab_vovnet39_pascal_v3_ddp_epoch1.pth', weights_only=True)
        keys[name] = list(checkpoint['state_dict'])
    # The second loss depends on the first step's update. Weights are not compared: rounding differences grow
    # within a few steps of training from scratch (channels-last alone differs more than aot_eager here).
    assert len(losses['eager']) == 2 and losses['eager'][0] != losses['eager'][1]
    assert losses['compiled'] == pytest.approx(losses['eager'], rel=1e-5)
    assert keys['compiled'] == keys['eager']  # no _orig_mod. prefix
    initial_model().load_state_dict(checkpoint['state_dict'])

    ious = []
    for flags in ([], ['--compile']):
        status, out, err = run_cli(*COMMON, '--data_root', synthetic_root, '--no-save_predictions', *flags)
        assert status == 0, err
        ious.append(re.findall(r'^(?:Mean )?IoU.*$', out, re.M))
    assert ious[0] == ious[1] and len(ious[0]) == 22  # 21 classes and the mean
    # weights frozen as constants for the compiled evaluation only, not while training nor after
    assert freezing[0] is False and freezing[-1] is True and inductor_config.freezing is False


def test_channels_last_and_bf16_logits_agree_with_fp32():
    model = initial_model().eval()
    x = torch.randn(1, 3, 65, 65)
    with torch.inference_mode():
        ref = model(x)
        cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
        with torch.autocast('cpu', dtype=torch.bfloat16):
            bf = model(x).float()
    assert torch.allclose(cl, ref, atol=1e-4 * ref.abs().max())
    assert (bf.argmax(1) == ref.argmax(1)).float().mean() > 0.9


@pytest.mark.slow
def test_benchmark_smoke(tmp_path, run_cli):
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmark.py'), '--backbones', 'vovnet39',
                             '--device', 'cpu', '--size', '65', '--warmup', '1', '--iters', '2', '--configs',
                             'fp32+cl,bf16+cl+fold', '--json', tmp_path / 'b.json'],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith('vovnet39')]
    assert [r.split()[1] for r in rows] == ['original', 'fp32+cl', 'bf16+cl+fold']
    assert all('ms' in r and 'MB' in r and 'GFLOPs' in r for r in rows)
    import json
    data = json.load(open(tmp_path / 'b.json'))
    assert data['results'][0]['time_ratio'] == 1.0 and data['results'][1]['argmax_agreement'] > 99
    # the training benchmark in this process: the command ran as a fresh process above
    status, out, err = run_cli('--mode', 'train', '--backbones', 'vovnet39', '--device', 'cpu', '--crop', '65',
                               '--batch', '2', '--warmup', '1', '--iters', '1', '--configs', 'fp32+cl', '--no_isolate',
                               module='benchmark')
    assert status == 0, err[-3000:]
    assert re.search(r'vovnet39\s+fp32\+cl\s+[\d.]+ ms/step \(x[\d.]+\)\s+[\d.]+ img/s', out)


@functools.cache
def vovnet39_checkpoint() -> bytes:
    """A VoVNet-39 checkpoint's bytes, made once for the benchmark's refusals."""
    buffer = io.BytesIO()
    torch.save({'state_dict': initial_model().state_dict()}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize('flags,message', [
    (['--configs', 'fp32,fp33'], "--configs: unknown token 'fp33'"),
    (['--device', 'tpu'], '--device tpu is not a device'),
    (['--backbones', 'resnet50', '--checkpoint', 'vov.pth'], 'holds a DeepLabV3-vovnet39 with 21 classes, not a '
                                                             'resnet50'),
    (['--backbones', 'vovnet39', '--checkpoint', 'absent.pth'], 'checkpoint absent.pth does not exist'),
    (['--json', 'a_file/out.json'], 'cannot write to the output folder'),
    (['--mode', 'train', '--batch', '1'], 'a training step needs --batch 2 or more'),
])
@pytest.mark.slow
def test_benchmark_refuses_what_would_fail_before_measuring_anything(flags, message, tmp_path, monkeypatch, run_cli):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'a_file').write_text('')
    with open('vov.pth', 'wb') as f:
        f.write(vovnet39_checkpoint())
    status, out, err = run_cli('--device', 'cpu', '--size', '65', '--iters', '1', '--backbones', 'vovnet39', *flags,
                               module='benchmark')
    assert status == 1 and message in err and 'Traceback' not in err, err
    assert 'ms' not in out  # not a row measured
