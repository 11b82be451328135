"""The DSD demo, shortened (tens of iterations per phase) but real: Fashion-MNIST LMDBs, real Caffe training.

One module-scoped run; the tests check its table, densities, models and re-run behaviour.
"""
import os
import re

import numpy as np
import pytest

from dsd_caffe import demo, fashion_mnist, fileio, masks, phases, pipeline, pruning, sources
from dsd_caffe.errors import UserError

pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(fashion_mnist.FASHION_MNIST_DIR,
                                                                "train-images-idx3-ubyte.gz")),
                                reason="Fashion-MNIST (Debian's dataset-fashion-mnist) is not installed")

QUICK = dict(scale=0.02, tests_per_phase=2)  # dense 80, sparse 20, redense 20 iterations


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    res = demo.run_demo(out, seed=0, **QUICK)
    return out, res


def test_config_scales_iterations():
    cfg = demo.config_for(scale=0.02)
    assert (cfg["dense_max_iter"], cfg["sparse_max_iter"], cfg["redense_max_iter"]) == (80, 20, 20)
    for bad in (0, -1, float("nan"), True, "1"):
        with pytest.raises(UserError, match="scale"):
            demo.config_for(scale=bad)
    with pytest.raises(TypeError, match="unknown demo setting"):
        demo.config_for(learning_rate=1)
    from dsd_caffe import solvers

    for phase in solvers.PHASES:  # the demo runs the fashion-mnist recipe of the one table
        row = solvers.DEFAULTS["fashion-mnist"][phase]
        assert (demo.config_for()[f"{phase}_max_iter"], demo.config_for()[f"{phase}_base_lr"]) == (row.max_iter,
                                                                                           row.base_lr)


def test_a_demo_folder_of_the_previous_release_is_read_with_its_old_keys(tmp_path):
    """demo_config.json keys are named like the flags now (dense_max_iter, sparse_base_lr); a folder written with
    the old keys (dense_iters, sparse_lr) is the same run, not one "with other settings"."""
    cfg = demo.config_for()
    old = {{v: k for k, v in demo.OLD_KEYS.items()}.get(k, k): v for k, v in cfg.items()}
    assert "dense_iters" in old and "dense_max_iter" not in old and len(old) == len(cfg)
    fileio.write_json(tmp_path / "demo_config.json", old)
    demo._open(str(tmp_path), cfg, force=False)
    assert fileio.read_json(tmp_path / "demo_config.json") == cfg
    fileio.write_json(tmp_path / "demo_config.json", dict(old, dense_iters=1), force=True)
    with pytest.raises(UserError, match=r"other settings \(dense_max_iter\)"):
        demo._open(str(tmp_path), cfg, force=False)


def test_force_replaces_what_the_demo_owns_and_refuses_a_foreign_file(tmp_path):
    """--force follows the one rule (fileio.clear_owned over demo.OWNED): the demo's own outputs go, the data and
    the config stay, and a file the demo did not write is refused by name, with nothing removed."""
    cfg = demo.config_for()
    for name in ("dense", "dsd", "data"):
        (tmp_path / name).mkdir()
    for name in ("results.json", "accuracy.png", "weights_histogram.png", ".dsd.lock"):
        (tmp_path / name).write_text("")
    fileio.write_json(tmp_path / demo.CONFIG, dict(cfg, seed=7))
    (tmp_path / "notes.txt").write_text("mine")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(FileExistsError, match="holds 'notes.txt', which the demo did not write"):
        demo._open(str(tmp_path), cfg, force=True)
    assert sorted(os.listdir(tmp_path)) == before
    (tmp_path / "notes.txt").unlink()
    demo._open(str(tmp_path), cfg, force=True)
    assert sorted(os.listdir(tmp_path)) == sorted(["data", demo.CONFIG])
    assert fileio.read_json(tmp_path / demo.CONFIG) == cfg


def test_table_structure_and_densities(run):
    out, res = run
    lines = res["table"].splitlines()
    assert lines[0].split() == ["model", "top-1", "top-5", "density"]
    assert [l.split()[0] for l in lines[1:5]] == ["dense", "sparse", "DSD", "control"]
    assert re.fullmatch(r"DSD - control: [+-]\d+\.\d\d points of top-1", lines[5])
    for name in demo.ROWS:
        r = res["test"][name]
        assert 0.0 <= r["top1"] <= r["top5"] <= 1.0
    # the trained net beats chance by far even after 80 iterations
    assert res["test"]["dense"]["top1"] > 0.2  # chance is 0.1
    t = res["test"]
    assert t["dense"]["density"] == 1.0 and t["control"]["density"] == 1.0
    # 3x on every layer but conv1 (kept dense): the overall density is a little above 1/3
    assert 1 / 3 < t["sparse"]["density"] < 0.36
    assert t["sparse"]["density"] < t["DSD"]["density"] <= 1.0
    assert res["gain"] == pytest.approx(t["DSD"]["top1"] - t["control"]["top1"])
    assert fileio.read_json(os.path.join(out, "results.json"))["table"] == res["table"]
    # every path in results.json is relative to the demo's folder
    assert [p["model"] for p in res["dsd_phases"]][:2] == [os.path.join("dense", "dense.caffemodel"),
                                                           os.path.join("dsd", "cycle1-sparse", "pruned.caffemodel")]
    assert all(os.path.exists(os.path.join(out, p["model"])) for p in res["dsd_phases"])
    assert all(os.path.exists(os.path.join(out, m)) for m in res["models"].values())
    for png in ("accuracy.png", "weights_histogram.png"):
        with open(os.path.join(out, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_every_phase_model_loads(run, tmp_path):
    from dsd_caffe.caffe_env import import_caffe

    caffe = import_caffe()
    out, res = run
    dense_net = os.path.join(out, "dense", "dense_trainval.prototxt")
    sparse_dir = os.path.join(out, "dsd", "cycle1-sparse")
    models = [(dense_net, os.path.join(out, res["models"][k])) for k in ("dense", "DSD", "control")]
    models += [(os.path.join(sparse_dir, phases.SPARSE_NET), os.path.join(sparse_dir, f))
               for f in (phases.PRUNED, phases.SPARSE)]
    for net_path, weights in models:
        assert os.path.exists(fileio.sidecar_path(weights)), weights
        # Caffe resolves Data sources against the working folder: load a copy with absolute sources
        param = sources.absolute_sources(fileio.read_net_prototxt(net_path), os.path.dirname(net_path))
        path = str(tmp_path / "net.prototxt")
        fileio.write_prototxt(path, param)
        net = caffe.Net(path, weights, caffe.TEST)
        w = masks.weight_arrays(weights)
        for name, arr in w.items():
            np.testing.assert_array_equal(net.params[name][0].data, arr)


def test_sparse_model_has_exactly_the_pruned_density(run):
    out, res = run
    sparse_dir = os.path.join(out, "dsd", "cycle1-sparse")
    pruned = masks.sparsity_report(os.path.join(sparse_dir, phases.PRUNED))
    sparse = masks.sparsity_report(os.path.join(sparse_dir, phases.SPARSE))
    kept = masks.load_masks(os.path.join(sparse_dir, phases.MASKS))
    assert kept["conv1"].all()  # kept dense
    for name, rep in pruned.items():
        if name == "total":
            continue
        expected = rep["count"] if name == "conv1" else pruning.kept_count(rep["count"], 1 / 3)
        assert rep["nonzero"] == expected, name
        assert sparse[name]["nonzero"] == expected, name
    assert sparse["total"]["density"] == pruned["total"]["density"] == res["test"]["sparse"]["density"]
    masks.check_masked(os.path.join(sparse_dir, phases.SPARSE), kept)  # every pruned weight exactly 0.0
    # the control never pruned anything; DSD's redense phase revived pruned weights
    assert res["test"]["control"]["density"] == 1.0
    dsd = masks.weight_arrays(os.path.join(out, res["models"]["DSD"]))
    assert any(np.count_nonzero(dsd[n][~m]) for n, m in kept.items())


def test_rerun_reuses_everything(run):
    out, res = run
    logs = [os.path.join(out, p, "train.log") for p in ("dense", "dsd/cycle1-sparse", "dsd/cycle1-redense",
                                                        "dsd/" + pipeline.control_step(1, "sparse"),
                                                        "dsd/" + pipeline.control_step(1, "redense"))]
    before = {p: os.path.getsize(p) for p in logs}
    again = demo.run_demo(out, seed=0, **QUICK)
    assert {p: os.path.getsize(p) for p in logs} == before  # no phase trained again
    assert again["table"] == res["table"]


def test_other_settings_in_the_same_folder_are_refused(run):
    out, _ = run
    with pytest.raises(UserError, match="other settings.*seed"):
        demo.run_demo(out, seed=1, **QUICK)


def test_untrained_dense_net_is_flagged(tmp_path, caplog):
    from dsd_caffe import demo

    log = tmp_path / "train.log"
    lines = []
    for it, acc in ((500, 0.41), (1000, 0.097)):
        lines.append(f"I1126 solver.cpp:347] Iteration {it}, Testing net (#0)")
        lines.append(f"I1126 solver.cpp:414]     Test net output #0: accuracy_top1 = {acc}")
    log.write_text("\n".join(lines) + "\n")
    with caplog.at_level("WARNING", logger="dsd_caffe.demo"):
        demo._warn_if_untrained(str(log), classes=10)
    assert "about chance" in caplog.text
    caplog.clear()
    log.write_text("\n".join(lines[:2]) + "\n")
    with caplog.at_level("WARNING", logger="dsd_caffe.demo"):
        demo._warn_if_untrained(str(log), classes=10)
    assert caplog.text == ""
