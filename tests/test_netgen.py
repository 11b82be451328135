"""netgen: the generated SqueezeNet v1.0 equals the DSD release, loads in real Caffe with the expected shapes,
moves weights between namings, runs under `caffe test`, and tools/generate.py reproduces the committed files."""
import os
import subprocess

import numpy as np
import pytest
from google.protobuf import text_format

from helpers import DC_DEPLOY, DSD_TRAINVAL, shared_file
from dsd_caffe import netgen, repogen
from dsd_caffe.caffe_env import caffe_binary, import_caffe
from dsd_caffe.fileio import read_caffemodel, read_net_prototxt, write_caffemodel, write_prototxt
from dsd_caffe.errors import OutputExists, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF_SOURCES = dict(train_source="/ssd/dataset/ilsvrc12_train_lmdb/", test_source="/ssd/dataset/ilsvrc12_val_lmdb/")

# DeepScale's SqueezeNet_v1.0/train_val.prototxt names, written out by hand as the known answer.
DEEPSCALE_FIRE2 = ["fire2/squeeze1x1", "fire2/relu_squeeze1x1", "fire2/expand1x1", "fire2/relu_expand1x1",
                   "fire2/expand3x3", "fire2/relu_expand3x3", "fire2/concat"]
DEEPSCALE_HEAD = ["drop9", "conv10", "relu_conv10", "pool10"]


def _diff(a, b):
    import difflib

    return "\n".join(difflib.unified_diff(text_format.MessageToString(a).splitlines(),
                                          text_format.MessageToString(b).splitlines(), lineterm="", n=2))


def _write(tmp_path, name, net):
    path = str(tmp_path / name)
    write_prototxt(path, net)
    return path


def test_han_equals_the_dsd_release():
    ref = read_net_prototxt(shared_file(DSD_TRAINVAL))
    net = netgen.squeezenet_v1_0("han", **REF_SOURCES)
    assert net == ref, _diff(ref, net)
    # the same message field by field, serialised
    assert net.SerializeToString(deterministic=True) == ref.SerializeToString(deterministic=True)


def test_any_change_is_caught():
    ref = read_net_prototxt(shared_file(DSD_TRAINVAL))
    for kw in (dict(test_batch=25), dict(mirror=False), dict(crop_size=224), dict(mean_values=(104, 117, 124))):
        assert netgen.squeezenet_v1_0("han", **REF_SOURCES, **kw) != ref, kw


def test_han_deploy_equals_the_deep_compression_deploy_layers():
    ref = read_net_prototxt(shared_file(DC_DEPLOY))
    d = netgen.deploy(netgen.squeezenet_v1_0("han"))
    assert d.layer[0].type == "Input" and list(d.layer[0].input_param.shape[0].dim) == list(ref.input_dim)
    assert list(d.layer[1:-1]) == list(ref.layer)
    assert (d.layer[-1].name, d.layer[-1].type, list(d.layer[-1].bottom)) == ("prob", "Softmax", ["pool_final"])


def test_deepscale_is_han_renamed():
    han, ds = netgen.squeezenet_v1_0("han"), netgen.squeezenet_v1_0("deepscale")
    names = [l.name for l in ds.layer]
    assert names[names.index("fire2/squeeze1x1"):names.index("fire3/squeeze1x1")] == DEEPSCALE_FIRE2
    assert names[-7:-3] == DEEPSCALE_HEAD
    assert netgen.weighted_layers(ds)[-1] == "conv10" and len(netgen.weighted_layers(ds)) == 26
    renamed = netgen.rename_weights(han, "han", "deepscale")
    renamed.name = ds.name
    assert renamed == ds, _diff(ds, renamed)
    back = netgen.rename_weights(ds, "deepscale", "han")
    assert back == han


def test_rename_map_and_detect_naming():
    fwd, bwd = netgen.rename_map("han", "deepscale"), netgen.rename_map("deepscale", "han")
    assert {v: k for k, v in fwd.items()} == bwd
    assert fwd["conv_final"] == "conv10" and fwd["fire9/conv3x3_2"] == "fire9/expand3x3"
    assert fwd["pool_final"] == "pool10" and "conv1" not in fwd
    assert netgen.rename_map("han", "han") == {}
    assert netgen.detect_naming(netgen.squeezenet_v1_0("han")) == "han"
    assert netgen.detect_naming([l.name for l in netgen.squeezenet_v1_0("deepscale").layer]) == "deepscale"
    assert netgen.detect_naming(["ip1", "ip2"]) is None
    assert netgen.detect_naming(["conv_final", "conv10"]) is None
    with pytest.raises(UserError, match="naming"):
        netgen.squeezenet_v1_0("caffenet")
    with pytest.raises(UserError, match="han-named"):
        netgen.rename_weights(netgen.squeezenet_v1_0("deepscale"), "han", "deepscale")


SQUEEZENET_SHAPES = {"data": (2, 3, 227, 227), "conv1": (2, 96, 111, 111), "pool1": (2, 96, 55, 55),
                     "fire2/concat": (2, 128, 55, 55), "pool4": (2, 256, 27, 27), "fire8/concat": (2, 512, 27, 27),
                     "pool8": (2, 512, 13, 13), "fire9/concat": (2, 512, 13, 13), "pool_final": (2, 1000, 1, 1)}


@pytest.mark.parametrize("naming", netgen.NAMINGS)
def test_squeezenet_loads_train_and_test_with_expected_shapes(naming, tiny_lmdb, tmp_path):
    caffe = import_caffe()
    lmdb = tiny_lmdb(n=2, channels=3, size=227, classes=1000)
    net = netgen.squeezenet_v1_0(naming, lmdb, lmdb, train_batch=2, test_batch=2)
    path = _write(tmp_path, "trainval.prototxt", net)
    final = "conv_final" if naming == "han" else "conv10"
    pool = "pool_final" if naming == "han" else "pool10"
    for phase in (caffe.TRAIN, caffe.TEST):
        n = caffe.Net(path, phase)
        shapes = {k: tuple(v.data.shape) for k, v in n.blobs.items()}
        expect = dict(SQUEEZENET_SHAPES)
        expect[pool] = expect.pop("pool_final")
        for blob, shape in expect.items():
            assert shapes[blob] == shape, blob
        assert shapes[final] == (2, 1000, 15, 15)  # the 1x1 conv with pad 1: 13x13 -> 15x15
        assert set(n.outputs) == {"loss", "accuracy_top1", "accuracy_top5"}
        assert list(n.params) == netgen.weighted_layers(net)
    assert n.params["conv1"][0].data.shape == (96, 3, 7, 7)


def _random_weights(net, seed):
    rng = np.random.default_rng(seed)
    for name in net.params:
        for blob in net.params[name]:
            blob.data[...] = rng.normal(0, 0.05, blob.data.shape)


@pytest.mark.parametrize("src,dst", [("han", "deepscale"), ("deepscale", "han")])
def test_weights_move_between_namings_with_identical_outputs(src, dst, tmp_path):
    caffe = import_caffe()
    shape = (1, 3, 99, 99)  # smaller than 227 to keep it fast; every layer still runs
    src_proto = _write(tmp_path, "src.prototxt", netgen.deploy(netgen.squeezenet_v1_0(src), shape))
    dst_proto = _write(tmp_path, "dst.prototxt", netgen.deploy(netgen.squeezenet_v1_0(dst), shape))
    a = caffe.Net(src_proto, caffe.TEST)
    _random_weights(a, 1)
    a.save(str(tmp_path / "src.caffemodel"))
    moved = netgen.rename_weights(read_caffemodel(tmp_path / "src.caffemodel"), src, dst)
    write_caffemodel(tmp_path / "dst.caffemodel", moved)
    b = caffe.Net(dst_proto, str(tmp_path / "dst.caffemodel"), caffe.TEST)
    mapping = netgen.rename_map(src, dst)
    for name in a.params:
        for x, y in zip(a.params[name], b.params[mapping.get(name, name)]):
            np.testing.assert_array_equal(x.data, y.data)
    x = np.random.default_rng(2).uniform(-100, 100, shape).astype(np.float32)
    a.blobs["data"].data[...] = x
    b.blobs["data"].data[...] = x
    pa, pb = a.forward()["prob"].copy(), b.forward()["prob"].copy()
    np.testing.assert_array_equal(pa, pb)
    # without the rename the fire layers keep their fillers: outputs differ
    c = caffe.Net(dst_proto, str(tmp_path / "src.caffemodel"), caffe.TEST)
    c.blobs["data"].data[...] = x
    assert not np.array_equal(c.forward()["prob"], pa)


@pytest.mark.parametrize("channels,size,pool2", [(1, 28, 7), (3, 32, 8)])
def test_small_squeezenet_loads_with_expected_shapes(channels, size, pool2, tiny_lmdb, tmp_path):
    caffe = import_caffe()
    lmdb = tiny_lmdb(n=8, channels=channels, size=size)
    net = netgen.small_squeezenet(lmdb, lmdb, channels=channels, size=size, train_batch=4, test_batch=4)
    path = _write(tmp_path, "small.prototxt", net)
    for phase in (caffe.TRAIN, caffe.TEST):
        n = caffe.Net(path, phase)
        assert n.blobs["data"].data.shape == (4, channels, size, size)
        assert n.blobs["conv1"].data.shape == (4, 16, size // 2, size // 2)
        assert n.blobs["pool2"].data.shape == (4, 32, pool2, pool2)
        assert n.blobs["pool_final"].data.shape == (4, 10, 1, 1)
        assert set(n.outputs) == {"loss", "accuracy_top1", "accuracy_top5"}
        out = n.forward()
        assert 0 <= out["accuracy_top1"] <= out["accuracy_top5"] <= 1
        assert -0.5 <= n.blobs["data"].data.min() and n.blobs["data"].data.max() < 0.5  # (pixel - 128) / 256
    d = netgen.deploy(net)
    assert list(d.layer[0].input_param.shape[0].dim) == [1, channels, size, size]


def test_small_squeezenet_params_and_width():
    assert netgen.param_count(netgen.small_squeezenet()) == netgen.SMALL_PARAMS == 15770
    assert netgen.param_count(netgen.small_squeezenet(width=2.0)) > 3 * netgen.SMALL_PARAMS
    net = netgen.small_squeezenet(num_classes=7, width=0.5)
    convs = {l.name: l.convolution_param.num_output for l in net.layer if l.type == "Convolution"}
    assert convs["conv1"] == 8 and convs["fire5/conv3x3_2"] == 16 and convs["conv_final"] == 7
    tp = net.layer[0].transform_param
    assert tp.scale == pytest.approx(1 / 256) and tp.crop_size == 28 and list(tp.mean_value) == [128]
    for bad in (dict(width=0), dict(width="1"), dict(num_classes=0), dict(channels=1.5), dict(size=4),
                dict(scale=-1), dict(train_batch=True)):
        with pytest.raises(UserError):
            netgen.small_squeezenet(**bad)


def test_deploy_drops_every_data_layer_type():
    """Every data layer of caffefacts.DATA_TYPES gives way to the Input layer (an HDF5Data layer was kept)."""
    from dsd_caffe import caffefacts

    expected = netgen.deploy(netgen.small_squeezenet())
    for kind in caffefacts.DATA_TYPES:
        net = netgen.small_squeezenet()
        for layer in net.layer:
            if layer.type == "Data":
                layer.type = kind
        assert netgen.deploy(net) == expected, kind


def test_deploy_and_set_data_sources_errors():
    net = netgen.small_squeezenet("a", "b")
    netgen.set_data_sources(net, train="x_lmdb", test="y_lmdb")
    assert [l.data_param.source for l in net.layer if l.type == "Data"] == ["x_lmdb", "y_lmdb"]
    d = netgen.deploy(net)
    with pytest.raises(UserError, match="Data layer"):
        netgen.set_data_sources(d, train="x")
    with pytest.raises(TypeError):
        netgen.deploy("trainval.prototxt")
    nocrop = netgen.squeezenet_v1_0("han", mean_values=())
    with pytest.raises(UserError, match="input_shape"):
        netgen.deploy(nocrop)
    assert list(netgen.deploy(nocrop, (2, 3, 64, 64)).layer[0].input_param.shape[0].dim) == [2, 3, 64, 64]
    with pytest.raises(UserError, match="mean_values"):
        netgen.squeezenet_v1_0("han", mean_values=(1, 2))


def _caffe_test(model, iterations, cwd=None):
    caffe = import_caffe()
    weights = model + ".caffemodel"
    caffe.Net(model, caffe.TEST).save(weights)  # the fillers' weights: `caffe test` needs a caffemodel
    env = dict(os.environ, GLOG_minloglevel="0", OMP_NUM_THREADS="1")
    r = subprocess.run([caffe_binary(), "test", "-model", model, "-weights", weights, "-iterations",
                        str(iterations)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stderr


def test_caffe_test_runs_on_generated_trainvals(tiny_lmdb, tmp_path):
    small = tiny_lmdb(n=20, name="small")
    path = _write(tmp_path, "small.prototxt", netgen.small_squeezenet(small, small, test_batch=10))
    log = _caffe_test(path, 2)
    for out in ("accuracy_top1 =", "accuracy_top5 =", "loss ="):
        assert out in log
    big = tiny_lmdb(n=2, channels=3, size=227, classes=1000, name="big")
    path = _write(tmp_path, "han.prototxt", netgen.squeezenet_v1_0("han", big, big, test_batch=2))
    log = _caffe_test(path, 1)
    assert "accuracy_top5 =" in log and "loss =" in log


def test_generate_reproduces_the_committed_files(tmp_path):
    result = repogen.generate(tmp_path)
    assert set(result.values()) == {"written"}
    for rel in result:
        with open(os.path.join(ROOT, rel), "rb") as f, open(tmp_path / rel, "rb") as g:
            assert f.read() == g.read(), f"{rel} differs from a fresh generation: run tools/generate.py"
        text = (tmp_path / rel).read_text()
        assert "/work/" not in text and "/tmp" not in text and str(tmp_path) not in text
    # committed files parse and the Han trainval is the release's net with our sources
    han = read_net_prototxt(os.path.join(ROOT, "models/squeezenet_v1.0/trainval_han.prototxt"))
    assert han == netgen.set_data_sources(read_net_prototxt(shared_file(DSD_TRAINVAL)), *repogen.IMAGENET_SOURCES)
    # again: nothing changes; a changed file is refused without force, rewritten with it
    assert set(repogen.generate(tmp_path).values()) == {"unchanged"}
    target = tmp_path / "models/squeezenet_v1.0/deploy_han.prototxt"
    target.write_text("# edited\n")
    with pytest.raises(OutputExists, match="deploy_han"):
        repogen.generate(tmp_path)
    assert repogen.generate(tmp_path, force=True)["models/squeezenet_v1.0/deploy_han.prototxt"] == "written"
    assert target.read_text().startswith(repogen.HEADER)


def test_generate_tool_cli(tmp_path):
    import sys

    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "generate.py"), "-o", str(tmp_path),
                        "--no-small"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "solvers/squeezenet_v1.0/dense_solver.prototxt").exists()
    assert not (tmp_path / "models/small_squeezenet").exists()
    (tmp_path / "models/squeezenet_v1.0/deploy_han.prototxt").write_text("x")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "generate.py"), "-o", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--force" in r.stderr


def test_committed_deploy_nets_load_in_both_phases():
    caffe = import_caffe()
    for rel in sorted(repogen.generated_files()):
        if "/deploy" not in rel:
            continue
        path = os.path.join(ROOT, rel)
        for phase in (caffe.TRAIN, caffe.TEST):
            n = caffe.Net(path, phase)
            assert n.outputs == ["prob"], rel
            classes = 1000 if "squeezenet_v1.0" in rel else 10
            assert n.blobs["prob"].data.shape == (1, classes, 1, 1), rel
