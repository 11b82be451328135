"""Kill tools/dsd.py with SIGKILL (its whole process group) at points in different phases, chosen by watching the run
folder, re-run the same command each time, and check the finished run against an uninterrupted one with the same
seed: identical masks, every sparse-phase snapshot at exactly the pruned density, no truncated output file.
The harness is tests/crash_harness.py (run it as a script for more kill points)."""
import os

import numpy as np
import pytest

import crash_harness as cr

pytest.importorskip("caffe")

#: Candidate kill points, one chain, in phase order: before caffe is imported, the dense evaluation, right after
#: the pruned model appears, as the first sparse snapshot's caffemodel appears (usually before its solverstate),
#: during the copy of the final sparse model, as the first redense snapshot appears, the final evaluation + PNG.
POINTS = ["startup", "dense-eval", "pruned-model-written", "sparse-first-snapshot-writing", "sparse-final-copy",
          "redense-first-snapshot-writing", "final-eval-and-png"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("crash"))
    model, weights = cr.make_setup(folder, seed=0)
    ref = os.path.join(folder, "reference")
    r = cr.run_to_end(cr.dsd_command(model, weights, ref, seed=0))
    assert r.returncode == 0, r.stderr[-2000:]
    return folder, model, weights, ref


def test_reference_run(setup):
    folder, model, weights, ref = setup
    counts = cr.check_run(ref, ref, weights)
    assert counts["caffemodel"] >= 2 + cr.SPARSE_ITERS // cr.SNAPSHOT and counts["leftover_tmp"] == 0


def test_sigkill_at_five_phases_then_resume(setup):
    folder, model, weights, ref = setup
    out = os.path.join(folder, "killed")
    kills, final = cr.chain(cr.dsd_command(model, weights, out, seed=0), out, POINTS, np.random.default_rng(0),
                            max_jitter=0.2)
    report = "\n".join(f"{k['point']}: {'skipped' if k['skipped'] else 'killed' if k['killed'] else 'ended'} "
                       f"[{k['where']}]" for k in kills)
    assert final.returncode == 0, final.stderr[-2000:] + "\n" + report
    killed = [k for k in kills if k["killed"]]
    assert len(killed) >= 5, report
    # the kills landed in different phases: before pruning, in the sparse phase, in the redense phase
    assert {"startup", "dense-eval"} & {k["point"] for k in killed}, report
    assert {"sparse-first-snapshot-writing", "sparse-final-copy"} & {k["point"] for k in killed}, report
    assert {"redense-first-snapshot-writing", "final-eval-and-png"} & {k["point"] for k in killed}, report
    cr.check_run(out, ref, weights)
    # the same command on the finished run is refused in one line
    again = cr.run_to_end(cr.dsd_command(model, weights, out, seed=0))
    assert again.returncode == 2 and "finished DSD run" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1, again.stderr
