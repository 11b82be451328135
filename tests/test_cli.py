"""The tools' shell: one line and exit 2 for bad input, 130 for interruptions, tracebacks for bugs, and the
vocabulary helpers (comma lists, deprecated spellings, --output)."""
import os
import subprocess
import sys
import textwrap

import pytest

from dsd_caffe import cli


def _tool(tmp_path, body, *args):
    script = tmp_path / "tool.py"
    script.write_text(textwrap.dedent('''\
        """A test tool."""
        import os, signal, sys, time
        from dsd_caffe import cli
        from dsd_caffe.errors import DiskFull, InputMissing, Interrupted, UserError

        def run(a):
        ''') + textwrap.indent(textwrap.dedent(body), "    ") + textwrap.dedent('''
        p = cli.parser(__doc__)
        cli.add_list(p, "--skip", help="layers")
        cli.add_output(p, "where", legacy_positional=True, required=False)
        p.add_argument("--max-iter", type=int, help="iterations")
        cli.add_deprecated(p, "--iters", "--max-iter", "max_iter", type=int)
        cli.main(p, run)
        '''))
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("body, code, line", [
    ("raise UserError('bad --ratio 1x')", 2, "tool.py: error: bad --ratio 1x"),
    ("raise InputMissing('input /nonexistent/x does not exist')", 2,
     "tool.py: error: input /nonexistent/x does not exist"),
    ("raise DiskFull(28, 'No space left on device', 'out.lmdb')", 2,
     "tool.py: error: No space left on device: out.lmdb; free some space and run the same command again"),
    ("raise UserError('max_iter must be an integer >= 1, got 0', fields=['max_iter'])", 2,
     "tool.py: error: --max-iter must be an integer >= 1, got 0"),
    ("raise UserError('sparse.max_iter must be at most 3, got 9; skip is fine', fields=['sparse.max_iter'])", 2,
     "tool.py: error: --max-iter must be at most 3, got 9; skip is fine"),
    ("raise UserError('seed must be an integer >= 0, got -1', fields=['seed'])", 2,
     "tool.py: error: seed must be an integer >= 0, got -1"),
    ("raise Interrupted('interrupted at iteration 7; run the same command again to resume', 7)", 130,
     "tool.py: interrupted at iteration 7; run the same command again to resume"),
    ("os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)", 130, "tool.py: interrupted"),
])
def test_one_line_and_exit_status(tmp_path, body, code, line):
    r = _tool(tmp_path, body)
    assert r.returncode == code and r.stderr.strip().splitlines() == [line], r.stderr


@pytest.mark.parametrize("body", ["{}['missing']", "None + 1", "raise ImportError('a bug')",
                                  "open('/nonexistent/x')", "raise OSError(28, 'No space left on device', 'x')"])
def test_bugs_keep_their_traceback(tmp_path, body):
    r = _tool(tmp_path, body)
    assert r.returncode == 1 and "Traceback" in r.stderr


def test_lists_deprecations_and_output(tmp_path):
    body = "print(a.skip, a.max_iter, a.output)"
    r = _tool(tmp_path, body, "--skip", "conv1,fire2/*", "--skip", "conv_final", "--iters", "5", "old_out")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["['conv1',", "'fire2/*',", "'conv_final']", "5", "old_out"]
    notes = r.stderr.strip().splitlines()
    assert len(notes) == 2 and "--iters is deprecated" in notes[0] and "use --max-iter" in notes[0]
    assert "positional output argument is deprecated" in notes[1]
    r = _tool(tmp_path, body, "--output", "a", "b")
    assert r.returncode == 2 and "not both" in r.stderr


def test_help_shows_defaults_but_not_none():
    p = cli.parser("doc")
    p.add_argument("--base-lr", type=float, default=1e-4, help="learning rate")
    p.add_argument("--epochs", type=float, help="epochs (default: from the phase table)")
    p.add_argument("--max-iter", type=int, help="iterations")
    text = p.format_help()
    assert "learning rate (default: 0.0001)" in text and "(default: None)" not in text


def test_a_file_name_that_is_not_utf8_is_one_line(tmp_path):
    r = _tool(tmp_path, "print(a.output)", "--output", os.fsdecode(b"r\xffx"))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(
        "error: --output r\\udcffx: a file name that is not valid UTF-8; rename it"), r.stderr


def test_the_tools_that_write_one_file_share_output_and_force():
    """compress, decode_compressed and export_onnx take --output/-o and --force from flags.add_file_output, as the
    other tools take theirs from cli and flags: the same flags, help and missing --output line."""
    from helpers import tool_parser

    for tool in ("compress", "decode_compressed", "export_onnx"):
        p = tool_parser(f"dsd_caffe.commands.{tool}")
        actions = {a.dest: a for a in p._actions}
        assert actions["output"].option_strings == ["--output", "-o"], tool
        assert (actions["force"].option_strings, actions["force"].help) == (["--force"],
                                                                            "overwrite an existing output"), tool
        assert p._dsd_checks, tool  # cli.add_output's check: a missing --output is one line, exit 2
