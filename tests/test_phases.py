"""DSD's phases on the small net with tiny LMDBs: prune outputs, re-dense, the whole pipeline, kill and resume,
and clear errors for bad inputs."""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import write_tiny_lmdb
from dsd_caffe import fileio, masklayer, netgen, phases, pruning
from test_masklayer import small_setup

caffe = pytest.importorskip("caffe")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("phases"))
    model, weights = small_setup(folder)
    return folder, model, weights


@pytest.fixture(scope="module")
def pruned(setup):
    folder, model, weights = setup
    out = os.path.join(folder, "p3x")
    res = phases.prune(model, weights, out, ratio="3x", max_iter=4, snapshot=2, base_lr=0.05)
    return out, res


def test_prune_writes_everything(setup, pruned):
    folder, model, weights = setup
    out, res = pruned
    for f in (phases.PRUNED, phases.MASKS, phases.SPARSE_NET, phases.SPARSE_SOLVER, "weights_histogram.png",
              fileio.sidecar_path(phases.PRUNED)):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    with open(os.path.join(out, "weights_histogram.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    names = netgen.weighted_layers(fileio.read_net_prototxt(model))
    assert [r["name"] for r in res["rows"]] == names and "threshold" in res["table"].splitlines()[0]
    prov = fileio.read_json(fileio.sidecar_path(os.path.join(out, phases.PRUNED)))
    assert prov["phase"] == "prune" and prov["source"] == os.path.abspath(weights)
    dense = masklayer.weight_arrays(weights)
    masks = phases.load_masks(os.path.join(out, phases.MASKS))
    for name in names:
        assert prov["density"][name] == pytest.approx(pruning.kept_count(dense[name].size, 1 / 3) / dense[name].size)
        np.testing.assert_array_equal(masks[name], pruning.magnitude_mask(dense[name], 1 / 3))
        kept = np.abs(dense[name][masks[name]])
        assert kept.min() == pytest.approx(prov["thresholds"][name])
    net = fileio.read_net_prototxt(os.path.join(out, phases.SPARSE_NET))
    mask_layers = [l for l in net.layer if masklayer.is_mask_layer(l)]
    assert len(mask_layers) == 1 and mask_layers[0].include[0].phase == caffe.TRAIN
    assert [p.name for p in mask_layers[0].param[:len(names)]] == [f"{n}_w" for n in names]
    assert all(p.lr_mult == 0 and p.decay_mult == 0 for p in mask_layers[0].param[len(names):])
    for l in net.layer:  # sources relative to the prototxt's folder
        if l.type == "Data":
            assert not os.path.isabs(l.data_param.source)
            assert os.path.isdir(os.path.join(out, l.data_param.source))
    s = fileio.read_solver_prototxt(os.path.join(out, phases.SPARSE_SOLVER))
    assert s.net == phases.SPARSE_NET and s.max_iter == 4 and s.base_lr == pytest.approx(0.05)


def test_prune_skip_keeps_layer_dense(setup, tmp_path):
    folder, model, weights = setup
    res = phases.prune(model, weights, str(tmp_path / "p"), density="0.5", skip=["conv1", "conv_final"],
                       max_iter=1)
    assert res["densities"]["conv1"] == 1.0 and res["densities"]["conv_final"] == 1.0
    assert set(masklayer.read_masks(res["model"])) == set(res["densities"]) - {"conv1", "conv_final"}


def test_prune_refuses_bad_inputs(setup, pruned, tmp_path):
    folder, model, weights = setup
    out, _ = pruned
    with pytest.raises(FileExistsError, match="already holds a pruned model"):
        phases.prune(model, weights, out, ratio="3x")
    with pytest.raises(ValueError, match="accepted forms"):
        phases.prune(model, weights, str(tmp_path / "x"), ratio="1x")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError):
        phases.prune(model, weights, str(blocker / "out"), ratio="3x")
    # a caffemodel from another net: the first layer whose shape differs is named
    from dsd_caffe import netgen

    other = netgen.small_squeezenet("train_lmdb", "val_lmdb", width=2.0, train_batch=4, test_batch=4)
    fileio.write_prototxt(str(tmp_path / "other.prototxt"), phases.absolute_sources(other, folder))
    caffe.Net(str(tmp_path / "other.prototxt"), caffe.TEST).save(str(tmp_path / "other.caffemodel"))
    with pytest.raises(ValueError, match="'conv1'"):
        phases.prune(model, str(tmp_path / "other.caffemodel"), str(tmp_path / "y"), ratio="3x")
    assert not os.path.exists(tmp_path / "y" / phases.PRUNED)
    with pytest.raises(FileNotFoundError, match="not a folder written by tools/prune.py"):
        phases.train_sparse(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="data source .*nope not found"):
        phases.prune(model, weights, str(tmp_path / "z"), ratio="3x", train_source=str(tmp_path / "nope"))
    small = write_tiny_lmdb(tmp_path / "small_lmdb", np.zeros((2, 1, 8, 8)), [0, 1])
    with pytest.raises(ValueError, match="TRAIN.*smaller than the crop size 28"):
        phases.prune(model, weights, str(tmp_path / "z"), ratio="3x", train_source=small)
    truncated = tmp_path / "truncated.caffemodel"
    with open(weights, "rb") as f:
        truncated.write_bytes(f.read()[:1000])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        phases.prune(model, str(truncated), str(tmp_path / "z"), ratio="3x")
    with pytest.raises(ValueError, match="unknown profile"):
        phases.prune(model, weights, str(tmp_path / "z"), ratio="3x", profile="nope")
    assert not os.path.exists(tmp_path / "z" / phases.PRUNED)


def test_prune_tool_one_line_error(setup, tmp_path):
    folder, model, weights = setup
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "prune.py"), "--model", model, "--weights",
                        weights, "--output", str(tmp_path / "o"), "--ratio", "3x", "--density", "0.3"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prune.py: error:"), r.stderr


def test_retrain_dense_releases_masks(setup, pruned, tmp_path):
    folder, model, weights = setup
    src, _ = pruned
    run = os.path.join(folder, "sparse-" + tmp_path.name)
    shutil.copytree(src, run)
    sparse = phases.train_sparse(run, engine="pycaffe")
    masks = phases.load_masks(os.path.join(run, phases.MASKS))
    out = str(tmp_path / "dense")
    final = phases.retrain_dense(os.path.join(run, phases.SPARSE_NET), sparse, out, max_iter=3, engine="pycaffe")
    s = fileio.read_solver_prototxt(os.path.join(out, phases.DENSE_SOLVER))
    assert s.base_lr == pytest.approx(1e-4)
    net = fileio.read_net_prototxt(os.path.join(out, phases.DENSE_NET))
    assert not any(masklayer.is_mask_layer(l) for l in net.layer)
    # survivors start at their sparse-phase values, pruned weights at exactly 0.0
    abs_net = str(tmp_path / "abs.prototxt")
    fileio.write_prototxt(abs_net, phases.absolute_sources(net, out))
    start = caffe.Net(abs_net, caffe.TEST)
    start.copy_from(sparse)
    sw = masklayer.weight_arrays(sparse)
    for name, m in masks.items():
        np.testing.assert_array_equal(start.params[name][0].data, sw[name])
        assert np.all(start.params[name][0].data[~m] == 0.0)
    # after training, the killed weights have come back to life (in every layer; those feeding a dead ReLU get
    # no gradient, so not all of them)
    dw = masklayer.weight_arrays(final)
    for n, m in masks.items():
        assert np.count_nonzero(dw[n][~m]) > 0, n
    revived = sum(int(np.count_nonzero(dw[n][~m])) for n, m in masks.items())
    assert revived > 0.5 * sum(int((~m).sum()) for m in masks.values())
    prov = fileio.read_json(fileio.sidecar_path(final))
    assert prov["phase"] == "re-dense" and prov["iteration"] == 3
    with pytest.raises(FileExistsError, match="finished re-dense"):
        phases.retrain_dense(os.path.join(run, phases.SPARSE_NET), sparse, out, max_iter=3)


def dsd_args(setup, out, sparse_iters=30, cycles=1):
    folder, model, weights = setup
    return [sys.executable, os.path.join(ROOT, "tools", "dsd.py"), "--model", model, "--weights", weights,
            "--output", out, "--ratio", "3x", "--sparse-iters", str(sparse_iters), "--dense-iters", "4",
            "--snapshot", "2", "--sparse-lr", "0.05", "--test-iterations", "2", "--cycles", str(cycles)]


def test_dsd_pipeline_and_finished_run(setup, tmp_path):
    out = str(tmp_path / "dsd")
    r = subprocess.run(dsd_args(setup, out, sparse_iters=4, cycles=2), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    state = fileio.read_json(os.path.join(out, phases.STATE))
    assert state["finished"] and [p["name"] for p in state["phases"]] == [
        "dense", "cycle1-sparse", "cycle1-dense", "cycle2-sparse", "cycle2-dense"]
    assert state["final_model"] == os.path.join("cycle2-dense", phases.DENSE)
    # DSDSD: the second pruning starts from the first re-dense model
    prov = fileio.read_json(fileio.sidecar_path(os.path.join(out, "cycle2-sparse", phases.PRUNED)))
    assert prov["source"] == os.path.join(out, "cycle1-dense", phases.DENSE)
    assert all(p["accuracy"] is not None for p in state["phases"])
    assert state["phases"][1]["density"] == pytest.approx(1 / 3, abs=0.002)
    assert os.path.getsize(os.path.join(out, "accuracy.png")) > 0
    r = subprocess.run(dsd_args(setup, out, sparse_iters=4, cycles=2), capture_output=True, text=True)
    assert r.returncode == 2 and "finished DSD run" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_dsd_resumes_after_sigkill(setup, tmp_path):
    """Kill tools/dsd.py (SIGKILL, whole process group) at 5 random points, then run the same command again: it
    finishes, the masks equal those of an uninterrupted pruning, every sparse snapshot has exactly the pruned
    density, and no output file is truncated."""
    t = time.monotonic()
    subprocess.run(dsd_args(setup, str(tmp_path / "reference")), capture_output=True, check=True)
    whole = time.monotonic() - t  # kill points are fractions of an uninterrupted run: machines differ in speed
    out = str(tmp_path / "dsd")
    args = dsd_args(setup, out)
    rng = np.random.default_rng(0)
    kills = 0
    for delay in whole * rng.uniform(0.15, 0.9, size=5):
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
    assert kills >= 1
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode == 2 and "finished DSD run" in r.stderr:
        pass  # one of the runs got to the end before its kill
    else:
        assert r.returncode == 0, r.stderr[-2000:]
    assert fileio.read_json(os.path.join(out, phases.STATE))["finished"]
    folder, model, weights = setup
    dense = masklayer.weight_arrays(weights)
    masks = phases.load_masks(os.path.join(out, "cycle1-sparse", phases.MASKS))
    for name, m in masks.items():
        np.testing.assert_array_equal(m, pruning.magnitude_mask(dense[name], 1 / 3))
    snaps = os.path.join(out, "cycle1-sparse", "snapshots")
    assert phases.snapshots(snaps, "sparse")[0][0] == 30
    for it, _, snap in phases.snapshots(snaps, "sparse"):
        w = masklayer.weight_arrays(snap)
        for name, m in masks.items():
            assert np.count_nonzero(w[name]) == m.sum() and np.all(w[name][~m] == 0), (it, name)
        for name, m in masklayer.read_masks(snap).items():
            np.testing.assert_array_equal(m, masks[name])
    for root, _, files in os.walk(out):  # nothing truncated under a real name
        for f in files:
            path = os.path.join(root, f)
            if f.startswith("."):
                continue
            if f.endswith(".caffemodel"):
                fileio.read_caffemodel(path)
            elif f.endswith(".json"):
                fileio.read_json(path)
            elif f.endswith(".solverstate"):
                assert any(s[1] == path for s in phases.snapshots(root, f.split("_iter_")[0])), path


def test_dsd_refuses_other_settings_on_unfinished_run(setup, tmp_path):
    folder, model, weights = setup
    out = str(tmp_path / "dsd")
    os.makedirs(out)
    fileio.write_json(os.path.join(out, phases.STATE), {"config": {"cycles": 7}, "phases": [], "finished": False})
    with pytest.raises(ValueError, match="other settings"):
        phases.run_dsd(model, weights, out, ratio="3x")
    with pytest.raises(ValueError, match="--cycles"):
        phases.run_dsd(model, weights, str(tmp_path / "z"), ratio="3x", cycles=0)


def test_squeezenet_3x_profile_on_deepscale_naming(tmp_path):
    """--ratio 3x with squeezenet-3x on a SqueezeNet v1.0 caffemodel (DeepScale names): per-layer densities
    within 0.01 of the released sparse SqueezeNet, 0.334 +- 0.005 overall."""
    from dsd_caffe import netgen

    rng = np.random.default_rng(0)
    for name in ("train_lmdb", "val_lmdb"):
        write_tiny_lmdb(tmp_path / name, rng.integers(0, 256, (2, 3, 227, 227)), [0, 1])
    net = netgen.squeezenet_v1_0("deepscale", train_source="train_lmdb", test_source="val_lmdb", train_batch=1,
                                 test_batch=1)
    fileio.write_prototxt(str(tmp_path / "trainval.prototxt"), net)
    fileio.write_prototxt(str(tmp_path / "abs.prototxt"), phases.absolute_sources(net, str(tmp_path)))
    caffe.Net(str(tmp_path / "abs.prototxt"), caffe.TEST).save(str(tmp_path / "sq.caffemodel"))
    res = phases.prune(str(tmp_path / "trainval.prototxt"), str(tmp_path / "sq.caffemodel"), str(tmp_path / "p"),
                       ratio="3x", profile="squeezenet-3x", max_iter=1)
    ref = {pruning.deepscale_name(k): nz / total for k, (nz, total) in pruning.SQUEEZENET_3X.items()}
    assert set(res["densities"]) == set(ref)
    for name, d in res["densities"].items():
        assert abs(d - ref[name]) <= 0.01, name
    kept = sum(r["kept"] for r in res["rows"])
    assert abs(kept / sum(r["size"] for r in res["rows"]) - 0.334) <= 0.005


def test_sensitivity_same_batches_every_time(setup, tmp_path):
    folder, model, weights = setup
    rows = phases.sensitivity(model, weights, str(tmp_path / "s"), densities=(0.2, 1.0), layers=["conv1", "conv_final"],
                              iterations=2)
    assert [(r["layer"], r["density"]) for r in rows] == [("(none)", 1.0), ("conv1", 0.2), ("conv1", 1.0),
                                                          ("conv_final", 0.2), ("conv_final", 1.0)]
    base = rows[0]
    for r in rows[1:]:
        if r["density"] == 1.0:  # nothing pruned, same batches: exactly the unpruned outputs
            assert r["loss"] == base["loss"] and r["accuracy"] == base["accuracy"]
    with open(tmp_path / "s" / "sensitivity.csv") as f:
        assert f.readline().startswith("layer,density,accuracy")
    assert os.path.getsize(tmp_path / "s" / "sensitivity.png") > 0
    with pytest.raises(ValueError, match="unknown layer"):
        phases.sensitivity(model, weights, str(tmp_path / "t"), layers=["nope"])
    with pytest.raises(FileExistsError):
        phases.sensitivity(model, weights, str(tmp_path / "s"), layers=["conv1"])


def test_any_net_with_inner_product(tmp_path):
    """Not only SqueezeNet: a conv + fc net, pruned 2x, trained under the mask with pycaffe."""
    from google.protobuf import text_format

    from dsd_caffe.caffe_env import caffe_pb2

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
    fileio.write_prototxt(str(tmp_path / "abs.prototxt"), phases.absolute_sources(net, str(tmp_path)))
    caffe.Net(str(tmp_path / "abs.prototxt"), caffe.TRAIN).save(str(tmp_path / "w.caffemodel"))
    out = str(tmp_path / "p")
    phases.prune(str(tmp_path / "net.prototxt"), str(tmp_path / "w.caffemodel"), out, ratio="2x", max_iter=3,
                 base_lr=0.1)
    sparse_net = fileio.read_net_prototxt(os.path.join(out, phases.SPARSE_NET))
    mask = next(l for l in sparse_net.layer if masklayer.is_mask_layer(l))
    assert [(p.name, p.lr_mult, p.decay_mult) for p in mask.param[:2]] == [("c_w", 1, 1), ("ip_w", 2, 3)]
    final = phases.train_sparse(out, engine="pycaffe")
    w = masklayer.weight_arrays(final)
    for name, m in phases.load_masks(os.path.join(out, phases.MASKS)).items():
        assert np.all(w[name][~m] == 0) and m.mean() == 0.5


def test_num_classes_follows_the_loss_back_to_its_classifier():
    from dsd_caffe import netgen

    assert phases.num_classes(netgen.squeezenet_v1_0(naming="han")) == 1000
    assert phases.num_classes(netgen.squeezenet_v1_0(naming="deepscale", num_classes=7)) == 7
    assert phases.num_classes(netgen.small_squeezenet("a", "b", num_classes=10)) == 10
