"""What produced a folder of results, so that a later stage never reads a mix or a wrong size.

A stage that writes a folder of per-image results (inference -> `results/scores_*`, seeds ->
`results/seeds/<variant>`) keeps a record beside it, `<folder>.provenance.json` (beside, so that
the folder holds only what a segmentation trainer or the release's tools expect):

  {"stage": "infer", "state": "running" | "failed" | "complete", "settings": {...},
   "fingerprint": <hash of the settings>, "notes": {...}, "error": <why it failed>}

`producing` writes it: "running" before the first file, "complete" or "failed" at the end (a
killed run stays "running"). The record lists the image ids the run writes ("names"). A run
with the settings of the record continues in the folder (resumable stages keep their files); a
run with other settings, or into a folder holding files of its ids without a record, refuses
unless `overwrite`, which clears the folder first: only the files the stage itself writes there,
`<id><ext>` for its extensions (`STAGE_OUTPUTS`) and the ids of this run and of the records;
every other file stays, and a log line names them. `require_complete`
is what a reading stage calls: a running or failed record is an error naming the folder; a folder
without a record (e.g. the release's files) is accepted with a warning, as nothing can be checked.
Results hold class indices, so a record names its class list (settings "classes") and a reader
with another list is refused (`require_folder_classes`; checkpoints: `require_checkpoint_classes`).

Shards (`--shard I/N`: N machines writing one folder, icd.devices.shard_names): each shard keeps
its own record, `<folder>.provenance.shard-I-of-N.json`, and `read_record` merges them: complete
only when all N shards are, failed when one failed, running otherwise (a shard not started yet
counts as running); their notes are merged. A run's records replace those of another split (an
unsharded run removes the shard records; a shard of N removes the unsharded record and shard
records of another N). `overwrite` is refused for a shard (it would clear the others' files),
and a shard leaves the folder's temporaries alone (they may be another shard's writes).

Two runs never write a folder at once: `producing` holds an OS advisory lock on
`<folder>.provenance.lock` (`<folder>.provenance.shard-I-of-N.lock` for a shard) for the run
(icd.io.exclusive_lock: a second run refuses naming the first, a stale lock is taken over). A
folder that is a symbolic link out of its parent's tree is refused, never written or cleared.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import time
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from .data.classes import VOC_CLASSES, require_classes
from .io import exclusive_lock, read_json, remove_stale_temporaries, write_json

log = logging.getLogger(__name__)
RECORD_SUFFIX = ".provenance.json"
# the extensions of the files `<id><ext>` each stage writes into its folders: what `overwrite`
# clears (infer-seg: pred/<id>.png, overlay/<id>.jpg)
STAGE_OUTPUTS = {"infer": (".npy",), "seeds": (".png",), "infer-seg": (".png", ".jpg")}
SHOWN = 5   # names a message shows of a longer list


class ProvenanceError(ValueError):
    """A folder holds results of other settings, or of a run that did not finish."""


def file_identity(path: str) -> Dict[str, object]:
    """What identifies an input file cheaply: absolute path, size and modification time."""
    stat = os.stat(path)
    return {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def fingerprint(settings: Mapping[str, object]) -> str:
    """A short hash of `settings` (JSON with sorted keys)."""
    text = json.dumps(settings, sort_keys=True, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _named(folder: str) -> str:
    """`folder` by a path that ends in its name (`.` -> its absolute path): records lie beside
    the folder whichever way it is given."""
    path = os.path.normpath(folder)
    return os.path.abspath(path) if os.path.basename(path) in (".", "..") else path


def record_path(folder: str, shard: Tuple[int, int] = (0, 1)) -> str:
    """`<folder>.provenance.json`, the record of `folder`, or
    `<folder>.provenance.shard-I-of-N.json`, that of shard (I, N) of a sharded run."""
    if shard[1] == 1:
        return _named(folder) + RECORD_SUFFIX
    return _named(folder) + f".provenance.shard-{shard[0]}-of-{shard[1]}.json"


def _records(folder: str) -> Dict[Tuple[int, int], dict]:
    """Every record of `folder`: (I, N) -> record, (0, 1) for the unsharded one."""
    parent, name = os.path.split(_named(folder))
    pattern = re.compile(re.escape(name) + r"\.provenance\.shard-(\d+)-of-(\d+)\.json")
    found = {}
    if os.path.isfile(record_path(folder)):
        found[(0, 1)] = read_json(record_path(folder))
    for entry in sorted(os.listdir(parent or ".")) if os.path.isdir(parent or ".") else []:
        match = pattern.fullmatch(entry)
        if match:
            found[(int(match.group(1)), int(match.group(2)))] = \
                read_json(os.path.join(parent, entry))
    return found


def read_record(folder: str) -> Optional[dict]:
    """The record of `folder`, or None when it has none; shard records are merged (module doc):
    the first one's stage and settings, a merged state and notes, `shards` {"I/N": state}."""
    records = _records(folder)
    if set(records) in (set(), {(0, 1)}):
        return records.get((0, 1))
    shards = sorted(records, key=lambda s: (s[1], s[0]))
    first = records[shards[0]]
    merged = dict(first, notes={}, shards={f"{i}/{n}": records[(i, n)].get("state")
                                           for i, n in shards})
    merged.pop("error", None)
    for shard in shards:
        for key, value in records[shard].get("notes", {}).items():
            merged["notes"].setdefault(key, {}).update(value)
    failed = [f"shard {i}/{n}: {records[(i, n)].get('error')}" for i, n in shards
              if records[(i, n)].get("state") == "failed"]
    if len({records[s].get("fingerprint") for s in shards}) > 1:
        failed.append("the shards' records name different settings")
    counts = {n for _, n in shards}
    waiting = [f"{i}/{n}" for n in sorted(counts) for i in range(n) if (i, n) not in records or
               records[(i, n)].get("state") == "running"]
    if failed:
        merged.update(state="failed", error="; ".join(failed))
    elif waiting:
        merged.update(state="running", detail=f"shards {', '.join(waiting)} not complete")
    else:
        merged.update(state="complete")
    return merged


def _result_files(folder: str, stage: str, names: Sequence[str]) -> List[str]:
    """The files of `folder` that `stage` writes for the image ids `names` and that exist:
    `<id><ext>` for its extensions (`STAGE_OUTPUTS`)."""
    paths = (os.path.join(folder, name + ext) for name in dict.fromkeys(names)
             for ext in STAGE_OUTPUTS[stage])
    return sorted(path for path in paths if os.path.isfile(path))


def _shown(names: Sequence[str]) -> str:
    """The first SHOWN of `names`, then how many more."""
    more = f", ... {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def require_outputs_apart(outputs: Mapping[str, str], inputs: Mapping[str, Optional[str]]) -> None:
    """ValueError naming both flags when a folder a command writes (`outputs`: flag -> path) is
    one it reads (`inputs`: flag -> path, None when not given): the stage would write into,
    clear, or replace the provenance record of its own input."""
    for out_flag, out in outputs.items():
        for in_flag, path in inputs.items():
            if path is not None and os.path.realpath(out) == os.path.realpath(path):
                raise ValueError(f"{out_flag} {out}: is the folder the stage reads as {in_flag} "
                                 f"{path}; a stage never writes into its input, choose another "
                                 f"{out_flag.split('/')[0]}")


def _check_not_linked_out(folder: str) -> None:
    """ProvenanceError when `folder` is a symbolic link leading out of its parent folder's tree
    (e.g. `results/scores_icd` -> a user's folder): a stage never writes or clears there."""
    parent = os.path.realpath(os.path.dirname(os.path.abspath(folder)))
    target = os.path.realpath(folder)
    if os.path.islink(os.path.normpath(folder)) and \
            os.path.commonpath([parent, target]) != parent:
        raise ProvenanceError(
            f"{folder}: is a symbolic link to {target}, outside {parent}; refusing to write or "
            f"clear results there. Remove the link or pass the folder itself")


def _differences(old: Mapping[str, object], new: Mapping[str, object]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


def _claim(folder: str, stage: str, settings: Mapping[str, object], names: Sequence[str],
           overwrite: bool) -> dict:
    """Check that `stage` with `settings` may write the files of the ids `names` into `folder`
    (its merged record); clear what the stage wrote there if `overwrite` must."""
    records = _records(folder)
    record = read_record(folder)
    written = [name for other in records.values() for name in other.get("names", ())]
    files = _result_files(folder, stage, [*names, *written])
    same = record is not None and record.get("fingerprint") == fingerprint(settings)
    if same and not overwrite:
        return dict(record, names=list(dict.fromkeys(written)))
    if files and not overwrite:
        if record is None:
            raise ProvenanceError(
                f"{folder}: holds {len(files)} files of unknown origin under names this run "
                f"writes (no {record_path(folder)}); pass --overwrite to replace them, or choose "
                f"another output folder")
        raise ProvenanceError(
            f"{folder}: holds results of another {record.get('stage')} run (changed: "
            f"{_differences(record.get('settings', {}), settings)}); pass --overwrite to clear "
            f"it, or choose another output folder")
    for path in files:
        os.remove(path)
    if files:
        log.info("%s: removed %d %s files of an earlier run", folder, len(files), stage)
    kept = sorted(entry + ("/" if os.path.isdir(os.path.join(folder, entry)) else "")
                  for entry in (os.listdir(folder) if overwrite and os.path.isdir(folder) else ()))
    if kept:
        log.info("%s: kept %d files the %s stage did not write: %s", folder, len(kept), stage,
                 _shown(kept))
    return {}


def lock_path(folder: str, shard: Tuple[int, int] = (0, 1)) -> str:
    """The lock file beside `folder` (of shard (I, N)): its record's name ending in .lock."""
    return record_path(folder, shard)[:-len(".json")] + ".lock"


@contextlib.contextmanager
def producing(folders: Sequence[str], stage: str, settings: Mapping[str, object],
              overwrite: bool = False, shard: Tuple[int, int] = (0, 1),
              names: Sequence[str] = ()) -> Iterator[dict]:
    """Write `folders` as one run of `stage` with `settings` writing the files of the image ids
    `names` (shard (I, N) of it: its own record, see the module doc); yields the record's
    `notes` dict, which the stage may fill (e.g. images it had to crop) and which is saved with
    the record.

    Raises ProvenanceError (before anything is written) when a folder holds other results, or
    for `overwrite` with a shard.
    """
    if overwrite and shard[1] > 1:
        raise ProvenanceError(
            f"{', '.join(folders)}: --overwrite with --shard {shard[0]}/{shard[1]} would clear "
            f"the files the other shards write; clear the folder first (an unsharded run with "
            f"--overwrite, or by hand), then start every shard without --overwrite")
    settings = json.loads(json.dumps(dict(settings)))   # what the record will read back
    with contextlib.ExitStack() as locks:
        for folder in folders:
            _check_not_linked_out(folder)
            locks.enter_context(exclusive_lock(lock_path(folder, shard), folder))
        with _produce(folders, stage, settings, names, overwrite, shard) as notes:
            yield notes


@contextlib.contextmanager
def _produce(folders: Sequence[str], stage: str, settings: dict, names: Sequence[str],
             overwrite: bool, shard: Tuple[int, int]) -> Iterator[dict]:
    """`producing` once its folders are locked."""
    earlier = [_claim(folder, stage, settings, names, overwrite) for folder in folders]
    notes: dict = {}
    # a continued run's record keeps the ids of the earlier runs it continues (module doc)
    names = list(dict.fromkeys([n for record in earlier for n in record.get("names", ())]
                               + list(names)))
    for record in earlier:       # a continued run keeps what the earlier one noted
        for key, value in record.get("notes", {}).items():
            notes.setdefault(key, {}).update(value)
    record = {"stage": stage, "state": "running", "settings": settings,
              "fingerprint": fingerprint(settings), "notes": notes, "names": names,
              "host": socket.gethostname(), "pid": os.getpid(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def save():
        for folder in folders:
            write_json(record_path(folder, shard), record)

    for folder in folders:
        os.makedirs(folder, exist_ok=True)
        for other in _records(folder):   # this run's split replaces any other (module doc)
            if other != shard and (shard[1] == 1 or other[1] != shard[1]):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(record_path(folder, other))
        record_file = record_path(folder, shard)
        # a shard cannot tell its own interrupted writes from another shard's current ones
        stale = remove_stale_temporaries(folder) if shard[1] == 1 else []
        for path in stale + remove_stale_temporaries(
                os.path.dirname(record_file), prefix=os.path.basename(record_file)):
            log.info("%s: removed the temporary file of an interrupted write", path)
    save()
    try:
        yield notes
    except BaseException as e:
        record.update(state="failed", error=f"{type(e).__name__}: {e}".splitlines()[0],
                      finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        save()
        raise
    record.update(state="complete", finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    save()


def require_complete(folder: str, rerun: str) -> Optional[dict]:
    """The record of an input folder, checked to be complete; None (and a warning) without one.

    `rerun` says what writes the folder (e.g. "infer_scores.py"), for the message.
    """
    record = read_record(folder)
    if record is None:
        if os.path.isdir(folder):
            log.warning("%s: no %s; its files cannot be checked against the settings that made "
                        "them", folder, record_path(folder))
        return None
    if record.get("state") != "complete":
        why = f" ({record.get('error') or record.get('detail')})" \
            if record.get("error") or record.get("detail") else \
            f" (started {record.get('started')} by pid {record.get('pid')} on {record.get('host')})"
        raise ProvenanceError(
            f"{folder}: the {record.get('stage')} run that writes it is {record.get('state')}"
            f"{why}, so its files may be a mix of runs or incomplete; run {rerun} into it again "
            f"(the same settings continue; other settings need --overwrite)")
    return record


def score_infer_size(results_dir: str, folders: Sequence[str], names: Sequence[str],
                     infer_size: Optional[int], default: int,
                     classes: Optional[Sequence[str]] = None) -> int:
    """The inference size to read score folders `folders` of `results_dir` with, after checking
    that they are complete, come from one inference run, scored every image of `names` whole,
    and (given `classes`) were made with that class list (`require_folder_classes`).

    `infer_size` None takes the size the scores were made at (`default` for folders without a
    record); an explicit value that contradicts it is an error, as are images the inference had
    to crop (larger than its size; release: only their centre crop is scored).
    """
    paths = [os.path.join(results_dir, folder) for folder in dict.fromkeys(folders)]
    records = {path: require_complete(path, "infer_scores.py") for path in paths}
    for path, record in records.items() if classes is not None else ():
        require_folder_classes(path, record, classes)
    known = {path: record for path, record in records.items() if record is not None}
    if len({record["fingerprint"] for record in known.values()}) > 1:
        first, *others = known
        raise ProvenanceError(
            f"{', '.join(known)}: made by different inference runs (changed: "
            f"{_differences(known[first]['settings'], known[others[0]]['settings'])}); infer "
            f"them again together into one results folder")
    if not known:
        return default if infer_size is None else infer_size
    folder, record = next(iter(known.items()))
    made = record["settings"]["infer_size"]
    if infer_size is not None and infer_size != made:
        raise ProvenanceError(
            f"{folder}: scores were made at inference size {made}, not {infer_size}; leave "
            f"--infer-size out (it defaults to the scores' size) or pass --infer-size {made}")
    cropped = record.get("notes", {}).get("cropped", {})
    larger = [name for name in names if name in cropped]
    if larger:
        shown = ", ".join(f"{n} {cropped[n]['size'][0]}x{cropped[n]['size'][1]}"
                          for n in larger[:5])
        side = max(max(cropped[n]["size"]) for n in larger)
        raise ProvenanceError(
            f"{folder}: {len(larger)} images are larger than the inference size {made}, so only "
            f"their centre {made}x{made} crop was scored (as in the release) and their seeds "
            f"cannot cover them: {shown}{', ...' if len(larger) > 5 else ''}; infer again with "
            f"--infer-size {side} or more, or leave them out of the list")
    return made


def given_classes(classes: Sequence[str]) -> str:
    """Where a class list handed to a stage came from, for a message: `--classes`, or the default
    (VOC's 20) when it is VOC's list."""
    return "the default list (no --classes: PASCAL VOC's)" if tuple(classes) == VOC_CLASSES \
        else "--classes"


def require_folder_classes(folder: str, record: Optional[dict], classes: Sequence[str]) -> None:
    """ValueError naming both lists unless the results of `folder` (its record `record`, None
    for a folder without one) were made with the class list `classes`, names and order: scores
    and seeds hold class indices, which another list maps to other classes."""
    made = ((record or {}).get("settings") or {}).get("classes")
    if made is not None:
        require_classes(made, classes, folder, f"its {record.get('stage')} run used",
                        given_classes(classes))


def checkpoint_record(params: str) -> Optional[dict]:
    """The run record `<stem>.json` of the checkpoint `params` (icd.engine writes one per
    checkpoint), or None: the release's checkpoints and other weight files have none."""
    path = os.path.splitext(params)[0] + ".json"
    if not os.path.isfile(path):
        return None
    record = read_json(path)
    return record if isinstance(record, dict) and "run" in record else None


def require_checkpoint_classes(params: str, classes: Sequence[str]) -> None:
    """ValueError naming both lists unless the checkpoint `params` was trained on the class list
    `classes` (names and order; a same-length list in another order maps every score to the
    wrong class). A checkpoint without a run record naming its classes is not checked."""
    made = (checkpoint_record(params) or {}).get("classes")
    if made is not None:
        require_classes(made, classes, os.path.splitext(params)[0] + ".json",
                        "the checkpoint was trained on", given_classes(classes))
