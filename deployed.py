"""Exported models, the files a deployer ships: ONNX (run by ONNX Runtime) and OpenVINO IR (`.xml` + `.bin`, run by
OpenVINO), both written by export.py with this project's metadata in them. `read` checks such a file and gives an
`ExportedModel`, which takes a normalised batch (N, 3, H, W) and returns logits (N, classes, H, W) as a PyTorch
model does, so that evaluation and prediction run it under the same protocol (inference.Runner).

The metadata is one JSON object under the key `vovnet_deeplabv3`: in the ONNX file's metadata_props, in the IR's
runtime info (`rt_info`). It names the model, backbone, classes and their names, output stride, the input
normalisation, the precision and the checkpoint the file was exported from; an IR's also holds the sha256 of its
`.bin`, so that weights from another export are refused rather than run.
"""
import contextlib
import json
import logging
import os
import warnings
import xml.etree.ElementTree as ElementTree

import numpy as np
import torch

import checkpoints
import errors
import files
import utils
from deeplab import BACKBONES, MODELS
from errors import UserError

KEY = 'vovnet_deeplabv3'
VERSION = 1
KINDS = {'.onnx': 'ONNX', '.xml': 'OpenVINO IR'}
FIELDS = ('format_version', 'model', 'backbone', 'num_classes', 'output_stride', 'class_names', 'mean', 'std',
          'precision', 'checkpoint', 'checkpoint_sha256', 'weights_sha256')


def kind(path: str | None) -> str | None:
    """'ONNX' or 'OpenVINO IR' for an exported model's path (by its extension), else None."""
    return KINDS.get(os.path.splitext(path)[1].lower()) if isinstance(path, str) else None


def weights_path(xml: str) -> str:
    """The `.bin` OpenVINO reads beside an IR's `.xml`."""
    return os.path.splitext(xml)[0] + '.bin'


def inputs_of(path: str | None, what: str) -> dict[str, str]:
    """The files a model reference reads, for refusing outputs over them: an IR's .bin with its .xml."""
    found = files.inputs_of(path, what)
    if found and kind(path) == 'OpenVINO IR':
        found[weights_path(path)] = f'{what} (its weights)'
    return found


def metadata(model, checkpoint: str, class_names, precision: str) -> dict:
    """What evaluation and prediction need to run an exported `model` as the checkpoint it came from."""
    return {'format_version': VERSION, 'model': model.name, 'backbone': model.backbone_name,
            'num_classes': model.num_classes, 'output_stride': model.output_stride,
            'class_names': list(class_names) if class_names else None, 'mean': list(utils.MEAN),
            'std': list(utils.STD), 'precision': precision, 'checkpoint': checkpoint,
            'checkpoint_sha256': files.sha256_file(checkpoint) if os.path.isfile(checkpoint) else None}


def require_openvino(purpose: str = 'OpenVINO IR (.xml)'):
    return errors.require('openvino', purpose)


# ---------------------------------------------------------------------------------------------------------------
# OpenVINO from a PyTorch model (export.py writes it, benchmark.py measures it in memory)


def to_openvino(model, height: int, width: int):
    """The OpenVINO model converted from the PyTorch `model` itself (openvino.convert_model traced on a
    (1, 3, height, width) example), taking `image` of any batch, height and width and giving `logits`."""
    ov = require_openvino()
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter('ignore')  # the tracer's notes about the model's Python control flow
        ir = ov.convert_model(model, example_input=torch.randn(1, 3, height, width),
                              input=[ov.PartialShape([-1, 3, -1, -1])])
    ir.inputs[0].get_tensor().set_names({'image'})
    ir.outputs[0].get_tensor().set_names({'logits'})
    return ir


def quantize_openvino(ir, images: list[torch.Tensor]):
    """`ir` quantized to int8 by NNCF (`nncf.quantize`, its defaults: MinMax ranges, fast bias correction),
    calibrated on `images` (3, h, w), normalised as the model's inputs."""
    nncf = errors.require('nncf', 'int8 OpenVINO quantization')
    quiet = ('nncf', 'torch.utils.cpp_extension')  # its notices, and "No CUDA runtime is found" as it imports
    levels = {name: logging.getLogger(name).level for name in quiet}
    for name in quiet:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        return nncf.quantize(ir, nncf.Dataset(images, lambda image: image[None].numpy()), subset_size=len(images))
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def compile_openvino(ir, precision: str | None = None):
    """`ir` compiled for the CPU in `precision` (f32, bf16; None: OpenVINO's default for this CPU): returns a
    function from a float array (N, 3, H, W) to the logits, and the precision OpenVINO uses."""
    ov = require_openvino()
    core = ov.Core()
    if precision == 'bf16' and 'BF16' not in core.get_property('CPU', 'OPTIMIZATION_CAPABILITIES'):
        raise UserError('this CPU has no bf16 units (AVX-512 BF16 or AMX), so OpenVINO would run f32 instead of '
                        'the bf16 asked for; use --amp off (f32), or leave --amp to OpenVINO\'s default.')
    compiled = core.compile_model(ir, 'CPU', {'INFERENCE_PRECISION_HINT': precision} if precision else {})
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        # The input is read where it lies (a C-contiguous float32 array, alive for the call); the output comes back
        # as an array of its own (share_outputs=False), so nothing is copied twice.
        return request.infer({0: x}, share_inputs=True)[0]
    return run, compiled.get_property('INFERENCE_PRECISION_HINT').to_string()


def openvino_version() -> str:
    return require_openvino().get_version().split('-')[0]


# ---------------------------------------------------------------------------------------------------------------
# Writing (export.py)

_PENDING = '0' * 64  # the IR's weights_sha256 until its .bin is written


def stamp_onnx(path: str, meta: dict) -> None:
    """Put `meta` into the ONNX file at `path` (rewritten in place: a staged file of export.py)."""
    onnx = errors.require('onnx', 'writing ONNX metadata')
    proto = onnx.load(path)
    for entry in list(proto.metadata_props):
        if entry.key == KEY:
            proto.metadata_props.remove(entry)
    proto.metadata_props.add(key=KEY, value=json.dumps(meta))
    onnx.save(proto, path)


def save_ir(ir, xml: str, bin_path: str, meta: dict) -> None:
    """Write the OpenVINO model `ir` with `meta` (and its weights' sha256) in its runtime info, as `xml` and
    `bin_path` (staged paths of export.py: OpenVINO writes the weights beside the .xml, under its stem, and they
    are moved to `bin_path`). Weights stay fp32 (OpenVINO would otherwise store them in fp16)."""
    ov = require_openvino()
    written = weights_path(xml)
    ir.set_rt_info(json.dumps({**meta, 'weights_sha256': _PENDING}), [KEY])
    try:
        ov.save_model(ir, xml, compress_to_fp16=False)
        if os.path.abspath(written) != os.path.abspath(bin_path):
            os.replace(written, bin_path)
    except BaseException:
        if os.path.abspath(written) != os.path.abspath(bin_path):
            with contextlib.suppress(OSError):
                os.unlink(written)
        raise
    with open(xml, encoding='utf-8') as f:
        text = f.read()
    if text.count(_PENDING) != 1:  # the .xml is written by this function; never expected
        raise RuntimeError(f'the IR written at {xml} does not hold its metadata once')
    files.atomic_write(xml, lambda f: f.write(text.replace(_PENDING, files.sha256_file(bin_path)).encode()),
                       '--output')


# ---------------------------------------------------------------------------------------------------------------
# Reading


def _parse(text: str | None, path: str) -> dict:
    """The metadata's JSON, checked field by field."""
    if text is None:
        raise UserError(f'{path} carries no metadata of this project ({KEY}): it was not written by this project\'s '
                        f'export.py, so its classes, input normalisation and output are unknown. Export the '
                        f'checkpoint with export.py, or evaluate the checkpoint itself.')
    try:
        meta = json.loads(text)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise UserError(f'{path}: its {KEY} metadata is not a JSON object; the file is damaged. Export it again.')
    unknown = sorted(set(meta) - set(FIELDS))
    if unknown:
        raise UserError(f'{path}: its {KEY} metadata has fields this code does not read ({", ".join(unknown)}); '
                        f'export it again with this version of export.py.')
    version = meta.get('format_version')
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= VERSION:
        raise UserError(f'{path}: format_version={version!r} in its metadata; this code reads 1 to {VERSION}. '
                        f'Export it again with this version of export.py.')
    args = {k: meta.get(k) for k in ('model', 'backbone', 'num_classes', 'output_stride')}
    problem = checkpoints.model_args_problem({k: v for k, v in args.items() if k != 'backbone'})
    if problem is None and args['backbone'] not in BACKBONES:
        problem = f'backbone={args["backbone"]!r}: not a backbone of this project'
    if problem is None and any(v is None for v in args.values()):
        problem = 'model, backbone, num_classes and output_stride must all be given'
    names = meta.get('class_names')
    if problem is None and names is not None and (
            not isinstance(names, list) or len(names) != args['num_classes']
            or not all(isinstance(n, str) and n for n in names)):
        problem = f'class_names={names!r}: {args["num_classes"]} names (strings) must be given, or null'
    for key, wanted in (('mean', utils.MEAN), ('std', utils.STD)):
        value = meta.get(key)
        if problem is None and (not isinstance(value, list) or len(value) != 3
                                or any(abs(float(a) - b) > 1e-6 for a, b in zip(value, wanted))):
            problem = (f'{key}={value!r}: the input normalisation must be ImageNet\'s {list(wanted)}, which '
                       f'evaluation and prediction apply')
    if problem is not None:
        raise UserError(f'{path}: its metadata describes no model this project runs ({problem}); the file is '
                        f'damaged or was written by another program. Export it again.')
    return meta


def _read_onnx(path: str):
    ort = errors.require('onnxruntime', 'running an ONNX model (.onnx)')
    options = ort.SessionOptions()
    options.log_severity_level = 3  # its warnings about the graph go to stderr from C++
    try:
        session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    except Exception as e:  # onnxruntime's errors are not one class (InvalidProtobuf, Fail, ...)
        raise UserError(f'{path} is not an ONNX model ONNX Runtime {ort.__version__} can run '
                        f'({errors.first_line(e)}). Export it again with export.py.') from None
    meta = _parse(session.get_modelmeta().custom_metadata_map.get(KEY), path)
    names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    if names != (['image'], ['logits']):
        raise UserError(f'{path} takes {names[0]} and gives {names[1]}, not image and logits as export.py '
                        f'writes them; export it again.')
    return meta, session


def _is_ir(path: str) -> bool:
    """Whether the file is XML whose root is OpenVINO IR's `net` (checked here: OpenVINO, given another file,
    tries every frontend it has, which print to stderr)."""
    try:
        for _, element in ElementTree.iterparse(path, events=('start',)):
            return element.tag == 'net'
    except (ElementTree.ParseError, UnicodeDecodeError):
        return False
    return False


def _read_openvino(path: str):
    ov = require_openvino()
    if not _is_ir(path):
        raise UserError(f'{path} is not an OpenVINO IR (an XML file whose root is <net>, as export.py --format '
                        f'openvino writes). Export the checkpoint again.')
    weights = weights_path(path)
    if not os.path.isfile(weights):
        raise UserError(f'{path} is an OpenVINO IR without its weights: {weights} is missing. Copy the .bin '
                        f'export.py wrote beside the .xml (they go together), or export again.')
    try:
        model = ov.Core().read_model(path)
    except RuntimeError as e:
        raise UserError(f'{path} cannot be read with {weights} by OpenVINO {ov.get_version()} '
                        f'({_openvino_error(e)}): the .bin is damaged or belongs to another export. Export '
                        f'again.') from None
    text = model.get_rt_info([KEY]).astype(str) if model.has_rt_info([KEY]) else None
    meta = _parse(text, path)
    recorded = meta.get('weights_sha256')
    if recorded is not None and files.sha256_file(weights) != recorded:
        raise UserError(f'{weights} does not match {path}: its sha256 is not the one the .xml records, so it holds '
                        f'the weights of another export (or a damaged copy). Put the .bin written with this .xml '
                        f'beside it, or export again.')
    if [i.get_any_name() for i in model.inputs] != ['image']:
        raise UserError(f'{path} does not take one input named image as export.py writes it; export it again.')
    return meta, model


def _openvino_error(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip() and not line.startswith('Exception from')
             and not line.startswith('Check ')]
    return (lines[-1] if lines else errors.first_line(e))[:200]


def read(path: str, num_classes: int | None = None, precision: str | None = None,
         what: str = 'the model') -> 'ExportedModel':
    """The exported model at `path`, checked: its metadata, its input and output, for OpenVINO its weights file;
    `num_classes`, when given (the dataset's), must be its. `precision`, for an IR only: OpenVINO's inference
    precision (f32 or bf16; None: OpenVINO's default for this CPU)."""
    if not os.path.isfile(path):
        raise UserError(f'{what} {path} does not exist (or is not a file).')
    if kind(path) == 'ONNX':
        if precision not in (None, 'f32'):
            raise UserError(f'{path} runs in ONNX Runtime in the precision it was exported in; --amp '
                            f'{precision} applies to PyTorch and OpenVINO models. Drop --amp.')
        meta, session = _read_onnx(path)
        model = ExportedModel(path, meta, _onnx_runner(session), 'ONNX Runtime', meta.get('precision', 'fp32'))
    else:
        meta, ir = _read_openvino(path)
        model = _openvino_model(path, meta, ir, precision)
    if num_classes is not None and num_classes != model.num_classes:
        raise UserError(f'{path} predicts {model.num_classes} classes, the dataset has {num_classes}: evaluate it on '
                        f'the dataset it was trained on (--dataset, --num_classes, --class_names).')
    return model


def _onnx_runner(session):
    def run(x: np.ndarray) -> np.ndarray:
        return session.run(['logits'], {'image': x})[0]
    return run


def _openvino_model(path: str, meta: dict, ir, precision: str | None) -> 'ExportedModel':
    run, used = compile_openvino(ir, precision)
    stored = meta.get('precision', 'fp32')
    shown = used if stored == 'fp32' else f'{stored}, its other layers in {used}'
    return ExportedModel(path, meta, run, f'OpenVINO {openvino_version()}', shown)


class ExportedModel:
    """An exported file that runs like the PyTorch model it came from: a normalised float batch (N, 3, H, W) in,
    fp32 logits (N, classes, H, W) out, on the CPU. `runtime` and `precision` say how it runs (for the log)."""

    def __init__(self, path: str, meta: dict, run, runtime: str, precision: str):
        self.path, self.meta, self._run = path, meta, run
        self.runtime, self.precision = runtime, precision
        self.name, self.backbone_name = meta['model'], meta['backbone']
        self.num_classes, self.output_stride = meta['num_classes'], meta['output_stride']
        self.class_names = meta.get('class_names')
        self.title = MODELS[self.name].title
        self.model_args = {'backbone': self.backbone_name, 'num_classes': self.num_classes,
                           'output_stride': self.output_stride}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != 'cpu':
            raise UserError(f'{self.path} runs on the CPU ({self.runtime}); drop --device.')
        batch = x.detach().float().contiguous().numpy()
        return torch.from_numpy(np.ascontiguousarray(self._run(batch), dtype=np.float32))

    def eval(self) -> 'ExportedModel':
        """Inference is all it does (called as a PyTorch model's eval() is)."""
        return self
