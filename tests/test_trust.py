"""Results that must never be silently wrong (issue 21, docs/guarantees.md): a resume checks what it resumes, a
diverged model is never a 100% model, a live run's folder is its own, one setting per shared blob, inputs that
never end or that Caffe cannot open, Python layers that fail after importing, true reasons in refusals."""
import errno
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dsd_caffe import fileio, phases, pipeline, runreport, seedpool, training
from dsd_caffe.errors import DiskFull, Interrupted, UserError
from dsd_caffe.solvers import Schedule
from helpers import ROOT, small_setup, tool

caffe = pytest.importorskip("caffe")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("trust"))
    model, weights = small_setup(folder)
    other = str(tmp_path_factory.mktemp("trust-other"))
    _, other_weights = small_setup(other, seed=1)
    return {"dir": folder, "model": model, "weights": weights, "other": other_weights}


def copy_setup(setup, tmp_path):
    """A private copy of the set-up (its dense model may be replaced)."""
    folder = str(tmp_path / "setup")
    shutil.copytree(setup["dir"], folder)
    return dict(setup, dir=folder, model=os.path.join(folder, "trainval.prototxt"),
                weights=os.path.join(folder, "dense.caffemodel"))


def dsd(s, out, *extra):
    return tool("dsd", "--model", s["model"], "--weights", s["weights"], "--output", out, "--ratio", "3x",
                "--sparse-max-iter", 4, "--redense-max-iter", 4, "--snapshot", 2, "--iterations", 2, *extra)


def strict(path):
    """A JSON file read as strict JSON (a bare NaN or Infinity fails)."""
    def refuse(name):
        raise AssertionError(f"{path}: bare {name} in JSON")

    with open(path) as f:
        return json.load(f, parse_constant=refuse)


def one_error_line(r, prog):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), r.stderr[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------------------------ resumes
def test_a_resume_refuses_a_replaced_dense_model(setup, tmp_path):
    """A run stopped before its control arm, its dense model then replaced in place: the same command refuses to
    resume, naming the file and both hashes (before, the control trained from the other model, exit 0)."""
    s = copy_setup(setup, tmp_path)
    out = tmp_path / "run"
    r = dsd(s, out, "--control")
    assert r.returncode == 0, r.stderr[-3000:]
    state = fileio.read_json(out / pipeline.STATE)  # as if stopped before the control arm
    state["phases"] = [p for p in state["phases"] if p["arm"] != "control"]
    state["finished"] = False
    fileio.write_json(out / pipeline.STATE, state)
    for folder in (pipeline.control_step(1, "sparse"), pipeline.control_step(1, "redense")):
        shutil.rmtree(out / folder)
    old = training.file_record(s["weights"])["sha256"]
    shutil.copyfile(s["other"], s["weights"])
    new = training.file_record(s["weights"])["sha256"]
    line = one_error_line(dsd(s, out, "--control"), "dsd.py")
    assert s["weights"] in line and old in line and new in line, line
    assert not (out / pipeline.control_step(1, "sparse")).exists()


def test_a_phase_resume_names_the_file_and_both_hashes(setup, tmp_path):
    """A phase folder started from a file whose content changed names it once, with both hashes (it said
    "other weights (X, not X)")."""
    s = copy_setup(setup, tmp_path)
    args = ("--model", s["model"], "--weights", s["weights"], "--output", tmp_path / "r", "--max-iter", 2)
    r = tool("retrain_dense", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    old = training.file_record(s["weights"])["sha256"]
    shutil.copyfile(s["other"], s["weights"])
    line = one_error_line(tool("retrain_dense", *args), "retrain_dense.py")
    assert old in line and training.file_record(s["weights"])["sha256"] in line, line
    assert f"{s['weights']}, not {s['weights']}" not in line


# ------------------------------------------------------------------------------------------------ diverged
def nan_model(s, tmp_path):
    """The dense model with one NaN weight in its first layer."""
    param = fileio.read_caffemodel(s["weights"])
    layer = next(l for l in param.layer if len(l.blobs))
    layer.blobs[0].data[0] = float("nan")
    path = str(tmp_path / "nan.caffemodel")
    fileio.write_caffemodel(path, param)
    return path


def test_evaluate_reports_a_diverged_model(setup, tmp_path):
    """`caffe test`'s lines (accuracy 1, loss nan: Caffe counts a NaN score as a hit), then one warning line and
    exit status 3; --allow-diverged exits 0 with the same lines."""
    weights = nan_model(setup, tmp_path)
    args = ("--model", setup["model"], "--weights", weights, "--iterations", 2)
    r = tool("evaluate", *args)
    assert r.returncode == 3, r.stderr[-3000:]
    assert "accuracy_top1 = 1" in r.stdout.splitlines() and "Loss: -nan" in r.stdout.splitlines(), r.stdout
    warnings = [l for l in r.stderr.splitlines() if "diverged" in l]
    assert len(warnings) == 1 and warnings[0].startswith("evaluate.py: warning: the model diverged"), r.stderr
    assert r.stderr.strip().splitlines()[-1] == warnings[0]
    ok = tool("evaluate", *args, "--allow-diverged")
    assert ok.returncode == 0 and ok.stdout == r.stdout, ok.stderr[-3000:]
    assert "--allow-diverged" in tool("evaluate", "--help").stdout


def test_a_diverged_run_is_marked_and_gets_no_verdict(setup, tmp_path, monkeypatch):
    """Models whose evaluation is not finite (here: the redense and control models, as a NaN net evaluates): the
    table says "diverged" (never 100%), dsd_state.json and verdict.json are strict JSON (null and a reason), and
    the verdict refuses the seed."""
    from dsd_caffe import evaluate

    real = evaluate.evaluate_param

    def nan_after_redense(net, weights, *a, **k):
        scores = real(net, weights, *a, **k)
        if os.path.basename(os.path.dirname(weights)) in ("cycle1-redense", pipeline.control_step(1, "redense")):
            scores = evaluate.Scores(dict.fromkeys(scores))
            scores.diverged = "diverged: loss is nan"
        return scores

    monkeypatch.setattr(evaluate, "evaluate_param", nan_after_redense)
    config = pipeline.RunConfig(setup["model"], setup["weights"], phases.PruneConfig(ratio="3x"),
                                Schedule(max_iter=2, flag="sparse"), Schedule(max_iter=2, flag="redense"),
                                control=True, iterations=2)
    out = tmp_path / "run"
    result = seedpool.run_seeds(config, out)
    state = strict(out / pipeline.STATE)
    entries = {p["name"]: p for p in state["phases"]}
    for name in ("cycle1-redense", pipeline.control_step(1, "redense")):
        assert entries[name]["accuracy"] is None and entries[name]["diverged"] == "diverged: loss is nan"
        assert set(entries[name]["val"].values()) == {None}
    assert entries["dense"]["diverged"] is None and entries["dense"]["accuracy"] is not None
    rows = {l.split()[0]: l.split()[1:] for l in runreport.results_text(state).splitlines()}
    assert rows["DSD"][:2] == rows["control"][:2] == ["diverged", "diverged"] and rows["sparse"][0].endswith("%")
    assert "DSD - control" not in runreport.results_text(state)
    v = strict(out / runreport.VERDICT)
    assert result["verdict"] is None and v == {"verdict": None, "split": "val", "refused": result["refused"]}
    assert result["refused"].startswith("no verdict: seed 0: the DSD arm's model diverged: loss is nan")


def test_a_training_that_diverges_says_so(setup, tmp_path):
    """A NaN net makes `caffe train` itself crash (max pooling's backward then writes out of bounds): the one
    line says the training diverged (it said "no error line in the log")."""
    r = tool("retrain_dense", "--model", setup["model"], "--weights", setup["weights"], "--output", tmp_path / "r",
             "--max-iter", 4, "--base-lr", "1e8")
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert last.startswith("retrain_dense.py: error: ") and "the training diverged: the " in last, last
    assert "became nan" in last or "became -nan" in last, last


def test_json_is_strict(tmp_path):
    """A NaN never reaches a JSON file: the writer refuses it (a bug), and nothing is written."""
    with pytest.raises(ValueError) as e:
        fileio.write_json(tmp_path / "x.json", {"loss": math.nan})
    assert not isinstance(e.value, UserError)  # a bug: its traceback
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------ live runs
@pytest.fixture
def live(tmp_path):
    """A process holding the lock of tmp_path/run, as a live DSD run does; yields (run folder, its pid)."""
    out = tmp_path / "run"
    code = ("import sys, time; from dsd_caffe import fileio\n"
            f"with fileio.output_lock({str(out)!r}):\n    print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield out, holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_tool_writing_inside_a_live_run_is_refused(setup, live):
    """prune.py --force into a live run's phase folder, then train_sparse.py on it: both refused, naming the run
    and its pid; nothing is written there."""
    out, pid = live
    r = tool("prune", "--model", setup["model"], "--weights", setup["weights"], "--ratio", "4x", "--output",
             out / "cycle1-sparse", "--force")
    line = one_error_line(r, "prune.py")
    assert f"inside {out}" in line and f"pid {pid}" in line, line
    line = one_error_line(tool("train_sparse", out / "cycle1-sparse"), "train_sparse.py")
    assert f"inside {out}" in line and f"pid {pid}" in line, line
    assert not (out / "cycle1-sparse").exists()


def test_lock_files_go_with_their_holder(setup, tmp_path):
    """No `.NAME.lock` stays beside an output, after a finished tool or a refused one."""
    args = ("--model", setup["model"], "--weights", setup["weights"], "--ratio", "3x")
    r = tool("prune", *args, "--output", tmp_path / "p")
    assert r.returncode == 0, r.stderr[-3000:]
    one_error_line(tool("prune", *args, "--skip", "*", "--output", tmp_path / "q"), "prune.py")
    (tmp_path / "mine").mkdir()
    one_error_line(tool("prune", *args, "--skip", "*", "--output", tmp_path / "mine" / "q"), "prune.py")
    left = [os.path.join(d, n) for d, _, files in os.walk(tmp_path) for n in files if n.endswith(".lock")]
    assert left == []


def test_a_refusal_names_the_pid_written_just_after_the_lock(tmp_path):
    """The holder writes its pid a moment after taking the lock: the refusal waits for it (it said `pid unknown`)."""
    out = tmp_path / "run"
    lock = fileio.lock_path(out)
    code = ("import fcntl, os, sys, time\n"
            f"f = open({lock!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
            "print('locked', flush=True); time.sleep(0.1); f.write(f'{os.getpid()}\\n'); f.flush(); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"pid {holder.pid}\\)"):
            with fileio.output_lock(out):
                pass
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------------------------------------ inputs
@pytest.mark.parametrize("which", ["weights", "model", "make_lmdb", "decode"])
def test_a_device_as_an_input_is_refused(setup, tmp_path, which):
    """/dev/zero never ends: as --weights, --model, an image list or a .net file it is refused in one line (it was
    read until memory ran out)."""
    args = {"weights": ("evaluate", "--model", setup["model"], "--weights", "/dev/zero"),
            "model": ("evaluate", "--model", "/dev/zero", "--weights", setup["weights"]),
            "make_lmdb": ("make_lmdb", "/dev/zero", "--output", tmp_path / "l"),
            "decode": ("decode_compressed", "--model", setup["model"], "--net", "/dev/zero", "--output",
                       tmp_path / "d.caffemodel")}[which]
    line = one_error_line(tool(*args, timeout=120), f"{args[0]}.py")
    assert "/dev/zero is a character device" in line, line


# ------------------------------------------------------------------------------------------------ small
def test_a_full_disk_names_the_file(tmp_path):
    """A write's ENOSPC names no file; the error that leaves atomic_path names the output."""
    target = tmp_path / "model.caffemodel"
    with pytest.raises(DiskFull) as e:
        with fileio.atomic_path(target):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)


def test_ctrl_c_while_a_tool_loads(tmp_path):
    """SIGINT while the tool's modules load (before cli.main's handler): one line and exit status 130, no
    KeyboardInterrupt traceback. The signal is sent the moment the shim imports its command module."""
    shim = os.path.join(ROOT, "tools", "evaluate.py")
    code = ("import builtins, os, runpy, signal, sys\n"
            "real = builtins.__import__\n"
            "def hook(name, *a, **k):\n"
            "    if name == 'dsd_caffe.commands.evaluate':\n"
            "        os.kill(os.getpid(), signal.SIGINT)\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = hook\n"
            f"sys.argv = [{shim!r}, '--help']\n"
            f"runpy.run_path({shim!r}, run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 130 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    assert r.stderr.strip().splitlines() == ["evaluate.py: interrupted"], r.stderr


def test_ctrl_c_in_the_final_evaluation_says_how_to_resume(setup, tmp_path, monkeypatch):
    """Ctrl-C while a finished phase is evaluated: the same resume hint as in training."""
    from dsd_caffe import evaluate

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "evaluate_param", stop)
    config = pipeline.RunConfig(setup["model"], setup["weights"], phases.PruneConfig(ratio="3x"),
                                Schedule(max_iter=2, flag="sparse"), Schedule(max_iter=2, flag="redense"))
    with pytest.raises(Interrupted, match="run the same command again to resume"):
        pipeline.run_dsd(config, tmp_path / "run")


def test_an_lmdb_on_a_read_only_mount_is_read(setup, tmp_path):
    """LMDBs on a read-only bind mount: LMDB (and so Caffe) reads them without a lock; evaluate.py runs (root
    ignores file modes, not a read-only mount)."""
    from helpers import in_small_tmpfs

    script = f'''
        mount --bind "{setup['dir']}" "$DISK" && mount -o remount,ro,bind "$DISK" || exit 97
        "$PY" "$TOOLS/evaluate.py" --model "$DISK/trainval.prototxt" --weights "$DISK/dense.caffemodel" \\
            --iterations 1 >/dev/null 2>"{tmp_path}/evaluate.err"; echo "evaluate $?"
    '''
    out = in_small_tmpfs(tmp_path, "1m", script)
    assert out.split() == ["evaluate", "0"], (tmp_path / "evaluate.err").read_text()[-3000:]


def test_an_lmdb_whose_lock_file_is_not_writable_is_refused(setup, tmp_path, monkeypatch):
    """A lock.mdb this user may not write (a shared dataset: Caffe aborts with `mdb_status == 0 (13 vs. 0)`): one
    UserError naming it before Caffe starts, and dsd leaves no run state. Tests run as root, which file modes do
    not stop, so the open's EACCES is injected (every other open is the real one)."""
    real = os.open

    def denied(path, flags, *a, **k):
        if os.path.basename(os.fspath(path)) == "lock.mdb" and flags & os.O_RDWR:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", denied)
    config = pipeline.RunConfig(setup["model"], setup["weights"], phases.PruneConfig(ratio="3x"))
    with pytest.raises(UserError, match=r"Caffe opens its lock file .*/train_lmdb/lock.mdb for writing.*Permission"):
        pipeline.run_dsd(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    from dsd_caffe import evaluate

    with pytest.raises(UserError, match=r"val_lmdb/lock.mdb"):
        evaluate.evaluate(setup["model"], setup["weights"], iterations=1)


# ------------------------------------------------------------------------------------------------ python layers
PY_NET = """name: "py"
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TEST }}
  data_param {{ source: "{source}" batch_size: 2 backend: LMDB }} }}
layer {{ name: "mine" type: "Python" bottom: "data" top: "out" python_param {{ module: "{module}" layer: "{cls}" }} }}
"""
LAYERS = {
    "setup_raises": "import caffe\nclass Mine(caffe.Layer):\n    def setup(self, bottom, top):\n"
                    "        raise ValueError('param_str must name a mode')\n"
                    "    def reshape(self, bottom, top):\n        top[0].reshape(1)\n",
    "exits_on_import": "import sys\nsys.exit(3)\n",
}


@pytest.mark.parametrize("case", ["not_a_layer", "setup_raises", "exits_on_import"])
def test_a_python_layer_that_fails_after_importing(setup, tmp_path, case):
    """A class that is not a caffe.Layer (was a SystemError traceback), a setup() that raises (a traceback, exit
    1), a module that calls sys.exit(3) on import (exit 3, no output): one line naming the module and class."""
    module, cls = ("collections", "OrderedDict") if case == "not_a_layer" else (f"layer_{case}", "Mine")
    if case in LAYERS:
        (tmp_path / f"{module}.py").write_text(LAYERS[case])
    model = tmp_path / "net.prototxt"
    model.write_text(PY_NET.format(source=os.path.join(setup["dir"], "val_lmdb"), module=module, cls=cls))
    r = tool("evaluate", "--model", model, "--weights", setup["weights"], "--iterations", 1, "--allow-missing",
             env={"PYTHONPATH": str(tmp_path)})
    line = one_error_line(r, "evaluate.py")
    assert f"module {module!r}" in line and repr(cls) in line, line
    assert {"not_a_layer": "not a caffe.Layer subclass", "setup_raises": "ValueError: param_str must name a mode",
            "exits_on_import": "SystemExit: 3"}[case] in line, line


# ------------------------------------------------------------------------------------------------ reasons, overlap
V1_NET = """name: "v1"
layers {{ name: "data" type: DATA top: "data" top: "label" include {{ phase: TEST }}
  data_param {{ source: "{source}" batch_size: 2 backend: LMDB }} }}
layers {{ name: "fc" type: INNER_PRODUCT bottom: "data" top: "fc" inner_product_param {{ num_output: 10
  weight_filler {{ type: "gaussian" std: 0.01 }} }} }}
layers {{ name: "accuracy" type: ACCURACY bottom: "fc" bottom: "label" top: "accuracy" }}
layers {{ name: "loss" type: SOFTMAX_LOSS bottom: "fc" bottom: "label" top: "loss" }}
"""


def test_a_v1_net_is_read_as_caffe_upgrades_it(setup, tmp_path):
    """Caffe's legacy V1 format, which `caffe test` runs: evaluate.py runs it too, with `caffe test`'s numbers
    (it said "no data layer")."""
    model = tmp_path / "v1.prototxt"
    model.write_text(V1_NET.format(source=os.path.join(setup["dir"], "val_lmdb")))
    caffe.set_random_seed(0)
    weights = str(tmp_path / "v1.caffemodel")
    caffe.Net(str(model), caffe.TEST).save(weights)
    r = tool("evaluate", "--model", model, "--weights", weights, "--iterations", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines()[1].startswith("accuracy = ") and "legacy V1 format" in r.stderr
    from dsd_caffe import caffe_env

    binary = subprocess.run([caffe_env.caffe_binary(), "test", "--model", str(model), "--weights", weights,
                             "--iterations", "2"], capture_output=True, text=True, timeout=300)
    lines = [l.split("] ", 1)[1] for l in binary.stderr.splitlines() if "caffe.cpp" in l and "] " in l]
    start = next(i for i, l in enumerate(lines) if l.startswith("Loss: "))
    assert r.stdout.splitlines() == lines[start:]


def test_a_solverstate_given_as_weights_is_named(setup, tmp_path):
    """A .solverstate as --weights is called a solver state, naming its caffemodel (it said "truncated or
    corrupted")."""
    r = tool("retrain_dense", "--model", setup["model"], "--weights", setup["weights"], "--output", tmp_path / "r",
             "--max-iter", 2, "--snapshot", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    state = tmp_path / "r" / "snapshots" / "redense_iter_2.solverstate"
    line = one_error_line(tool("evaluate", "--model", setup["model"], "--weights", state), "evaluate.py")
    assert "is a Caffe solver state (iteration 2), not a caffemodel" in line and "redense_iter_2.caffemodel" in line


def test_no_false_data_note_for_an_image_data_net(setup, tmp_path):
    """A net whose input comes from an ImageData layer: no "the net's data is not on this machine" note."""
    from dsd_caffe import fileio as fio, netcheck

    net = fio.read_net_prototxt(setup["model"])
    for layer in net.layer:
        if layer.type == "Data":
            layer.type = "ImageData"
            layer.image_data_param.source = "/somewhere/list.txt"
            layer.image_data_param.batch_size = 2
            layer.ClearField("data_param")
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("dsd_caffe.netcheck").addHandler(handler)
    logging.getLogger("dsd_caffe.netcheck").setLevel(logging.INFO)
    try:
        netcheck.check_fits(net, fio.read_caffemodel(setup["weights"]))
    finally:
        logging.getLogger("dsd_caffe.netcheck").removeHandler(handler)
    text = " ".join(r.getMessage() for r in records)
    assert "not on this machine" not in text and "ImageData layer" in text, text


@pytest.mark.parametrize("which", ["dsd_holds_its_lmdbs", "prune_inside_an_lmdb"])
def test_an_output_over_the_net_data_is_refused(setup, tmp_path, which):
    """The net's own data (its LMDBs, named only in the prototxt) counts as an input: an output folder holding
    them or inside one is refused, also with --force (dsd.py --force cleared the folder of its input LMDBs)."""
    s = copy_setup(setup, tmp_path)
    data = os.path.join(s["dir"], "data")
    os.mkdir(data)
    for name in ("train_lmdb", "val_lmdb"):
        os.rename(os.path.join(s["dir"], name), os.path.join(data, name))
    text = open(s["model"]).read().replace('source: "', 'source: "data/')
    open(s["model"], "w").write(text)
    before = sorted(os.path.join(d, n) for d, _, files in os.walk(data) for n in files)
    if which == "dsd_holds_its_lmdbs":
        r = tool("dsd", "--model", s["model"], "--weights", s["weights"], "--ratio", "3x", "--output", data,
                 "--force")
        line = one_error_line(r, "dsd.py")
        assert f"output {data} holds the input {data}/" in line and "_lmdb" in line, line
    else:
        out = os.path.join(data, "train_lmdb", "p")
        line = one_error_line(tool("prune", "--model", s["model"], "--weights", s["weights"], "--ratio", "3x",
                                   "--output", out), "prune.py")
        assert f"output {out} is inside the input {data}/train_lmdb" in line, line
    assert sorted(os.path.join(d, n) for d, _, files in os.walk(data) for n in files) == before


# ------------------------------------------------------------------------------------------------ shared blobs
SHARED_NET = """name: "shared"
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TRAIN }}
  data_param {{ source: "{train}" batch_size: 4 backend: LMDB }} transform_param {{ scale: 0.00390625 }} }}
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TEST }}
  data_param {{ source: "{val}" batch_size: 4 backend: LMDB }} transform_param {{ scale: 0.00390625 }} }}
layer {{ name: "convA" type: "Convolution" bottom: "data" top: "a" param {{ name: "shared_w" }}
  convolution_param {{ num_output: 6 kernel_size: 3 weight_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "convB" type: "Convolution" bottom: "data" top: "b" param {{ name: "shared_w" }}
  convolution_param {{ num_output: 6 kernel_size: 3 weight_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "s" }}
layer {{ name: "fc" type: "InnerProduct" bottom: "s" top: "fc" inner_product_param {{ num_output: 10
  weight_filler {{ type: "gaussian" std: 0.01 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }}
layer {{ name: "accuracy" type: "Accuracy" bottom: "fc" bottom: "label" top: "accuracy" include {{ phase: TEST }} }}
"""


@pytest.fixture
def shared(setup, tmp_path):
    model = tmp_path / "shared.prototxt"
    model.write_text(SHARED_NET.format(train=os.path.join(setup["dir"], "train_lmdb"),
                                       val=os.path.join(setup["dir"], "val_lmdb")))
    caffe.set_random_seed(0)
    weights = str(tmp_path / "shared.caffemodel")
    caffe.Net(str(model), caffe.TRAIN).save(weights)
    return str(model), weights


@pytest.mark.parametrize("how", ["skip", "profile"])
def test_conflicting_settings_for_a_shared_blob_are_refused(shared, tmp_path, how):
    """--skip convA, or a profile giving convA 0.5 and convB 0.25, while both share one blob: refused naming both
    (the blob ended at the smaller density, the table said otherwise, the caffemodel held two different copies)."""
    model, weights = shared
    if how == "skip":
        extra = ("--ratio", "3x", "--skip", "convA")
    else:
        (tmp_path / "profile.json").write_text(json.dumps({"convA": 0.5, "convB": 0.25, "fc": 0.5}))
        extra = ("--profile", tmp_path / "profile.json")
    line = one_error_line(tool("prune", "--model", model, "--weights", weights, "--output", tmp_path / "p", *extra),
                          "prune.py")
    assert "layers 'convA' and 'convB' share one weight blob" in line, line
    assert not (tmp_path / "p").exists()


def test_a_shared_blob_is_pruned_once_and_stays_consistent(shared, tmp_path):
    """One mask for the shared blob: the table marks the sharing and counts the blob once; the pruned and the
    trained caffemodels hold one consistent copy at the asked density."""
    model, weights = shared
    r = tool("prune", "--model", model, "--weights", weights, "--ratio", "3x", "--output", tmp_path / "p",
             "--max-iter", 4, "--snapshot", 2, "--base-lr", 0.01)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "convB" in r.stdout and "(the weights of convA)" in r.stdout, r.stdout
    total = next(l for l in r.stdout.splitlines() if l.startswith("total")).split()
    assert int(total[2]) == 6 * 1 * 3 * 3 + 10 * 6 * 26 * 26  # convA's blob once, and fc
    r = tool("train_sparse", tmp_path / "p")
    assert r.returncode == 0, r.stderr[-3000:]
    for name in (phases.PRUNED, phases.SPARSE):
        from dsd_caffe import masks

        w = masks.weight_arrays(str(tmp_path / "p" / name))
        assert np.array_equal(w["convA"], w["convB"]), name
        assert np.count_nonzero(w["convA"]) == math.ceil(w["convA"].size / 3), name
