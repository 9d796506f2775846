"""Trained models that can be shared and loaded again: a folder of three files, published on the Hugging Face Hub.

    python hub.py save --checkpoint data/deeplab_vovnet39_pascal_v3_bn_lr7e-3_epoch50.pth --output hub/vovnet39
    python hub.py save --checkpoint CKPT --output FOLDER --metrics eval.json   # with main.py --json's figures
    python hub.py push --folder hub/vovnet39 --repo my-org/deeplabv3-vovnet39
    python predict.py --checkpoint hf://my-org/deeplabv3-vovnet39 --input photos/

A published model is `model.safetensors` (the weights, no pickle), `config.json` (what rebuilds the model: backbone,
model, classes and their names, output stride, norm options, input normalisation, the evaluation crop, the format
version) and `README.md` (a model card with the Hub's metadata). Wherever a checkpoint is accepted (main.py
--checkpoint and --init, predict.py, export.py, benchmark.py), `hf://org/name[@revision]` or such a folder is too;
from Python, `weights.from_pretrained("org/name")`. Downloads go through huggingface_hub's cache, revisions and
offline mode (HF_HUB_OFFLINE=1); huggingface_hub and safetensors are optional (requirements-extras.txt).
"""
import argparse
import json
import logging
import os
import shutil
import sys
import tempfile

import deeplab
import errors
import files
import imagenet
import published
import utils
import weights
from errors import UserError, few
from published import CARD, CONFIG, EVAL_CROP, FILES, FORMAT, VERSION, WEIGHTS

log = logging.getLogger('hub')

ORIGINAL_REPO = 'https://github.com/stigma0617/VoVNet-DeepLabV3'
# The original's released checkpoints (file name -> mean IoU on VOC 2012 val its README reports, not measured here).
RELEASED = {f'deeplab_{b}_pascal_v3_bn_lr7e-3_epoch50.pth': miou for b, miou in (
    ('resnet50', 74.27), ('densenet201', 75.63), ('vovnet39', 75.71), ('resnet101', 76.81), ('densenet161', 76.13),
    ('vovnet57', 77.4))}


# ---------------------------------------------------------------------------------------------------------------
# Writing: save a checkpoint as a folder, push a folder


def original_format(checkpoint: dict) -> bool:
    """A checkpoint of the original work: its keys carry DataParallel's `module.` prefix and it holds no record
    of this project (the released files are {'epoch', 'state_dict', 'optimizer'})."""
    return ('model_args' not in checkpoint and 'format' not in checkpoint
            and all(k.startswith('module.') for k in checkpoint['state_dict']))


def make_config(checkpoint: dict, model, path: str, sha256: str, metrics: dict | None) -> dict:
    recorded = checkpoint.get('args') or {}
    names = checkpoint.get('class_names') or (metrics or {}).get('class_names')
    if names is None and model.num_classes == len(utils.VOC_CLASSES):
        names = list(utils.VOC_CLASSES)
    training = {k: recorded[k] for k in ('dataset', 'data_root', 'epochs', 'batch_size', 'base_lr', 'last_mult',
                                         'crop_size', 'output_stride', 'amp', 'freeze_bn', 'seed') if k in recorded}
    if 'epoch' in checkpoint:
        training['epochs_trained'] = int(checkpoint['epoch'])
    if checkpoint.get('initial_weights'):
        training['initial_weights'] = checkpoint['initial_weights']
    if checkpoint.get('best_miou') is not None:
        training['best_validation_miou'] = checkpoint['best_miou']
    released = original_format(checkpoint)
    if released:
        training.setdefault('dataset', 'pascal')
        training.setdefault('data_root', utils.DEFAULT_ROOTS['pascal'])
    if training.get('dataset'):
        training['dataset_name'] = describe_dataset(training['dataset'], training.get('data_root'), names)[1]
    return {'format': FORMAT, 'format_version': VERSION, **model.model_args,
            'model': model.name, 'class_names': names,
            'input': {'mean': list(utils.MEAN), 'std': list(utils.STD),
                      'note': 'RGB scaled to [0, 1], then (x - mean) / std'},
            'crop_size': EVAL_CROP, 'training': training,
            'source': {'checkpoint': os.path.basename(path), 'sha256': sha256,
                       'original_release': released},
            'evaluation': metrics}


def describe_dataset(dataset: str, data_root: str | None, class_names) -> tuple[str, str]:
    """(Hub dataset id, name) of a dataset as the flags named it: PASCAL VOC 2012 only for VOC itself (its classes, in
    its VOCdevkit folder), Cityscapes for that layout, and any other dataset in VOC's list layout by its folder and
    classes, never as VOC."""
    if dataset == 'cityscapes':
        return 'cityscapes', 'Cityscapes'
    root = data_root or utils.DEFAULT_ROOTS.get(dataset or 'pascal')
    folder = os.path.basename(os.path.normpath(root)) if root else 'unknown'
    if dataset == 'pascal' and folder.lower() == 'vocdevkit' and list(class_names or []) == list(utils.VOC_CLASSES):
        return 'pascal-voc-2012', 'PASCAL VOC 2012'
    names = f': {", ".join(class_names[:6])}{", ..." if len(class_names) > 6 else ""}' if class_names else ''
    return 'custom', f'a custom dataset ({folder}/, {len(class_names or [])} classes{names})'


def _shown(value) -> str:
    return few(map(str, value), 4) if isinstance(value, list) else str(value)


def check_metrics(metrics: dict, metrics_path: str, checkpoint: dict, checkpoint_path: str, sha256: str,
                  model) -> None:
    """The evaluation given to a card must be of this model: the same checkpoint file when it names one (its
    sha256), else the same model, backbone, classes, output stride and training dataset; a UserError naming what
    differs otherwise."""
    where = f'--metrics {metrics_path}'
    sha = metrics.get('checkpoint_sha256')
    if sha and sha != sha256:
        raise UserError(f'{where} is the evaluation of another file ({metrics.get("checkpoint")}, sha256 '
                        f'{sha[:12]}...) than --checkpoint {checkpoint_path}: evaluate this checkpoint with main.py '
                        f'--json and give that file.')
    ours = {'model': model.name, 'backbone': model.backbone_name, 'num_classes': model.num_classes,
            'output_stride': model.output_stride, 'class_names': checkpoint.get('class_names'),
            'dataset': checkpoint.get('dataset') or (checkpoint.get('args') or {}).get('dataset')}
    theirs = dict(metrics, output_stride=(metrics.get('protocol') or {}).get('output_stride'))
    for field, value in ours.items():
        if value is not None and theirs.get(field) is not None and theirs[field] != value:
            raise UserError(f'{where} describes another model than --checkpoint {checkpoint_path}: its {field} is '
                            f'{_shown(theirs[field])}, the checkpoint\'s {_shown(value)}. Evaluate this checkpoint '
                            f'with main.py --json and give that file.')
    if not isinstance(metrics.get('precision', 'fp32'), str):
        raise UserError(f'{where} records precision {metrics["precision"]!r}, not a description such as "fp32": give '
                        f'the file main.py --json writes.')


def read_metrics(path: str) -> dict:
    try:
        with open(path, encoding='utf-8') as f:
            metrics = json.load(f)
    except FileNotFoundError:
        raise UserError(f'--metrics {path} does not exist; write it with main.py --json FILE (evaluation).') from None
    except (OSError, ValueError) as e:
        raise UserError(f'--metrics {path} cannot be read as JSON ({e}); give the file of main.py --json.') from None
    if not isinstance(metrics, dict) or not isinstance(metrics.get('mean_iou'), (int, float)):
        raise UserError(f'--metrics {path} holds no mean_iou: give the file main.py --json writes when evaluating.')
    if isinstance(metrics['mean_iou'], bool) or not 0 <= metrics['mean_iou'] <= 100:
        raise UserError(f'--metrics {path} has mean_iou {metrics["mean_iou"]!r}, not a percentage from 0 to 100: '
                        f'give the file main.py --json writes when evaluating.')
    return metrics


def model_card(config: dict, license_: str) -> str:
    """README.md: the Hub's YAML metadata, then what the model is, its training, its evaluation, how to load it."""
    hf = published.require_hub('writing the model card')
    title = {'deeplabv3': 'DeepLabV3', 'deeplabv3plus': 'DeepLabV3+'}[config['model']]
    name = f'{title} {config["backbone"]}'
    training, source, metrics = config['training'], config['source'], config.get('evaluation')
    dataset_id, trained_on = describe_dataset(training.get('dataset'), training.get('data_root'),
                                              config.get('class_names'))
    if metrics:  # the evaluation's own data, as main.py --json recorded it
        dataset_id, evaluated_on = describe_dataset(metrics.get('dataset', training.get('dataset')),
                                                    metrics.get('data_root', training.get('data_root')),
                                                    metrics.get('class_names', config.get('class_names')))
        dataset_name = f'{evaluated_on} {metrics.get("split", "val")}'
    else:
        dataset_name = f'{trained_on} val'
    precision = (metrics or {}).get('precision', 'fp32')
    reported = RELEASED.get(source['checkpoint']) if source['original_release'] else None
    results = []
    if metrics:
        results.append(hf.EvalResult(task_type='image-segmentation', dataset_type=dataset_id,
                                     dataset_name=dataset_name, metric_type='mean_iou',
                                     metric_value=round(metrics['mean_iou'], 2),
                                     metric_name=f'mean IoU (%), {precision}'))
    elif reported is not None:
        results.append(hf.EvalResult(task_type='image-segmentation', dataset_type=dataset_id,
                                     dataset_name=dataset_name, metric_type='mean_iou', metric_value=reported,
                                     metric_name='mean IoU (%), reported by the original work',
                                     source_name='VoVNet-DeepLabV3 README', source_url=ORIGINAL_REPO))
    data = hf.ModelCardData(
        library_name='vovnet-deeplabv3', pipeline_tag='image-segmentation', license=license_,
        tags=['semantic-segmentation', config['model'], config['backbone'], 'pytorch', 'safetensors'],
        datasets=[dataset_id], model_name=name if results else None, eval_results=results or None)
    init = training.get('initial_weights')
    lines = [f'# {name}', '',
             f'{title} with a {config["backbone"]} backbone, output stride {config["output_stride"]}, '
             f'{config["num_classes"]} classes, written by hub.py of VoVNet-DeepLabV3 from `{source["checkpoint"]}` '
             f'(sha256 `{source["sha256"]}`).', '']
    if source['original_release']:
        lines += ['This is a checkpoint of the original work (its keys: DataParallel\'s `module.` prefix, no record '
                  f'of this project), [{ORIGINAL_REPO}]({ORIGINAL_REPO}), converted unchanged.', '']
    lines += ['## Training', '']
    facts = [('dataset', trained_on)] if training.get('dataset') else []
    facts += [(k.replace('_', ' '), training[k]) for k in ('epochs', 'epochs_trained', 'batch_size', 'base_lr',
                                                           'last_mult', 'crop_size', 'amp', 'seed') if k in training]
    if source['original_release']:
        lines += ['The original reports its released runs as: PASCAL VOC 2012 + SBD, 50 epochs, batch 16, base lr '
                  '0.007 (poly), crop 513, from ImageNet weights. The file records only:', '']
    lines += [f'- {k}: {v}' for k, v in facts]
    lines += [f'- initial weights: {imagenet.describe(init)}', '']
    lines += ['## Evaluation', '']
    if metrics:
        protocol = metrics.get('protocol') or {}
        lines += [f'Mean IoU **{metrics["mean_iou"]:.2f}** on {metrics.get("images", "?")} images of '
                  f'{dataset_name}, computed in {precision} (measured by main.py: single scale, each image padded on a '
                  f'{protocol.get("crop_size", EVAL_CROP)}x{protocol.get("crop_size", EVAL_CROP)} canvas'
                  + (f', scales {protocol["scales"]}' if protocol.get('scales') else '')
                  + (', flip' if protocol.get('flip') else '') + ').', '']
        if metrics.get('class_iou'):
            lines += ['| class | IoU (%) |', '|:--|--:|']
            lines += [f'| {c} | {v:.2f} |' for c, v in metrics['class_iou'].items()]
            lines.append('')
    elif reported is not None:
        lines += [f'Mean IoU {reported} on PASCAL VOC 2012 val, **as reported by the original work** (its README), '
                  'not measured by this conversion.', '']
    else:
        lines += ['Not evaluated here (save with `--metrics` from `main.py --json` to add the figures).', '']
        if training.get('best_validation_miou') is not None:
            lines += [f'Best validation mean IoU during training: {training["best_validation_miou"]:.2f}.', '']
    lines += ['## Use', '', '```bash',
              'python predict.py --checkpoint hf://ORG/NAME --input photos/ --output masks/', '```', '', '```python',
              'from weights import from_pretrained', 'model = from_pretrained("ORG/NAME")  # eval mode; '
              'model.class_names, model.mean, model.std', '```', '',
              f'Inputs: RGB in [0, 1], normalised with mean {config["input"]["mean"]} and std '
              f'{config["input"]["std"]}; the logits come at the input size.', '']
    return hf.ModelCard.from_template(data, template_str='---\n{{ card_data }}\n---\n\n' + '\n'.join(lines)).content


def save(checkpoint_path: str, output: str, metrics_path: str | None = None, license_: str = 'unknown') -> None:
    """Write the folder of `checkpoint_path` (this project's or the original's) to `output`, all files or none."""
    published.require_hub('hub.py save (the model card)')
    st = published.require_safetensors('hub.py save')
    if weights.is_published(checkpoint_path):
        raise UserError(f'{checkpoint_path} is already a published model; copy the folder, or push it.')
    files.check_name_fits(os.path.join(output, WEIGHTS), '--output')
    if os.path.isdir(output) and os.listdir(output):
        raise UserError(f'--output {output} exists and is not empty; give a new folder (nothing was written).')
    files.refuse_overwrite({os.path.join(output, n): '--output' for n in FILES},
                           {checkpoint_path: 'the checkpoint (--checkpoint)', metrics_path: '--metrics'})
    metrics = read_metrics(metrics_path) if metrics_path else None
    checkpoint = weights.read(checkpoint_path)
    model = weights.model_from_checkpoint(checkpoint_path, checkpoint=checkpoint)  # the file is read once
    sha256 = files.sha256_file(checkpoint_path)
    if metrics:
        check_metrics(metrics, metrics_path, checkpoint, checkpoint_path, sha256, model)
    config = make_config(checkpoint, model, checkpoint_path, sha256, metrics)
    card = model_card(config, license_)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with files.staged_folder(output, '--output') as staging:
        files.atomic_write(os.path.join(staging, WEIGHTS), lambda p: st.save_file(state, p, metadata={'format': 'pt'}),
                           '--output', by_path=True)
        files.atomic_write(os.path.join(staging, CONFIG),
                           lambda f: f.write((json.dumps(config, indent=2) + '\n').encode()), '--output')
        files.atomic_write(os.path.join(staging, CARD), lambda f: f.write(card.encode()), '--output')
    log.info('wrote %s (%s, %s, %s)', output, ', '.join(FILES), deeplab.describe(
        model.backbone_name, model.num_classes, model.name), 'with evaluation figures' if metrics else
        'no evaluation figures')
    log.info('publish it with: python hub.py push --folder %s --repo ORG/NAME', output)


def push(folder: str, repo: str, private: bool = False, message: str | None = None) -> str:
    """Upload a folder written by `save` to the Hub model repository `repo` (created if missing); returns its URL."""
    hf = published.require_hub('hub.py push')
    try:
        hf.utils.validate_repo_id(repo)
        if repo.count('/') != 1:
            raise hf.errors.HFValidationError('it must be org/name')
    except hf.errors.HFValidationError as e:
        raise UserError(f'--repo {repo!r} is not a Hub repository name ({e}); write org/name.') from None
    published.read(folder)  # what is published must load back
    if not os.path.isfile(os.path.join(folder, CARD)):
        raise UserError(f'the model folder {folder} has no {CARD} (the model card); write it with hub.py save.')
    if hf.constants.is_offline_mode():
        raise UserError(f'HF_HUB_OFFLINE is set, so {folder} cannot be uploaded to {repo}: unset it (with a network) '
                        f'and push again.')
    if hf.get_token() is None:
        raise UserError('not logged in to the Hugging Face Hub: run `hf auth login` (or set HF_TOKEN to a token with '
                        'write access), then push again.')
    api = hf.HfApi()
    try:
        api.create_repo(repo, repo_type='model', private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as upload:  # the card's commands name the repository they load from
            for name in (WEIGHTS, CONFIG):
                shutil.copyfile(os.path.join(folder, name), os.path.join(upload, name))
            with open(os.path.join(folder, CARD), encoding='utf-8') as f:
                card = f.read().replace('ORG/NAME', repo)
            with open(os.path.join(upload, CARD), 'w', encoding='utf-8') as f:
                f.write(card)
            commit = api.upload_folder(repo_id=repo, folder_path=upload, allow_patterns=list(FILES),
                                       commit_message=message or f'Upload {os.path.basename(os.path.abspath(folder))} '
                                                                 f'with hub.py')
    except hf.errors.HfHubHTTPError as e:
        raise UserError(f'the Hub refused the upload to {repo}: {errors.first_line(e)} (check the token\'s write '
                        f'access to {repo.split("/")[0]}).') from None
    except published.network_errors() as e:
        raise UserError(f'could not reach the Hub ({hf.constants.ENDPOINT}) to upload {folder} to {repo} '
                        f'({errors.first_line(e)}): check the network (or HF_ENDPOINT), then push again.') from None
    url = getattr(commit, 'commit_url', None) or f'https://huggingface.co/{repo}'
    log.info('pushed %s to %s; load it with --checkpoint hf://%s', folder, url, repo)
    return url


# ---------------------------------------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)
    s = sub.add_parser('save', help='write the folder of a checkpoint')
    s.add_argument('--checkpoint', required=True, help='a checkpoint of main.py --train, or a released one')
    s.add_argument('--output', required=True, help='the folder to write (new or empty)')
    s.add_argument('--metrics', default=None, metavar='FILE',
                   help='the JSON of an evaluation of this checkpoint (main.py --json FILE), for the model card')
    s.add_argument('--license', default='unknown', help='the license in the model card (default: %(default)s)')
    u = sub.add_parser('push', help='upload a folder written by save')
    u.add_argument('--folder', required=True)
    u.add_argument('--repo', required=True, help='org/name (or user/name) of the Hub model repository')
    u.add_argument('--private', action='store_true', help='create the repository private')
    u.add_argument('--message', default=None, help='the commit message')
    return p


def run(args) -> None:
    if args.command == 'save':
        save(args.checkpoint, args.output, args.metrics, args.license)
    else:
        push(args.folder, args.repo, args.private, args.message)


def cli(argv=None) -> int:
    return utils.run_command(get_args_parser(), run, argv, 'free memory')


if __name__ == '__main__':
    sys.exit(cli())
