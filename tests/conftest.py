import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

torch.set_num_threads(2)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights and running statistics everywhere, as a trained checkpoint would have. The ASPP's
    running variances are small, so that its BN eps (0.0003 vs 1e-5) visibly changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.modules.batchnorm._NormBase):
                small = name.startswith('aspp')
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                lo, hi = (1e-4, 2e-3) if small else (0.5, 1.5)
                m.running_var.copy_(lo + (hi - lo) * torch.rand(m.running_var.shape, generator=g))
                m.num_batches_tracked.fill_(int(torch.randint(1, 10**5, (1,), generator=g)))
            elif isinstance(m, torch.nn.Conv2d) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model


@pytest.fixture
def released_checkpoint(tmp_path):
    """Write a checkpoint in the released format: {'epoch', 'state_dict' with `module.`, 'optimizer'}."""
    def write(model, name='released.pth', epoch=50):
        state = {f'module.{k}': v.clone() for k, v in model.state_dict().items()}
        optimizer = torch.optim.SGD([{'params': [p for n, p in model.named_parameters() if not n.startswith('aspp')]},
                                     {'params': list(model.aspp.parameters())}], lr=0.007, momentum=0.9)
        path = tmp_path / name
        torch.save({'epoch': epoch, 'state_dict': state, 'optimizer': optimizer.state_dict()}, path)
        return path
    return write


@pytest.fixture(scope='session')
def synthetic_root(tmp_path_factory):
    """A tiny synthetic dataset in the VOC layout (8 training, 4 validation images of 40-64 pixels), written
    once per session; tests that corrupt it work on a copy (`voc_copy`)."""
    import synthetic
    root = tmp_path_factory.mktemp('synthetic')
    synthetic.generate(str(root), num_train=8, num_val=4, seed=0, min_size=40, max_size=64)
    return root


@pytest.fixture
def voc_copy(synthetic_root, tmp_path):
    import shutil
    root = tmp_path / 'voc'
    shutil.copytree(synthetic_root, root)
    return root


@pytest.fixture
def run_cli(capsys):
    """Run main.py's command line in this process; returns (exit status, stdout, stderr)."""
    def run(*argv, module='main'):
        import importlib
        cli = importlib.import_module(module).cli
        try:
            status = cli([str(a) for a in argv])
        except SystemExit as e:  # argparse's usage errors
            status = e.code
        out, err = capsys.readouterr()
        return status, out, err
    return run


def train_in(folder, argv) -> None:
    """Run main.py's command line with `folder` as the working directory (for module-scoped fixtures, which
    cannot use monkeypatch); the run must succeed."""
    import main
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        assert main.cli([str(a) for a in argv]) == 0
    finally:
        os.chdir(cwd)
