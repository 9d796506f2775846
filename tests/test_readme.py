"""The README's commands as a user runs them: each one a fresh Python process with nothing imported beforehand,
on the synthetic data, with the Hugging Face cache laid out as huggingface_hub writes it and HF_HUB_OFFLINE=1.
Nothing is mocked: the network is absent (the push goes to a closed port on this machine)."""
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = 'data/deeplab_vovnet39_pascal_v3_t_epoch1.pth'
SMALL = ['--crop_size', '65', '--workers', '0']
TRAIN = ['--train', '--epochs', '1', '--backbone', 'vovnet39', '--batch_size', '4', '--seed', '0', '--base_lr',
         '0.01', *SMALL]

pytestmark = pytest.mark.slow
pytest.importorskip('huggingface_hub')
pytest.importorskip('safetensors')


def command(args, cwd, **env):
    """`python args...` in a fresh process, in `cwd`, without a Hub token and with the Hugging Face files under
    `cwd`; returns the finished process (stdout and stderr as text)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'HUGGING'))}
    environ.update(HF_HOME=os.path.join(cwd, 'hf_home'), HF_HUB_OFFLINE='1', HF_HUB_DISABLE_TELEMETRY='1',
                   PYTHONPATH=ROOT, OMP_NUM_THREADS='2')
    environ.update({k: v for k, v in env.items() if v is not None})
    for k in [k for k, v in env.items() if v is None]:
        environ.pop(k, None)
    script = args[0] if args[0] == '-c' else os.path.join(ROOT, args[0])
    return subprocess.run([sys.executable, script, *map(str, args[1:])], cwd=cwd, env=environ, capture_output=True,
                          text=True, timeout=600)


def succeeded(result) -> bool:
    return result.returncode == 0 and 'Traceback' not in result.stdout + result.stderr


def refused(result, *phrases) -> None:
    """Exit 1, one message naming each phrase, no traceback."""
    text = result.stdout + result.stderr
    assert result.returncode == 1 and 'Traceback' not in text, text[-3000:]
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr[-3000:]


def publish_to_cache(cache: str, repo: str, folder: str) -> str:
    """Lay `folder` out in huggingface_hub's cache as a download of `repo` at `main` leaves it: the files as blobs
    named by their hash, a snapshot of links to them named by the commit, refs/main holding the commit. Returns
    the commit."""
    base = os.path.join(cache, 'models--' + repo.replace('/', '--'))
    names = sorted(os.listdir(folder))
    commit = hashlib.sha1(b''.join(open(os.path.join(folder, n), 'rb').read() for n in names)).hexdigest()
    for sub in ('blobs', f'snapshots/{commit}', 'refs'):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    for name in names:
        data = open(os.path.join(folder, name), 'rb').read()
        etag = hashlib.sha256(data).hexdigest()
        with open(os.path.join(base, 'blobs', etag), 'wb') as f:
            f.write(data)
        os.symlink(os.path.join('..', '..', 'blobs', etag), os.path.join(base, 'snapshots', commit, name))
    with open(os.path.join(base, 'refs', 'main'), 'w') as f:
        f.write(commit)
    return commit


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    """A folder with the synthetic data (voc/), the checkpoint of a 1-epoch run of main.py --train (data/), its
    evaluation's figures (data/eval.json), its hub folder (hub/m, written by hub.py save) and that folder in the
    Hugging Face cache as org/m, each made by the README's command in a process of its own."""
    import synthetic
    folder = tmp_path_factory.mktemp('user')
    synthetic.generate(str(folder / 'voc'), num_train=8, num_val=4, seed=0, min_size=40, max_size=64)
    trained = command(['main.py', *TRAIN, '--exp', 't', '--scratch', '--data_root', 'voc'], folder)
    assert succeeded(trained), trained.stderr[-3000:]
    evaluated = command(['main.py', '--exp', 't', '--epochs', '1', '--backbone', 'vovnet39', '--data_root', 'voc',
                         '--json', 'data/eval.json', *SMALL], folder)
    assert succeeded(evaluated), evaluated.stderr[-3000:]
    assert 'Mean IoU:' in evaluated.stdout
    saved = command(['hub.py', 'save', '--checkpoint', CKPT, '--output', 'hub/m', '--metrics', 'data/eval.json',
                     '--license', 'mit'], folder)
    assert succeeded(saved), saved.stderr[-3000:]
    commit = publish_to_cache(str(folder / 'hf_home' / 'hub'), 'org/m', str(folder / 'hub' / 'm'))
    return folder, commit


def test_evaluation_writes_its_figures_and_hub_save_puts_them_in_the_card(workspace):
    folder, _ = workspace
    figures = json.load(open(folder / 'data' / 'eval.json'))
    assert figures['backbone'] == 'vovnet39' and figures['num_classes'] == 21 and figures['precision'] == 'fp32'
    config = json.load(open(folder / 'hub' / 'm' / 'config.json'))
    assert config['evaluation']['mean_iou'] == figures['mean_iou']
    card = open(folder / 'hub' / 'm' / 'README.md').read()
    assert f'{figures["mean_iou"]:.2f}' in card and 'license: mit' in card


def test_predict_loads_hf_reference_from_the_cache_offline(workspace):
    folder, _ = workspace
    image = sorted((folder / 'voc' / 'VOC2012' / 'JPEGImages').iterdir())[0]
    result = command(['predict.py', '--checkpoint', 'hf://org/m', '--input', image, '--output', 'out'], folder)
    assert succeeded(result), result.stderr[-3000:]
    assert sorted(os.listdir(folder / 'out')) == [f'{image.stem}.png', f'{image.stem}_overlay.jpg']


def test_from_pretrained_in_python_loads_org_name_from_the_cache(workspace):
    folder, commit = workspace
    code = ('from deeplab import from_pretrained\n'
            'import torch\n'
            'model = from_pretrained("org/m")\n'
            'print(model.training, model.num_classes, model.class_names[1], model.mean, model.config["backbone"])\n'
            'print(model(torch.zeros(1, 3, 65, 65)).shape)\n')
    result = command(['-c', code], folder)
    assert succeeded(result), result.stderr[-3000:]
    assert result.stdout.splitlines()[-2:] == ['False 21 aeroplane (0.485, 0.456, 0.406) vovnet39',
                                               'torch.Size([1, 21, 65, 65])']


def test_fine_tuning_from_hf_reference_records_its_revision(workspace):
    folder, commit = workspace
    result = command(['main.py', *TRAIN, '--exp', 'ft', '--init', 'hf://org/m', '--data_root', 'voc'], folder)
    assert succeeded(result), result.stderr[-3000:]
    checkpoint = torch.load(folder / 'data' / 'deeplab_vovnet39_pascal_v3_ft_epoch1.pth', weights_only=True)
    assert checkpoint['initial_weights'] == {'source': 'trained model', 'file': 'hf://org/m', 'classes': 21,
                                             'revision': commit}


def test_a_model_missing_from_the_offline_cache_is_a_message(workspace):
    folder, _ = workspace
    result = command(['predict.py', '--checkpoint', 'hf://org/absent', '--input', 'voc/VOC2012/JPEGImages', '--output', 'absent'],
                     folder)
    refused(result, 'org/absent', 'HF_HUB_OFFLINE is set', str(folder / 'hf_home' / 'hub'))
    assert not os.path.exists(folder / 'absent')


def test_a_damaged_cache_entry_is_named_with_the_command_that_clears_it(workspace, tmp_path):
    folder, commit = workspace
    home = tmp_path / 'hf_home'
    shutil.copytree(folder / 'hf_home', home, symlinks=True)
    entry = home / 'hub' / 'models--org--m'
    blob = os.path.realpath(entry / 'snapshots' / commit / 'model.safetensors')
    with open(blob, 'r+b') as f:
        f.truncate(1000)
    result = command(['predict.py', '--checkpoint', 'hf://org/m', '--input', folder / 'voc' / 'VOC2012' / 'JPEGImages', '--output', 'out'],
                     tmp_path, HF_HOME=str(home))
    refused(result, 'model.safetensors', str(entry), 'hf cache')
    assert not os.path.exists(tmp_path / 'out')


def test_push_without_a_token_is_a_message(workspace):
    folder, _ = workspace
    refused(command(['hub.py', 'push', '--folder', 'hub/m', '--repo', 'org/m'], folder, HF_HUB_OFFLINE=None),
            'not logged in', 'hf auth login')


def test_push_to_an_unreachable_hub_is_a_message(workspace):
    folder, _ = workspace
    with socket.socket() as s:  # a port nothing listens on: the connection is refused
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    result = command(['hub.py', 'push', '--folder', 'hub/m', '--repo', 'org/m'], folder, HF_HUB_OFFLINE=None,
                     HF_TOKEN='hf_' + 'x' * 34, HF_ENDPOINT=f'http://127.0.0.1:{port}')
    refused(result, 'could not reach the Hub', 'hub/m', 'org/m')
    offline = command(['hub.py', 'push', '--folder', 'hub/m', '--repo', 'org/m'], folder, HF_TOKEN='hf_' + 'x' * 34)
    refused(offline, 'HF_HUB_OFFLINE')
