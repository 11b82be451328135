"""`python -m dsd_caffe.info` reports what the Caffe build really has (checked against pycaffe itself)."""
import json
import subprocess
import sys

import pytest

from dsd_caffe import blas, caffe_env
from helpers import ROOT


@pytest.fixture(scope="module")
def report():
    out = subprocess.run([sys.executable, "-m", "dsd_caffe.info", "--json"], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    return json.loads(out)


def test_reports_the_real_build(report):
    caffe = caffe_env.import_caffe()
    layers = set(caffe.layer_type_list())
    assert report["caffe_version"] == caffe.__version__
    assert set(report["layer_types"]) == layers
    # the project's build: CPU only, with the Python layer, LMDB, HDF5 and OpenCV (and these layers registered)
    assert report["python_layer"] is True and "Python" in layers
    for t in ("Data", "ImageData", "HDF5Data"):
        assert report["data_layers"][t] is True
    gpu = caffe_env.has_gpu_support()  # the CPU build, or the GPU one under DSD_CAFFE_BUILD=gpu (docs/gpu.md)
    assert report["gpu_support"] is gpu
    assert report["mode"] == ("GPU (CUDA)" if gpu else "CPU only")
    libs = report["libraries"]
    assert libs["OpenCV"]["linked"] and libs["LMDB"]["linked"] and libs["HDF5"]["linked"]
    for label in ("CUDA", "cuBLAS", "cuRAND", "NCCL"):
        assert libs[label]["linked"] is gpu, label
    assert not libs["cuDNN"]["linked"]
    if gpu:
        assert report["cuda"] == caffe_env.build_info()["cuda"]
        assert libs["cuBLAS"]["version"] == report["cuda"]["libraries"]["cublas"]["version"].split(".")[0]
    else:
        assert report["cuda"] is None and report["gpu_devices"] is None


def test_reports_the_blas_in_use(report):
    b = report["blas"]
    assert b["library"] == blas.caffe_blas_library()
    # the kernel is the one the library reports when loaded with the same environment
    probe = subprocess.run([sys.executable, "-c", "import sys; from dsd_caffe import blas; blas.apply(); "
                            "print(blas.corename(sys.argv[1]))", b["library"]],
                           capture_output=True, text=True, timeout=120, check=True).stdout.strip()
    assert b["kernel"] == probe
    assert b["config"].startswith("OpenBLAS") and b["threads"] >= 1
    assert report["numpy"]["version"] == __import__("numpy").__version__


def test_text_output():
    out = subprocess.run([sys.executable, "-m", "dsd_caffe.info"], capture_output=True, text=True, timeout=300,
                         check=True).stdout
    assert "Python layer   yes" in out
    if caffe_env.has_gpu_support():
        assert "GPU (CUDA)" in out and "\nCUDA build     13." in out and "\nGPU devices    " in out
    else:
        assert "CPU only" in out and "CUDA build" not in out
    assert "kernel" in out and "OpenCV         yes" in out


@pytest.mark.parametrize("argv0, prog", [("/venv/bin/dsd-info", "dsd-info"),
                                         ("/src/dsd_caffe/info.py", "python -m dsd_caffe.info")])
def test_usage_names_the_command_as_started(monkeypatch, capsys, argv0, prog):
    """The installed ``dsd-info`` says ``dsd-info`` in its usage; ``python -m dsd_caffe.info`` says that."""
    from dsd_caffe.commands import info

    monkeypatch.setattr(sys, "argv", [argv0, "--help"])
    with pytest.raises(SystemExit) as e:
        info.main(["--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {prog} [-h] [--json]")


def test_without_pycaffe_one_line_and_exit_2(tmp_path):
    """A Python that cannot import caffe (here: no site-packages) gets the set-up hint, not a recursion."""
    r = subprocess.run([sys.executable, "-S", "-m", "dsd_caffe.info"], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path, env={"PYTHONPATH": ROOT, "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "pycaffe is not importable" in r.stderr and "make setup" in r.stderr


FAKE_CAFFE = """#!/bin/sh
# stands in for `caffe device_query`: prints what $FAKE_OUT holds to stderr and exits with $FAKE_RC
cat "$FAKE_OUT" >&2
exit $FAKE_RC
"""
NO_DEVICE = """I20261203 09:50:24.063271 19865 caffe.cpp:138] Querying GPUs 0
F20261203 09:50:24.063478 19865 common.cpp:158] Check failed: error == cudaSuccess (100 vs. 0)  no CUDA-capable device is detected
*** Check failure stack trace: ***
    @     0x7f3c21c301ed  google::LogMessage::Fail()
"""
TWO_DEVICES = "".join(
    f"I20261203 10:00:00.000000 1 common.cpp:{178 + i}] {k}:{' ' * 5}{v}\n"
    for d in (0, 1) for i, (k, v) in enumerate((("Device id", d), ("Name", "NVIDIA H200"),
                                                ("Total global memory", 150754820096))))


@pytest.mark.parametrize("stderr, rc, expect", [
    (NO_DEVICE, 134, "GPU 0 cannot be used: Check failed: error == cudaSuccess (100 vs. 0) "
                     "no CUDA-capable device is detected"),
    ("", 1, "GPU 0 cannot be used: exit code 1"),
    ("I20261203 09:50:24.063271 19865 caffe.cpp:138] Querying GPUs 0\nsegfault\n", 139,
     "GPU 0 cannot be used: segfault"),
])
def test_device_query_failure_is_one_line(tmp_path, monkeypatch, stderr, rc, expect):
    from dsd_caffe import info
    from dsd_caffe.errors import UserError

    fake = tmp_path / "caffe"
    fake.write_text(FAKE_CAFFE)
    fake.chmod(0o755)
    (tmp_path / "out").write_text(stderr)
    monkeypatch.setenv("FAKE_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("FAKE_RC", str(rc))
    with pytest.raises(UserError) as e:
        info.device_query(0, binary=str(fake))
    assert str(e.value) == expect


def test_device_query_reads_every_device(tmp_path, monkeypatch):
    from dsd_caffe import info

    fake = tmp_path / "caffe"
    fake.write_text(FAKE_CAFFE)
    fake.chmod(0o755)
    (tmp_path / "out").write_text("I20261203 09:59:59.000000 1 caffe.cpp:138] Querying GPUs all\n" + TWO_DEVICES)
    monkeypatch.setenv("FAKE_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("FAKE_RC", "0")
    assert info.device_query("all", binary=str(fake)) == [
        {"Device id": str(d), "Name": "NVIDIA H200", "Total global memory": "150754820096"} for d in (0, 1)]


def test_device_query_on_the_build_in_use():
    """The real binary: on a CPU-only build (or a GPU build on a machine without a GPU) one line, not glog's abort."""
    from dsd_caffe import info
    from dsd_caffe.errors import UserError

    if not caffe_env.has_gpu_support():
        with pytest.raises(UserError, match=r"^GPU 0 cannot be used: Cannot use GPU in CPU-only Caffe: check mode\.$"):
            info.device_query(0)
        return
    try:
        devices = info.device_query(0)
    except UserError as e:
        assert str(e).startswith("GPU 0 cannot be used: ") and "\n" not in str(e)
    else:
        assert devices and devices[0]["Device id"] == "0" and devices[0]["Name"]
