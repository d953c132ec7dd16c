"""What a run is: its files in cfg.snapshot, their names, records and rotation, and the rules
for starting and resuming it.

A training run writes, beside each other in cfg.snapshot, a checkpoint pair
`<model>-<epoch:04d>.params/.states` after every epoch with the newest `num_save` kept
(docs/release.md section 4) and, ours, a run record `<model>-<epoch:04d>.json` naming the run
that wrote it, its seed, the digests of the pair, the task's shared state and the run's config;
the log `<model>-log.json` lists the run's epochs and `demo/<model>-<epoch:04d>.jpg` is the
epoch's picture. The files' format is icd.checkpoint's.

A fresh run refuses a folder holding the model's checkpoints unless `overwrite`; a resume
continues the run of checkpoint begin_epoch - 1: with another class list it is refused, with
other settings too unless `allow_changes`, which starts a new run chained to the old one
(`start_run`, RESUME_FREE). Rotation removes only the current run's checkpoints.
`resume_auto` picks the checkpoint to continue from (icd-train --resume auto, icd-run).
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import os
import re
import time
import uuid
from typing import Dict, List, Optional, Tuple

from .checkpoint import file_digest
from .config import Config
from .data.classes import require_classes
from .io import exclusive_lock, read_json, remove_stale_temporaries
from .provenance import given_classes

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = ("params", "states", "json")   # weights, optimizer, run record


def checkpoint_path(cfg: Config, epoch: int, suffix: str = "params") -> str:
    """`<model>-<epoch:04d>.<suffix>` in cfg.snapshot (suffix: one of CHECKPOINT_SUFFIXES)."""
    return os.path.join(cfg.snapshot, f"{cfg.model}-{epoch:04d}.{suffix}")


def checkpoint_files(cfg: Config) -> Dict[int, List[str]]:
    """Epoch -> the model's checkpoint files (.params, .states, run record) in cfg.snapshot."""
    pattern = re.compile(re.escape(cfg.model) + r"-(\d{4})\.(" + "|".join(CHECKPOINT_SUFFIXES)
                         + r")$")
    found: Dict[int, List[str]] = {}
    for path in sorted(glob.glob(os.path.join(glob.escape(cfg.snapshot), f"{cfg.model}-*"))):
        match = pattern.search(os.path.basename(path))
        if match:
            found.setdefault(int(match.group(1)), []).append(path)
    return found


def complete_checkpoints(cfg: Config) -> List[int]:
    """The epochs of cfg.snapshot whose checkpoint can be resumed: .params and .states present
    (the loop writes .states and the run record first and the .params last, each atomically, so
    a run killed between them leaves no .params; the release's checkpoints have no run record)."""
    return sorted(epoch for epoch, paths in checkpoint_files(cfg).items()
                  if {checkpoint_path(cfg, epoch, s) for s in ("params", "states")} <= set(paths))


def last_complete_epoch(cfg: Config) -> Optional[int]:
    """The epoch of the newest resumable checkpoint (`complete_checkpoints`), None without one:
    `--begin-epoch last_complete_epoch + 1` resumes the run."""
    epochs = complete_checkpoints(cfg)
    return epochs[-1] if epochs else None


def read_run_record(cfg: Config, epoch: int) -> Optional[dict]:
    """The run record of checkpoint `epoch`, or None for a checkpoint without one (the release's)."""
    path = checkpoint_path(cfg, epoch, "json")
    return read_json(path) if os.path.isfile(path) else None


def check_checkpoint_files(cfg: Config, epoch: int, record: dict) -> None:
    """The .params and .states of checkpoint `epoch` are the files its run record `record` was
    written with (the digests it holds, icd.checkpoint.staged_params): ValueError naming both files and the
    record otherwise, since a .states (or .params) from another run or edited by hand would
    continue this run with other optimizer states (or weights) under its id. A record written
    before records held digests is accepted with a warning."""
    source = checkpoint_path(cfg, epoch, "json")
    paths = {suffix: checkpoint_path(cfg, epoch, suffix) for suffix in ("params", "states")}
    digests = record.get("digests")
    if not digests:
        log.warning("%s: the run record holds no digests of %s and %s (an older version wrote "
                    "it); they are taken as the run's own", source, paths["params"],
                    paths["states"])
        return
    changed = [path for suffix, path in paths.items()
               if file_digest(path) != digests.get(suffix)]
    if changed:
        raise ValueError(
            f"{paths['states']}, {paths['params']}: not the files run {record.get('run')} wrote "
            f"at epoch {epoch}: {' and '.join(changed)} "
            f"{'differ from their digests' if len(changed) > 1 else 'differs from its digest'} "
            f"in {source} (a file copied from another run, or edited). Resume from a checkpoint "
            f"whose .params, .states and run record were written together, or start a new run")


def rotate_checkpoints(cfg: Config, run: str) -> None:
    """Keep the newest `num_save` checkpoints of run `run` (release: 5); other runs' checkpoints
    and checkpoints without a run record are never removed."""
    ours = sorted(epoch for epoch in checkpoint_files(cfg)
                  if (read_run_record(cfg, epoch) or {}).get("run") == run)
    for epoch in ours[:-cfg.num_save] if cfg.num_save > 0 else []:
        # the .params first (the checkpoint stops being resumable), the run record last: it
        # names the owner
        for suffix in ("params", "states", "json"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(checkpoint_path(cfg, epoch, suffix))


def log_path(cfg: Config) -> str:
    """The JSON log of the run's epochs, `<model>-log.json` beside the checkpoints."""
    return os.path.join(cfg.snapshot, f"{cfg.model}-log.json")


def epoch_image_path(cfg: Config, epoch: int) -> str:
    """The picture of `epoch` (the loop's CheckpointHook writes it), `demo/` in cfg.snapshot."""
    return os.path.join(cfg.snapshot, "demo", f"{cfg.model}-{epoch:04d}.jpg")


def _remove_run_files(cfg: Config, epochs) -> None:
    """Remove the model's checkpoints of `epochs` and their demo pictures."""
    files = checkpoint_files(cfg)
    for epoch in epochs:
        for path in files.get(epoch, []) + [epoch_image_path(cfg, epoch)]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def _new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S-") + uuid.uuid4().hex[:6]


# Settings a resumed run may change without changing the run (the rest must equal the run
# record's `config`, or `allow_changes` starts a new run chained to the old one):
RESUME_FREE = (
    "begin_epoch",                          # where to resume, by definition
    "num_epoch",                            # where to stop: a finished run may be extended
                                            # (the poly LR of the epochs to come follows it)
    "snapshot",                             # the folder may have moved
    "num_workers",                          # loader processes: augmentation is keyed by
                                            # (seed, epoch, index), not by the process
    "num_save", "log_frequency",            # bookkeeping: rotation, log lines
    "pin_memory",                           # where the host keeps a batch, not what it holds
    "overwrite", "allow_changes",           # how this command treats the folder
    "pretrained",                           # initialises epoch 0 only; a resume loads the
                                            # checkpoint
    "classes",                              # the file's path; its names are compared apart
    "amp",                                  # precision may change between epochs (icd.amp)
    "gpus", "cpus", "batch_size", "kvstore",   # compared for the whole job as `devices`
                                            # (kind and number: the batch split follows it) and
                                            # `batch` (x the workers): one machine with two
                                            # devices continues as two machines with one
    "infer_size", "infer_batch_size", "scales", "flip", "crf",   # inference only
)


JOB_LABELS = {"devices": "devices (--gpus / --cpus, x workers)",
              "batch": "global batch (--batch-size x workers)"}


def _job(config: Dict[str, object], workers: int) -> Dict[str, object]:
    """The job of a config run by `workers` machines: `devices`, their kind and number over the
    job ("2 GPUs", "1 CPU"), and `batch`, the global batch."""
    gpus = [g for g in str(config.get("gpus") or "").split(",") if g.strip()]
    count, kind = (len(gpus), "GPU") if gpus else (max(int(config.get("cpus") or 0), 1), "CPU")
    count *= workers
    return {"devices": f"{count} {kind}{'s' if count > 1 else ''}",
            "batch": int(config.get("batch_size") or 0) * workers}


def resume_changes(cfg: Config, record: dict, workers: int = 1
                   ) -> Dict[str, Tuple[object, object]]:
    """The settings of `cfg` run by `workers` machines that differ from those of the run record
    `record` (its `config` and `workers`): {field: (the run's, cfg's)}, fields of RESUME_FREE
    left out, `devices` and `batch` for the job (`_job`); fields only one of them knows
    (another version) are not compared."""
    old = dict(record.get("config") or {})
    new = json.loads(json.dumps(dataclasses.asdict(cfg)))   # as the record reads it back
    changes = {k: (old[k], new[k]) for k in sorted(set(old) & set(new))
               if k not in RESUME_FREE and old[k] != new[k]}
    before, now = _job(old, int(record.get("workers") or 1)), _job(new, workers)
    changes.update({k: (before[k], now[k]) for k in before if before[k] != now[k]})
    return changes


def _check_resume(cfg: Config, workers: int = 1
                  ) -> Tuple[Optional[dict], Dict[str, Tuple[object, object]]]:
    """The run record of checkpoint begin_epoch - 1 (None without one) and the settings that
    differ from it (`resume_changes`), after the checks of a resume: the .params and .states must
    be the files the record was written with (`check_checkpoint_files`) and the class list the
    run's (names and order, always); other settings need cfg.allow_changes (ValueError naming
    each)."""
    record = read_run_record(cfg, cfg.begin_epoch - 1)
    if record is None:
        return None, {}
    check_checkpoint_files(cfg, cfg.begin_epoch - 1, record)
    source = checkpoint_path(cfg, cfg.begin_epoch - 1, "json")
    if record.get("classes") is not None:
        require_classes(record["classes"], cfg.class_names, source, "the run was trained on",
                        given_classes(cfg.class_names), "resume with the run's --classes")
    changes = resume_changes(cfg, record, workers)
    if changes and not cfg.allow_changes:
        shown = "; ".join(f"{JOB_LABELS.get(k, '--' + k.replace('_', '-'))} {old!r} in the run, "
                          f"{new!r} now" for k, (old, new) in changes.items())
        raise ValueError(
            f"{source}: run {record.get('run')} was trained with other settings ({shown}); "
            f"resume with the run's settings for a continuation bit for bit, or pass "
            f"--allow-changes to start a new run from this checkpoint (its records name this "
            f"one as previous_run)")
    return record, changes


def start_run(cfg: Config, workers: int = 1) -> Dict[str, object]:
    """Check the snapshot folder for `cfg` and decide the run: {"run": id, "records": log so far,
    "record": run record of the resumed checkpoint or None, "previous_run": the run this one
    continues under a new id, or None}.

    A fresh run (begin_epoch 0) into a folder holding checkpoints of the same model raises
    FileExistsError naming them, unless cfg.overwrite, which removes them and the log first.
    A resumed run continues the run of checkpoint begin_epoch - 1; checkpoints of later epochs
    (another continuation) are an error unless cfg.overwrite removes them. Its class list must be
    the run's, and its settings (`workers` machines: `resume_changes`) too unless
    cfg.allow_changes: then a resume with other settings starts a new run id whose records name
    the old one (`previous_run`) and whose log keeps the old run's epochs.
    """
    os.makedirs(cfg.snapshot, exist_ok=True)
    for folder in (cfg.snapshot, os.path.join(cfg.snapshot, "demo")):
        for path in remove_stale_temporaries(folder, prefix=f"{cfg.model}-"):
            log.info("%s: removed the temporary file of an interrupted write", path)
    complete = complete_checkpoints(cfg)
    # the files of a checkpoint a killed run did not finish (no .params: see
    # complete_checkpoints); this run holds the folder's lock, so no other run is writing them
    unfinished = [e for e in checkpoint_files(cfg) if not os.path.isfile(checkpoint_path(cfg, e))]
    for epoch in unfinished:
        log.info("%s: removing the files of a checkpoint whose writing was interrupted",
                 checkpoint_path(cfg, epoch, "states"))
    _remove_run_files(cfg, unfinished)
    files = checkpoint_files(cfg)
    later = sorted(e for e in files if e >= cfg.begin_epoch)
    if later and not cfg.overwrite:
        names = ", ".join(os.path.basename(p) for e in later for p in files[e])
        resume = f"Resume with --begin-epoch {complete[-1] + 1}, " if complete else ""
        if cfg.begin_epoch == 0:
            raise FileExistsError(
                f"{cfg.snapshot}: holds checkpoints of {cfg.model} ({names}); a new run would "
                f"mix with them. {resume}choose another --snapshot, or pass --overwrite to "
                f"delete them")
        raise FileExistsError(
            f"{cfg.snapshot}: holds checkpoints of {cfg.model} after epoch {cfg.begin_epoch - 1} "
            f"({names}); resuming at epoch {cfg.begin_epoch} would overwrite them. {resume}or "
            f"pass --overwrite to delete them")
    record, changes = _check_resume(cfg, workers) if cfg.begin_epoch > 0 else (None, {})
    _remove_run_files(cfg, later)
    if cfg.begin_epoch == 0:
        with contextlib.suppress(FileNotFoundError):
            os.remove(log_path(cfg))
        return {"run": _new_run_id(), "records": [], "record": None, "previous_run": None}
    if record is None:
        log.warning("%s: no run record; the shared sign-flip store is taken from the checkpoint "
                    "and the run's earlier log is not kept", checkpoint_path(cfg, cfg.begin_epoch - 1))
        return {"run": _new_run_id(), "records": [], "record": None, "previous_run": None}
    logged = read_json(log_path(cfg)) if os.path.isfile(log_path(cfg)) else []
    records = [r for r in logged if r.get("run") == record["run"] and r["epoch"] < cfg.begin_epoch]
    if changes:   # allowed by cfg.allow_changes (_check_resume)
        run = _new_run_id()
        log.warning("%s: resumed with other settings (%s): new run %s, previous run %s",
                    checkpoint_path(cfg, cfg.begin_epoch - 1, "json"),
                    ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items()),
                    run, record["run"])
        return {"run": run, "records": records, "record": record, "previous_run": record["run"]}
    return {"run": record["run"], "records": records, "record": record,
            "previous_run": record.get("previous_run")}


def snapshot_lock(cfg: Config):
    """The lock of cfg.model's checkpoints in cfg.snapshot (`<model>.lock` there), held for the
    training run's lifetime (icd.io.exclusive_lock): a second run of the model into the folder
    refuses, naming the running one. Rank 0 alone holds it: it alone writes the folder."""
    return exclusive_lock(os.path.join(cfg.snapshot, f"{cfg.model}.lock"),
                          f"{cfg.snapshot} ({cfg.model})")


def resume_auto(cfg: Config, workers: int = 1) -> Config:
    """`cfg` to continue from the last complete checkpoint below num_epoch of the same run
    (`complete_checkpoints`), or to start fresh (begin_epoch 0) when there is none or
    `cfg.overwrite`; begin_epoch == num_epoch means the run is finished. A checkpoint whose run
    had other settings (`resume_changes`: another run) is refused with FileExistsError
    naming its run record and the settings that differ."""
    epochs = [] if cfg.overwrite else [e for e in complete_checkpoints(cfg) if e < cfg.num_epoch]
    if not epochs:
        return dataclasses.replace(cfg, begin_epoch=0)
    epoch = epochs[-1]
    record = read_run_record(cfg, epoch)
    if record is None:   # not written by our loop (the release's): nothing to check it by
        raise FileExistsError(
            f"{checkpoint_path(cfg, epoch)}: a checkpoint without a run record; resume it "
            f"explicitly with --begin-epoch {epoch + 1}, or pass --overwrite to delete it")
    differ = resume_changes(cfg, record, workers)
    if differ:
        raise FileExistsError(
            f"{checkpoint_path(cfg, epoch, 'json')}: checkpoint of another run ("
            + "; ".join(f"{k} {old!r} (now {new!r})" for k, (old, new) in differ.items())
            + "); choose another --snapshot or pass --overwrite to delete it")
    log.info("%s: resuming run %s after epoch %d", cfg.snapshot, record.get("run"), epoch)
    return dataclasses.replace(cfg, begin_epoch=epoch + 1)
