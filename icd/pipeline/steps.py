"""A resumable step runner (IRN-style): named steps, each making the folders it owns from the
outputs of the steps it reads, run in order by one `Run`.

Every step leaves a marker `<marker_dir>/<step>.json`:
  {"status": "running" | "failed" | "done", "fingerprint", "seconds", "finished", "result",
   "folders", "kept", "wrote"}.
The fingerprint holds the step's own settings, the content (size and SHA-256, cached by size
and modification time in `<marker_dir>/input-digests.cache`) of every input file its settings
name, and the finish times of the steps whose outputs it reads (its inputs); paths inside the
run folder `root` are held relative to it (`<out>/...`), so a moved run folder is the same run.
A step whose done marker has this fingerprint is skipped while every file it wrote still exists
(else it resumes, remaking what is missing); a step that was interrupted or failed with this
fingerprint resumes (its partial outputs are kept: steps write each file atomically and skip
finished ones); a step whose settings or inputs changed, any step with `overwrite`, and an
`always` step clear their outputs and run afresh. A failed step never leaves a done marker, so
nothing downstream mistakes it for finished.

What a step owns: the files it wrote in its folders, never the others there (a user's notes,
their own maps when `--out` is their data folder; issue 30). Its marker lists the files that were
in its folders when it started (`kept`, with size and modification time) and, once done, the
files it wrote (`wrote`); clearing removes only the latter (for an interrupted step: what is there
beyond `kept`) and the folders that emptied, and logs the files it kept. A folder of another step
inside a step's folder (seeds/ in the results of inference) is that step's. One process runs a
marker folder at a time (`lock`: icd.io.exclusive_lock, a stale lock is taken over).

Progress: each step's expected duration is the previous run's time from its done marker when
its settings are unchanged, otherwise the step's `estimate`; the console shows the step's and the
whole run's elapsed time and time left at every step boundary and every `progress_every` seconds
while a step runs.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from ..io import exclusive_lock, read_json, write_json

log = logging.getLogger(__name__)

ACTIONS = {"run": "running", "rerun": "running afresh", "resume": "resuming"}


@dataclass(frozen=True)
class Step:
    """One step of a pipeline.

    func(run) makes the step's outputs and returns a JSON-able summary (kept in its marker);
    inputs: the steps whose outputs it reads; folders: what it owns (cleared before a rerun);
    settings: what its outputs depend on (JSON-able; devices and process counts left out);
    estimate: expected seconds when no previous run's marker has a time; always: rerun every time.
    """
    name: str
    func: Callable[["Run"], Mapping]
    inputs: Tuple[str, ...] = ()
    folders: Tuple[str, ...] = ()
    settings: Mapping = field(default_factory=dict)
    estimate: float = 0.0
    always: bool = False


def select_steps(available: Sequence[str], wanted: Sequence[str]) -> List[str]:
    """The `wanted` steps in pipeline order; unknown names are an error naming them."""
    unknown = [s for s in wanted if s not in available]
    if unknown:
        raise ValueError(f"unknown steps {unknown}; choose from {', '.join(available)}")
    return [s for s in available if s in wanted]


def _plain(value) -> object:
    """`value` as JSON reads it back (tuples become lists), for comparing with a marker."""
    return json.loads(json.dumps(value))


def step_action(marker: Optional[Mapping], fingerprint: Mapping, overwrite: bool) -> str:
    """What to do with a step: "skip" (done with this fingerprint), "resume" (interrupted or
    failed with this fingerprint: keep partial outputs), "run" (never started) or "rerun"
    (clear, run)."""
    if marker is None:
        return "run"
    if overwrite or _plain(marker.get("fingerprint")) != _plain(fingerprint):
        return "rerun"
    return "skip" if marker.get("status") == "done" else "resume"


def clock(seconds: float) -> str:
    """Seconds as mm:ss.s, or h:mm:ss from one hour on."""
    seconds = max(round(seconds, 1), 0.0)
    if seconds >= 3600:
        return f"{int(seconds // 3600)}:{int(seconds % 3600 // 60):02d}:{int(seconds % 60):02d}"
    return f"{int(seconds // 60):02d}:{seconds % 60:04.1f}"


def refuse_linked_folder(folder: str) -> None:
    """A step's folder that is a symbolic link (e.g. to a user's data) is refused, never
    followed."""
    if os.path.islink(os.path.normpath(folder)):
        raise ValueError(f"{folder}: is a symbolic link to {os.path.realpath(folder)}; a step "
                         f"reruns only into a folder of its own: remove the link")


def inventory(folder: str, skip: Sequence[str] = ()) -> Dict[str, List[int]]:
    """{path: [size, mtime_ns]} of the files under `folder` and {path + "/": [0, 0]} of its
    folders, itself included (links are entries, never followed); the folders `skip` (other
    steps') and what is in them are left out."""
    found: Dict[str, List[int]] = {}
    if not os.path.isdir(folder) or os.path.islink(folder):
        return found
    skipped = {os.path.normpath(p) for p in skip}
    for parent, dirs, files in os.walk(folder):
        found[os.path.normpath(parent) + "/"] = [0, 0]
        links = [d for d in dirs if os.path.islink(os.path.join(parent, d))]
        dirs[:] = [d for d in dirs if d not in links and
                   os.path.normpath(os.path.join(parent, d)) not in skipped]
        for name in files + links:
            path = os.path.normpath(os.path.join(parent, name))
            stat = os.lstat(path)
            found[path] = [stat.st_size, stat.st_mtime_ns]
    return found


def file_digest(path: str, cache: Dict[str, Dict]) -> str:
    """"<size>:<sha256>" of the file `path`; `cache` ({real path: {"size", "mtime_ns",
    "digest"}}) keeps it while the file's size and modification time stay."""
    stat = os.stat(path)
    key = os.path.realpath(path)
    known = cache.get(key)
    if known and known["size"] == stat.st_size and known["mtime_ns"] == stat.st_mtime_ns:
        return known["digest"]
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    digest = f"{stat.st_size}:{sha.hexdigest()}"
    cache[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "digest": digest}
    return digest


class Run:
    """One invocation of a pipeline: which steps run, their markers, the clock and the ETA.

    The step functions receive it (a report reads `executed`, `elapsed()` and `seconds()`).
    `root`: the run folder, whose paths markers hold relative to it (default: the marker
    folder's parent). `exclusive`: one process runs the marker folder at a time (False for the
    workers of one distributed job, which run every step together). `timer` is the clock in
    seconds (injectable for tests).
    """

    def __init__(self, steps: Sequence[Step], marker_dir: str,
                 selected: Optional[Sequence[str]] = None, overwrite: bool = False,
                 progress_every: float = 30.0, timer: Callable[[], float] = time.monotonic,
                 root: Optional[str] = None, exclusive: bool = True):
        self.steps: Dict[str, Step] = {s.name: s for s in steps}
        self.selected = select_steps(list(self.steps), list(self.steps) if selected is None
                                     else selected)
        self.marker_dir = marker_dir
        self.exclusive = exclusive
        self.root = os.path.abspath(root if root is not None else os.path.dirname(
            os.path.abspath(marker_dir)))
        self.digests: Dict[str, Dict] = {}
        with contextlib.suppress(FileNotFoundError, ValueError):
            cached = read_json(self.digest_path)
            self.digests = cached if isinstance(cached, dict) else {}
        self.overwrite = overwrite
        self.progress_every = progress_every
        self.timer = timer
        self.started = timer()
        self.executed: List[str] = []          # steps run (not skipped) by this invocation
        self.finished: List[str] = []          # steps done by this invocation, skipped included
        self.current: Optional[str] = None
        self.current_started = self.started
        self.expected = {s: (0.0 if a == "skip" else self.estimate(s))
                         for s, a in self.plan().items()}

    # markers ---------------------------------------------------------------------------------

    def marker_path(self, step: str) -> str:
        return os.path.join(self.marker_dir, f"{step}.json")

    def marker(self, step: str) -> Optional[Dict]:
        """The step's marker, None if it never started."""
        path = self.marker_path(step)
        return read_json(path) if os.path.isfile(path) else None

    def done(self, step: str) -> Optional[Dict]:
        """The step's marker if it is done, else None."""
        marker = self.marker(step)
        return marker if marker and marker.get("status") == "done" else None

    @property
    def digest_path(self) -> str:
        return os.path.join(self.marker_dir, "input-digests.cache")

    def portable(self, value):
        """`value` (JSON-able) with every path inside the run folder as `<out>/<relative>`."""
        if isinstance(value, dict):
            return {k: self.portable(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.portable(v) for v in value]
        if isinstance(value, str) and value and (os.sep in value or os.path.exists(value)):
            full = os.path.abspath(value)
            if full == self.root or full.startswith(self.root + os.sep):
                return "<out>" + full[len(self.root):]
        return value

    def input_files(self, value) -> Dict[str, str]:
        """{portable path: file_digest} of every existing file `value` (settings) names."""
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, (list, tuple)):
            return {k: v for item in value for k, v in self.input_files(item).items()}
        if isinstance(value, str) and value and os.path.isfile(value):
            return {self.portable(value): file_digest(value, self.digests)}
        return {}

    def fingerprint(self, step: str) -> Dict:
        """The step's own settings (paths in the run folder relative to it), the content of
        the files they name and the finish times of the steps whose outputs it reads."""
        inputs = {}
        for dep in self.steps[step].inputs:
            marker = self.done(dep)
            inputs[dep] = marker.get("finished") if marker else None
        settings = _plain(self.steps[step].settings)
        return {"settings": self.portable(settings), "files": self.input_files(settings),
                "inputs": inputs}

    def seconds(self) -> Dict[str, Optional[float]]:
        """Each step's duration from its done marker (None: not done)."""
        return {s: (self.done(s) or {}).get("seconds") for s in self.steps}

    # plan and progress -------------------------------------------------------------------------

    def plan(self) -> Dict[str, str]:
        """The action each selected step is expected to take (a step reading a step that will
        run reruns after it, since its input's finish time changes)."""
        planned: Dict[str, str] = {}
        for step in self.selected:
            marker = self.marker(step)
            if self.steps[step].always or any(planned.get(d, "skip") != "skip"
                                              for d in self.steps[step].inputs):
                planned[step] = "rerun" if marker else "run"
            else:
                planned[step] = self.action(step, marker, self.fingerprint(step))
        return planned

    def estimate(self, step: str) -> float:
        """Expected seconds of a step: its previous time if done with the same settings."""
        marker = self.done(step)
        if marker and (marker.get("fingerprint") or {}).get("settings") == \
                self.portable(_plain(self.steps[step].settings)) and \
                marker.get("seconds") is not None:
            return float(marker["seconds"])
        return float(self.steps[step].estimate)

    def elapsed(self) -> float:
        """Seconds since this run started."""
        return self.timer() - self.started

    def left(self) -> float:
        """Expected seconds until the run ends (the current step's expected rest included)."""
        total = 0.0
        for step in self.selected:
            if step in self.finished:
                continue
            expected = self.expected[step]
            if step == self.current:
                expected = max(expected - (self.timer() - self.current_started), 0.0)
            total += expected
        return total

    def progress(self, with_step: bool = True) -> str:
        """One console line: the current step's (`with_step`) and the whole run's time so far
        and left."""
        line = ""
        if with_step and self.current is not None:
            spent = self.timer() - self.current_started
            line = (f"{self.prefix(self.current)} {clock(spent)} of ~"
                    f"{clock(max(self.expected[self.current], spent))}; ")
        return line + f"run {clock(self.elapsed())}, about {clock(self.left())} left"

    def prefix(self, step: str) -> str:
        return f"[{self.selected.index(step) + 1}/{len(self.selected)} {step}]"

    @contextlib.contextmanager
    def _progress_thread(self) -> Iterator[None]:
        """Log `progress()` every `progress_every` seconds while the block runs (0: never)."""
        if self.progress_every <= 0:
            yield
            return
        stop = threading.Event()

        def report():
            while not stop.wait(self.progress_every):
                log.info("%s", self.progress())

        thread = threading.Thread(target=report, name="pipeline-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    # outputs: what a step wrote, what it keeps -----------------------------------------------

    def rel(self, path: str) -> str:
        """`path` relative to the run folder (a folder's keeps its trailing /)."""
        return os.path.relpath(os.path.abspath(path.rstrip("/")), self.root) + \
            ("/" if path.endswith("/") else "")

    def full(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def nested(self, step: str) -> List[str]:
        """The other steps' folders inside `step`'s (theirs, not its: seeds/ in the results of
        inference)."""
        own = [os.path.abspath(f) for f in self.steps[step].folders]
        return [os.path.abspath(f) for other in self.steps.values() if other.name != step
                for f in other.folders
                if any(os.path.abspath(f).startswith(o + os.sep) for o in own)]

    def contents(self, folders: Sequence[str], skip: Sequence[str] = ()) -> Dict[str, List[int]]:
        """`inventory` of `folders`, paths relative to the run folder."""
        found: Dict[str, List[int]] = {}
        for folder in folders:
            found.update({self.rel(p): v for p, v in
                          inventory(os.path.abspath(folder), skip).items()})
        return found

    @staticmethod
    def step_files(marker: Mapping, current: Mapping[str, List[int]]) -> Optional[List[str]]:
        """The files of `current` that the step of `marker` wrote: its `wrote` list once done,
        else what is there beyond its `kept` files; None for a marker that lists neither (of an
        earlier version)."""
        if marker.get("status") == "done" and "wrote" in marker:
            return [p for p in marker["wrote"] if p in current]
        if "kept" in marker:
            return [p for p, v in current.items()
                    if not p.endswith("/") and marker["kept"].get(p) != v]
        return None

    def remove_outputs(self, name: str, marker: Optional[Mapping], folders: Sequence[str],
                       skip: Sequence[str] = ()) -> Dict[str, List[int]]:
        """Remove the files the step of `marker` wrote in `folders` and the folders that
        emptied (not those that were there before it); log the files kept. Returns what is
        left: the files and folders the step did not write."""
        for folder in folders:
            refuse_linked_folder(folder)
        current = self.contents(folders, skip)
        files = self.step_files(marker, current) if marker else []
        if files is None:
            log.warning("step %s: its marker %s lists no files it wrote (an earlier version); "
                        "its folders are left as they are", name, self.marker_path(name))
            files = []
        for rel in files:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.full(rel))
        before = marker.get("kept", current) if marker else current
        for rel in sorted((p for p in current if p.endswith("/") and p not in before),
                          key=lambda p: -p.count("/")):
            with contextlib.suppress(OSError):
                os.rmdir(self.full(rel))
        left = self.contents(folders, skip)
        kept = sorted(p for p in left if not p.endswith("/"))
        if kept:
            log.info("step %s: kept %d files it did not write: %s%s", name, len(kept),
                     ", ".join(kept[:5]), ", ..." if len(kept) > 5 else "")
        return left

    def missing(self, marker: Mapping) -> List[str]:
        """The files a done step wrote that are gone."""
        return [p for p in marker.get("wrote", []) if not os.path.lexists(self.full(p))]

    def action(self, name: str, marker: Optional[Mapping], fingerprint: Mapping) -> str:
        """`step_action`, but a done step whose files are missing resumes (remaking them) and
        an `always` step reruns."""
        if self.steps[name].always:
            return "rerun"
        action = step_action(marker, fingerprint, self.overwrite)
        return "resume" if action == "skip" and self.missing(marker) else action

    def marker_names(self) -> List[str]:
        """The steps with a marker in the marker folder, this pipeline's or not."""
        if not os.path.isdir(self.marker_dir):
            return []
        return sorted(n[:-len(".json")] for n in os.listdir(self.marker_dir)
                      if n.endswith(".json") and os.path.isfile(os.path.join(self.marker_dir, n)))

    def forget(self, names: Sequence[str]) -> None:
        """Remove the outputs (only the files they wrote) and markers of steps no longer in
        the pipeline (e.g. the seeds of a larger --repeat); a marker that does not name its
        folders (an earlier version) is left, with a warning."""
        for name in names:
            marker = self.marker(name)
            if marker is None:
                continue
            if "folders" not in marker:
                log.warning("step %s is no longer in this run, but its marker %s does not name "
                            "its folders; remove them by hand", name, self.marker_path(name))
                continue
            log.info("step %s is no longer in this run: removing the files it wrote in %s",
                     name, ", ".join(marker["folders"]))
            self.remove_outputs(name, marker, [self.full(f) for f in marker["folders"]])
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.marker_path(name))
            for folder in marker["folders"]:   # and the emptied folders above (seed<k>/)
                parent = os.path.dirname(self.full(folder))
                with contextlib.suppress(OSError):   # not empty, or gone
                    while parent.startswith(self.root + os.sep):
                        os.rmdir(parent)
                        parent = os.path.dirname(parent)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One run of this marker folder at a time (icd.io.exclusive_lock; re-entrant), unless
        not `exclusive`."""
        os.makedirs(self.marker_dir, exist_ok=True)
        with exclusive_lock(os.path.join(self.marker_dir, "run.lock"), self.root) \
                if self.exclusive else contextlib.nullcontext():
            yield

    # running -----------------------------------------------------------------------------------

    def _check_inputs(self, step: str) -> None:
        for dep in self.steps[step].inputs:
            if dep not in self.selected and self.done(dep) is None:
                raise RuntimeError(f"step {step!r} needs the outputs of step {dep!r}, which has "
                                   f"not finished in {self.marker_dir}; add it to the steps")

    def execute(self) -> Dict[str, Dict]:
        """Run the selected steps in order; returns {step: {"action", "seconds", **result}}."""
        with self.lock():
            try:
                summary = {name: self._execute(name) for name in self.selected}
            finally:
                write_json(self.digest_path, self.digests)
        log.info("finished in %s -> %s", clock(self.elapsed()), self.marker_dir)
        return summary

    def _execute(self, name: str) -> Dict:
        """Run, resume or skip one step; its summary."""
        step = self.steps[name]
        self._check_inputs(name)
        fingerprint = self.fingerprint(name)
        marker = self.marker(name)
        action = self.action(name, marker, fingerprint)
        if action == "skip":
            self.finished.append(name)
            log.info("%s done before (%s), skipped; %s", self.prefix(name),
                     clock(marker.get("seconds") or 0.0), self.progress())
            return {"action": action, "seconds": marker.get("seconds")}
        skip = self.nested(name)
        if action == "rerun":
            kept = self.remove_outputs(name, marker, step.folders, skip)
        else:
            for folder in step.folders:
                refuse_linked_folder(folder)
            current = self.contents(step.folders, skip)
            kept = {p: v for p, v in (marker or {}).get("kept", current).items() if p in current}
            gone = self.missing(marker) if marker and marker.get("status") == "done" else []
            if gone:
                log.info("%s %d files it wrote are missing (%s%s): remaking them",
                         self.prefix(name), len(gone), ", ".join(gone[:5]),
                         ", ..." if len(gone) > 5 else "")
        previous = (marker.get("seconds") or 0.0) if action == "resume" else 0.0
        record = {"fingerprint": fingerprint, "folders": [self.rel(f) for f in step.folders],
                  "kept": kept}
        write_json(self.marker_path(name), {"status": "running", "seconds": previous, **record})
        self.current, self.current_started = name, self.timer()
        self.executed.append(name)
        log.info("%s %s (expected ~%s); %s", self.prefix(name), ACTIONS[action],
                 clock(self.expected[name]), self.progress(with_step=False))
        try:
            with self._progress_thread():
                result = dict(step.func(self))
        except BaseException as error:
            # the time spent counts when the step resumes; no done marker
            write_json(self.marker_path(name), {
                "status": "failed", "seconds": previous + self.timer() - self.current_started,
                "error": f"{type(error).__name__}: {error}", **record})
            self.current = None
            raise
        seconds = previous + self.timer() - self.current_started
        wrote = self.step_files(record, self.contents(step.folders, skip))
        write_json(self.marker_path(name), {
            "status": "done", "seconds": seconds,
            "finished": datetime.datetime.now().isoformat(), "result": result,
            "wrote": sorted(wrote), **record})
        self.current = None
        self.finished.append(name)
        log.info("%s finished in %s; %s", self.prefix(name), clock(seconds), self.progress())
        return {"action": action, "seconds": seconds, **result}
