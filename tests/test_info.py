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
    assert report["gpu_support"] is caffe_env.has_gpu_support() is False
    assert report["mode"] == "CPU only"
    libs = report["libraries"]
    assert libs["OpenCV"]["linked"] and libs["LMDB"]["linked"] and libs["HDF5"]["linked"]
    assert not libs["CUDA"]["linked"]


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
    assert "CPU only" in out
    assert "kernel" in out and "OpenCV         yes" in out


@pytest.mark.parametrize("argv0, prog", [("/venv/bin/dsd-info", "dsd-info"),
                                         ("/src/dsd_caffe/info.py", "python -m dsd_caffe.info")])
def test_usage_names_the_command_as_started(monkeypatch, capsys, argv0, prog):
    """The installed ``dsd-info`` says ``dsd-info`` in its usage; ``python -m dsd_caffe.info`` says that."""
    from dsd_caffe import info

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
