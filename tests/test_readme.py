"""The README's commands work as written: the "own nets" walk-through runs, literally, on a copy of the repository
(with this checkout's .venv), and every other tool command in the README and in docs/*.md (the ImageNet ones, which
need ImageNet) is at least accepted by its tool's parser, flag for flag."""
import filecmp
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

from dsd_caffe import cli
from helpers import FASHION, ROOT, copy_repo, tool_parser

README = os.path.join(ROOT, "README.md")
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def blocks(section=None, path=README):
    """The ```sh blocks of a markdown file (of one ``## section``), continuation lines joined."""
    with open(path) as f:
        text = f.read()
    if section:
        start = text.index(f"## {section}")
        end = text.find("\n## ", start + 1)
        text = text[start:end if end > 0 else None]
    found = re.findall(r"```sh\n(.*?)```", text, re.S)
    return [b.replace("\\\n", " ") for b in found]


def commands(block):
    for line in block.splitlines():
        line = line.split(" #", 1)[0].strip() if not line.startswith("#") else ""
        for part in line.split("&&"):
            if part.strip():
                yield shlex.split(part)


def _parser(module, argv):
    """Parse ``argv`` with the tool's own parser; returns the parse error, or None."""
    p = tool_parser(module)
    try:
        cli.run_checks(p, p.parse_args(argv))
    except SystemExit:
        return "refused"
    return None


def test_every_tool_command_in_the_readme_is_accepted_by_its_parser(capsys):
    seen = 0
    for block in [b for path in [README] + DOCS for b in blocks(path=path)]:
        for cmd in commands(block):
            if len(cmd) > 1 and cmd[0].endswith("python") and cmd[1].startswith("tools/"):
                module = "dsd_caffe.commands." + os.path.basename(cmd[1])[:-3]
                argv = cmd[2:]
            elif len(cmd) > 2 and cmd[1:3] == ["-m", "dsd_caffe.zoo"]:
                module, argv = "dsd_caffe.commands.zoo", cmd[3:]
            else:
                continue
            if "..." in argv:  # a sketch with a placeholder, not a command to run
                continue
            assert _parser(module, argv) is None, (cmd, capsys.readouterr().err)
            seen += 1
    assert seen >= 12


@pytest.mark.skipif(not os.path.exists(os.path.join(FASHION, "train-images-idx3-ubyte.gz")),
                    reason="Fashion-MNIST (Debian's dataset-fashion-mnist) is not installed")
def test_the_own_nets_walk_through_runs_as_written(tmp_path):
    """Literally, in order, in a copy of the repository: import the data, train the first dense model with plain
    caffe, prune, sparse, redense, evaluate, caffe test, then the whole run with its control."""
    copy = copy_repo(tmp_path)
    script = "set -e\n" + "\n".join(blocks("Using it on your own nets"))
    r = subprocess.run(["bash", "-c", script], cwd=copy, capture_output=True, text=True, timeout=3600,
                       env=dict(os.environ, TQDM_DISABLE="1"))
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    out = r.stdout
    assert "accuracy_top1 = " in out and out.count("Loss: ") == 1  # evaluate.py's caffe-test lines
    assert "DSD - control:" in out
    for f in ("runs/mine/sparse/sparse.caffemodel.json", "runs/mine/redense/redense.caffemodel.json",
              "runs/mine/eval/confusion.png", "runs/mine/dsd/accuracy.png", "runs/mine/dsd/dsd_state.json"):
        assert (copy / f).exists(), f


def test_copy_repo_holds_every_tracked_file_and_this_venv(tmp_path):
    """helpers.copy_repo, where the documented commands run: every tracked file, byte for byte, nothing else but
    the .venv link to this interpreter's environment."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    copy = copy_repo(tmp_path)
    found = {os.path.relpath(os.path.join(d, f), copy) for d, _, fs in os.walk(copy) for f in fs}
    assert found == set(files)
    assert all(filecmp.cmp(os.path.join(ROOT, f), copy / f, shallow=False) for f in files)
    assert os.readlink(copy / ".venv") == sys.prefix
