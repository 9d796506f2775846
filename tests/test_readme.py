"""The README's commands as a user runs them: each one a fresh Python process with nothing imported beforehand,
on the synthetic data, with the Hugging Face cache laid out as huggingface_hub writes it and HF_HUB_OFFLINE=1.
Nothing is mocked: the network is absent (the push goes to a closed port on this machine)."""
import json
import os
import shutil
import socket

import pytest
import torch
from conftest import USER_TRAIN, command, refused, succeeded

pytestmark = pytest.mark.slow
pytest.importorskip('huggingface_hub')
pytest.importorskip('safetensors')


@pytest.fixture
def workspace(user_workspace):
    return user_workspace


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
    code = ('from weights import from_pretrained\n'
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
    result = command(['main.py', *USER_TRAIN, '--exp', 'ft', '--init', 'hf://org/m', '--data_root', 'voc'], folder)
    assert succeeded(result), result.stderr[-3000:]
    checkpoint = torch.load(folder / 'data' / 'deeplab_vovnet39_pascal_v3_ft_epoch1.pth', weights_only=True)
    assert checkpoint['initial_weights'] == {'source': 'trained model', 'file': 'hf://org/m', 'classes': 21,
                                             'revision': commit}


def test_a_model_missing_from_the_offline_cache_is_a_message(workspace):
    folder, _ = workspace
    result = command(['predict.py', '--checkpoint', 'hf://org/absent', '--input', 'voc/VOC2012/JPEGImages', '--output',
                      'absent'], folder)
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
    images = folder / 'voc' / 'VOC2012' / 'JPEGImages'
    result = command(['predict.py', '--checkpoint', 'hf://org/m', '--input', images, '--output', 'out'], tmp_path,
                     HF_HOME=str(home))
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
