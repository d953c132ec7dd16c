r"""Start a parameter-server job with MXNet's own launcher (mxnet/tools/launch.py + dmlc_tracker).

Examples:
  icd-launch -n 2 -s 1 --launcher local -- icd-train --config synthetic_demo --cpus 1 \
      --kvstore dist_device_sync
  icd-launch -n 4 -s 2 --launcher ssh -H hosts -- icd-train --config voc_vgg16 --gpus 0,1 \
      --batch-size 8 --kvstore dist_device_sync
  python tools/launch.py ... -- python tools/train_icd.py ...        the same from a checkout

Options are MXNet's (-n workers, -s servers, --launcher local|ssh|mpi|sge|yarn and slurm,
-H hostfile, --env-worker/--env-server VAR:VALUE, --sync-dst-dir); the `--` before the command is
optional. What this entry point adds to MXNet's launcher, and nothing else:
  - dmlc_tracker on Python >= 3.9: `Thread.isAlive` (removed from Python) is restored;
  - `--launcher slurm`: dmlc_tracker has it, MXNet's option list lacks it;
  - the scheduler address: DMLC_PS_ROOT_URI and the first free port from DMLC_PS_ROOT_PORT when
    set (the tracker otherwise takes this machine's outward address and the first free port from
    9091); `--launcher local`
    keeps every process on 127.0.0.1;
  - the job's status: the tracker waits for the scheduler only and ignores the workers' status, so
    a dead worker leaves the others blocked in the key-value store for ever. Here the first worker
    (or server, scheduler) that exits with an error ends every process this launcher started
    (SIGTERM, SIGKILL after GRACE_SECONDS) and the launcher exits with that status; when all
    workers have finished, servers and scheduler still running after GRACE_SECONDS are ended.
    Ctrl-C or SIGTERM to the launcher ends the job the same way (exit 130 / 143).
  - `--launcher` defaults to `local` when no host file (-H) is given (MXNet's default, ssh,
    needs one and otherwise dies with "Unknown submission cluster type ssh");
  - errors in one line: a command that is not found on this machine (local launcher) is refused
    before anything starts (exit 2); a failing process ends the job with one line naming it
    (`error: worker: exited with status 7; the job was ended`) instead of the tracker threads'
    tracebacks, which printed every environment variable.
The launcher's exit status is the job's: 0 when every worker succeeded, else the first failing
process's (a training's 3 for a NaN; 128 + signal for a killed one).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import List, Optional, Sequence, Tuple

import dmlc_tracker.opts
import dmlc_tracker.sge
import dmlc_tracker.slurm
from dmlc_tracker import tracker
import mxnet

GRACE_SECONDS = 10.0   # from SIGTERM to SIGKILL, and for servers after the last worker
POLL_SECONDS = 0.2


class _Job:
    """Every process the tracker starts (through subprocess), with its DMLC_ROLE."""

    def __init__(self):
        self.children = []   # (role, Popen)
        self.lock = threading.Lock()
        self.status = None   # the job's exit status once decided
        self.culprit = ""    # the role of the process whose failure decided it

    def popen(self):
        job = self

        class Popen(subprocess.Popen):
            def __init__(self, args, *rest, **kwargs):
                super().__init__(args, *rest, **kwargs)
                env = kwargs.get("env") or os.environ
                text = args if isinstance(args, str) else " ".join(map(str, args))
                role = "worker" if "DMLC_ROLE=worker" in text else env.get("DMLC_ROLE", "")
                with job.lock:
                    job.children.append((role, self))
        return Popen

    def end(self, status: int, culprit: str = "") -> None:
        """Decide the job's status (the first decision stands) and end every process left."""
        with self.lock:
            if self.status is None:
                self.status, self.culprit = status, culprit
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = _descendants(os.getpid())
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + GRACE_SECONDS
            while time.time() < deadline and _descendants(os.getpid()):
                time.sleep(POLL_SECONDS)

    def running(self, role: str) -> bool:
        with self.lock:
            return any(p.returncode is None for r, p in self.children if r == role)

    def failure(self) -> int:
        """Exit status of the first process that failed (128 + signal if killed), else 0."""
        return self.failed()[1]

    def failed(self) -> Tuple[str, int]:
        """(role, exit status) of the first process that failed, else ("", 0)."""
        with self.lock:
            failed = [(r, p.returncode) for r, p in self.children if p.returncode not in (None, 0)]
        if not failed:
            return "", 0
        role, code = failed[0]
        return role or "process", code if code > 0 else 128 - code

    def watch(self) -> None:
        """End the job at the first failure, or after the last worker's success."""
        finished_at = None
        while self.status is None:
            with self.lock:
                workers = [p for role, p in self.children if role == "worker"]
            role, status = self.failed()
            if status:
                self.end(status, role)
            elif workers and all(p.returncode == 0 for p in workers):
                finished_at = finished_at or time.time()
                if time.time() - finished_at > GRACE_SECONDS:
                    self.end(0)
            time.sleep(POLL_SECONDS)


def _descendants(root: int) -> List[int]:
    """Pids of every living descendant of `root` (from /proc), children before grandchildren."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parents.setdefault(int(fields[1]), []).append(int(entry))
    found, frontier = [], [root]
    while frontier:
        frontier = [child for pid in frontier for child in parents.get(pid, [])]
        found += frontier
    return found


def _mxnet_launch():
    """MXNet's launcher module, shipped in the wheel as mxnet/tools/launch.py (not a package)."""
    path = os.path.join(os.path.dirname(mxnet.__file__), "tools", "launch.py")
    spec = importlib.util.spec_from_file_location("mxnet_tools_launch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_VALUED = ("-n", "--num-workers", "-s", "--num-servers", "-H", "--hostfile", "--sync-dst-dir",
           "--launcher", "--env-server", "--env-worker", "--env")   # MXNet's launcher options


def _argv(argv):
    """MXNet's arguments with `--` before the command (inserted before the first word that is not
    a launcher option: MXNet's parser would otherwise also take the command's own options, such
    as train_icd.py's --num-workers), and `--launcher slurm` routed to dmlc_tracker's slurm."""
    argv = list(argv)
    options = {}   # name -> (value, its position)
    i = 0
    while i < len(argv) and argv[i] != "--":
        name, _, value = argv[i].partition("=")
        if name in _VALUED:
            at = i if "=" in argv[i] else i + 1
            options[name] = (argv[at].partition("=")[2] if at == i else
                             argv[at] if at < len(argv) else "", at)
            i = at + 1
        elif name in ("--p3", "-h", "--help"):
            i += 1
        else:
            argv.insert(i, "--")
            break
    if "--launcher" not in options and not ({"-H", "--hostfile"} & set(options)):
        argv[:0] = ["--launcher", "local"]   # MXNet's default, ssh, needs a host file
        options["--launcher"] = ("local", 1)
    launcher, at = options.get("--launcher", ("ssh", None))   # MXNet's default: ssh
    if launcher == "slurm":
        argv[at] = argv[at].replace("slurm", "sge")           # MXNet's list lacks slurm ...
        dmlc_tracker.sge.submit = dmlc_tracker.slurm.submit   # ... dmlc_tracker has it
    if launcher == "local":
        os.environ.setdefault("DMLC_PS_ROOT_URI", "127.0.0.1")
        os.environ.setdefault("DMLC_NODE_HOST", "127.0.0.1")   # ps-lite's own address
    return argv


def _command_after_separator(command) -> None:
    """dmlc_tracker parses MXNet's options followed by the command again, with the command's
    options mixed in (a training's --num-workers became the job's); put `--` before it."""
    get_opts = dmlc_tracker.opts.get_opts

    def separated(args=None):
        n = len(command)
        if args is not None and n and list(args[-n:]) == command:
            args = list(args[:-n]) + ["--"] + command
        return get_opts(args)
    dmlc_tracker.opts.get_opts = separated


def _scheduler_address() -> None:
    """Honour DMLC_PS_ROOT_URI / DMLC_PS_ROOT_PORT for the scheduler the tracker starts."""
    uri, port = os.environ.get("DMLC_PS_ROOT_URI"), os.environ.get("DMLC_PS_ROOT_PORT")
    if uri:
        tracker.get_host_ip = lambda host_ip=None: uri
    if port:
        defaults = tracker.PSTracker.__init__.__defaults__   # (port, port_end, envs)
        tracker.PSTracker.__init__.__defaults__ = (int(port), int(port) + 100) + defaults[2:]


def _missing_program(command: Sequence[str]) -> str:
    """The program of `command` (after any VAR=value words) when this machine cannot run it."""
    words = [w for w in command if not ("=" in w and w.split("=", 1)[0].isidentifier())]
    if words and shutil.which(words[0]) is None:
        return words[0]
    return ""


def _quiet_tracker_threads() -> None:
    """The tracker's threads raise when their process fails (dmlc_tracker/local.py puts every
    environment variable into the message); the job's watcher reports the failure instead."""
    package = os.path.dirname(tracker.__file__)
    default = threading.excepthook

    def hook(args):
        frames = []
        tb = args.exc_traceback
        while tb is not None:
            frames.append(tb.tb_frame.f_code.co_filename)
            tb = tb.tb_next
        if not any(f.startswith(package) for f in frames):
            default(args)
    threading.excepthook = hook


def _asks_help(argv: Sequence[str]) -> bool:
    """-h / --help among the launcher's own options (not the command's, after them)."""
    words = iter(argv)
    for word in words:
        if word in ("-h", "--help"):
            return True
        if word == "--" or not word.startswith("-"):
            return False
        if word in _VALUED and "=" not in word:
            next(words, None)
    return False


def _help() -> int:
    """This module's description, then MXNet's launcher's usage and options."""
    print(__doc__.strip() + "\n")
    sys.argv = ["icd-launch", "--help"]
    try:
        _mxnet_launch().main()
    except SystemExit as e:
        return e.code or 0
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the job of `argv` (default sys.argv[1:]); returns its exit status (module doc)."""
    threading.Thread.isAlive = threading.Thread.is_alive   # dmlc_tracker/tracker.py calls it
    argv = sys.argv[1:] if argv is None else argv
    if _asks_help(argv):
        return _help()
    argv = _argv(argv)
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    local = "--launcher=local" in argv or (
        "--launcher" in argv and argv[argv.index("--launcher") + 1:][:1] == ["local"])
    missing = _missing_program(command) if local else ""
    if missing:
        print(f"error: {missing}: command not found (icd-launch starts it on every worker)",
              file=sys.stderr)
        return 2
    _command_after_separator(command)
    _quiet_tracker_threads()
    _scheduler_address()
    job = _Job()
    subprocess.Popen = job.popen()
    for sig, status in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        signal.signal(sig, lambda *_, status=status: threading.Thread(
            target=job.end, args=(status,), daemon=True).start())
    watcher = threading.Thread(target=job.watch, daemon=True)
    watcher.start()
    launch = _mxnet_launch()
    sys.argv = [launch.__file__] + argv
    try:
        launch.main()   # returns when the scheduler has exited
    finally:
        deadline = time.time() + GRACE_SECONDS   # workers may still be leaving the store
        while time.time() < deadline and job.running("worker") and not job.failure():
            time.sleep(POLL_SECONDS)
        job.end(*job.failed()[::-1])
    if job.status and job.culprit:
        print(f"error: {job.culprit}: exited with status {job.status}; the job was ended",
              file=sys.stderr)
    return job.status
