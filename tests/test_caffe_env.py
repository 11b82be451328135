"""import_caffe() quiets glog whatever the import order, leaves os.environ as it found it, and the glog helpers
change and restore the level of the running library. Each case runs in a fresh interpreter: glog and OpenBLAS
read their settings once per process."""
import json
import os
import subprocess
import sys

import pytest

TINY = """name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 1 dim: 4 dim: 4 } } }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 2 } }
"""


def _run(code, env=None):
    """Run ``code`` in a fresh interpreter with the GLOG_* variables removed (plus ``env``); (stdout, stderr)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("GLOG_")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(base, **(env or {})))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, proc.stderr


def _info_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("I") and "net.cpp" in line]


BUILD = f"""
from google.protobuf import text_format
from dsd_caffe import caffe_env, caffeproto
param = text_format.Parse({TINY!r}, caffeproto.caffe_pb2().NetParameter())
caffe_env.make_net(param)
"""


def test_caffe_alone_logs_info():
    """The control: without dsd_caffe, building a net prints glog INFO lines, so the tests below can see them."""
    _, err = _run(f"import caffe, tempfile\nf = tempfile.NamedTemporaryFile('w', suffix='.prototxt')\n"
                  f"f.write({TINY!r}); f.flush()\ncaffe.Net(f.name, caffe.TEST)")
    assert _info_lines(err)


def test_quiet_when_caffe_was_imported_first_and_environ_unchanged():
    code = ("import os, json, caffe\nbefore = dict(os.environ)\nimport dsd_caffe\ncaffe_env_mod = "
            "dsd_caffe.import_caffe()\n" + BUILD +
            "print(json.dumps({'same': dict(os.environ) == before, 'level': caffe_env.glog_level()}))")
    out, err = _run(code)
    assert _info_lines(err) == [], err
    assert json.loads(out) == {"same": True, "level": 2}


def test_quiet_when_dsd_caffe_comes_first():
    out, err = _run(BUILD + "print(caffe_env.glog_level())")
    assert _info_lines(err) == [] and out.strip() == "2"


def test_user_level_is_kept():
    out, err = _run(BUILD + "print(caffe_env.glog_level())", env={"GLOG_minloglevel": "0"})
    assert _info_lines(err) and out.strip() == "0"


def test_blas_settings_reach_openblas_but_not_environ():
    """The set-up's BLAS choice is in force in the loaded OpenBLAS, yet os.environ holds none of it; a value the
    caller set is kept and wins."""
    code = ("import os, json\nfrom dsd_caffe import blas, caffe_env\nwanted = blas.runtime_env()\n"
            "before = dict(os.environ)\ncaffe_env.import_caffe()\n"
            "cfg = blas.library_config(blas.caffe_blas_library())\n"
            "print(json.dumps({'wanted': wanted, 'same': dict(os.environ) == before, 'threads': cfg.get('threads')}))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENBLAS_", "OMP_"))}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["same"]
    if "OPENBLAS_NUM_THREADS" not in r["wanted"]:
        pytest.skip("the set-up recorded no BLAS thread count to apply")
    assert r["threads"] == int(r["wanted"]["OPENBLAS_NUM_THREADS"])
    mine = "1" if r["threads"] != 1 else "2"  # OpenBLAS caps its threads at the CPU count
    out, _ = _run(code, env={"OPENBLAS_NUM_THREADS": mine})
    r = json.loads(out)
    assert r["same"] and r["threads"] == int(mine) and "OPENBLAS_NUM_THREADS" not in r["wanted"]


def test_glog_level_set_shows_info_inside_and_restores():
    code = BUILD + (
        "import sys\nprint('inside', file=sys.stderr, flush=True)\n"
        "with caffe_env.glog_level_set('INFO', to_stderr=True):\n"
        "    assert caffe_env.glog_level() == 0\n    caffe_env.make_net(param)\n"
        "print('after', file=sys.stderr, flush=True)\ncaffe_env.make_net(param)\n"
        "assert caffe_env.set_glog_level('WARNING') == 2 and caffe_env.glog_level() == 1\n"
        "try:\n    caffe_env.set_glog_level('LOUD')\nexcept ValueError as e:\n    print(e)\n")
    out, err = _run(code)
    before, rest = err.split("inside\n")
    inside, after = rest.split("after\n")
    assert not _info_lines(before) and _info_lines(inside) and not _info_lines(after)
    assert "'LOUD'" in out
