"""The package's face: lazy re-exports, no Caffe at import time, tools as thin CLIs."""
import ast
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

import dsd_caffe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_needs_neither_caffe_nor_numpy():
    code = "import sys, dsd_caffe; print('caffe' in sys.modules, 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_every_export_resolves_and_never_shadows_a_module():
    modules = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "dsd_caffe", "*.py"))}
    for name, module in dsd_caffe._EXPORTS.items():
        assert module in modules
        assert name not in modules, f"export {name!r} would shadow the module dsd_caffe.{name}"
        assert getattr(dsd_caffe, name) is not None


def test_tools_are_thin_clis_with_their_docstring_as_description():
    for path in glob.glob(os.path.join(REPO, "tools", "*.py")):
        with open(path) as f:
            text = f.read()
        assert len(text.splitlines()) <= 80, f"{path} is not a thin CLI"
        assert ast.get_docstring(ast.parse(text)), f"{path} has no docstring"
        assert "cli.parser(__doc__)" in text or "description=__doc__" in text, path


def test_an_installed_copy_ships_class_names_and_builds_zoo_nets(tmp_path):
    """What setup.py installs (build_py: the package and its package_data), away from the repository and its
    models/ folder, has the ImageNet class names and loads a zoo model."""
    from conftest import DC_NET

    src, site = tmp_path / "src", tmp_path / "site"
    shutil.copytree(os.path.join(REPO, "dsd_caffe"), src / "dsd_caffe", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(REPO, "setup.py"), src)
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(site)], cwd=src, check=True,
                   capture_output=True)
    code = ("import json, os, sys, numpy as np, dsd_caffe\n"
            "out = {'file': dsd_caffe.__file__, 'classes': len(dsd_caffe.imagenet_classes())}\n"
            "if os.path.exists(sys.argv[1]):\n"
            "    net = dsd_caffe.load('deep-compression-squeezenet', weights=sys.argv[1])\n"
            "    out['nonzero'] = int(sum(np.count_nonzero(b[0].data) for b in net.params.values()))\n"
            "print(json.dumps(out))")
    proc = subprocess.run([sys.executable, "-c", code, DC_NET], capture_output=True, text=True, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(site)), timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["file"] == str(site / "dsd_caffe" / "__init__.py") and out["classes"] == 1000
    if not os.path.exists(DC_NET):
        pytest.skip(f"reference file {DC_NET} is absent: the zoo model was not loaded")
    assert out["nonzero"] == 415921
