"""python -m benchmarks [--quick] [--ops ...] [--providers ...] [--dtype ...] [--device ...] [--out DIR] [--overhead]
                     [--fused-shape TxHxV ...]
                     [--model FAMILIES [--vocab V] [--threads T] [--rounds R] [--no-compile]]"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time

import torch


def _list(text):
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv=None):
    from .providers import ALL

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time, memory and %% of speed-of-light of torch_vjp against eager, torch.compile and Liger-Kernel, "
                    "and the VJP against full Jacobians. Sizes come from the preset for the hardware found.")
    parser.add_argument("--ops", type=_list, help="comma-separated op names (default: every op in torch_vjp/testing.py)")
    parser.add_argument("--providers", type=_list,
                        help=f"comma-separated, from {','.join(ALL)}, and for the fused-loss section torch_lce,torch_lce_ref "
                             "(torch's own F.linear_cross_entropy, chunked and reference) (default: all available)")
    parser.add_argument("--dtype", type=_list, help="comma-separated: float32, bfloat16, float16, float64 (default: the preset's)")
    parser.add_argument("--device", help="cpu or cuda[:i] (default: cuda if available, else cpu)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes: about 2 minutes on 2 CPU cores")
    parser.add_argument("--out", help="output folder (default: bench_out/<device>-<date>)")
    parser.add_argument("--only", choices=("main", "jacobian", "fused"), help="run one part only")
    parser.add_argument("--overhead", action="store_true",
                        help="only the per-call cost at small sizes (8x8, 64x256; --shape replaces them), against torch")
    parser.add_argument("--shape", help="ROWSxN: replace the preset's main shape (and drop its row sweep)")
    parser.add_argument("--fused-shape", action="append",
                        help="TOKENSxHIDDENxVOCAB: replace the preset's fused-loss shapes (repeat for several)")
    parser.add_argument("--all-variants", action="store_true", help="every keyword variant of each op, not only the default")
    parser.add_argument("--time-budget", type=float, help="seconds; cases not started by then are recorded as skipped")
    parser.add_argument("--model", type=_list,
                        help="only the training step of these Hugging Face model families, stock against "
                             "torch_vjp.transformers.patch() (benchmarks/models.py; 'all' for every family)")
    parser.add_argument("--vocab", type=int, default=32000, help="--model: the vocabulary (default 32000)")
    parser.add_argument("--threads", type=int, default=1, help="--model on the CPU: intra-op threads (default 1)")
    parser.add_argument("--rounds", type=int, default=7, help="--model: interleaved timed rounds (default 7)")
    parser.add_argument("--no-compile", action="store_true", help="--model: eager only, no torch.compile variants")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (there is none when stderr is not a terminal, as in CI logs)")
    return parser.parse_args(argv)


def command_line(argv) -> str:
    args = argv if argv is not None else sys.argv[1:]
    return "python -m benchmarks" + (" " + shlex.join(args) if args else "")


def overhead_main(args, device: str, command: str):
    from torch_vjp.testing import OPS

    from . import overhead

    from .bench import _busy_seconds_of_others, other_work

    shapes = (tuple(int(v) for v in args.shape.lower().split("x")),) if args.shape else overhead.DEFAULT_SHAPES
    infos = [info for info in OPS if args.ops is None or info.name in args.ops]
    start, others_start = time.monotonic(), _busy_seconds_of_others()
    rows = overhead.run_overhead(infos, shapes, device=device)
    notes = [] if device.startswith("cuda") else [f"other work on the machine during the run: "
                                                   f"{other_work(others_start, time.monotonic() - start)}"]
    kind = "cuda" if device.startswith("cuda") else "cpu"
    out = args.out or os.path.join("bench_out", f"{kind}-{datetime.date.today().isoformat()}")
    paths = overhead.write(rows, out, command, notes)
    print(overhead.markdown(rows, command, notes))
    print(f"benchmarks: wrote {', '.join(sorted(os.path.relpath(p) for p in paths.values()))}")
    return rows


def main(argv=None):
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("benchmarks: --device cuda asked for, but torch sees no CUDA device")

    import dataclasses

    from torch_vjp.testing import OPS_BY_NAME

    from .bench import run_benchmark
    from .config import preset_for
    from .harness import DTYPES

    for name in args.ops or ():
        if name not in OPS_BY_NAME:
            sys.exit(f"benchmarks: unknown op {name!r}; ops: {', '.join(OPS_BY_NAME)}")
    for name in args.dtype or ():
        if name not in DTYPES:
            sys.exit(f"benchmarks: unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    if args.overhead:
        return overhead_main(args, device, command_line(argv))
    if args.model:
        from . import models

        kind = "cuda" if device.startswith("cuda") else "cpu"
        out = args.out or os.path.join("bench_out", f"{kind}-{datetime.date.today().isoformat()}-models")
        return models.main(args.model, args.vocab, device, args.rounds, args.threads, not args.no_compile, out,
                           command_line(argv))
    preset = preset_for(device, args.quick)
    if args.shape:
        rows, n = (int(v) for v in args.shape.lower().split("x"))
        preset = dataclasses.replace(preset, shapes=((rows, n),), row_sweep=())
    if args.fused_shape:
        fused = tuple(tuple(int(v) for v in shape.lower().split("x")) for shape in args.fused_shape)
        if any(len(shape) != 3 for shape in fused):
            sys.exit("benchmarks: --fused-shape is TOKENSxHIDDENxVOCAB, e.g. 1024x1024x32000")
        preset = dataclasses.replace(preset, fused_shapes=fused)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    out = args.out or os.path.join("bench_out", f"{kind}-{datetime.date.today().isoformat()}")
    sections = (args.only,) if args.only else ("main", "jacobian", "fused")
    command = command_line(argv)

    try:
        result = run_benchmark(device, preset, out, ops=args.ops, provider_names=args.providers, dtypes=args.dtype,
                               sections=sections, all_variants=args.all_variants, time_budget=args.time_budget,
                               progress=not args.no_progress and sys.stderr.isatty(), command=command)
    except ValueError as error:  # an unknown provider name
        sys.exit(f"benchmarks: {error}")
    with open(result["paths"]["markdown"]) as f:
        print(f.read())
    print(f"benchmarks: wrote {', '.join(sorted(os.path.relpath(p) for p in result['paths'].values()))} "
          f"in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
