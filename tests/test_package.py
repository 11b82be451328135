"""The package's face: lazy re-exports, no Caffe at import time, tools as thin CLIs."""
import ast
import functools
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

import dsd_caffe
from dsd_caffe import cli
from helpers import ROOT as REPO
from helpers import tool, tool_parser


def setup_commands():
    """setup.py's {console script: command module} (its COMMANDS literal)."""
    with open(os.path.join(REPO, "setup.py")) as f:
        tree = ast.parse(f.read())
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "COMMANDS")
    return ast.literal_eval(node.value)


def test_import_needs_neither_caffe_nor_numpy():
    code = "import sys, dsd_caffe; print('caffe' in sys.modules, 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_masks_and_pruning_do_not_import_caffe(tmp_path):
    """Only the layer (dsd_caffe.masklayer) subclasses caffe.Layer: reading and writing masks needs no Caffe (its
    messages, caffe_pb2, load without it). Checked by reading the masks of a pruned model and pruning it again."""
    from helpers import small_setup
    from dsd_caffe import phases

    model, weights = small_setup(tmp_path)
    phases.prune(phases.Inputs(model=model, weights=weights), tmp_path / "sparse", phases.PruneConfig(ratio="3x"))
    code = (f"import sys, numpy, dsd_caffe.masks as m, dsd_caffe.pruning as p\n"
            f"masks = m.read_masks({str(tmp_path / 'sparse' / phases.PRUNED)!r})\n"
            f"again = p.magnitude_mask(m.weight_arrays({weights!r})['conv1'], 0.5)\n"
            f"print(len(masks), int(again.sum()), [k for k in sys.modules if k.split('.')[0] == 'caffe'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    n, kept, loaded = out.strip().split(maxsplit=2)
    assert int(n) > 0 and int(kept) > 0
    assert loaded == "['caffe.proto.caffe_pb2']"  # the messages only: no caffe, no _caffe.so


def test_every_export_resolves_and_never_shadows_a_module():
    modules = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "dsd_caffe", "*.py"))}
    for name, module in dsd_caffe._EXPORTS.items():
        assert module in modules
        assert name not in modules, f"export {name!r} would shadow the module dsd_caffe.{name}"
        assert getattr(dsd_caffe, name) is not None


COMMANDS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "dsd_caffe", "commands", "*.py"))
                  if not os.path.basename(p).startswith(("_", "flags")))


def test_tools_are_thin_clis_with_their_docstring_as_description():
    """Each tool is a command module (docstring = --help, one library call) run by a three-line tools/ shim and
    installed as a console script."""
    tools = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "tools", "*.py")))
    assert tools == COMMANDS
    for name in COMMANDS:
        with open(os.path.join(REPO, "dsd_caffe", "commands", f"{name}.py")) as f:
            text = f.read()
        assert len(text.splitlines()) <= 80, f"{name} is not a thin CLI"
        assert ast.get_docstring(ast.parse(text)) and "cli.parser(__doc__" in text, name
        with open(os.path.join(REPO, "tools", f"{name}.py")) as f:
            shim = f.read()
        assert f"from dsd_caffe.commands.{name} import main" in shim and ast.get_docstring(ast.parse(shim)), name


@functools.lru_cache(maxsize=None)
def _help(name):
    r = tool(name, "--help", timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _flags(name):
    """{flag: its argparse action} of a tool, including hidden deprecated spellings."""
    return {s: a for a in tool_parser(f"dsd_caffe.commands.{name}")._actions for s in a.option_strings}


#: the vocabulary: one spelling per meaning across every tool (issue 14)
FORBIDDEN = {"--sparse-iters", "--dense-iters", "--sparse-lr", "--dense-lr", "--dense-epochs", "--test-iterations",
             "--iters", "--lr", "--out", "--output-dir", "--confusion"}


def test_one_vocabulary_across_every_tool():
    import argparse

    for name in COMMANDS:
        text = _help(name)
        for flag in FORBIDDEN:  # old spellings work (hidden, with a deprecation line) but are never advertised
            assert f"{flag} " not in text and f"{flag}," not in text, (name, flag)
        actions = _flags(name)
        for flag, action in actions.items():
            if action.help == argparse.SUPPRESS:
                assert flag in FORBIDDEN or flag == "--debug", (name, flag)
                continue
            assert action.help, f"{name} {flag} has no help text"
            shown = cli.HelpFormatter(name)._get_help_string(action)  # what --help prints for it
            if action.default is not None and action.nargs != 0 and action.default != []:
                assert "default" in shown, (name, flag, shown)
            assert "re-dense" not in flag and not flag.startswith("--dense-"), (name, flag)  # the phase is redense
        outputs = [f for f in actions if "output" in f or "out" == f.strip("-")]
        assert set(outputs) <= {"--output", "-o"}, (name, outputs)
        for flag in actions:  # a phase setting is --max-iter, or --<phase>-max-iter where a tool drives several
            if actions[flag].help == argparse.SUPPRESS:
                continue
            assert not flag.endswith(("-iters", "-lr")) or flag.endswith("-base-lr"), (name, flag)
            for word in ("max-iter", "epochs", "base-lr"):
                if flag.endswith(word):
                    assert flag[2:-len(word)] in ("", "sparse-", "redense-", "dense-"), (name, flag)
    assert "usage: python -m dsd_caffe.zoo" in subprocess.run(
        [sys.executable, "-m", "dsd_caffe.zoo", "--help"], capture_output=True, text=True, check=True).stdout


def test_console_scripts_are_the_tools():
    """setup.py's console scripts run the same command modules as tools/*.py (the venv has them installed)."""
    scripts = setup_commands()
    assert sorted(scripts.values()) == COMMANDS
    bin_dir = os.path.dirname(sys.executable)
    for script, module in scripts.items():
        path = os.path.join(bin_dir, script)
        if not os.path.exists(path):
            pytest.skip(f"{path} is not installed (run make setup): the venv predates the console scripts")
        out = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.startswith(f"usage: {script}"), (script, out.stderr[-500:])
        body = (lambda text: text[text.index("\n\n"):])  # the same help but for the usage lines' wrapping
        assert body(_help(module)) == body(out.stdout), script


def test_an_installed_copy_ships_class_names_and_builds_zoo_nets(tmp_path):
    """What setup.py installs (build_py: the package and its package_data), away from the repository and its
    models/ folder, has the ImageNet class names and loads a zoo model."""
    from helpers import DC_NET

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
