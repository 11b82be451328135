"""Atomic writes: a crash never leaves a partial file under the real name, and temporaries of killed writers go."""
import os
import subprocess
import sys

import pytest

from dsd_caffe import fileio


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
