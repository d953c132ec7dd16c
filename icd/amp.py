"""Mixed precision (`--amp`): MXNet 1.9.1's automatic mixed precision, opt-in.

The release trains and infers in float32 (`off`, the default: parity mode, nothing here runs).
`bf16` and `fp16` go through `mxnet.contrib.amp`, not hand-written casts: `amp.init` rewrites
the operator functions so that convolutions and dense layers (fc6-fc8 are convolutions) take
low-precision inputs and weights; BatchNorm follows its input under fp16 (MXNet's fp16 list:
float32 parameters) and stays float32 under bf16; our custom operators (bottom-up, sign flip,
superpixel pooling, top-down: MXNet's AMP keeps `Custom` in float32), the losses, softmax and
sigmoid, reductions and the Trainer's weights and optimizer states stay float32. Weights are
float32 Parameters cast inside the graph, so checkpoints keep the release's float32 format and
a run may change precision between epochs (`amp` is free on resume: icd.runs.RESUME_FREE).

- bf16: CPUs with native bfloat16 (avx512_bf16 or AMX); oneDNN runs the convolutions. MXNet
  1.9.1 has no bfloat16 kernels on GPUs. Its exponent is float32's: no loss scaling.
- fp16: GPUs (tensor cores); dynamic loss scaling skips the steps whose gradients overflow on
  any device (MXNet's LossScaler rule: halve on overflow, double after 2000 clean steps), held
  on the devices (`LossScaledTrainer`: no read-back per step); the training log shows the scale
  and the skipped steps, and the scale is kept in the run record so that a resume continues
  with it. MXNet 1.9.1 has no fast float16 convolutions on CPUs: refused there.

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

from .constants import PRECISIONS

DTYPES = {"bf16": "bfloat16", "fp16": "float16"}

# Operators kept in float32 beyond MXNet's own lists: concat, which AMP leaves to its inputs and
# which refuses a float32 and a low-precision input together; fp16: sigmoid (bf16's list has
# it). BatchNorm follows its input under fp16 as MXNet's fp16 list has it (float16 data, float32
# parameters and statistics: no cast in or out; tests/test_amp.py counts the casts); bf16 keeps
# it in float32 as it was measured (MXNet's bf16 list would run it in bfloat16 with float32
# parameters; unmeasured: no native bfloat16 where this was changed).
EXTRA_FP32_OPS = {"bf16": ("BatchNorm", "Concat", "concat"),
                  "fp16": ("sigmoid", "Concat", "concat")}

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
                f"bfloat16, slower than float32 (docs/mixed-precision.md)")
    if not cpu_flags() & set(NATIVE_BF16_FLAGS):
        return ("this CPU has no native bfloat16 (neither avx512_bf16 nor amx_bf16 in "
                "/proc/cpuinfo): oneDNN would emulate it, slower than float32, or fail "
                "(docs/mixed-precision.md)")
    return None


def supported_precisions(contexts: Sequence[mx.Context]) -> Dict[str, Optional[str]]:
    """{precision: None if it runs on `contexts` here, else why not} (icd-bench --amp)."""
    return {p: unsupported_reason(p, contexts) for p in PRECISIONS}


def enable(precision: str, contexts: Sequence[mx.Context], flag: str = "--amp") -> None:
    """Make this process run `precision` on `contexts`: ValueError naming `flag` where it
    cannot; `amp.init` for bf16/fp16 before any network is built (a process keeps it)."""
    reason = unsupported_reason(precision, contexts)
    if reason:
        raise ValueError(f"{flag} {precision}: {reason}")
    if _enabled == precision or (_enabled is None and precision == "off"):
        return
    if _enabled is not None or mx_amp_lists._amp_initialized:
        raise ValueError(f"{flag} {precision}: this process already runs "
                         f"{_enabled or 'an AMP precision'}; MXNet cannot undo amp.init, run "
                         f"it in a new process")
    rewrite(precision)


def rewrite(precision: str) -> None:
    """amp.init with this project's lists: every graph traced from now on in this process is
    `precision`'s (bf16 / fp16), on any device (`enable` checks the devices; graphs can be
    built and inspected without running them)."""
    global _enabled
    dtype = mx_amp_lists.bfloat16 if precision == "bf16" else DTYPES[precision]
    fp32_ops = sorted(set(mx_amp.list_fp32_ops(dtype)) | set(EXTRA_FP32_OPS[precision]))
    mx_amp.init(target_dtype=DTYPES[precision], fp32_ops=fp32_ops)
    _enabled = precision


def enabled() -> str:
    """The precision of this process: off, bf16 or fp16."""
    return _enabled or "off"


MAX_LOSS_SCALE = 2.0 ** 24        # MXNet's LossScaler: the scale's ceiling,
SCALE_SEQ_LEN = 2000              # the clean steps after which it doubles,
INITIAL_LOSS_SCALE = 2.0 ** 16    # and its start
CHUNK = 200                       # arrays per multi_all_finite call (MXNet's LossScaler's)


class DeviceLossScaler:
    """MXNet's dynamic loss scaling (contrib.amp LossScaler's rule: halve on overflow, double
    after 2000 clean steps, a new scale applied one step late) held on the devices, so that no
    step reads anything back to the host: each device keeps [loss scale, next loss scale, clean
    steps since the last change, skipped steps] (4,) float32 (exact up to 2^24 steps), all
    devices the same values; `state` reads device 0's (a log line, a checkpoint)."""

    def __init__(self, contexts: Sequence[mx.Context], state: Optional[dict] = None):
        state = state or {}
        scale = float(state.get("loss_scale", INITIAL_LOSS_SCALE))
        values = [scale, float(state.get("next_loss_scale") or scale),
                  float(state.get("unskipped", 0)), float(state.get("skipped_steps", 0))]
        self.contexts = list(contexts)
        self.values = [mx.nd.array(values, ctx=ctx) for ctx in self.contexts]

    def scaled(self, loss: mx.nd.NDArray) -> mx.nd.NDArray:
        """`loss` times the loss scale of its device (recorded when called under record)."""
        scale = self.values[self.contexts.index(loss.context)][0:1]
        return mx.nd.broadcast_mul(loss, scale.reshape((1,) * loss.ndim))

    def finite(self, params: Sequence[gluon.Parameter]) -> List[mx.nd.NDArray]:
        """1 where every gradient of every device is finite, else 0: (1,) on each device.
        Each device's own gradients are checked (with the kvstore's sum or without it)."""
        flags = []
        for d, ctx in enumerate(self.contexts):
            grads = [p.list_grad()[d] for p in params if p.grad_req != "null"]
            flag = mx.nd.ones((1,), ctx=ctx)
            for i in range(0, len(grads), CHUNK):
                mx.nd.multi_all_finite(*grads[i:i + CHUNK], num_arrays=len(grads[i:i + CHUNK]),
                                       init_output=False, out=flag)
            flags.append(flag)
        verdict = flags[0]
        for flag in flags[1:]:
            verdict = verdict * flag.as_in_context(verdict.context)
        return [verdict.as_in_context(ctx) for ctx in self.contexts]

    def unscale(self, params: Sequence[gluon.Parameter]) -> None:
        """Divide every device's gradients by its loss scale."""
        for d, values in enumerate(self.values):
            inverse = 1.0 / values[0:1]
            for p in params:
                if p.grad_req != "null":
                    grad = p.list_grad()[d]
                    mx.nd.broadcast_mul(grad, inverse.reshape((1,) * grad.ndim), out=grad)

    def advance(self, finite: Sequence[mx.nd.NDArray]) -> None:
        """MXNet's LossScaler.has_overflow after the check, on the devices: the next scale
        becomes the scale; on overflow the next halves and the clean count restarts, else it
        counts; after SCALE_SEQ_LEN clean steps the next doubles (at most MAX_LOSS_SCALE)."""
        for values, ok in zip(self.values, finite):
            scale, unskipped = values[1:2], (values[2:3] + 1) * ok
            grow = unskipped == SCALE_SEQ_LEN
            following = mx.nd.where(ok, scale, scale / 2)
            following = mx.nd.where(grow, mx.nd.minimum(scale * 2, MAX_LOSS_SCALE), following)
            values[:] = mx.nd.concat(scale, following, unskipped * (1 - grow),
                                     values[3:4] + 1 - ok, dim=0)

    def state(self) -> Dict[str, float]:
        """What a resume needs and the log shows (one read of device 0's values): the scale of
        the next backward, the one after, clean steps since the last change, skipped steps."""
        scale, following, unskipped, skipped = self.values[0].asnumpy().tolist()
        return {"loss_scale": scale, "next_loss_scale": following, "unskipped": int(unskipped),
                "skipped_steps": int(skipped)}


def _arrays(state) -> List[mx.nd.NDArray]:
    """The NDArrays of an optimizer state (an array, None or nested tuples of them)."""
    if isinstance(state, (tuple, list)):
        return [a for s in state for a in _arrays(s)]
    return [state] if isinstance(state, mx.nd.NDArray) else []


class LossScaledTrainer(gluon.Trainer):
    """The Trainer of fp16: dynamic loss scaling (`DeviceLossScaler`) whose overflow check
    never reaches the host. The step is applied, then undone on the devices where a gradient
    of any device was not finite: weights and optimizer states are copied before the update
    and put back by `where` (a copy of the trainable weights and their states per device
    while the update runs). MXNet's own check (Trainer._update's `_amp_loss_scaler`) reads
    its flag back every step and sees only the first device's gradient; it is not used.

    Needs update_on_kvstore=False (icd.engine.make_trainer): with the optimizer inside the
    kvstore's pushpull, the weights would move before any check. The optimizer's update
    counts go on over a skipped step (they only matter to Adam's bias correction)."""

    def __init__(self, *args, amp_state: Optional[dict] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_scaler = DeviceLossScaler(self._contexts, amp_state)

    def _update(self, ignore_stale_grad=False):
        indices = [i for i, p in enumerate(self._params) if p.grad_req != "null"]
        params = [self._params[i] for i in indices]
        finite = self.loss_scaler.finite(params)
        self.loss_scaler.unscale(params)
        kept = []
        for d, updater in enumerate(self._updaters):
            _ready_states(updater, indices, [self._params[i].list_data()[d] for i in indices])
            arrays = [self._params[i].list_data()[d] for i in indices] + [
                a for i in indices for a in _arrays(updater.states[i])]
            kept.append([(a, a.copy()) for a in arrays])
        super()._update(ignore_stale_grad)
        for ok, pairs in zip(finite, kept):
            for array, before in pairs:
                keep = mx.nd.broadcast_to(ok.reshape((1,) * array.ndim), array.shape)
                array[:] = mx.nd.where(keep, array, before)
        self.loss_scaler.advance(finite)


def _ready_states(updater: mx.optimizer.Updater, indices: Sequence[int],
                  weights: Sequence[mx.nd.NDArray]) -> None:
    """Create or move to the weights' device the optimizer states of `indices` as
    mx.optimizer.Updater.__call__ does first, so that they can be copied before the update."""
    for index, weight in zip(indices, weights):
        if index not in updater.states:
            updater.states[index] = updater.optimizer.create_state_multi_precision(index, weight)
            updater.states_synced[index] = True
        elif not updater.states_synced[index]:
            updater.states[index] = updater.sync_state_context(updater.states[index],
                                                               weight.context)
            updater.states_synced[index] = True


def backward(losses: List[mx.nd.NDArray], trainer: gluon.Trainer) -> None:
    """autograd.backward of the devices' losses; fp16: of the losses times the loss scale,
    recorded onto the losses' graph (the Trainer divides the gradients by it again)."""
    if isinstance(trainer, LossScaledTrainer):
        with autograd.record():
            losses = [trainer.loss_scaler.scaled(loss) for loss in losses]
    autograd.backward(losses)


def trainer_state(trainer: gluon.Trainer) -> Dict[str, float]:
    """The loss scaler's state for the log and the run record (fp16); {} otherwise."""
    return trainer.loss_scaler.state() if isinstance(trainer, LossScaledTrainer) else {}
