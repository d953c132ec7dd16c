"""Mixed precision (`--amp`): MXNet 1.9.1's automatic mixed precision, opt-in.

The release trains and infers in float32 (`off`, the default: parity mode, nothing here runs).
`bf16` and `fp16` go through `mxnet.contrib.amp`, not hand-written casts: `amp.init` rewrites
the operator functions so that convolutions and dense layers (fc6-fc8 are convolutions) take
low-precision inputs and weights; BatchNorm, our custom operators (bottom-up, sign flip,
superpixel pooling, top-down: MXNet's AMP keeps `Custom` in float32), the losses, softmax and
sigmoid, reductions and the Trainer's weights and optimizer states stay float32. Weights are
float32 Parameters cast inside the graph, so checkpoints keep the release's float32 format and
a run may change precision between epochs (`amp` is free on resume: icd.train.RESUME_FREE).

- bf16: CPUs with native bfloat16 (avx512_bf16 or AMX); oneDNN runs the convolutions. MXNet
  1.9.1 has no bfloat16 kernels on GPUs. Its exponent is float32's: no loss scaling.
- fp16: GPUs (tensor cores); dynamic loss scaling skips the steps whose gradients overflow
  (MXNet's LossScaler: halve on overflow, double after 2000 clean steps); the training log shows
  the scale and the skipped steps, and the scale is kept in the run record so that a resume
  continues with it. MXNet 1.9.1 has no fast float16 convolutions on CPUs: refused there.

`amp.init` changes the `mx.nd` / `mx.sym` namespaces of the whole process and cannot be undone:
a process runs in one precision (`enable` refuses a second one), and the tests of bf16 run in a
subprocess.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import mxnet as mx
from mxnet import autograd, gluon
from mxnet.contrib import amp as mx_amp
from mxnet.contrib.amp import amp as mx_amp_lists
from mxnet.contrib.amp.loss_scaler import LossScaler

from .constants import PRECISIONS

DTYPES = {"bf16": "bfloat16", "fp16": "float16"}

# Operators kept in float32 beyond MXNet's own list: BatchNorm (which AMP lets follow its input),
# sigmoid (float16 only; bf16's list already has it) and concat, which AMP leaves to its inputs
# and which refuses a float32 and a low-precision input together.
EXTRA_FP32_OPS = ("BatchNorm", "sigmoid", "Concat", "concat")

# oneDNN ISA caps (DNNL_MAX_CPU_ISA) under which bfloat16 is emulated, not native.
EMULATED_BF16_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_MIC", "AVX512_MIC_4OPS",
                      "AVX512_CORE", "AVX512_CORE_VNNI")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")

_enabled: Optional[str] = None   # the precision amp.init gave this process (process-wide)


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset:
    """The CPU's feature flags (the first processor's `flags` line); empty where unknown."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def unsupported_reason(precision: str, contexts: Sequence[mx.Context]) -> Optional[str]:
    """Why `precision` cannot run on `contexts` here, or None when it can."""
    if precision == "off":
        return None
    if precision not in PRECISIONS:
        return f"unknown precision {precision!r}; one of {', '.join(PRECISIONS)}"
    gpu = any(c.device_type == "gpu" for c in contexts)
    cpu = any(c.device_type != "gpu" for c in contexts)
    if precision == "fp16":
        if cpu:
            return ("float16 needs GPUs (--gpus): MXNet 1.9.1 has no fast float16 convolutions "
                    "on CPUs; use --amp bf16 on a CPU with avx512_bf16 or AMX")
        return None
    if gpu:
        return ("bfloat16 runs only on CPUs in MXNet 1.9.1 (oneDNN); on GPUs use --amp fp16")
    isa = os.environ.get("DNNL_MAX_CPU_ISA", "").upper()
    if isa in EMULATED_BF16_ISAS:
        return (f"DNNL_MAX_CPU_ISA={isa} caps oneDNN below native bfloat16: it would emulate "
                f"bfloat16, slower than float32 (README: Mixed precision)")
    if not cpu_flags() & set(NATIVE_BF16_FLAGS):
        return ("this CPU has no native bfloat16 (neither avx512_bf16 nor amx_bf16 in "
                "/proc/cpuinfo): oneDNN would emulate it, slower than float32, or fail "
                "(README: Mixed precision)")
    return None


def supported_precisions(contexts: Sequence[mx.Context]) -> Dict[str, Optional[str]]:
    """{precision: None if it runs on `contexts` here, else why not} (icd-bench --amp)."""
    return {p: unsupported_reason(p, contexts) for p in PRECISIONS}


def enable(precision: str, contexts: Sequence[mx.Context], flag: str = "--amp") -> None:
    """Make this process run `precision` on `contexts`: ValueError naming `flag` where it
    cannot; `amp.init` for bf16/fp16 before any network is built (a process keeps it)."""
    global _enabled
    reason = unsupported_reason(precision, contexts)
    if reason:
        raise ValueError(f"{flag} {precision}: {reason}")
    if _enabled == precision or (_enabled is None and precision == "off"):
        return
    if _enabled is not None or mx_amp_lists._amp_initialized:
        raise ValueError(f"{flag} {precision}: this process already runs "
                         f"{_enabled or 'an AMP precision'}; MXNet cannot undo amp.init, run "
                         f"it in a new process")
    dtype = mx_amp_lists.bfloat16 if precision == "bf16" else DTYPES[precision]
    fp32_ops = sorted(set(mx_amp.list_fp32_ops(dtype)) | set(EXTRA_FP32_OPS))
    mx_amp.init(target_dtype=DTYPES[precision], fp32_ops=fp32_ops)
    _enabled = precision


def enabled() -> str:
    """The precision of this process: off, bf16 or fp16."""
    return _enabled or "off"


class CountingLossScaler(LossScaler):
    """MXNet's dynamic loss scaler that also counts the steps it skipped on overflow.

    MXNet's scaler applies a new scale one step late (`has_overflow` first takes the scale it
    chose at the previous step, then chooses the next): both are state."""

    def __init__(self, loss_scale: float = 2.0 ** 16, next_loss_scale: Optional[float] = None,
                 unskipped: int = 0, skipped: int = 0):
        super().__init__()
        self._loss_scale = loss_scale
        self._next_loss_scale = loss_scale if next_loss_scale is None else next_loss_scale
        self._unskipped = unskipped
        self.skipped = skipped

    def has_overflow(self, params) -> bool:
        overflow = super().has_overflow(params)
        self.skipped += overflow
        return overflow

    def state(self) -> Dict[str, float]:
        """What a resume needs and the log shows: the scale of the next backward, the one
        after, clean steps since the last change, the steps skipped so far."""
        return {"loss_scale": self._loss_scale, "next_loss_scale": self._next_loss_scale,
                "unskipped": self._unskipped, "skipped_steps": self.skipped}

    @classmethod
    def from_state(cls, state: Optional[dict]) -> "CountingLossScaler":
        state = state or {}
        return cls(float(state.get("loss_scale", 2.0 ** 16)),
                   state.get("next_loss_scale"), int(state.get("unskipped", 0)),
                   int(state.get("skipped_steps", 0)))


def prepare_trainer(trainer: gluon.Trainer, precision: str,
                    record: Optional[dict] = None) -> gluon.Trainer:
    """fp16: dynamic loss scaling on `trainer`, continuing the scale of a resumed run's
    `record` (its `amp` entry); bf16 and off: the trainer as it is."""
    if precision != "fp16":
        return trainer
    mx_amp.init_trainer(trainer)
    # amp.scale_loss and Trainer._update read the scaler from this attribute (MXNet's AMP API)
    trainer._amp_loss_scaler = CountingLossScaler.from_state((record or {}).get("amp"))
    return trainer


def backward(losses: List[mx.nd.NDArray], trainer: gluon.Trainer) -> None:
    """autograd.backward of the devices' losses; fp16: of the losses times the loss scale,
    recorded onto the losses' graph (the Trainer divides the gradients by it again)."""
    if getattr(trainer, "_amp_loss_scaler", None) is None:
        autograd.backward(losses)
        return
    with autograd.record(), mx_amp.scale_loss(losses, trainer) as scaled:
        autograd.backward(scaled)


def trainer_state(trainer: gluon.Trainer) -> Dict[str, float]:
    """The loss scaler's state for the log and the run record (fp16); {} otherwise."""
    scaler = getattr(trainer, "_amp_loss_scaler", None)
    return scaler.state() if isinstance(scaler, CountingLossScaler) else {}
