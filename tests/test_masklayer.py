"""The mask layer keeps pruned weights at exactly 0.0 under real Caffe: the `caffe train` binary and pycaffe's
Solver, momentum 0.9, weight decay, iter_size 2, across a snapshot and a resume; masks live in the caffemodel."""
import os

import numpy as np
import pytest

from dsd_caffe import fileio, masks, phases, sources, training
from dsd_caffe.caffeproto import caffe_pb2
from dsd_caffe.solvers import Schedule
from helpers import copy_beside, small_setup
from dsd_caffe.errors import UserError

caffe = pytest.importorskip("caffe")


# ------------------------------------------------------------------------------------------ blobs
def test_blob_array_reads_every_shape_as_caffe_does():
    """Blob::FromProto's rule: the legacy 4-d fields when any is set, else shape.dim; no dims at all is a scalar
    (a shapeless blob was read as (0, 0, 0, 0) and failed)."""
    pb2 = caffe_pb2()
    scalar = masks.blob_array(pb2.BlobProto(data=[2.5]))
    assert scalar.shape == () and scalar.dtype == np.float32 and scalar == 2.5
    assert masks.blob_array(pb2.BlobProto(data=[2.5], shape=pb2.BlobShape())).shape == ()
    shaped = masks.blob_array(pb2.BlobProto(data=range(6), shape=pb2.BlobShape(dim=[2, 3])))
    assert shaped.shape == (2, 3) and shaped.tolist() == [[0, 1, 2], [3, 4, 5]]
    legacy = masks.blob_array(pb2.BlobProto(data=range(6), num=1, channels=2, height=1, width=3))
    assert legacy.shape == (1, 2, 1, 3) and legacy.ravel().tolist() == list(range(6))


# ------------------------------------------------------------------------------------------ packed masks
@pytest.mark.parametrize("shape", [(1,), (15,), (16,), (17,), (3, 5, 7), (64, 16, 3, 3)])
def test_pack_roundtrip(shape):
    rng = np.random.default_rng(sum(shape))
    m = rng.random(shape) < 0.4
    packed = masks.pack_mask(m)
    assert packed.dtype == np.float32 and packed.size == masks.packed_length(m.size)
    assert packed[0] == 1.0 and np.all(packed[1:] == np.round(packed[1:])) and packed[1:].max(initial=0) <= 65535
    np.testing.assert_array_equal(masks.unpack_mask(packed, shape), m)


def test_unpack_refuses_bad_blobs():
    m = np.ones((4, 8), bool)
    p = masks.pack_mask(m)
    with pytest.raises(UserError, match="does not fit"):
        masks.unpack_mask(p, (4, 9))
    with pytest.raises(UserError, match="not set"):
        masks.unpack_mask(np.zeros_like(p), (4, 8))
    bad = p.copy()
    bad[1] = 0.5
    with pytest.raises(UserError, match="not packed mask bits"):
        masks.unpack_mask(bad, (4, 8))


def test_param_str_is_json_and_checked():
    assert masks.parse_param_str('{"layers": [{"name": "c", "shape": [2, 3]}]}') == [("c", (2, 3))]
    for bad in ("", "{layers: 1}", '{"layers": []}', '{"layers": [{"name": "c", "shape": [0]}]}'):
        with pytest.raises(UserError, match="param_str"):
            masks.parse_param_str(bad)


# ------------------------------------------------------------------------------------------ a pruned small net
@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A folder written by phases.prune: 3x, momentum 0.9, weight decay 0.01, iter_size 2, 6 iterations,
    snapshots every 2."""
    folder = str(tmp_path_factory.mktemp("masklayer"))
    model, weights = small_setup(folder)
    out = os.path.join(folder, "pruned")
    phases.prune(phases.Inputs(model, weights), out, phases.PruneConfig(ratio="3x"),
                 Schedule(max_iter=6, snapshot=2, base_lr=0.05, iter_size=2, weight_decay=0.01, momentum=0.9))
    return out


def sparse_net(folder):
    return sources.absolute_sources(fileio.read_net_prototxt(os.path.join(folder, phases.SPARSE_NET)), folder)


def check_snapshots(folder, expect_iters):
    kept = masks.load_masks(os.path.join(folder, phases.MASKS))
    start = masks.weight_arrays(os.path.join(folder, phases.PRUNED))
    snaps = training.snapshots(os.path.join(folder, "snapshots"), "sparse")
    assert sorted(s.iteration for s in snaps) == expect_iters
    for snap in snaps:
        w = masks.weight_arrays(snap.caffemodel)
        back = masks.read_masks(snap.caffemodel)
        for name, m in kept.items():
            assert np.all(w[name][~m] == 0.0) and not np.signbit(w[name][~m]).any(), (snap, name)  # +0.0 exactly
            np.testing.assert_array_equal(back[name], m)
            assert np.count_nonzero(w[name]) == np.count_nonzero(m), (snap, name)  # survivors stay non-zero
        changed = sum(not np.array_equal(w[n], start[n]) for n in kept)
        assert changed == len(kept), f"iteration {snap.iteration}: survivors of some layers did not train"


@pytest.mark.parametrize("engine", ["binary", "pycaffe"])
def test_pruned_weights_stay_zero_through_snapshot_and_resume(pruned, tmp_path, engine):
    run = copy_beside(pruned, "run-" + tmp_path.name)
    sp = fileio.read_solver_prototxt(os.path.join(run, phases.SPARSE_SOLVER))
    assert sp.momentum == pytest.approx(0.9) and sp.weight_decay > 0 and sp.iter_size == 2
    job = training.Job(run, "sparse", phases.SPARSE_SOLVER, sp, phases.SPARSE_NET,
                       fileio.read_net_prototxt(os.path.join(run, phases.SPARSE_NET)),
                       os.path.join(run, phases.PRUNED))
    training.train(job, engine)
    check_snapshots(run, [2, 4, 6])
    # a kill after the iteration-4 snapshot: the resume from its .solverstate (momentum history) redoes 5 and 6
    for ext in (".caffemodel", ".solverstate"):
        os.unlink(os.path.join(run, "snapshots", f"sparse_iter_6{ext}"))
    training.train(job, engine)
    check_snapshots(run, [2, 4, 6])


def test_train_sparse_writes_checked_model(pruned, tmp_path):
    run = copy_beside(pruned, "run-" + tmp_path.name)
    final = phases.train_sparse(run, engine="pycaffe")
    prov = fileio.read_json(fileio.sidecar_path(final))
    assert prov["phase"] == "sparse" and prov["iteration"] == 6
    kept = masks.load_masks(os.path.join(run, phases.MASKS))
    for name, m in kept.items():
        assert prov["density"][name] == pytest.approx(m.mean())


def test_backward_masks_diffs_and_forward_zeroes_weights(pruned, tmp_path):
    from dsd_caffe.caffe_env import make_net

    net = make_net(sparse_net(pruned), "TRAIN", weights=os.path.join(pruned, phases.PRUNED))
    kept = masks.read_masks(net)
    assert set(kept) == set(masks.load_masks(os.path.join(pruned, phases.MASKS)))
    name = "fire2/conv3x3_2"
    w = net.params[name][0]
    w.data[~kept[name]] = 1.0  # a pruned weight revived behind Caffe's back
    net.forward()
    assert np.all(w.data[~kept[name]] == 0.0)
    net.backward()
    for layer, m in kept.items():
        diff = net.params[layer][0].diff
        assert np.all(diff[~m] == 0.0), layer
        assert np.count_nonzero(diff[m]) > 0, layer  # the mask layer's backward ran after the conv's


def test_unset_masks_are_refused(pruned):
    from dsd_caffe.caffe_env import make_net

    net = make_net(sparse_net(pruned), "TRAIN")  # no weights: masks never loaded
    with pytest.raises(UserError, match="mask blob is not set"):
        net.forward()


def test_masks_come_back_from_the_caffemodel_and_any_net(pruned):
    kept = masks.load_masks(os.path.join(pruned, phases.MASKS))
    back = masks.read_masks(os.path.join(pruned, phases.PRUNED))
    assert list(back) == list(kept)
    for k in kept:
        np.testing.assert_array_equal(back[k], kept[k])
    rep = masks.sparsity_report(os.path.join(pruned, phases.PRUNED))
    assert rep["total"]["density"] == pytest.approx(1 / 3, abs=0.002)
    table = str(rep).splitlines()
    assert table[0].split() == ["layer", "nonzero", "weights", "density"] and table[-1].startswith("total")
    with pytest.raises(UserError, match="no mask layer"):
        masks.read_masks(os.path.join(os.path.dirname(pruned), "dense.caffemodel"))
    # the TEST net that dsd_caffe.load returns has no mask layer (it is TRAIN-only): the error names the caffemodel
    import dsd_caffe

    cwd = os.getcwd()
    try:
        os.chdir("/")  # load() resolves the trainval's sources beside it, from any folder
        test_net = dsd_caffe.load(os.path.join(pruned, phases.SPARSE_NET), weights=os.path.join(pruned,
                                                                                                   phases.PRUNED))
    finally:
        os.chdir(cwd)
    with pytest.raises(UserError, match=r"TRAIN phase only.*read_masks\('.*pruned.caffemodel'\)"):
        masks.read_masks(test_net)


def test_mask_that_does_not_fit_is_refused(pruned):
    net = fileio.read_net_prototxt(os.path.join(pruned, phases.SPARSE_NET))
    model = fileio.read_caffemodel(os.path.join(os.path.dirname(pruned), "dense.caffemodel"))
    kept = masks.load_masks(os.path.join(pruned, phases.MASKS))
    kept["conv1"] = kept["conv1"][:, :, :2, :]
    with pytest.raises(UserError, match="conv1.*does not fit the net"):
        masks.add_masks_to_caffemodel(model, kept, net)


def test_caffemodel_size_overhead(pruned):
    """Known answer: Caffe writes a shared blob under every layer using it, so a sparse-phase caffemodel holds the
    masked weights twice, plus 1/16 of their size for the packed masks: about 2.06x the dense caffemodel."""
    dense = os.path.getsize(os.path.join(os.path.dirname(pruned), "dense.caffemodel"))
    sparse = os.path.getsize(os.path.join(pruned, phases.PRUNED))
    assert 1.9 < sparse / dense < 2.2


def test_train_sparse_refuses_masks_that_do_not_fit(pruned, tmp_path):
    import json

    run = copy_beside(pruned, "run-" + tmp_path.name)
    path = os.path.join(run, phases.SPARSE_NET)
    net = fileio.read_net_prototxt(path)
    layer = next(l for l in net.layer if masks.is_mask_layer(l))
    spec = json.loads(layer.python_param.param_str)
    spec["layers"][0]["shape"] = [16, 1, 5, 5]
    layer.python_param.param_str = json.dumps(spec)
    fileio.write_prototxt(path, net)
    with pytest.raises(UserError, match="mask of layer 'conv1'.*does not fit the net"):
        phases.train_sparse(run)


def test_a_revived_pruned_weight_is_named_in_one_line(pruned, tmp_path):
    """retrain_dense releases the masks of a caffemodel it has parsed already: the refusal names the file (not
    the parsed model's text)."""
    param = fileio.read_caffemodel(os.path.join(pruned, phases.PRUNED))
    kept = masks.read_masks(param)
    name = next(n for n, m in kept.items() if not m.all())
    layer = next(l for l in param.layer if l.name == name)
    layer.blobs[0].data[int(np.flatnonzero(~kept[name].ravel())[0])] = 1.0
    revived = str(tmp_path / "revived.caffemodel")
    fileio.write_caffemodel(revived, param)
    model = os.path.join(os.path.dirname(pruned), "trainval.prototxt")
    with pytest.raises(UserError) as e:
        phases.retrain_dense(phases.Inputs(model, revived), tmp_path / "r", Schedule(max_iter=2))
    assert str(e.value) == f"{revived}: 1 pruned weights of layer {name!r} are not 0.0"
    assert not os.path.exists(tmp_path / "r")
