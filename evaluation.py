"""main.py's evaluation: the checkpoint the flags name, on the validation set, with the original's protocol
(engine.evaluate), its predictions published only when the evaluation succeeds, and the report: per-class table,
the original's `IoU {class}` and `Mean IoU` lines, a bar chart."""
import contextlib
import glob
import json
import logging
import os
import time

import torch

import deployed
import engine
import errors
import files
import imagenet
import inference
import pascal
import plots
import quantize
import runs
import utils
import weights
from checkpoints import epoch_path
from errors import Interrupted, UserError
from runs import dataset_inputs, dataset_of, eval_loader, model_for

log = logging.getLogger('main')


def run(args, rt: runs.Runtime) -> float:
    """Evaluate the checkpoint the flags name with the original's protocol; returns the mean IoU (percent)."""
    info, execution = rt.dist, rt.execution
    path = args.checkpoint or epoch_path(args, args.epochs)
    if not os.path.exists(path) and not weights.is_published(path):
        found = sorted(glob.glob(os.path.join(args.output_dir, f'deeplab_{args.backbone}_*.pth')))
        listing = ('checkpoints there for this backbone: ' + ', '.join(os.path.basename(f) for f in found)
                   if found else f'no checkpoint for {args.backbone} is in {args.output_dir}/')
        raise UserError(f'the checkpoint {path} does not exist ({listing}). Check --exp, --epochs, --backbone and '
                        f'--dataset, download a released checkpoint into {args.output_dir}/ (README), or pass '
                        f'--checkpoint PATH.')
    exported = deployed.kind(path) is not None  # an .onnx or OpenVINO .xml file: run by its runtime
    checkpoint = None if exported else weights.read(path)
    dataset = dataset_of(args, 'val', pascal.eval_transforms(args.crop_size))
    multi_scale = engine.MultiScale(args.eval_scales or [1.0], args.flip) if args.eval_scales or args.flip else None
    folders = {False: os.path.join(args.output_dir, 'val')}
    if multi_scale:
        folders[True] = os.path.join(args.output_dir, 'val_ms')
    names = dataset.output_names() if args.save_predictions else []
    outputs = [(os.path.join(folder, f'{name}.png'), '--output_dir') for folder in folders.values() for name in names]
    outputs.append((chart_path(args, path), '--output_dir'))
    if args.json:
        files.check_name_fits(args.json, '--json')
        if os.path.isdir(args.json):
            example = os.path.join(args.json, 'eval.json')
            raise UserError(f'--json {args.json} is a folder; give a file name, e.g. {example}.')
        outputs.append((args.json, '--json'))
    files.refuse_overwrite(outputs, {**dataset_inputs(dataset), **deployed.inputs_of(path, 'the checkpoint evaluated'),
                                     **files.inputs_of(args.class_names, '--class_names')})
    if exported:
        model = net = runs.exported_model(path, args, execution.device, dataset.num_classes, args.backbone)
        execution = inference.Execution(execution.device)  # the runtime's precision, NCHW
    else:
        model = model_for(args, dataset.num_classes, checkpoint, filled=True)
        weights.load_weights(model, checkpoint['state_dict'], path)
        model = execution.prepare(model)
        net = int8_model(args, model, execution.device) if args.quantize else torch.compile(model) if args.compile \
            else model
    runner = inference.Runner(net, execution, args.crop_size)

    log.info('evaluating %s on %s of %s (%s, output stride %d)', path, utils.plural(len(dataset), 'image'),
             args.dataset, execution.device, model.output_stride)
    if exported:
        log.info('the exported model runs in %s, %s', net.runtime, net.precision)
    else:
        log.info('initial weights of its training: %s', imagenet.describe(checkpoint.get('initial_weights')))
    hint = None if exported else inference.speed_hint(execution.device)
    if hint and execution.amp is None and not args.quantize:
        log.info('%s', hint)
    start = time.time()
    with contextlib.ExitStack() as stack:
        if args.compile:
            # Weights as constants (BN folded into the convolutions, weights prepacked), for this evaluation only:
            # Inductor reads the flag when it compiles, at the first call, and a flag left set would freeze the
            # weights of any model compiled later in this process.
            from torch._inductor import config as inductor_config
            stack.enter_context(inductor_config.patch(freezing=True))
        # Predictions go to staging folders that become <output_dir>/val (val_ms) only when the evaluation succeeds.
        staged = {ms: stack.enter_context(files.staged_folder(folder, '--output_dir'))
                  for ms, folder in folders.items()} if args.save_predictions else {}
        palette = utils.voc_palette()

        def save(index, pred, ms):
            files.save_mask(pred, os.path.join(staged[ms], f'{names[index]}.png'), palette, '--output_dir')

        stop = stack.enter_context(errors.GracefulStop(repeat_raises=True))
        batches = stack.enter_context(contextlib.closing(pascal.Batches(
            eval_loader(dataset, args, info, execution.device), stop,
            f'use a --crop_size that fits in memory (513 for VOC; the canvas is {args.crop_size}x{args.crop_size})')))

        def out_of_memory(e):
            image, _, meta = batches.current
            h, w = int(meta['size'][0]), int(meta['size'][1])
            return (f'out of memory evaluating {dataset.name(int(meta["index"]))} ({w}x{h} on a {image.shape[-1]}x'
                    f'{image.shape[-2]} canvas) on {execution.device} ({errors.first_line(e)}): evaluate on a device '
                    f'with more memory, or with --amp (bf16 on a CPU).')
        try:
            with errors.stops_on(stop), errors.out_of_memory_is(out_of_memory):
                confusion, confusion_ms = engine.evaluate(runner, batches, dataset.num_classes,
                                                          save if staged else None, multi_scale, stop)
        except errors.Stopped:
            raise Interrupted(stop.signal, f'evaluation stopped by signal {stop.signal} after {batches.done} of '
                                           f'{len(batches)} images; nothing was published') from None
    if isinstance(net, quantize.Int8Model) and net.uncompiled:
        log.info('%s larger than the %dx%d canvas ran int8 uncompiled at their own size (padding them to a compiled '
                 'shape would change their logits), at about fp32\'s speed; a --crop_size that covers them runs them '
                 'compiled', utils.plural(net.uncompiled, 'input'), *net.canvas[::-1])
    if info.is_main:
        report(confusion, confusion_ms, dataset.class_names, args, path, time.time() - start, len(dataset))
        if args.json:
            write_json(args, path, dataset, confusion, confusion_ms, model, net)
    return confusion.mean_iou()


def int8_model(args, model, device) -> quantize.Int8Model:
    """--quantize int8: the model quantized after observing --calibration images of the training list (drawn with
    --seed, or always the same ones without it), and compiled for the protocol's canvas."""
    quantize.check_device(device)
    quantize.require()
    train = dataset_of(args, 'train', pascal.eval_transforms(args.crop_size))
    seed = quantize.DEFAULT_SEED if args.seed is None else args.seed
    images = [quantize.canvas(train[i][0], args.crop_size)
              for i in quantize.pick(args.calibration, len(train), seed)]
    net = quantize.int8(model, images)
    seconds = quantize.warm_up(net, (1, 3, args.crop_size, args.crop_size))
    log.info('int8 (PT2E, torchao X86InductorQuantizer): calibrated on %s of the training list in %.1f s, compiled '
             'in %.1f s', utils.plural(len(images), 'image'), net.quantize_seconds, seconds)
    return net


def write_json(args, path, dataset, confusion, confusion_ms, model, net) -> None:
    """The figures of the evaluation as JSON (--json): what hub.py save --metrics puts in a model card."""
    iou = confusion.iou() * 100
    figures = {'checkpoint': path, 'checkpoint_sha256': files.sha256_file(path) if os.path.isfile(path) else None,
               'model': model.name, 'backbone': model.backbone_name,
               'num_classes': dataset.num_classes, 'class_names': list(dataset.class_names),
               'dataset': args.dataset, 'data_root': args.data_root or pascal.DEFAULT_ROOTS[args.dataset],
               'split': 'val', 'images': len(dataset),
               'protocol': {'crop_size': args.crop_size, 'output_stride': model.output_stride},
               'precision': precision(args, net),
               'mean_iou': float(iou.mean()),
               'class_iou': {name: float(v) for name, v in zip(dataset.class_names, iou)}}
    if confusion_ms is not None:
        figures['multi_scale'] = {'scales': args.eval_scales or [1.0], 'flip': args.flip,
                                  'mean_iou': float(confusion_ms.mean_iou())}
    text = json.dumps(figures, indent=1) + '\n'
    files.atomic_write(args.json, lambda f: f.write(text.encode()), flag='--json',
                       keeps='The figures are printed above')
    log.info('figures in %s', args.json)


def precision(args, net) -> str:
    """How the evaluated model computed: fp32 (the protocol), autocast, or int8 with its calibration."""
    if isinstance(net, deployed.ExportedModel):
        return f'{net.precision} ({net.runtime})'
    if isinstance(net, quantize.Int8Model):
        return f'int8 (PT2E, {utils.plural(net.images, "calibration image")})'
    return {'off': 'fp32'}.get(args.amp, f'{args.amp} autocast') + (' + channels last' if args.channels_last else '')


def report(confusion, confusion_ms, class_names, args, path, seconds, count) -> None:
    """Print the per-class table, the original's `IoU {class}: x` and `Mean IoU: x` lines, and save a chart."""
    iou = confusion.iou()
    label = ''
    if confusion_ms is not None:
        label = 'scales ' + ','.join(f'{s:g}' for s in (args.eval_scales or [1.0])) + (' + flip' if args.flip else '')
        log.info('per-class IoU (%%): single scale | %s\n%s', label,
                 _side_by_side(class_names, iou, confusion_ms.iou()))
    else:
        log.info('per-class IoU (%%):\n%s', confusion.table(class_names))
    for name, value in zip(class_names, iou):
        log.info('IoU %s: %.2f', name, value * 100)
    log.info('Mean IoU: %.2f', iou.mean() * 100)
    if confusion_ms is not None:
        log.info('Mean IoU (%s): %.2f', label, confusion_ms.mean_iou())
    chart = chart_path(args, path)
    plots.iou_bar_chart(class_names, iou * 100, chart, f'{os.path.basename(path)}: mIoU {iou.mean() * 100:.2f}',
                        extra=None if confusion_ms is None else confusion_ms.iou() * 100, extra_label=label)
    where = f'predictions in {os.path.join(args.output_dir, "val")}/, ' if args.save_predictions else ''
    log.info('%s in %.1f s; %sIoU chart %s', utils.plural(count, 'image'), seconds, where, chart)


def chart_path(args, checkpoint: str) -> str:
    return os.path.join(args.output_dir, os.path.basename(weights.stem(checkpoint)) + '_iou.png')


def _side_by_side(class_names, iou, iou_ms) -> str:
    width = max(len(n) for n in class_names)
    rows = [f'{name:<{width}}  {a * 100:6.2f}  {b * 100:6.2f}' for name, a, b in zip(class_names, iou, iou_ms)]
    rows.append(f'{"mean":<{width}}  {iou.mean() * 100:6.2f}  {iou_ms.mean() * 100:6.2f}')
    return '\n'.join(rows)
