"""An OpenVINO IR's latency measured with OpenVINO's own API and nothing of this project: the reference that
benchmark.py's `ov` rows (and main.py / predict.py --checkpoint model.xml) are compared with (docs/deployment.md).

    python scripts/openvino_alone.py demo_int8.xml demo.xml --size 513

Each IR is compiled for the CPU with OpenVINO's defaults (and, with --precision f32, in f32), then run on one
random (1, 3, size, size) input: 3 warm-up runs, then --runs timed ones; the median is printed, first with the
IR's dynamic shapes, then reshaped to the static input shape. The IRs are measured in turn, --rounds times over.
"""
import argparse
import statistics
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('irs', nargs='+', help='.xml files (their .bin beside them)')
    parser.add_argument('--size', type=int, default=513)
    parser.add_argument('--runs', type=int, default=10)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--precision', choices=['f32', 'bf16'], help="INFERENCE_PRECISION_HINT (default: OpenVINO's)")
    args = parser.parse_args()
    import openvino as ov
    core = ov.Core()
    x = np.random.default_rng(0).standard_normal((1, 3, args.size, args.size)).astype(np.float32)
    config = {'INFERENCE_PRECISION_HINT': args.precision} if args.precision else {}
    compiled = {}
    for path in args.irs:
        for shape in ('dynamic', 'static'):
            model = core.read_model(path)
            if shape == 'static':
                model.reshape([1, 3, args.size, args.size])
            compiled[path, shape] = core.compile_model(model, 'CPU', config)
    times = {key: [] for key in compiled}
    for _ in range(args.rounds):
        for key, net in compiled.items():
            request = net.create_infer_request()
            for _ in range(3):
                request.infer({0: x})
            for _ in range(args.runs):
                start = time.perf_counter()
                request.infer({0: x})
                times[key].append((time.perf_counter() - start) * 1000)
    print(f'OpenVINO {ov.get_version()}, {args.size}x{args.size}, batch 1, median of {args.rounds} x {args.runs} runs')
    for (path, shape), values in times.items():
        precision = compiled[path, shape].get_property('INFERENCE_PRECISION_HINT')
        print(f'{path}  {shape:7}  {statistics.median(values):8.1f} ms  ({precision})')


if __name__ == '__main__':
    main()
