"""Atomic writes, stale temporaries, deferred Ctrl-C and full disks (icd.io)."""
import errno
import os
import signal

import pytest

import icd.io
from icd.io import atomic_path, deferred_interrupt, remove_stale_temporaries, write_json


def test_atomic_path_renames_on_success(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with atomic_path(str(target)) as tmp:
        assert tmp.endswith(".txt") and not target.exists()
        with open(tmp, "w") as f:
            f.write("done")
    assert target.read_text() == "done"
    assert os.listdir(target.parent) == ["out.txt"]


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(str(target)) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("writer failed")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_atomic_path_gives_usual_permissions(tmp_path):
    target = tmp_path / "out.txt"
    with atomic_path(str(target)) as tmp:
        open(tmp, "w").close()
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_stale_temporaries_of_interrupted_writes_are_removed(tmp_path):
    folder = str(tmp_path)
    with atomic_path(os.path.join(folder, "kept.params")) as tmp:
        open(tmp, "w").close()
        stale = os.path.basename(tmp)                 # what a SIGKILL at this point leaves
    for name in (stale, ".a.b.abcd_123.tmp.png", ".log.x1y2z3w4.tmp"):
        open(os.path.join(folder, name), "w").close()
    open(os.path.join(folder, ".hidden.tmp.txt"), "w").close()   # not an atomic_path name
    removed = remove_stale_temporaries(folder)
    assert sorted(os.path.basename(p) for p in removed) == sorted(
        [stale, ".a.b.abcd_123.tmp.png", ".log.x1y2z3w4.tmp"])
    assert sorted(os.listdir(folder)) == [".hidden.tmp.txt", "kept.params"]
    assert remove_stale_temporaries(os.path.join(folder, "absent")) == []
    for name in (".vgg16_icd-0001.abcdefgh.tmp.params", ".vgg16_cam-0001.abcdefgh.tmp.params"):
        open(os.path.join(folder, name), "w").close()
    assert [os.path.basename(p) for p in remove_stale_temporaries(folder, "vgg16_cam-")] == [
        ".vgg16_cam-0001.abcdefgh.tmp.params"]     # another model's write may be in progress


def test_deferred_interrupt_finishes_the_block_then_raises(tmp_path, python_sigint):
    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("rest of the block")
    assert done == ["rest of the block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_disk_full_names_the_file(tmp_path, monkeypatch):
    path = str(tmp_path / "out.json")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(icd.io.json, "dump", full)
    with pytest.raises(OSError, match=rf"{path}: no space left on device") as error:
        write_json(path, {"a": 1})
    assert error.value.errno == errno.ENOSPC and os.listdir(tmp_path) == []
