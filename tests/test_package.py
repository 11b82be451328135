"""The package's face: lazy re-exports, no Caffe at import time, tools as thin CLIs."""
import ast
import glob
import os
import subprocess
import sys

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
