"""Every shell runs through cli.main: the set-up (``python3 -m dsd_caffe.build``), the BLAS choice
(``python -m dsd_caffe.blas``), ``python -m dsd_caffe.info`` and ``python -m dsd_caffe.zoo`` show their --help as
documented and exit 0, report a bad value in one line with exit status 2 and Ctrl-C in one line with 130, and the
set-up's shell needs neither Caffe nor numpy (it runs before the virtual environment exists)."""
import os
import subprocess
import sys

import pytest

from helpers import ROOT

#: module -> (the usage line's command, the first line of its description)
SHELLS = {
    "dsd_caffe.build": ("python3 -m dsd_caffe.build",
                        "Set-up: real Caffe built from Debian's source package, cached outside the repo, and the "
                        "project's .venv."),
    "dsd_caffe.blas": ("python -m dsd_caffe.blas",
                       "The fastest correct BLAS set-up for Caffe's OpenBLAS, chosen once at set-up and applied "
                       "wherever Caffe runs."),
    "dsd_caffe.info": ("python -m dsd_caffe.info",
                       "Print the Caffe in use and how it was built: version, BLAS and the kernel it runs, threads, "
                       "Python layer, OpenCV,"),
    "dsd_caffe.zoo": ("python -m dsd_caffe.zoo",
                      "List, fetch and verify the released SqueezeNet models (git blob id checked)."),
}


def _run(args, bare=False, cwd=None):
    """``python [-S] args`` from the repository (``bare``: no site-packages, so neither Caffe nor numpy)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, *(["-S"] if bare else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd or ROOT, env=env)


@pytest.mark.parametrize("module", sorted(SHELLS))
def test_help_exits_0_and_names_the_command_as_documented(module):
    r = _run(["-m", module, "--help"], bare=module == "dsd_caffe.build")
    assert r.returncode == 0, r.stderr
    usage, description = SHELLS[module]
    assert r.stdout.startswith(f"usage: {usage} [-h]"), r.stdout[:200]
    assert f"\n\n{description}" in r.stdout
    assert "--debug" in r.stdout and "--verbose" in r.stdout  # cli.main's own flags
    assert r.stderr == ""


def test_bad_values_are_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "not-the-release.caffemodel"
    bad.write_bytes(b"x")
    cases = {
        "dsd_caffe.build": (["--gpu", "--cuda-arch", "bogus", "--skip-apt", "--venv", str(tmp_path / "venv")],
                            "set-up failed at step 'configure': CUDA target 'bogus' is neither sm_NN nor compute_NN "
                            "(in 'bogus')"),
        "dsd_caffe.blas": (["--threads", "0", "--dry-run"], "--threads must be an integer >= 1, got 0"),
        "dsd_caffe.zoo": (["verify", "dsd-squeezenet", str(bad)], f"{bad} is not the released "
                          "DSD_SqueezeNet_top1_0.617579_top5_0.834742.caffemodel: git blob id "),
    }
    for module, (argv, message) in cases.items():
        r = _run(["-m", module, *argv], bare=module == "dsd_caffe.build")
        assert r.returncode == 2, (module, r.stderr)
        assert r.stdout == "" and r.stderr.count("\n") == 1, (module, r.stderr)
        assert r.stderr.startswith(f"{SHELLS[module][0]}: error: {message}"), (module, r.stderr)
    assert not (tmp_path / "venv").exists()  # a bad --cuda-arch fails before anything is made


@pytest.mark.parametrize("module", sorted(SHELLS))
def test_a_bad_flag_is_refused_with_exit_2(module):
    r = _run(["-m", module, "--no-such-flag"], bare=module == "dsd_caffe.build")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines()[-1].startswith(f"{SHELLS[module][0]}: error: ")


#: module -> (the module whose main() is the shell, the library call it makes (replaced by one that raises
#: KeyboardInterrupt), the command line)
CALLS = {
    "dsd_caffe.build": ("dsd_caffe.build", "setup", ["--skip-apt"]),
    "dsd_caffe.blas": ("dsd_caffe.blas", "choose", ["--dry-run"]),
    "dsd_caffe.info": ("dsd_caffe.commands.info", "collect", []),
    "dsd_caffe.zoo": ("dsd_caffe.commands.zoo", "verify", ["verify", "dsd-squeezenet", "x"]),
}


@pytest.mark.parametrize("module", sorted(CALLS))
def test_ctrl_c_in_the_library_call_is_one_line_and_130(module):
    shell, call, argv = CALLS[module]
    code = (f"import importlib, sys\n"
            f"def stop(*a, **k):\n    raise KeyboardInterrupt\n"
            f"setattr(importlib.import_module({module!r}), {call!r}, stop)\n"
            f"sys.argv[0] = {os.path.join(ROOT, *module.split('.')) + '.py'!r}  # as `python -m` sets it\n"
            f"importlib.import_module({shell!r}).main({argv!r})\n")
    r = _run(["-c", code], bare=module == "dsd_caffe.build")
    assert r.returncode == 130, r.stderr
    assert r.stderr == f"{SHELLS[module][0]}: interrupted\n"


def test_the_set_up_shell_imports_neither_caffe_nor_numpy():
    code = ("import sys, dsd_caffe.build, dsd_caffe.blas, dsd_caffe.cli\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'caffe', 'numpy', 'google'}))")
    r = _run(["-c", code])  # with site-packages: numpy and caffe could be imported, and are not
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
