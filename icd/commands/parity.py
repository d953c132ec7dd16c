r"""Check our Gluon ICDNet against a parity bundle recorded from the original release.

Example:
  icd-parity BUNDLE_DIR [--ctx cpu(0)[,cpu(1)]] [--strict] [--free-running]
Teacher-forced: every step starts from the reference's state before it. Each step is also run
from its start perturbed by 1e-7 (relative) with 3 different draws and, on CPU contexts, once
under each of DNNL_MAX_CPU_ISA=SSE41 and AVX2 (other kernels' rounding, in subprocesses): a
tensor's noise is the largest movement of our own result, and it is judged `error <= max(tolerance, 4 x noise)`; a
tensor whose noise exceeds 1e-3 is unjudgeable (counted in the verdict line). Prints one line
per tensor (error, tolerance, noise, bound, ok|FAIL|unjudgeable), then
`parity: <n> tensors, <u> unjudgeable (noise > 0.001), worst <err> (bound <b>) at <name>: PASS|FAIL`.
This replays the bundle 6 times: a full-width VGG16 bundle (2 steps, 32 px, batch 2) took 33 s
(measured once, on 2 AVX-512 cores shared with other jobs); --strict replays it once and judges
against the fixed tolerances (1e-4 outputs, 1e-3 updates) alone.
--free-running replays all steps from the start instead (its noise includes the chaos of
several steps: later updates are often unjudgeable).
Before MXNet is loaded, MXNET_ENFORCE_DETERMINISM=1, MXNET_CUDNN_AUTOTUNE_DEFAULT=0 and
NVIDIA_TF32_OVERRIDE=0 are set (deterministic kernels, no autotune, no TF32 on GPUs).
Exit status: 0 PASS, 1 FAIL or an unreadable bundle (named), 2 bad arguments.
"""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

# docs/gpus.md: deterministic kernels, no cuDNN autotune (timing-dependent choice of
# algorithms), no TF32 convolutions on Ampere and newer; read by MXNet when it loads, so set
# here, before ..devices and ..parity import mxnet (no effect on a process that already has it)
DETERMINISM = {"MXNET_ENFORCE_DETERMINISM": "1", "MXNET_CUDNN_AUTOTUNE_DEFAULT": "0",
               "NVIDIA_TF32_OVERRIDE": "0"}
os.environ.update(DETERMINISM)

from ..devices import parse_context  # noqa: E402
from ..parity import check_bundle, report  # noqa: E402
from .runner import EXIT_ERROR, Parser, run  # noqa: E402


def build_parser() -> Parser:
    parser = Parser(__doc__, prog="icd-parity")
    parser.add_argument("bundle", help="bundle folder (meta.json, params.params, *.npz)")
    parser.add_argument("--ctx", default=None,
                        help="devices, comma-separated, as many as the bundle was recorded on "
                             "(meta num_devices); default cpu(0) .. cpu(n-1)")
    parser.add_argument("--strict", action="store_true",
                        help="fixed tolerances (1e-4 outputs, 1e-3 updates), no noise runs")
    parser.add_argument("--free-running", action="store_true",
                        help="replay all steps from the start (noise: our run from a perturbed "
                             "start)")
    return parser


def _parity(args: argparse.Namespace) -> int:
    contexts = [parse_context(c) for c in args.ctx.split(",")] if args.ctx else None
    errors = check_bundle(args.bundle, contexts, free_running=args.free_running,
                          strict=args.strict)
    lines = report(errors)
    print("\n".join(lines))
    return 0 if lines[-1].endswith("PASS") else EXIT_ERROR


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(build_parser(), _parity, argv)
