"""Sharing and loading models (hub.py): the folder of model.safetensors, config.json and README.md, hf://org/name
through huggingface_hub's own cache code with only the network replaced, pushing through HfApi with its upload
replaced, and every bad input a message."""
import hashlib
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import initial_model, randomize
from PIL import Image

import deeplab
import errors
import hub
import weights

hf = pytest.importorskip('huggingface_hub')
pytest.importorskip('safetensors')
RELEASED = 'deeplab_vovnet39_pascal_v3_bn_lr7e-3_epoch50.pth'


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """The Hub's network calls (the HEAD that resolves a file and the GET that downloads it) answered from
    folders the test publishes, in huggingface_hub's own wire format (X-Repo-Commit, ETag, X-Error-Code), so that
    its cache (blobs, snapshots, refs), revisions, offline mode and error classes run for real in a temporary
    cache. serve(repo, folder, tag=None) publishes a folder as a new commit; returns the downloads made."""
    import httpx2
    from huggingface_hub import constants, file_download
    from huggingface_hub.errors import OfflineModeIsEnabled
    from huggingface_hub.utils import hf_raise_for_status
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'hf_cache'))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    repos, downloads = {}, []

    def lookup(url):
        if constants.is_offline_mode():  # as huggingface_hub's HTTP session does for every request
            raise OfflineModeIsEnabled(f'Cannot reach {url}: offline mode is enabled.')
        m = re.fullmatch(r'.*/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<name>.+)', url)
        repo, revision, name = m['repo'], m['revision'], m['name']
        request = httpx2.Request('HEAD', url)
        if repo not in repos:
            error = {'X-Error-Code': 'RepoNotFound'}
        else:
            commit = repos[repo]['refs'].get(revision, revision if revision in repos[repo]['commits'] else None)
            if commit is None:
                error = {'X-Error-Code': 'RevisionNotFound'}
            elif name not in repos[repo]['commits'][commit]:
                error = {'X-Error-Code': 'EntryNotFound', 'X-Repo-Commit': commit}
            else:
                return commit, repos[repo]['commits'][commit][name]
        hf_raise_for_status(httpx2.Response(404, headers={**error, 'X-Error-Message': 'not found'}, request=request))

    def head(url, *args, **kwargs):
        commit, (data, etag) = lookup(url)
        return file_download.HfFileMetadata(commit_hash=commit, etag=etag, location=url, size=len(data),
                                            xet_file_data=None)

    def get(url, temp_file, *args, **kwargs):
        downloads.append(url)
        _, (data, _) = lookup(url)
        temp_file.write(data)

    monkeypatch.setattr(file_download, 'get_hf_file_metadata', head)
    monkeypatch.setattr(file_download, 'http_get', get)

    def serve(repo, folder, tag=None):
        # Each file with its ETag (the sha256 the Hub gives an LFS file), hashed once here rather than at every HEAD;
        # the commit hashes the names and contents, not their repr (a second per 100 MB).
        content, commit = {}, hashlib.sha1(repo.encode())
        for name in sorted(os.listdir(folder)):
            data = open(os.path.join(folder, name), 'rb').read()
            content[name] = data, hashlib.sha256(data).hexdigest()
            commit.update(b'%d %s %d ' % (len(name), name.encode(), len(data)))
            commit.update(data)
        commit = commit.hexdigest()
        entry = repos.setdefault(repo, {'refs': {}, 'commits': {}})
        entry['commits'][commit] = content
        entry['refs']['main'] = commit
        if tag:
            entry['refs'][tag] = commit
        return downloads
    serve.cache = tmp_path / 'hf_cache'
    return serve


def save(tmp_path, model, name='ckpt.pth', **extra):
    path = tmp_path / name
    torch.save({'state_dict': model.state_dict(), 'model_args': model.model_args, 'epoch': 3, **extra}, path)
    folder = tmp_path / f'{name}.hub'
    hub.save(str(path), str(folder))
    return folder


def logits(model, seed=0):
    x = torch.randn(2, 3, 65, 71, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize('backbone,model', [pytest.param('vovnet39', 'deeplabv3', marks=pytest.mark.slow),
                                            pytest.param('ese_vovnet39b', 'deeplabv3', marks=pytest.mark.slow),
                                            pytest.param('vovnet39', 'deeplabv3plus', marks=pytest.mark.slow)])
def test_save_then_load_gives_bit_identical_logits_from_a_folder_and_from_the_hub(backbone, model, tmp_path,
                                                                                  fake_hub):
    source = randomize(initial_model(backbone, num_classes=6, model=model), seed=4)
    folder = save(tmp_path, source, class_names=[f'c{i}' for i in range(6)])
    assert sorted(os.listdir(folder)) == ['README.md', 'config.json', 'model.safetensors']
    assert open(folder / 'model.safetensors', 'rb').read(8) != b'PK\x03\x04'  # no zip, no pickle
    config = json.load(open(folder / 'config.json'))
    assert (config['backbone'], config['model'], config['num_classes'], config['output_stride']) == \
        (backbone, model, 6, 16)
    assert config['class_names'] == [f'c{i}' for i in range(6)] and config['format_version'] == hub.VERSION
    assert config['input']['mean'] == [0.485, 0.456, 0.406] and config['crop_size'] == 513
    expected = logits(source)
    local = weights.from_pretrained(str(folder))
    assert torch.equal(logits(local), expected) and not local.training
    assert local.class_names == [f'c{i}' for i in range(6)] and local.std == (0.229, 0.224, 0.225)
    downloads = fake_hub('org/model', folder)
    for reference in ('org/model', 'hf://org/model', 'hf://org/model@main'):
        assert torch.equal(logits(weights.from_pretrained(reference)), expected)
    assert len(downloads) == 2  # config and weights, once: then huggingface_hub's cache
    assert weights.model_from_checkpoint('hf://org/model').name == model


@pytest.mark.slow
def test_revisions_resolve_through_the_cache_and_offline_mode_reads_it(tmp_path, fake_hub, monkeypatch):
    first = randomize(deeplab.build_model('vovnet39', num_classes=3), seed=1)
    second = randomize(deeplab.build_model('vovnet39', num_classes=3), seed=2)
    fake_hub('org/m', save(tmp_path, first, 'a.pth'), tag='v1')
    fake_hub('org/m', save(tmp_path, second, 'b.pth'))  # a later commit on main
    assert torch.equal(logits(weights.from_pretrained('hf://org/m@v1')), logits(first))
    assert torch.equal(logits(weights.from_pretrained('hf://org/m')), logits(second))
    snapshots = os.listdir(fake_hub.cache / 'models--org--m' / 'snapshots')
    assert len(snapshots) == 2 and all(re.fullmatch('[0-9a-f]{40}', s) for s in snapshots)
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    assert torch.equal(logits(weights.from_pretrained('hf://org/m@v1')), logits(first))
    with pytest.raises(errors.UserError, match=r'config.json of org/m at revision v2 is not in the Hugging Face '
                                               rf'cache \({re.escape(str(fake_hub.cache))}\) and HF_HUB_OFFLINE is '
                                               r'set'):
        weights.from_pretrained('hf://org/m@v2')


def test_a_released_checkpoint_converts_with_the_originals_reported_figure_labelled_as_reported(tmp_path):
    model = randomize(initial_model(), seed=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.007)
    path = tmp_path / RELEASED
    torch.save({'epoch': 50, 'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()},
                'optimizer': optimizer.state_dict()}, path)
    assert hub.cli(['save', '--checkpoint', str(path), '--output', str(tmp_path / 'out')]) == 0
    config = json.load(open(tmp_path / 'out' / 'config.json'))
    assert config['source']['original_release'] is True and config['class_names'][1] == 'aeroplane'
    assert config['source']['sha256'] == hashlib.sha256(path.read_bytes()).hexdigest()
    card = hf.ModelCard.load(tmp_path / 'out' / 'README.md')
    data = card.data.to_dict()
    assert data['pipeline_tag'] == 'image-segmentation' and data['library_name'] == 'vovnet-deeplabv3'
    assert {'license', 'tags', 'datasets'} <= set(data)
    result = card.data.eval_results[0]
    assert (result.metric_type, result.metric_value, result.task_type) == ('mean_iou', 75.71, 'image-segmentation')
    assert 'reported by the original' in result.metric_name
    assert 'as reported by the original work' in card.text and 'not measured' in card.text
    assert 'checkpoint of the original work' in card.text and config['source']['sha256'] in card.text
    assert torch.equal(logits(weights.from_pretrained(str(tmp_path / 'out'))), logits(model))


@pytest.mark.slow
def test_evaluation_figures_go_into_the_card_and_a_published_model_evaluates_predicts_exports_and_fine_tunes(
        synthetic_root, tmp_path, monkeypatch, run_cli, fake_hub):
    monkeypatch.chdir(tmp_path)
    common = ['--backbone', 'vovnet39', '--crop_size', '65', '--workers', '0', '--data_root', synthetic_root]
    status, _, err = run_cli('--train', '--exp', 'h', '--epochs', '1', '--scratch', '--batch_size', '4', '--seed', '0',
                             *common)
    assert status == 0, err
    ckpt = 'data/deeplab_vovnet39_pascal_v3_h_epoch1.pth'
    status, out, err = run_cli('--exp', 'h', '--epochs', '1', '--json', 'eval.json', *common)
    assert status == 0, err
    measured = re.search(r'^Mean IoU: (\d+\.\d\d)$', out, re.M).group(1)
    figures = json.load(open('eval.json'))
    assert f'{figures["mean_iou"]:.2f}' == measured and len(figures['class_iou']) == 21
    status, out, err = run_cli('save', '--checkpoint', ckpt, '--output', 'published', '--metrics', 'eval.json',
                               '--license', 'mit', module='hub')
    assert status == 0, err
    card = hf.ModelCard.load('published/README.md')
    assert card.data.license == 'mit' and card.data.eval_results[0].metric_value == round(float(measured), 2)
    assert f'Mean IoU **{measured}**' in card.text and '| aeroplane |' in card.text
    assert 'batch size: 4' in card.text and 'none: trained from random initialisation' in card.text
    fake_hub('me/vov', 'published')

    # Evaluation of the published model gives the checkpoint's figure.
    status, out, err = run_cli('--exp', 'h', '--checkpoint', 'hf://me/vov', '--no-save_predictions', *common)
    assert status == 0, err
    assert re.search(r'^Mean IoU: (\d+\.\d\d)$', out, re.M).group(1) == measured
    assert os.path.isfile('data/vov_iou.png')
    photos = tmp_path / 'photos'
    photos.mkdir()
    Image.fromarray(np.full((50, 60, 3), 90, np.uint8)).save(photos / 'p.png')
    status, _, err = run_cli('--checkpoint', 'published', '--input', photos, '--output', 'masks', module='predict')
    assert status == 0 and os.path.isfile('masks/p.png'), err  # the folder itself, as hub.py save wrote it
    # (the TorchScript exporter, 4 s instead of 11: what the reference gives export.py is the subject here; the
    # default exporter's file of a checkpoint is test_tools' and test_decoder's)
    status, out, err = run_cli('--checkpoint', 'hf://me/vov', '--height', '65', '--width', '65', '--exporter',
                               'torchscript', '--opset', '17', module='export')
    assert status == 0 and os.path.isfile('vov.onnx'), err  # named after the repository, here
    assert 'vs PyTorch on a' in out + err and 'argmax agreement' in out + err, out + err  # checked
    status, out, err = run_cli('--backbones', 'vovnet39', '--checkpoint', 'hf://me/vov', '--size', '65', '--warmup',
                               '0', '--iters', '1', '--configs', 'fp32', '--no_isolate', module='benchmark')
    assert status == 0, err

    # Fine-tuning from it on a dataset with other classes: the classifier starts afresh, and the log says so.
    fine = randomize(initial_model(num_classes=5), seed=6)
    fake_hub('me/five', save(tmp_path, fine, 'five.pth'))
    status, out, err = run_cli('--train', '--exp', 'f', '--epochs', '1', '--batch_size', '4', '--init', 'hf://me/five',
                               *common)
    assert status == 0, err
    assert 'hf://me/five has 5 classes, this dataset 21: its classifier (aspp.conv3.*) starts from random weights' \
        in out
    record = torch.load('data/deeplab_vovnet39_pascal_v3_f_epoch1.pth', weights_only=True)['initial_weights']
    assert record['source'] == 'trained model' and record['file'] == 'hf://me/five'
    assert record['classifier'] == 'reinitialised' and re.fullmatch('[0-9a-f]{40}', record['revision'])
    status, _, err = run_cli('--train', '--exp', 'g', '--epochs', '1', '--resume', 'hf://me/five', *common)
    assert status == 1 and 'use --init' in err.replace('with --init', 'use --init')


def test_fine_tuning_keeps_every_weight_but_a_classifier_of_another_size(tmp_path):
    trained = randomize(initial_model(num_classes=5, model='deeplabv3plus'), seed=7)
    checkpoint = {'state_dict': trained.state_dict()}
    torch.manual_seed(0)
    model = deeplab.build_model('vovnet39', num_classes=3, model='deeplabv3plus')
    fresh = model.decoder.classifier.weight.clone()
    record = weights.fine_tune_from(model, checkpoint, 'five.pth')
    assert record['classifier'] == 'reinitialised' and record['classes'] == 5
    for name, tensor in model.state_dict().items():
        if name.startswith('decoder.classifier.'):
            continue
        assert torch.equal(tensor, trained.state_dict()[name]), name
    assert torch.equal(model.decoder.classifier.weight, fresh)
    same = deeplab.build_model('vovnet39', num_classes=5, model='deeplabv3plus')
    weights.fine_tune_from(same, checkpoint, 'five.pth')
    assert torch.equal(same.decoder.classifier.weight, trained.decoder.classifier.weight)
    with pytest.raises(errors.UserError, match='pass --model deeplabv3plus'):
        weights.fine_tune_from(initial_model(num_classes=5), checkpoint, 'five.pth')
    with pytest.raises(errors.UserError, match='pass --backbone vovnet39'):
        weights.fine_tune_from(initial_model('resnet50', model='deeplabv3plus'), checkpoint, 'five.pth')


def test_push_uploads_the_three_files_through_hfapi_with_the_cards_commands_naming_the_repo(tmp_path, monkeypatch,
                                                                                              run_cli):
    folder = save(tmp_path, initial_model(num_classes=4))
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(('create', repo_id, kwargs.get('private')))

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, commit_message=None, **kwargs):
        uploaded = {n: open(os.path.join(folder_path, n), 'rb').read() for n in os.listdir(folder_path)}
        calls.append(('upload', repo_id, sorted(uploaded), allow_patterns, commit_message))
        calls.append(uploaded)
        return hf.CommitInfo(commit_url=f'https://huggingface.co/{repo_id}/commit/abc', commit_message='m',
                             commit_description='', oid='a' * 40)
    monkeypatch.setattr(hf.HfApi, 'create_repo', create_repo)
    monkeypatch.setattr(hf.HfApi, 'upload_folder', upload_folder)
    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.setattr(hf.constants, 'HF_TOKEN_PATH', str(tmp_path / 'no_token'))
    monkeypatch.setattr(hf.constants, 'HF_STORED_TOKENS_PATH', str(tmp_path / 'no_tokens'))
    status, _, err = run_cli('push', '--folder', folder, '--repo', 'me/vov', module='hub')
    assert status == 1 and 'not logged in to the Hugging Face Hub: run `hf auth login`' in err and not calls
    for bad in ('vov', 'me/v o v', 'a/b/c'):
        status, _, err = run_cli('push', '--folder', folder, '--repo', bad, module='hub')
        assert status == 1 and f"--repo {bad!r} is not a Hub repository name" in err and not calls, err
    monkeypatch.setenv('HF_TOKEN', 'hf_test_token')
    status, out, err = run_cli('push', '--folder', folder, '--repo', 'me/vov', '--private', module='hub')
    assert status == 0, err
    assert calls[0] == ('create', 'me/vov', True)
    assert calls[1][:3] == ('upload', 'me/vov', ['README.md', 'config.json', 'model.safetensors'])
    assert b'--checkpoint hf://me/vov' in calls[2]['README.md'] and b'ORG/NAME' not in calls[2]['README.md']
    assert calls[2]['model.safetensors'] == open(folder / 'model.safetensors', 'rb').read()
    assert 'https://huggingface.co/me/vov/commit/abc' in out


def _damage(folder, how):
    if how == 'no weights':
        os.remove(folder / 'model.safetensors')
    elif how == 'no config':
        os.remove(folder / 'config.json')
    else:
        config = json.load(open(folder / 'config.json'))
        if how == 'not json':
            (folder / 'config.json').write_text('{"format": "vovnet-deeplabv3-hub", ')
            return
        if how == 'unknown backbone':
            config['backbone'] = 'vovnet99'
        elif how == 'newer format':
            config['format_version'] = hub.VERSION + 1
        elif how == 'other classes':
            config['num_classes'], config['class_names'] = 7, None
        elif how == 'missing tensor' or how == 'non-finite':
            from safetensors.torch import load_file, save_file
            state = load_file(folder / 'model.safetensors')
            if how == 'missing tensor':
                del state['stage3.OSA3_1.concat.OSA3_1_concat/conv.weight']
            else:
                state['aspp.conv2.weight'][0, 0] = float('nan')
            save_file(state, folder / 'model.safetensors')
        (folder / 'config.json').write_text(json.dumps(config))


@pytest.mark.parametrize('how,needles', [
    ('no weights', ['has no model.safetensors', 'hub.py save']),
    ('no config', ['is a folder; give the .pth file in it (or a folder written by hub.py save']),
    ('not json', ['config.json of', 'is not valid JSON']),
    ('unknown backbone', ["names the backbone 'vovnet99'"]),
    ('newer format', [f'format version {hub.VERSION + 1}, newer than this code reads']),
    ('other classes', ['does not fit its config.json: aspp.conv3.weight has shape (4, 256, 1, 1), the model (7, 256, '
                       '1, 1)']),
    ('missing tensor', ['does not fit its config.json: it has no stage3.OSA3_1.concat.OSA3_1_concat/conv.weight']),
    ('non-finite', ['aspp.conv2.weight', 'NaN']),
])
def test_a_damaged_model_folder_is_a_message_and_exit_status_1_with_nothing_written(how, needles, tmp_path,
                                                                                    run_cli):
    folder = save(tmp_path, initial_model(num_classes=4))
    _damage(folder, how)
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(tmp_path / 'p.png')
    commands = [('predict', ['--input', tmp_path / 'p.png', '--output', tmp_path / 'masks'])]
    if how == 'missing tensor':  # the same reader serves every command; export once
        commands.append(('export', ['--output', tmp_path / 'm.onnx']))
    for module, flags in commands:
        status, _, err = run_cli('--checkpoint', folder, *flags, module=module)
        assert status == 1 and 'Traceback' not in err, err
        for needle in needles:
            assert needle in err, (module, err)
    assert not os.path.exists(tmp_path / 'm.onnx') and not os.path.exists(tmp_path / 'masks')  # not even the folder


@pytest.mark.slow
def test_hub_references_that_do_not_resolve_are_messages(tmp_path, fake_hub, run_cli):
    folder = save(tmp_path, initial_model(num_classes=4))
    fake_hub('org/m', folder)
    partial = tmp_path / 'partial'
    partial.mkdir()
    shutil.copy(folder / 'model.safetensors', partial)
    fake_hub('org/weights-only', partial)
    for reference, needle in (('hf://org/m@nope', "the Hub repository org/m has no revision 'nope'"),
                              ('hf://org/absent', 'the Hub has no model repository org/absent'),
                              ('hf://org/weights-only', 'org/weights-only has no config.json: it is not a model '
                                                        'published by hub.py'),
                              ('hf://datasets/org/m', 'is not a model repository (a dataset)'),
                              ('hf://', 'is not a model on the Hub')):
        status, _, err = run_cli('--checkpoint', reference, '--output', tmp_path / 'm.onnx', module='export')
        assert status == 1 and needle in err and 'Traceback' not in err, (reference, err)


def test_without_huggingface_hub_the_hub_is_a_one_line_pip_install(tmp_path, monkeypatch, run_cli):
    folder = save(tmp_path, initial_model(num_classes=4))
    monkeypatch.setitem(__import__('sys').modules, 'huggingface_hub', None)
    with pytest.raises(errors.UserError, match=r'needs huggingface_hub, which is not installed: pip install '
                                               r'huggingface_hub'):
        weights.from_pretrained('hf://org/m')
    status, _, err = run_cli('save', '--checkpoint', tmp_path / 'ckpt.pth', '--output', tmp_path / 'o', module='hub')
    assert status == 1 and 'pip install huggingface_hub' in err and not os.path.exists(tmp_path / 'o')
    monkeypatch.setitem(__import__('sys').modules, 'safetensors', None)
    monkeypatch.setitem(__import__('sys').modules, 'safetensors.torch', None)
    with pytest.raises(errors.UserError, match='needs safetensors, which is not installed: pip install safetensors'):
        weights.from_pretrained(str(folder))
    assert weights.model_from_checkpoint(str(tmp_path / 'ckpt.pth')).num_classes == 4  # .pth files need neither
