"""Training beyond one machine on MXNet's parameter server (the hooks of icd.engine's loop).

A job is started by `icd-launch` (icd.commands.launch, around MXNet's launcher): a scheduler,
servers and workers find each other through DMLC_ROLE, DMLC_PS_ROOT_URI, DMLC_PS_ROOT_PORT,
DMLC_NUM_SERVER and DMLC_NUM_WORKER. With `--kvstore dist_device_sync` (MXNet's name; its
substring rule also takes dist_sync_device) or dist_sync, every worker runs the training loop,
whatever its task (ICD, CAM, ablations, DeepLab on the seeds), on its own devices:
  - global batch = per-worker batch x workers; gradients are summed over all devices of all
    workers by the servers and rescaled by the global batch; every worker applies the same SGD
    step to the same weights (update_on_kvstore=False, so the optimizer states stay on the
    worker and are checkpointed, as on one machine);
  - worker r reads block r of every global batch of the epoch's shuffle (EpochShuffleSampler), so
    the union of the workers' batches is the single-machine global batch, split like the devices
    split it (rank-major);
  - BatchNorm statistics (every aux state) stay per device; a checkpoint holds their average over
    every device of every worker (icd.checkpoint.gather's rule over the job); the run record
    keeps each device's copy, rank-major; rank 0 alone writes checkpoints, records and logs;
  - the running figures (the task's sums and ranges) are reduced over workers before they are read,
    so a NaN on any worker stops every worker at the same iteration with the same message.

The sign flip across machines (release section 3.2: one store, one update per device per batch,
m <- 0.9 m + 0.1 c_d for every class, c_d the value device d pushes: its slice's means for the
classes present in it, its own copy of m for the others; sign read right after it):
  - during a batch each device reads the batch-start value followed by the updates of the devices
    before it on its own machine (the release's single-machine behaviour, devices in the order in
    which they reach the store);
  - after the step every worker adopts the value that applies all updates of the batch in the
    order (rank, order of arrival on that worker), computed from the contributions c_d
    exchanged through the key-value store; each device's copy is set to the value
    right after its own update in that order, as on one machine.
With one worker this is the release's rule exactly (nothing is exchanged). With several, the
final value equals that of one machine holding all devices in that order; what a device of rank
r > 0 reads during the batch lacks the earlier ranks' updates of the same batch, so its sign can
differ from the one-machine run only in a batch in which those updates flip a class's sign.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Dict, Iterator, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np

from .checkpoint import gather, release_key
from .constants import KVSTORES
from .model.ops import SharedMovingMean, moving_mean_update

log = logging.getLogger(__name__)
# MXNet 1.9's names (mx.kv.create): one machine (device: the release's, aggregation on the
# devices; local: on the CPU), or the parameter server, synchronous (dist_device_sync aggregates
# on the devices; dist_sync_device is the same store by MXNet's substring rule)
EXCHANGE_KEY = 1 << 30   # our exchanges' keys, far above the Trainer's parameter indices
LAUNCHER_VARIABLES = ("DMLC_ROLE", "DMLC_PS_ROOT_URI", "DMLC_PS_ROOT_PORT", "DMLC_NUM_SERVER",
                      "DMLC_NUM_WORKER")


class Workers:
    """This process among the job's workers: rank, number of workers and the key-value store.

    `kvstore` device or local is one machine (rank 0 of 1, no store here: the Trainer makes
    its own of that name).
    """

    def __init__(self, kvstore: str = "device"):
        if kvstore not in KVSTORES:
            raise ValueError(f"--kvstore {kvstore!r}: expected one of {', '.join(KVSTORES)}")
        self.kv = None
        self.kvstore = kvstore
        if kvstore.startswith("dist"):
            missing = [v for v in LAUNCHER_VARIABLES if v not in os.environ]
            if missing:
                raise ValueError(
                    f"--kvstore {kvstore} needs the job's variables ({', '.join(missing)} not "
                    f"set); start the workers with icd-launch "
                    f"(docs/machines.md)")
            self.kv = mx.kv.create(kvstore)
        self.rank = self.kv.rank if self.kv else 0
        self.num_workers = self.kv.num_workers if self.kv else 1
        self._keys: Dict[str, Tuple[int, tuple]] = {}

    @property
    def trainer_kvstore(self):
        """What gluon.Trainer gets: our dist store, or the store's name on one machine."""
        return self.kv or self.kvstore

    @property
    def shard(self) -> Tuple[int, int]:
        return self.rank, self.num_workers

    def barrier(self) -> None:
        if self.kv:
            self.kv._barrier()

    def allgather(self, name: str, value: mx.nd.NDArray) -> mx.nd.NDArray:
        """(num_workers, *value.shape) float32 on value's context: row r is worker r's `value`.

        Collective: every worker calls it with the same name and shape, in the same order. Exact:
        the servers sum rows that are zero except the sender's. Synchronous.
        """
        if self.kv is None:
            return value.astype(np.float32).expand_dims(0)
        shape = (self.num_workers,) + tuple(value.shape)
        if name not in self._keys:
            self._keys[name] = (EXCHANGE_KEY + len(self._keys), shape)
            self.kv.init(self._keys[name][0], mx.nd.zeros(shape))
        key, known = self._keys[name]
        if known != shape:
            raise ValueError(f"exchange {name!r}: shape {shape} differs from {known}")
        rows = mx.nd.zeros(shape)
        rows[self.rank] = value.astype(np.float32).as_in_context(mx.cpu())
        self.kv.push(key, rows)
        self.kv.pull(key, out=rows)
        # complete on return: a worker that reads nothing of the result (rank > 0 saving the
        # last checkpoint) and leaves would otherwise take its queued push with it, and rank 0
        # would wait for it forever
        rows.wait_to_read()
        return rows.as_in_context(value.context)


def worker_seed(seed: int, rank: int) -> int:
    """The seed of worker `rank`'s generators (dropout): `seed` on rank 0 (one machine unchanged),
    another stream on every other rank (their devices would otherwise draw rank 0's masks)."""
    return seed if rank == 0 else int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


@contextlib.contextmanager
def failures_end_the_process(workers: Workers, statuses: Dict[type, int]) -> Iterator[None]:
    """In a job of several workers, an error leaves the process at once, logged, with the status
    of the first class in `statuses` it is an instance of (1 otherwise): MXNet's store would
    otherwise wait at exit for workers that are blocked waiting for this one, and the launcher
    could never end the job."""
    try:
        yield
    except BaseException as e:
        if workers.num_workers == 1:
            raise
        status = next((code for kind, code in statuses.items() if isinstance(e, kind)), 1)
        log.error("worker %d of %d stops: %s: %s", workers.rank, workers.num_workers,
                  type(e).__name__, e, exc_info=status == 1)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


# ---------------------------------------------------------------------------------------------
# Running figures, BatchNorm statistics, checkpoints
# ---------------------------------------------------------------------------------------------

def reduce_metrics(workers: Workers, figures) -> None:
    """Make an icd.tasks.RunningMetrics hold the sums over all workers (images, the task's sums)
    and the ranges over all workers, in place; every worker then reads the same numbers
    (collective)."""
    if workers.num_workers == 1:
        return
    k, m = figures.sums.shape[0], figures.low.shape[0]
    ranges = [figures.low, figures.high] if m else []   # a task may have none (DeepLab)
    mine = mx.nd.concat(figures.sums, *ranges,
                        mx.nd.full((1,), figures.images, ctx=figures.sums.context), dim=0)
    rows = workers.allgather("figures", mine)
    figures.sums = rows[:, :k].sum(axis=0)
    if m:
        figures.low = rows[:, k:k + m].min(axis=0)
        figures.high = rows[:, k + m:k + 2 * m].max(axis=0)
    figures.images = int(rows[:, k + 2 * m].sum().asscalar())


def checkpoint_values(workers: Workers, net: mx.gluon.Block) -> Dict[str, mx.nd.NDArray]:
    """`icd.checkpoint.gather` over the job: every aux state (BatchNorm statistics, the
    sign-flip means) averaged over every device of every worker, as `gather` averages one
    machine's devices; collective (several workers)."""
    values = gather(net)
    if workers.num_workers == 1:
        return values
    for name, param in net.collect_params().items():
        if param.grad_req != "null":
            continue   # trained weights are the same on every device of every worker
        copies = param.list_data()
        local = mx.nd.add_n(*[c.copyto(mx.cpu()) for c in copies])
        values[release_key(name)] = workers.allgather("state:" + name, local).sum(axis=0) / \
            (len(copies) * workers.num_workers)
    return values


def all_device_states(workers: Workers, local: Dict[str, list]) -> Dict[str, list]:
    """`icd.engine.hooks.device_states` of every device of every worker, rank-major (collective)."""
    if workers.num_workers == 1:
        return local
    return {name: workers.allgather("devices:" + name, mx.nd.array(copies)).reshape(
                (-1,) + np.shape(copies)[1:]).asnumpy().tolist()
            for name, copies in local.items()}


def local_device_states(workers: Workers, saved: Optional[Dict[str, list]],
                        num_devices: int) -> Optional[Dict[str, list]]:
    """This worker's part of `all_device_states` (None stays None; another layout is returned
    whole so that the caller's check reports it)."""
    if not saved or workers.num_workers == 1:
        return saved
    if any(len(copies) != num_devices * workers.num_workers for copies in saved.values()):
        return saved
    first = workers.rank * num_devices
    return {name: copies[first:first + num_devices] for name, copies in saved.items()}


# ---------------------------------------------------------------------------------------------
# The sign flip's moving mean across machines
# ---------------------------------------------------------------------------------------------

def ordered_moving_mean(start: mx.nd.NDArray, updates: Sequence[mx.nd.NDArray]):
    """The values after each of `updates` [pushed value (C, 2), ...] applied in order to
    `start` (C, 2) with the release's update; the last is the batch's final value."""
    values, value = [], start
    for current in updates:
        value = moving_mean_update(value, current)
        values.append(value)
    return values


class SignFlipExchange:
    """After each step, make every worker hold the moving mean that applies all devices' updates
    of the batch in the order (rank, arrival on that worker) (module docstring)."""

    def __init__(self, workers: Workers, store: SharedMovingMean, param: mx.gluon.Parameter):
        self.workers = workers
        self.store = store
        self.param = param
        self.start = store.master.copy()   # the batch-start value, the same on every worker

    def after_step(self) -> None:
        """Collective; call once per batch after the forward of every local device."""
        if self.workers.num_workers == 1:
            return
        contexts = self.store.contexts
        for ctx in contexts:   # the operators have run (and recorded their contributions)
            self.param.data(ctx).wait_to_read()
        mine = mx.nd.stack(*self.store.contributions)                              # (k, C, 2)
        rows = self.workers.allgather("sign_flip", mine)                          # (W, k, C, 2)
        home = self.store.master.context
        rows = rows.as_in_context(home).reshape((-1,) + mine.shape[1:])
        values = ordered_moving_mean(self.start, list(rows))
        self.store.master[:] = values[-1]
        self.start = values[-1].copy()
        first = self.workers.rank * len(contexts)
        for position, device in enumerate(self.store.order):
            self.param.data(contexts[device])[:] = \
                values[first + position].as_in_context(contexts[device])
