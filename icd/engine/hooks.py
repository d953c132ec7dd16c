"""What the loop does besides the step: hooks (detectron2's HookBase), called in the order given
to `icd.engine.train` (None: `default_hooks`).

The default hooks, in their order: the sign flip's store exchanged between machines after every
step (`SignFlipExchangeHook`), the NaN stop (`NanStopHook`), the log lines and the progress bar
(`LogHook`), the epoch's record (`EpochRecordHook`) and the checkpoint with its run record, its
rotation, the JSON log and the epoch's picture (`CheckpointHook`). A hook that talks to the other
workers (a collective) runs on every worker in the same order.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from typing import TYPE_CHECKING, Dict, List, Optional

import mxnet as mx
from mxnet import gluon

from .. import amp, distributed as dist
from ..checkpoint import file_digest, save_states, staged_params
from ..data.voc import write_image
from ..io import deferred_interrupt, write_json
from ..model import ops
from ..runs import checkpoint_path, epoch_image_path, log_path, rotate_checkpoints
from .exceptions import TrainingDiverged

if TYPE_CHECKING:   # for annotations only: the loop imports this module
    from ..tasks.base import RunningMetrics
    from .loop import Loop

log = logging.getLogger(__name__)


class Hook:
    """Something the loop does besides the step: the loop calls `before_train` once the
    network, the Trainer and the task's shared state are ready, `before_epoch` at the start of
    every epoch, `after_step` after every optimizer step with the batch's metrics and
    `after_epoch` at the end of every epoch, each in the order of its hooks."""

    def before_train(self, loop: Loop) -> None:
        pass

    def before_epoch(self, loop: Loop) -> None:
        pass

    def after_step(self, loop: Loop, index: int, metrics: RunningMetrics) -> None:
        pass

    def after_epoch(self, loop: Loop) -> None:
        pass


class SignFlipExchangeHook(Hook):
    """With several workers, after every step each worker adopts the sign flip's moving mean that
    applies every device's update of the batch in the order (rank, arrival on the worker)
    (icd.distributed.SignFlipExchange; collective). Only a network whose devices share one store
    (icd.model.ops.share_moving_mean, set up by its task's `start`) has one to exchange."""

    def before_train(self, loop: Loop) -> None:
        store = ops.shared_moving_mean(getattr(loop.net, "share_key", None))
        self.exchange = None if store is None or loop.workers.num_workers == 1 else \
            dist.SignFlipExchange(loop.workers, store, loop.net.icd_accum_resign_moving_mean)

    def after_step(self, loop: Loop, index: int, metrics: RunningMetrics) -> None:
        if self.exchange is not None:
            self.exchange.after_step()


class NanStopHook(Hook):
    """Stop on a NaN or infinite loss (TrainingDiverged naming where, and the last good
    checkpoint): the task's losses summed since the last check, reduced over the workers (every
    worker stops at the same iteration), checked every `log_every` batches and at the end of
    every epoch, before anything of the epoch is logged or saved."""

    def before_epoch(self, loop: Loop) -> None:
        self.window = loop.task.metrics(loop.contexts[0])

    def after_step(self, loop: Loop, index: int, metrics: RunningMetrics) -> None:
        self.window.add(metrics)
        if (index + 1) % loop.log_every == 0:
            self.check(loop)

    def after_epoch(self, loop: Loop) -> None:
        self.check(loop)

    def check(self, loop: Loop) -> None:
        dist.reduce_metrics(loop.workers, self.window)
        figures = self.window.read()
        self.window.reset()
        losses = loop.task.losses
        if not all(math.isfinite(figures[k]) for k in losses):
            last = checkpoint_path(loop.cfg, loop.epoch - 1) if loop.epoch > 0 else \
                "none (first epoch)"
            raise TrainingDiverged(
                f"loss became NaN or infinite in epoch {loop.epoch} by iteration "
                f"{loop.iteration} ({', '.join(f'{k} {figures[k]}' for k in losses)}); training "
                f"stopped, last good checkpoint: {last}. Lower --learning-rate or check the "
                f"data.")


class LogHook(Hook):
    """Every `log_every` batches: the running window's metrics reduced over the workers, a log
    line and the progress bar's figures."""

    def before_epoch(self, loop: Loop) -> None:
        self.window = loop.task.metrics(loop.contexts[0])

    def after_step(self, loop: Loop, index: int, metrics: RunningMetrics) -> None:
        self.window.add(metrics)
        if (index + 1) % loop.log_every:
            return
        dist.reduce_metrics(loop.workers, self.window)
        now = self.window.read()
        log.info("epoch %d batch %d lr %.3g %s", loop.epoch, index + 1, loop.lr, " ".join(
            f"{k} {v:.4g}" for k, v in {**loop.task.schedule(), **now,
                                        **amp.trainer_state(loop.trainer)}.items()
            if v is not None))
        loop.bar.set_postfix({k: f"{now[k]:.3g}" for k in loop.task.sums + ("images_per_s",)})
        self.window.reset()


class EpochRecordHook(Hook):
    """At the end of an epoch: its metrics reduced over the workers and the epoch's record (lr,
    schedule, seconds, metrics, precision) appended to the run's log, and logged."""

    def before_epoch(self, loop: Loop) -> None:
        self.epoch_metrics = loop.task.metrics(loop.contexts[0])

    def after_step(self, loop: Loop, index: int, metrics: RunningMetrics) -> None:
        self.epoch_metrics.add(metrics)

    def after_epoch(self, loop: Loop) -> None:
        dist.reduce_metrics(loop.workers, self.epoch_metrics)
        loop.records.append(dict(
            epoch=loop.epoch, run=loop.run["run"], lr=loop.epoch_lr, **loop.task.schedule(),
            seconds=time.time() - loop.epoch_started, **self.epoch_metrics.read(),
            amp=loop.cfg.amp, **amp.trainer_state(loop.trainer)))
        log.info("epoch %d done: %s", loop.epoch, json.dumps(loop.records[-1]))


class CheckpointHook(Hook):
    """At the end of an epoch, together or not at all under Ctrl-C: the epoch image, the
    checkpoint (.states, run record and the JSON log first, .params last: a checkpoint is
    complete or not resumable, icd.runs.complete_checkpoints; the record holds the digests of
    the .params and .states, which a resume checks), then the rotation. Rank 0 writes; the
    collectives (device states, a dist checkpoint's values) run on every worker in the same
    order."""

    def after_epoch(self, loop: Loop) -> None:
        cfg, workers, epoch = loop.cfg, loop.workers, loop.epoch
        with deferred_interrupt():
            if workers.rank == 0:
                write_image(epoch_image_path(cfg, epoch),
                            loop.task.epoch_image(loop.inputs[0], loop.outputs[0]))
            states = dist.all_device_states(workers, device_states(loop.net)) \
                if len(loop.contexts) * workers.num_workers > 1 else None
            values = dist.checkpoint_values(workers, loop.net)
            if workers.rank == 0:
                states_file = checkpoint_path(cfg, epoch, "states")
                with staged_params(values, checkpoint_path(cfg, epoch)) as params:
                    save_states(loop.trainer, states_file)
                    digests = {"params": params, "states": file_digest(states_file)}
                    write_json(checkpoint_path(cfg, epoch, "json"),
                               self.run_record(loop, states, digests))
                    # the log before the .params: a job killed once the checkpoint is complete
                    # has logged its epoch (a resume keeps the records before its begin_epoch)
                    write_json(log_path(cfg), loop.records)
                rotate_checkpoints(cfg, loop.run["run"])
            loop.saved_epoch = epoch

    @staticmethod
    def run_record(loop: Loop, states: Optional[Dict[str, list]],
                   digests: Dict[str, str]) -> Dict[str, object]:
        """The checkpoint's run record: the run, the seed, the digests of the checkpoint's
        .params and .states, the task's shared state, every device's states, the class list,
        the loss scaler's state (fp16) and the config."""
        cfg = loop.cfg
        return dict(run=loop.run["run"], epoch=loop.epoch, seed=cfg.seed, digests=digests,
                    generators="reseeded at each epoch start from (seed, epoch)",
                    **loop.task.run_record(), device_states=states,
                    amp=amp.trainer_state(loop.trainer) or None,
                    classes=list(cfg.class_names), previous_run=loop.run.get("previous_run"),
                    workers=loop.workers.num_workers, config=dataclasses.asdict(cfg))


def default_hooks() -> List[Hook]:
    """The hooks of a training run, new ones (they hold an epoch's running figures), in order."""
    return [SignFlipExchangeHook(), NanStopHook(), LogHook(), EpochRecordHook(),
            CheckpointHook()]


def device_states(net: gluon.Block) -> Dict[str, list]:
    """Each device's copy of every non-trained state (BatchNorm statistics, sign-flip means):
    the checkpoint holds their average (release), a resumed run needs each copy back."""
    return {name: [copy.asnumpy().tolist() for copy in p.list_data()]
            for name, p in net.collect_params().items() if p.grad_req == "null"}


def restore_device_states(net: gluon.Block, saved: Optional[Dict[str, list]],
                          contexts: List[mx.Context], source: str) -> None:
    """Put back the per-device states of `device_states` (the checkpoint gave every device the
    average); without them, or for another number of devices, the average stays (a warning)."""
    if not saved or any(len(copies) != len(contexts) for copies in saved.values()):
        log.warning("%s: no per-device states for %d devices; every device resumes from their "
                    "average, so the run is not bit-identical to an uninterrupted one", source,
                    len(contexts))
        return
    params = net.collect_params()
    for name, copies in saved.items():
        for target, value in zip(params[name].list_data(), copies):
            target[:] = mx.nd.array(value, dtype=target.dtype)
