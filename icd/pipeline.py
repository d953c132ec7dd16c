"""A resumable step runner (IRN-style): named steps, each making the folders it owns from the
outputs of the steps it reads, run in order by one `Run`.

Every step leaves a marker `<marker_dir>/<step>.json`:
  {"status": "running" | "failed" | "done", "fingerprint", "seconds", "finished", "result"}.
The fingerprint holds the step's own settings and the finish times of the steps whose outputs it
reads (its inputs). A step whose done marker has this fingerprint is skipped; a step that was
interrupted or failed with this fingerprint resumes (its partial outputs are kept: steps write
each file atomically and skip finished ones); a step whose settings or inputs changed, any step
with `overwrite`, and an `always` step clear their folders and run afresh. A failed step never
leaves a done marker, so nothing downstream mistakes it for finished.

Progress: each step's expected duration is the previous run's time from its done marker when
its settings are unchanged, otherwise the step's `estimate`; the console shows the step's and the
whole run's elapsed time and time left at every step boundary and every `progress_every` seconds
while a step runs.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from .io import read_json, write_json

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


def clear_step_folder(folder: str) -> None:
    """Remove a step's own folder before it reruns (everything in it is the step's output). A
    folder that is a symbolic link (e.g. to a user's data) is refused, never followed."""
    if os.path.islink(folder):
        raise ValueError(f"{folder}: is a symbolic link to {os.path.realpath(folder)}; a step "
                         f"reruns only into a folder of its own: remove the link")
    if os.path.isdir(folder):
        shutil.rmtree(folder)


class Run:
    """One invocation of a pipeline: which steps run, their markers, the clock and the ETA.

    The step functions receive it (a report reads `executed`, `elapsed()` and `seconds()`).
    `timer` is the clock in seconds (injectable for tests).
    """

    def __init__(self, steps: Sequence[Step], marker_dir: str,
                 selected: Optional[Sequence[str]] = None, overwrite: bool = False,
                 progress_every: float = 30.0, timer: Callable[[], float] = time.monotonic):
        self.steps: Dict[str, Step] = {s.name: s for s in steps}
        self.selected = select_steps(list(self.steps), list(self.steps) if selected is None
                                     else selected)
        self.marker_dir = marker_dir
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

    def fingerprint(self, step: str) -> Dict:
        """The step's own settings and the finish times of the steps whose outputs it reads."""
        inputs = {}
        for dep in self.steps[step].inputs:
            marker = self.done(dep)
            inputs[dep] = marker.get("finished") if marker else None
        return {"settings": _plain(self.steps[step].settings), "inputs": inputs}

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
                planned[step] = step_action(marker, self.fingerprint(step), self.overwrite)
        return planned

    def estimate(self, step: str) -> float:
        """Expected seconds of a step: its previous time if done with the same settings."""
        marker = self.done(step)
        if marker and _plain((marker.get("fingerprint") or {}).get("settings")) == \
                _plain(self.steps[step].settings) and marker.get("seconds") is not None:
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

    # running -----------------------------------------------------------------------------------

    def _check_inputs(self, step: str) -> None:
        for dep in self.steps[step].inputs:
            if dep not in self.selected and self.done(dep) is None:
                raise RuntimeError(f"step {step!r} needs the outputs of step {dep!r}, which has "
                                   f"not finished in {self.marker_dir}; add it to the steps")

    def execute(self) -> Dict[str, Dict]:
        """Run the selected steps in order; returns {step: {"action", "seconds", **result}}."""
        os.makedirs(self.marker_dir, exist_ok=True)
        summary: Dict[str, Dict] = {}
        for name in self.selected:
            step = self.steps[name]
            self._check_inputs(name)
            fingerprint = self.fingerprint(name)
            marker = self.marker(name)
            action = "rerun" if step.always else step_action(marker, fingerprint, self.overwrite)
            if action == "skip":
                self.finished.append(name)
                summary[name] = {"action": action, "seconds": marker.get("seconds")}
                log.info("%s done before (%s), skipped; %s", self.prefix(name),
                         clock(marker.get("seconds") or 0.0), self.progress())
                continue
            if action == "rerun":
                for folder in step.folders:
                    clear_step_folder(folder)
            previous = (marker.get("seconds") or 0.0) if action == "resume" else 0.0
            write_json(self.marker_path(name), {"status": "running", "fingerprint": fingerprint,
                                                "seconds": previous})
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
                    "status": "failed", "fingerprint": fingerprint,
                    "seconds": previous + self.timer() - self.current_started,
                    "error": f"{type(error).__name__}: {error}"})
                self.current = None
                raise
            seconds = previous + self.timer() - self.current_started
            write_json(self.marker_path(name), {
                "status": "done", "fingerprint": fingerprint, "seconds": seconds,
                "finished": datetime.datetime.now().isoformat(), "result": result})
            self.current = None
            self.finished.append(name)
            summary[name] = {"action": action, "seconds": seconds, **result}
            log.info("%s finished in %s; %s", self.prefix(name), clock(seconds), self.progress())
        log.info("finished in %s -> %s", clock(self.elapsed()), self.marker_dir)
        return summary
