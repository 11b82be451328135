"""Devices are explicit (dsd_caffe.devices, devices.set_device): the --gpu forms, the decision whether a device
exists (with injected answers: a CPU-only build, a CUDA build with 0, 1 or 2 GPUs), a library call that leaves the
caller's Caffe mode alone, seeds spread over devices, and every tool that runs a net refusing --gpu 0 on this
CPU-only build in one line with exit status 2."""
import ctypes
import os

import pytest

from dsd_caffe import devices, fileio
from dsd_caffe.errors import UserError
from helpers import small_setup, tool

CPU_BUILD = devices.Offer(True, 0, "a CPU-only build")


def cuda(n):
    return devices.Offer(False, n, "cudaGetDeviceCount ok")


# ------------------------------------------------------------------------------------------------ forms
@pytest.mark.parametrize("given, expected", [
    (None, None), (0, (0,)), (3, (3,)), ("0", (0,)), (" 1 ", (1,)), ("0,1", (0, 1)), ("2, 0", (2, 0)),
    ([1, 0], (1, 0)), ((0,), (0,)), ("2147483647", (2147483647,)),
])
def test_parse_the_forms(given, expected):
    assert devices.parse(given) == expected


@pytest.mark.parametrize("given, named", [
    ("-1", "-1"), (-1, "-1"), ("a", "a"), ("1.5", "1.5"), (1.0, "1.0"), (True, "True"), ("0,,1", "0,,1"),
    ("", "''"), ([], "''"), ("0,0", "device 0 is given twice"), ([1, 2, 1], "device 1 is given twice"),
    ("2147483648", "2147483648"),
])
def test_bad_forms_are_one_user_error_naming_them(given, named):
    with pytest.raises(UserError) as e:
        devices.parse(given)
    assert named in str(e.value) and str(e.value).startswith("gpu ") and "\n" not in str(e.value)
    assert e.value.fields == ("gpu",)  # the field: the tools print --gpu


# ------------------------------------------------------------------------------------------------ the decision
def test_no_gpu_asked_asks_nothing():
    def never():
        raise AssertionError("the probe was asked")

    assert devices.check(None, never) is None


def test_a_cpu_only_build_refuses_any_device():
    for gpu in (0, "0,1", 3):
        with pytest.raises(UserError) as e:
            devices.check(gpu, CPU_BUILD)
        msg = str(e.value)
        assert f"no GPU device {devices.parse(gpu)[0]}" in msg and "CPU-only" in msg and "\n" not in msg


@pytest.mark.parametrize("count, gpu, missing", [(0, 0, 0), (1, 1, 1), (1, "0,1", 1), (2, "0,1,2", 2),
                                                 (2, "5,0", 5)])
def test_a_cuda_build_refuses_a_device_it_does_not_see(count, gpu, missing):
    with pytest.raises(UserError) as e:
        devices.check(gpu, cuda(count))
    msg = str(e.value)
    assert f"no GPU device {missing} here" in msg and "\n" not in msg
    assert ("no GPU" if count == 0 else f"{count} GPU") in msg


@pytest.mark.parametrize("count, gpu, expected", [(1, 0, (0,)), (2, "0,1", (0, 1)), (2, "1", (1,)),
                                                  (4, [3, 1], (3, 1))])
def test_a_cuda_build_accepts_the_devices_it_sees(count, gpu, expected):
    assert devices.check(gpu, cuda(count)) == expected
    assert devices.check(gpu, lambda: cuda(count)) == expected  # a probe function, asked once


def test_bad_form_is_refused_before_the_probe():
    with pytest.raises(UserError, match="given twice"):
        devices.check("0,0", lambda: pytest.fail("probed"))


class _Runtime:
    """A stand-in for the CUDA runtime or driver reached through ctypes."""

    def __init__(self, rc, n):
        self.rc, self.n = rc, n

    def count(self, ptr):
        ctypes.cast(ptr, ctypes.POINTER(ctypes.c_int))[0] = self.n
        return self.rc


def test_cuda_count_reads_the_runtime_and_takes_an_error_for_no_gpu():
    lib = type("Lib", (), {})()
    lib.cudaGetDeviceCount = _Runtime(0, 2).count
    assert devices.cuda_count(lib) == (False, 2, "cudaGetDeviceCount ok")
    lib.cudaGetDeviceCount = _Runtime(100, 7).count  # cudaErrorNoDevice: whatever it wrote, no GPU
    assert devices.cuda_count(lib) == (False, 0, "cudaGetDeviceCount error 100")


def test_cuda_count_without_runtime_or_driver_is_no_gpu(tmp_path):
    offer = devices.cuda_count(object(), driver=str(tmp_path / "libcuda.so.1"))
    assert offer.cpu_only is False and offer.count == 0 and offer.how.startswith("no NVIDIA driver")


def test_a_real_cuda_runtime_without_a_driver_answers_no_gpu():
    """The CUDA runtime itself, where one is installed on a machine without a driver (as here: CUDA 13's toolkit,
    no GPU): an error code, read as no GPU, and no abort."""
    import glob

    found = sorted(glob.glob("/usr/local/cuda*/lib*/libcudart.so*"))
    if not found:
        pytest.skip("no CUDA runtime in /usr/local/cuda*")
    try:
        ctypes.CDLL("libcuda.so.1")
        pytest.skip("this machine has an NVIDIA driver")
    except OSError:
        pass
    offer = devices.cuda_count(ctypes.CDLL(found[0]))
    assert offer.cpu_only is False and offer.count == 0 and offer.how.startswith("cudaGetDeviceCount error ")


def test_this_build_is_probed_without_aborting():
    caffe_env = pytest.importorskip("dsd_caffe.caffe_env")
    pytest.importorskip("caffe")
    offer = devices.probe()
    assert offer.cpu_only is (not caffe_env.has_gpu_support())
    if offer.cpu_only:
        assert offer == CPU_BUILD


# ------------------------------------------------------------------------------------------------ per use
def test_evaluation_device_seed_devices_and_records():
    assert devices.first(None) is None and devices.first("2,1") == 2 and devices.first(3) == 3
    assert [devices.of_seed("0,1", k) for k in range(5)] == [0, 1, 0, 1, 0]
    assert [devices.of_seed("3", k) for k in range(3)] == [3, 3, 3]
    assert devices.of_seed(None, 4) is None
    assert devices.record(None) is None and devices.record("1,0") == [1, 0] and devices.record(2) == [2]


def test_the_flag_parses_in_one_place():
    from dsd_caffe import cli
    from dsd_caffe.commands import flags

    p = cli.parser("x")
    flags.add_device(p)
    assert p.parse_args(["--gpu", "0,1"]).gpu == "0,1"  # text until flags.device: errors are then one line
    assert p.parse_args([]).gpu is None and p.parse_args([]).engine == "binary"


# ------------------------------------------------------------------------------------------------ the caller's mode
@pytest.fixture
def mode_calls(monkeypatch):
    """Every call that changes Caffe's mode or device, recorded instead of made."""
    caffe = pytest.importorskip("caffe")
    calls = []
    for name in ("set_mode_cpu", "set_mode_gpu", "set_device"):
        monkeypatch.setattr(caffe, name, lambda *a, _n=name: calls.append((_n, *a)))
    return calls


def test_set_device_none_leaves_the_mode(mode_calls):
    devices.set_device(None)
    assert mode_calls == []
    devices.use_cpu()  # what a tool chooses without --gpu
    assert mode_calls == [("set_mode_cpu",)]


def test_set_device_selects_a_device_once_it_exists(mode_calls, monkeypatch):
    monkeypatch.setattr(devices, "probe", lambda: cuda(2))
    devices.set_device(1)
    assert mode_calls == [("set_mode_gpu",), ("set_device", 1)]
    with pytest.raises(UserError, match="one device"):
        devices.set_device("0,1")
    monkeypatch.setattr(devices, "probe", lambda: CPU_BUILD)
    with pytest.raises(UserError, match="CPU-only"):
        devices.set_device(0)
    assert mode_calls == [("set_mode_gpu",), ("set_device", 1)]  # nothing asked of Caffe for a refused device


def test_load_evaluate_and_train_keep_the_callers_mode(mode_calls, tmp_path):
    """dsd_caffe.load, evaluate and a pycaffe training phase with gpu=None never switch Caffe's mode."""
    import dsd_caffe
    from dsd_caffe import evaluate, phases
    from dsd_caffe.solvers import Schedule

    model, weights = small_setup(str(tmp_path))
    dsd_caffe.load(model, weights)
    evaluate.evaluate(model, weights, iterations=1)
    final = phases.train_dense(phases.Inputs(model, weights), str(tmp_path / "dense"),
                               Schedule(max_iter=2, snapshot=2, base_lr=0.001), "fashion-mnist", engine="pycaffe")
    assert mode_calls == []
    assert fileio.read_json(fileio.sidecar_path(final))["devices"] is None  # the record: no GPU asked
    assert fileio.read_json(str(tmp_path / "dense" / "training.json"))["devices"] is None


# ------------------------------------------------------------------------------------------------ the tools
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    pytest.importorskip("caffe")
    folder = tmp_path_factory.mktemp("devices")
    model, weights = small_setup(str(folder))
    return {"dir": folder, "model": model, "weights": weights}


TOOL_ARGS = {
    "evaluate": ("--model", "MODEL", "--weights", "WEIGHTS"),
    "sensitivity": ("--model", "MODEL", "--weights", "WEIGHTS", "--output", "OUT"),
    "retrain_dense": ("--model", "MODEL", "--weights", "WEIGHTS", "--max-iter", 1, "--output", "OUT"),
    "dsd": ("--model", "MODEL", "--weights", "WEIGHTS", "--ratio", "3x", "--output", "OUT"),
    "demo": ("--quick", "--output", "OUT"),
    "train_sparse": ("OUT",),
}


@pytest.mark.parametrize("which, gpu", [(w, "0") for w in TOOL_ARGS] + [("dsd", "0,1"), ("retrain_dense", "1,0")])
def test_gpu_without_a_gpu_is_one_line_and_exit_2(small, tmp_path, which, gpu):
    """On the CPU-only build (and on a CUDA build on a machine without a GPU) every tool that runs a net answers
    --gpu in one line naming the missing device, and writes nothing."""
    offer = devices.probe()
    if offer.count > 0:
        pytest.skip(f"this machine has a GPU ({offer.how})")
    values = {"MODEL": small["model"], "WEIGHTS": small["weights"], "OUT": tmp_path / "out"}
    r = tool(which, *[values.get(a, a) if isinstance(a, str) else a for a in TOOL_ARGS[which]], "--gpu", gpu)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"{which}.py: error: --gpu {gpu}: there is no GPU device {gpu[0]}")
    assert ("CPU-only" if offer.cpu_only else "CUDA sees no GPU") in lines[0]
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("gpu, named", [("-1", "--gpu -1"), ("0,0", "device 0 is given twice"), ("x", "--gpu x")])
def test_a_bad_gpu_form_is_one_line_and_exit_2(small, gpu, named):
    r = tool("evaluate", "--model", small["model"], "--weights", small["weights"], "--gpu", gpu)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and named in lines[0], r.stderr


def test_the_caffe_binary_is_given_the_device(tmp_path, monkeypatch):
    """--engine binary with a device: `caffe train ... -gpu N` (after the device is known to exist); without one,
    no -gpu (the binary's CPU)."""
    pytest.importorskip("caffe")
    from dsd_caffe import phases, training
    from dsd_caffe.solvers import Schedule

    model, weights = small_setup(str(tmp_path))
    monkeypatch.setattr(devices, "probe", lambda: cuda(2))
    commands = []

    class Started(Exception):
        pass

    def popen(cmd, **kw):
        commands.append(cmd)
        raise Started

    monkeypatch.setattr(training.subprocess, "Popen", popen)
    for gpu, out in ((1, "one"), (None, "cpu")):
        with pytest.raises(Started):
            phases.train_dense(phases.Inputs(model, weights), str(tmp_path / out),
                               Schedule(max_iter=2, snapshot=2, base_lr=0.001), "fashion-mnist", gpu=gpu)
    assert commands[0][-2:] == ["-gpu", "1"] and "-gpu" not in commands[1]
    assert fileio.read_json(str(tmp_path / "one" / "training.json"))["devices"] == [1]
