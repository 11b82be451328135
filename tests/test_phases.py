"""DSD's phases on the small net with tiny LMDBs: what prune writes (with and without data, re-pruning), the
sparse and redense phases, the release, and the rule that a phase folder is reused only with the settings it
records."""
import os
import shutil
import subprocess

import numpy as np
import pytest

from dsd_caffe import fileio, masks, netgen, phases, pruning, sources, training
from dsd_caffe.solvers import Schedule
from helpers import copy_beside, small_setup, tool, write_tiny_lmdb
from dsd_caffe.errors import AccessDenied, OutputExists, UserError

caffe = pytest.importorskip("caffe")
SHORT = Schedule(max_iter=4, snapshot=2, base_lr=0.05)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("phases"))
    model, weights = small_setup(folder)
    return folder, model, weights


@pytest.fixture(scope="module")
def pruned(setup):
    folder, model, weights = setup
    out = os.path.join(folder, "p3x")
    res = phases.prune(phases.Inputs(model, weights), out, phases.PruneConfig(ratio="3x"), SHORT)
    return out, res


def test_prune_writes_everything(setup, pruned):
    folder, model, weights = setup
    out, res = pruned
    for f in (phases.PRUNED, phases.MASKS, phases.SPARSE_NET, phases.SPARSE_SOLVER, phases.HISTOGRAM,
              fileio.sidecar_path(phases.PRUNED)):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    assert os.path.isdir(os.path.join(out, "snapshots"))  # caffe train, run from the folder, needs it
    with open(os.path.join(out, phases.HISTOGRAM), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    names = netgen.weighted_layers(fileio.read_net_prototxt(model))
    assert [r["name"] for r in res["rows"]] == names and "threshold" in res["table"].splitlines()[0]
    prov = fileio.read_json(fileio.sidecar_path(os.path.join(out, phases.PRUNED)))
    assert (prov["phase"], prov["made_by"], prov["iteration"]) == ("sparse", "prune", 0)
    assert prov["source"] == os.path.abspath(weights)
    assert prov["source_sha256"] == training.file_record(weights)["sha256"]
    dense = masks.weight_arrays(weights)
    kept = masks.load_masks(os.path.join(out, phases.MASKS))
    assert list(kept) == names  # every weighted layer is in the mask layer
    for name in names:
        assert prov["density"][name] == pruning.kept_count(dense[name].size, 1 / 3) / dense[name].size
        np.testing.assert_array_equal(kept[name], pruning.magnitude_mask(dense[name], 1 / 3))
        assert np.abs(dense[name][kept[name]]).min() == pytest.approx(prov["thresholds"][name])
    net = fileio.read_net_prototxt(os.path.join(out, phases.SPARSE_NET))
    mask_layers = [l for l in net.layer if masks.is_mask_layer(l)]
    assert len(mask_layers) == 1 and mask_layers[0].include[0].phase == caffe.TRAIN
    assert [p.name for p in mask_layers[0].param[:len(names)]] == [f"{n}_w" for n in names]
    assert all(p.lr_mult == 0 and p.decay_mult == 0 for p in mask_layers[0].param[len(names):])
    for _, p in sources.source_fields(net):  # sources relative to the prototxt's folder
        assert not os.path.isabs(p.source) and os.path.isdir(os.path.join(out, p.source))
    s = fileio.read_solver_prototxt(os.path.join(out, phases.SPARSE_SOLVER))
    assert (s.net, s.max_iter, s.snapshot, s.snapshot_prefix) == (phases.SPARSE_NET, 4, 2, "snapshots/sparse")
    assert s.base_lr == pytest.approx(0.05)


def test_readme_caffe_train_runs_in_a_fresh_prune_folder(pruned, tmp_path):
    """The README's command: cd into prune.py's folder and run the plain binary on its solver."""
    from dsd_caffe.caffe_env import caffe_binary

    run = copy_beside(pruned[0], "plain-" + tmp_path.name)
    r = subprocess.run([caffe_binary(), "train", "--solver=sparse_solver.prototxt", "--weights=pruned.caffemodel"],
                       cwd=run, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    snap = os.path.join(run, "snapshots", "sparse_iter_4.caffemodel")
    masks.check_masked(snap, masks.load_masks(os.path.join(run, phases.MASKS)))


def test_prune_skip_keeps_layer_dense(setup, tmp_path):
    folder, model, weights = setup
    res = phases.prune(phases.Inputs(model, weights), tmp_path / "p",
                       phases.PruneConfig(density="0.5", skip=("conv1", "conv_final")), Schedule(max_iter=1))
    assert res["densities"]["conv1"] == 1.0 and res["densities"]["conv_final"] == 1.0
    kept = masks.read_masks(res["model"])
    assert set(kept) == set(res["densities"]) and kept["conv1"].all()


def test_prune_refuses_bad_inputs_and_leaves_nothing(setup, pruned, tmp_path):
    folder, model, weights = setup
    out, _ = pruned
    inputs = phases.Inputs(model, weights)
    stamp = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
    again = phases.prune(inputs, out, phases.PruneConfig(ratio="3x"), SHORT)  # the same command: reused as it is
    assert again["table"] == pruned[1]["table"] and {f: os.path.getmtime(os.path.join(out, f)) for f in stamp} == stamp
    with pytest.raises(UserError, match=r"other settings \(first: target_density: 0\.333.* 0\.5 now\).*--force"):
        phases.prune(inputs, out, phases.PruneConfig(ratio="2x"), SHORT)
    with pytest.raises(UserError, match="accepted forms"):
        phases.PruneConfig(ratio="1x")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(AccessDenied, match="file is not writable"):
        phases.prune(inputs, blocker / "out", phases.PruneConfig(ratio="3x"))
    other = netgen.small_squeezenet("train_lmdb", "val_lmdb", width=2.0, train_batch=4, test_batch=4)
    from dsd_caffe.caffe_env import make_net

    make_net(sources.absolute_sources(other, folder), "TEST").save(str(tmp_path / "other.caffemodel"))
    bad = [(phases.Inputs(model, str(tmp_path / "other.caffemodel")), {}, ValueError, "'conv1'"),
           (inputs, {"profile": "nope"}, ValueError, "unknown profile")]
    small = write_tiny_lmdb(tmp_path / "small_lmdb", np.zeros((2, 1, 8, 8)), [0, 1])
    bad.append((phases.Inputs(model, weights, train_source=small), {}, ValueError,
                r"\(TRAIN\).*smaller than crop_size 28"))
    truncated = tmp_path / "truncated.caffemodel"
    truncated.write_bytes(open(weights, "rb").read()[:1000])
    bad.append((phases.Inputs(model, str(truncated)), {}, ValueError, "truncated or corrupted"))
    for i, (inp, kw, kind, match) in enumerate(bad):
        with pytest.raises(kind, match=match):
            phases.prune(inp, tmp_path / f"z{i}", phases.PruneConfig(ratio="3x", **kw))
        assert not os.path.exists(tmp_path / f"z{i}"), i  # a refusal leaves no folder behind
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(OutputExists, match="did not write"):
        phases.prune(inputs, foreign, phases.PruneConfig(ratio="3x"), force=True)
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_prune_without_data_from_a_trainval_and_a_deploy(setup, pruned, tmp_path):
    """Pruning is pure numpy: a trainval whose LMDBs are elsewhere gives the model, masks and sparse trainval (the
    solver is written where the data is); a deploy prototxt gives the model and masks."""
    folder, model, weights = setup
    away = tmp_path / "laptop"
    away.mkdir()
    shutil.copy(model, away / "trainval.prototxt")  # its sources name ../train_lmdb etc., absent here
    out = away / "p"
    res = phases.prune(phases.Inputs(str(away / "trainval.prototxt"), weights), out, phases.PruneConfig(ratio="3x"),
                       Schedule(epochs=2))
    assert sorted(os.listdir(out)) == sorted([phases.PRUNED, fileio.sidecar_path(phases.PRUNED), phases.MASKS,
                                              phases.SPARSE_NET, phases.HISTOGRAM, "snapshots"])
    assert any("train_sparse.py writes it" in n for n in res["notes"])
    ref = os.path.join(pruned[0], phases.MASKS)  # the same model pruned with its data at hand
    assert masks.same_masks(masks.load_masks(out / phases.MASKS), masks.load_masks(ref)) is None
    # on the machine with the data (the LMDBs beside the folder now), train_sparse writes the solver from the
    # settings recorded at pruning (2 epochs of 16 images at batch 4 = 8 iterations)
    for name in ("train_lmdb", "val_lmdb"):
        shutil.copytree(os.path.join(folder, name), away / name)
    final = phases.train_sparse(out)
    assert fileio.read_solver_prototxt(out / phases.SPARSE_SOLVER).max_iter == 8
    assert fileio.read_json(fileio.sidecar_path(final))["iteration"] == 8
    deploy = tmp_path / "deploy.prototxt"
    fileio.write_prototxt(deploy, netgen.deploy(fileio.read_net_prototxt(model), input_shape=(1, 1, 28, 28)))
    res = phases.prune(phases.Inputs(str(deploy), weights), tmp_path / "d", phases.PruneConfig(ratio="3x"))
    assert sorted(os.listdir(tmp_path / "d")) == sorted([phases.PRUNED, fileio.sidecar_path(phases.PRUNED),
                                                        phases.MASKS, phases.HISTOGRAM])
    assert any("deploy net" in n for n in res["notes"])


def test_repruning_semantics_through_the_tool(pruned, setup, tmp_path):
    folder, model, weights = setup
    out, _ = pruned
    phases.prune(phases.Inputs(model, os.path.join(out, phases.PRUNED)), tmp_path / "again",
                        phases.PruneConfig(ratio="3x"))
    first = masks.load_masks(os.path.join(out, phases.MASKS))
    assert masks.same_masks(first, masks.load_masks(tmp_path / "again" / phases.MASKS)) is None
    r = tool("prune", "--model", model, "--weights", os.path.join(out, phases.PRUNED), "--output",
             tmp_path / "2x", "--ratio", "2x")
    assert r.returncode == 2 and "already pruned" in r.stderr and "density 0.5000" in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "2x")
    deeper = phases.prune(phases.Inputs(model, os.path.join(out, phases.PRUNED)), tmp_path / "4x",
                          phases.PruneConfig(ratio="4x"))
    report = masks.sparsity_report(deeper["model"])
    assert all(report[r["name"]]["nonzero"] == r["kept"] for r in deeper["rows"])  # the table is the truth


def test_sparse_and_redense_phases_release_and_records(setup, pruned, tmp_path):
    folder, model, weights = setup
    run = copy_beside(pruned[0], "sparse-" + tmp_path.name)
    sparse = phases.train_sparse(run, engine="pycaffe")
    kept = masks.load_masks(os.path.join(run, phases.MASKS))
    masks.check_masked(sparse, kept)
    prov = fileio.read_json(fileio.sidecar_path(sparse))
    assert (prov["phase"], prov["iteration"], prov["engine"]) == ("sparse", 4, "pycaffe")
    out = tmp_path / "redense"
    inputs = phases.Inputs(os.path.join(run, phases.SPARSE_NET), sparse)
    final = phases.retrain_dense(inputs, out, Schedule(max_iter=3), engine="pycaffe")
    s = fileio.read_solver_prototxt(out / "redense_solver.prototxt")
    assert s.base_lr == pytest.approx(1e-4) and s.max_iter == 3
    net = fileio.read_net_prototxt(out / "redense_trainval.prototxt")
    assert not any(masks.is_mask_layer(l) for l in net.layer)
    # the release: the sparse model without its mask layer, pruned weights exactly 0.0, survivors as they were
    released = masks.weight_arrays(out / phases.RELEASED)
    assert not masks.mask_layer_spec(fileio.read_caffemodel(out / phases.RELEASED))
    sw = masks.weight_arrays(sparse)
    for name, m in kept.items():
        np.testing.assert_array_equal(released[name], sw[name])
        assert np.all(released[name][~m] == 0.0)
    dw = masks.weight_arrays(final)
    revived = sum(int(np.count_nonzero(dw[n][~m])) for n, m in kept.items())
    assert revived > 0.5 * sum(int((~m).sum()) for m in kept.values())
    prov = fileio.read_json(fileio.sidecar_path(final))
    assert (prov["phase"], prov["iteration"], prov["source"]) == ("redense", 3, os.path.abspath(sparse))
    assert prov["settings"]["base_lr"] == pytest.approx(1e-4)
    # the same command reuses the finished phase and writes nothing
    stamp = {f: os.path.getmtime(out / f) for f in os.listdir(out) if os.path.isfile(out / f)}
    assert phases.retrain_dense(inputs, out, Schedule(max_iter=3)) == final
    assert {f: os.path.getmtime(out / f) for f in stamp} == stamp


def test_a_phase_folder_is_reused_only_with_its_settings(setup, pruned, tmp_path):
    """Other --weights, --base-lr or --max-iter on a finished (or started) phase: refused, naming the first
    difference, with nothing rewritten; --force redoes the phase from scratch and the JSON says so."""
    folder, model, weights = setup
    run = copy_beside(pruned[0], "reuse-" + tmp_path.name)
    sparse = phases.train_sparse(run)
    inputs = phases.Inputs(os.path.join(run, phases.SPARSE_NET), sparse)
    out = tmp_path / "r"
    final = phases.retrain_dense(inputs, out, Schedule(max_iter=3))
    before = {f: open(out / f, "rb").read() for f in os.listdir(out) if os.path.isfile(out / f)}
    with pytest.raises(UserError, match="base_lr: 0.0001.*base_lr: 0.001"):
        phases.retrain_dense(inputs, out, Schedule(max_iter=3, base_lr=1e-3))
    with pytest.raises(UserError, match="max_iter: 3.*max_iter: 5"):
        phases.retrain_dense(inputs, out, Schedule(max_iter=5))
    with pytest.raises(UserError, match="other weights"):
        phases.retrain_dense(phases.Inputs(os.path.join(run, phases.SPARSE_NET), os.path.join(run, phases.PRUNED)),
                             out, Schedule(max_iter=3))
    assert {f: open(out / f, "rb").read() for f in before} == before
    phases.retrain_dense(inputs, out, Schedule(max_iter=5, base_lr=1e-3), force=True)
    prov = fileio.read_json(fileio.sidecar_path(final))
    assert prov["iteration"] == 5 and prov["settings"]["base_lr"] == pytest.approx(1e-3)
    assert open(out / "train.log").read().count("# ") == 1  # --force cleared the old log and snapshots
    # the sparse phase too: --max-iter on a finished folder is refused, --force retrains
    with pytest.raises(UserError, match="max_iter: 4.*max_iter: 6"):
        phases.train_sparse(run, Schedule(max_iter=6))
    phases.train_sparse(run, Schedule(max_iter=6), force=True)
    assert fileio.read_json(fileio.sidecar_path(os.path.join(run, phases.SPARSE)))["iteration"] == 6


def test_squeezenet_3x_profile_on_deepscale_naming(tmp_path):
    """--ratio 3x with squeezenet-3x on a SqueezeNet v1.0 caffemodel (DeepScale names): per-layer densities
    within 0.01 of the released sparse SqueezeNet, 0.334 +- 0.005 overall."""
    from dsd_caffe.caffe_env import make_net

    rng = np.random.default_rng(0)
    for name in ("train_lmdb", "val_lmdb"):
        write_tiny_lmdb(tmp_path / name, rng.integers(0, 256, (2, 3, 227, 227)), [0, 1])
    net = netgen.squeezenet_v1_0("deepscale", train_source="train_lmdb", test_source="val_lmdb", train_batch=1,
                                 test_batch=1)
    fileio.write_prototxt(str(tmp_path / "trainval.prototxt"), net)
    make_net(sources.absolute_sources(net, str(tmp_path)), "TEST").save(str(tmp_path / "sq.caffemodel"))
    res = phases.prune(phases.Inputs(str(tmp_path / "trainval.prototxt"), str(tmp_path / "sq.caffemodel")),
                       tmp_path / "p", phases.PruneConfig(ratio="3x", profile="squeezenet-3x"), Schedule(max_iter=1))
    ref = {pruning.deepscale_name(k): nz / total for k, (nz, total) in pruning.SQUEEZENET_3X.items()}
    assert set(res["densities"]) == set(ref)
    for name, d in res["densities"].items():
        assert abs(d - ref[name]) <= 0.01, name
    kept = sum(r["kept"] for r in res["rows"])
    assert abs(kept / sum(r["size"] for r in res["rows"]) - 0.334) <= 0.005


def test_any_net_with_inner_product(tmp_path):
    """Not only SqueezeNet: a conv + fc net, pruned 2x, trained under the mask with pycaffe."""
    from google.protobuf import text_format

    from dsd_caffe.caffe_env import make_net

    from dsd_caffe.caffeproto import caffe_pb2

    rng = np.random.default_rng(1)
    for name in ("train_lmdb", "val_lmdb"):
        write_tiny_lmdb(tmp_path / name, rng.integers(0, 256, (8, 1, 12, 12)), rng.integers(0, 3, 8))
    text = """name: "lenetish"
    layer { name: "d" type: "Data" top: "data" top: "label" include { phase: TRAIN }
            transform_param { scale: 0.0039 } data_param { source: "train_lmdb" batch_size: 4 backend: LMDB } }
    layer { name: "d" type: "Data" top: "data" top: "label" include { phase: TEST }
            transform_param { scale: 0.0039 } data_param { source: "val_lmdb" batch_size: 4 backend: LMDB } }
    layer { name: "c" type: "Convolution" bottom: "data" top: "c"
            convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
    layer { name: "r" type: "ReLU" bottom: "c" top: "c" }
    layer { name: "ip" type: "InnerProduct" bottom: "c" top: "ip"
            param { lr_mult: 2 decay_mult: 3 } param { lr_mult: 1 }
            inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
    layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc" include { phase: TEST } }"""
    net = text_format.Parse(text, caffe_pb2().NetParameter())
    fileio.write_prototxt(str(tmp_path / "net.prototxt"), net)
    make_net(sources.absolute_sources(net, str(tmp_path)), "TRAIN").save(str(tmp_path / "w.caffemodel"))
    out = tmp_path / "p"
    phases.prune(phases.Inputs(str(tmp_path / "net.prototxt"), str(tmp_path / "w.caffemodel")), out,
                 phases.PruneConfig(ratio="2x"), Schedule(max_iter=3, base_lr=0.1))
    sparse_net = fileio.read_net_prototxt(out / phases.SPARSE_NET)
    mask = next(l for l in sparse_net.layer if masks.is_mask_layer(l))
    assert [(p.name, p.lr_mult, p.decay_mult) for p in mask.param[:2]] == [("c_w", 1, 1), ("ip_w", 2, 3)]
    final = phases.train_sparse(out, engine="pycaffe")
    w = masks.weight_arrays(final)
    for name, m in masks.load_masks(out / phases.MASKS).items():
        assert np.all(w[name][~m] == 0) and m.mean() == 0.5


def test_sensitivity_needs_only_a_test_source(setup, tmp_path):
    """A trainval whose TRAIN LMDB is elsewhere: the scan reads the TEST LMDB only (--test-source may replace it),
    every evaluation sees the same batches, and the outputs land whole in the folder."""
    from dsd_caffe import sensitivity

    folder, model, weights = setup
    away = tmp_path / "evalbox"
    away.mkdir()
    shutil.copy(model, away / "trainval.prototxt")  # names ../train_lmdb and ../val_lmdb: absent from here
    config = sensitivity.ScanConfig(densities=(0.2, 1.0), layers=("conv1", "conv_final"), iterations=2)
    rows = sensitivity.sensitivity_scan(str(away / "trainval.prototxt"), weights, tmp_path / "s", config,
                                        test_source=os.path.join(folder, "val_lmdb"))
    assert [(r["layer"], r["density"]) for r in rows] == [("(none)", 1.0), ("conv1", 0.2), ("conv1", 1.0),
                                                          ("conv_final", 0.2), ("conv_final", 1.0)]
    base = rows[0]
    for r in rows[1:]:
        if r["density"] == 1.0:  # nothing pruned, same batches: exactly the unpruned outputs
            assert r["loss"] == base["loss"] and r["accuracy"] == base["accuracy"]
    assert sorted(os.listdir(tmp_path / "s")) == sorted(sensitivity.FILES)
    header, first = open(tmp_path / "s" / "sensitivity.csv").read().splitlines()[:2]
    assert header.split(",") == ["layer", "density", "accuracy", "accuracy_top1", "accuracy_top5", "loss",
                                 "above_current"]
    assert all(len(v.split(".")[1]) == 4 for v in first.split(",")[1:-1])  # 4 decimals for people; JSON keeps all
    assert first.split(",")[-1] == "False"
    scan = fileio.read_json(tmp_path / "s" / "sensitivity.json")
    assert scan["rows"][0]["loss"] == base["loss"]
    assert scan["inputs"] == {"model": str(away / "trainval.prototxt"), "weights": training.file_record(weights),
                              "test_source": os.path.join(folder, "val_lmdb"), "iterations": 2, "batch": 4,
                              "images": 8, "lmdb_images": 8, "densities": [0.2, 1.0],
                              "layers": ["conv1", "conv_final"]}
    with pytest.raises(UserError, match="unknown layer"):
        sensitivity.sensitivity_scan(model, weights, tmp_path / "t", sensitivity.ScanConfig(layers=("nope",)))
    assert not os.path.exists(tmp_path / "t")


def test_sensitivity_heatmap_marks_the_densities_that_keep_accuracy():
    """The heat map outlines each cell at or above the unpruned top-1 and hatches each above_current cell, with one
    legend line per kind of mark shown (the figure's patches and legend, not its pixels)."""
    from dsd_caffe import plots

    acc, base = [[0.5, 0.8, 0.8], [0.81, 0.7, 0.8]], 0.8
    above = [[False, False, True], [False, False, True]]
    keeps, hatched = plots.KEEPS[0], plots.ABOVE[0]
    marks = plots.sensitivity_marks(acc, base, above)
    assert {k: v.tolist() for k, v in marks.items()} == {keeps: [[False, True, True], [True, False, True]],
                                                        hatched: above}
    ax = plots.sensitivity_figure(["a", "b"], [0.2, 0.5, 1.0], acc, base, above).axes[0]
    drawn = sorted((p.get_label(), p.get_xy(), p.get_hatch(), p.get_fill()) for p in ax.patches)
    assert drawn == sorted([(keeps, (0.5, -0.5), None, False), (keeps, (1.5, -0.5), None, False),
                            (keeps, (-0.5, 0.5), None, False), (keeps, (1.5, 0.5), None, False),
                            (hatched, (1.5, -0.5), "//", False), (hatched, (1.5, 0.5), "//", False)])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [keeps, hatched]
    plain = plots.sensitivity_figure(["a", "b"], [0.2, 0.5, 1.0], acc, 0.9).axes[0]
    assert not plain.patches and plain.get_legend() is None


def test_sensitivity_names_the_lmdb_that_is_missing(setup, tmp_path):
    """Only the TEST LMDB is read: with --test-source given, an absent TRAIN LMDB is not an error; without it, the
    error names the TEST source (not the TRAIN one); a --test-source that is absent is the one named."""
    folder, model, weights = setup
    away = tmp_path / "evalbox"
    away.mkdir()
    shutil.copy(model, away / "trainval.prototxt")  # names train_lmdb and val_lmdb: absent beside it and in cwd
    common = ("--weights", weights, "--layers", "conv1", "--densities", "0.5", "--iterations", 1)
    r = tool("sensitivity", "--model", away / "trainval.prototxt", *common, "--output", tmp_path / "s",
             "--test-source", os.path.join(folder, "val_lmdb"), cwd=tmp_path)
    assert r.returncode == 0 and "train_lmdb" not in r.stderr, r.stderr[-2000:]
    r = tool("sensitivity", "--model", away / "trainval.prototxt", *common, "--output", tmp_path / "t", cwd=tmp_path)
    assert (r.returncode, r.stderr.splitlines()) == (2, [
        "sensitivity.py: error: Data layer 'data' (TEST): data source val_lmdb not found (looked beside the "
        f"prototxt in {away} and in the current folder)"])
    r = tool("sensitivity", "--model", model, *common, "--output", tmp_path / "u", "--test-source",
             tmp_path / "nope_lmdb", cwd=tmp_path)
    assert (r.returncode, r.stderr.splitlines()) == (2, [
        f"sensitivity.py: error: Data layer 'data' (TEST): data source {tmp_path / 'nope_lmdb'} not found (looked "
        "in the current folder)"])
    assert not any(os.path.exists(tmp_path / o) for o in "tu")


def test_sensitivity_marks_densities_above_a_pruned_layers_current_one(setup, pruned, tmp_path):
    """A layer pruned to ~1/3 cannot be pruned to 0.5: such rows are flagged above_current (in the rows, the CSV,
    the JSON, and with * and a note in the tool's table), and they are exactly the unpruned outputs."""
    from dsd_caffe import sensitivity

    folder, model, _ = setup
    weights = os.path.join(pruned[0], phases.PRUNED)
    r = tool("sensitivity", "--model", model, "--weights", weights, "--output", tmp_path / "s", "--densities",
             "0.2,0.5,1", "--iterations", 1)
    assert r.returncode == 0, r.stderr[-2000:]
    scan = fileio.read_json(tmp_path / "s" / "sensitivity.json")
    rows, w = scan["rows"], masks.weight_arrays(weights)
    names = netgen.weighted_layers(fileio.read_net_prototxt(model))
    assert scan["current_density"] == {n: pruning.density(w[n]) for n in names}
    assert scan["notes"] == {"above_current": sensitivity.ABOVE_CURRENT}
    assert [(x["layer"], x["density"]) for x in rows] == [("(none)", 1.0)] + [(n, d) for n in names
                                                                              for d in (0.2, 0.5, 1.0)]
    for x in rows[1:]:
        want = pruning.kept_count(w[x["layer"]].size, x["density"]) > np.count_nonzero(w[x["layer"]])
        assert x["above_current"] is bool(want), x
        if want:  # nothing pruned, same batches: the unpruned outputs exactly
            assert {k: v for k, v in x.items() if k not in ("layer", "density")} == dict(
                {k: v for k, v in rows[0].items() if k not in ("layer", "density")}, above_current=True)
    marked = {(x["layer"], x["density"]) for x in rows if x["above_current"]}
    pruned_layers = [n for n in names if scan["current_density"][n] < 0.4]
    assert pruned_layers and {(n, d) for n in pruned_layers for d in (0.5, 1.0)} <= marked
    assert all(x["layer"] in pruned_layers for x in rows if x["above_current"])
    assert not rows[0]["above_current"]
    csv_rows = [l.split(",") for l in open(tmp_path / "s" / "sensitivity.csv").read().splitlines()[1:]]
    assert [c[-1] for c in csv_rows] == [str(x["above_current"]) for x in rows]
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["layer", "density", "accuracy"] and lines[-1] == f"* {sensitivity.ABOVE_CURRENT}"
    assert [l.endswith(" *") for l in lines[1:-1]] == [x["above_current"] for x in rows]


def test_sensitivity_warns_when_it_reads_the_lmdb_around_again(setup, tmp_path, caplog):
    from dsd_caffe import sensitivity

    folder, model, weights = setup
    sensitivity.sensitivity_scan(model, weights, tmp_path / "s", sensitivity.ScanConfig(
        densities=(0.5,), layers=("conv1",), iterations=3))
    assert (f"the TEST LMDB {os.path.join(folder, 'val_lmdb')} holds 8 images, fewer than the 12 the scan reads "
            "(3 batches of 4)") in caplog.text
    assert fileio.read_json(tmp_path / "s" / "sensitivity.json")["inputs"]["images"] == 12


def test_sensitivity_tool_scans_the_densities_given_and_prints_a_header(setup, tmp_path):
    folder, model, weights = setup
    r = tool("sensitivity", "--model", model, "--weights", weights, "--output", tmp_path / "s", "--layers",
             "conv1", "--densities", "0.5", "--iterations", 1)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["layer", "density", "accuracy"]
    assert [l.split()[:2] for l in lines[1:]] == [["(none)", "1.00"], ["conv1", "0.50"]]  # not the defaults too
