"""Atomic writes: a crash never leaves a partial file under the real name, and temporaries of killed writers go."""
import os
import subprocess
import sys

import pytest

from dsd_caffe import fileio
from dsd_caffe.errors import OutputExists, UserError


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "model.json"
    with pytest.raises(RuntimeError):
        with fileio.atomic_path(target) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("crash")
    assert os.listdir(tmp_path) == []


def test_temporaries_of_killed_writers_are_removed(tmp_path):
    dead = tmp_path / f".model.json.tmp-{_dead_pid()}-abc"
    dead.mkdir()
    (dead / "data.mdb").write_bytes(b"x")
    alive = tmp_path / f".model.json.tmp-{os.getpid()}-def"  # a writer still running: kept
    alive.write_bytes(b"y")
    other = tmp_path / f".other.json.tmp-{_dead_pid()}-ghi"  # another output's temporary: not ours to judge
    other.write_bytes(b"z")
    fileio.write_json(tmp_path / "model.json", {"a": 1})
    assert sorted(os.listdir(tmp_path)) == sorted(["model.json", alive.name, other.name])
    assert fileio.read_json(tmp_path / "model.json") == {"a": 1}


@pytest.mark.parametrize("device", ["/dev/null", "/dev/full"])
def test_devices_are_never_replaced_even_with_force(device):
    with pytest.raises(UserError, match="character device"):
        fileio.check_output(device, force=True)
    with pytest.raises(UserError, match="character device"):
        fileio.write_json(device, {"a": 1}, force=True)
    assert os.path.exists(device) and not os.path.isfile(device)


def test_fifo_and_link_to_a_device_are_refused(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="FIFO"):
        fileio.atomic_write(fifo, "x", force=True)
    link = tmp_path / "link"
    link.symlink_to("/dev/null")
    with pytest.raises(UserError, match="character device"):
        fileio.atomic_write(link, "x", force=True)
    assert os.path.islink(link)


def test_folder_swap_keeps_the_old_output_until_the_new_one_is_complete(tmp_path):
    out = tmp_path / "out"
    with fileio.atomic_path(out, directory=True) as tmp:
        open(os.path.join(tmp, "a"), "w").write("old")
    with pytest.raises(RuntimeError):
        with fileio.atomic_path(out, directory=True) as tmp:
            open(os.path.join(tmp, "a"), "w").write("new, half")
            raise RuntimeError("crash")
    assert open(out / "a").read() == "old" and os.listdir(tmp_path) == ["out"]
    with fileio.atomic_path(out, directory=True) as tmp:
        open(os.path.join(tmp, "b"), "w").write("new")
    assert os.listdir(out) == ["b"] and os.listdir(tmp_path) == ["out"]


def test_replaceable_folder_holds_only_what_the_tool_writes(tmp_path):
    own = ["*.caffemodel", "snapshots"]
    assert fileio.check_replaceable(tmp_path / "absent", own, False, "prune.py")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x.caffemodel").write_bytes(b"")
    with pytest.raises(OutputExists, match="--force"):
        fileio.check_replaceable(tmp_path / "run", own, False, "prune.py")
    fileio.check_replaceable(tmp_path / "run", own, True, "prune.py")
    (tmp_path / "run" / "thesis.tex").write_bytes(b"")
    with pytest.raises(OutputExists, match="'thesis.tex', which prune.py did not write"):
        fileio.check_replaceable(tmp_path / "run", own, True, "prune.py")


def test_clear_owned_removes_what_the_tool_owns_and_refuses_anything_else(tmp_path):
    """The one --force rule for resumable folders: what the tool declares (names, patterns, and their lock files
    and staging leftovers) goes, ``keep`` stays, and a foreign entry is refused by name before anything goes."""
    own = ["state.json", "cycle*", "data"]
    run = tmp_path / "run"
    for name in ("cycle1-sparse", "data", ".cycle1-sparse.tmp-12-ab"):
        (run / name).mkdir(parents=True)
    for name in ("state.json", ".cycle2-redense.lock", ".state.json.tmp-3-x"):
        (run / name).write_text("")
    (run / ".thesis.lock").write_text("")
    with pytest.raises(FileExistsError, match="holds '.thesis.lock', which dsd.py did not write"):
        fileio.clear_owned(run, own, "dsd.py", keep=("data",))
    assert len(os.listdir(run)) == 7
    (run / ".thesis.lock").unlink()
    assert fileio.clear_owned(run, own, "dsd.py", keep=("data",)) == str(run)
    assert os.listdir(run) == ["data"]
    assert fileio.clear_owned(tmp_path / "absent", own, "dsd.py") == str(tmp_path / "absent")


def test_a_second_process_is_refused_with_the_live_pid(tmp_path):
    out = tmp_path / "run"
    code = ("import sys, time; from dsd_caffe import fileio\n"
            f"with fileio.output_lock({str(out)!r}):\n    print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"in use by another dsd-caffe process \\(pid {holder.pid}\\)"):
            with fileio.output_lock(out):
                pass
    finally:
        holder.kill()
        holder.wait()
    with fileio.output_lock(out):  # the lock went with the killed holder
        with fileio.output_lock(out):  # and a process may take its own lock again
            pass
