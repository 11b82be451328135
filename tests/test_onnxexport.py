"""ONNX export (dsd_caffe.onnxexport, tools/export_onnx.py): every net through pycaffe and ONNX Runtime, compared.

Nets get random weights with a third of them exactly zero (seeded), so that the exact zeros are checked per
initializer too. Every export below runs the module's own parity check (refused past its tolerance); the tests
check its figures, the metadata, the JSON record and the zero counts against the caffemodel, read on its own.
"""
import json
import os

import numpy as np
import pytest

from dsd_caffe import fileio, masks, netgen, onnxexport
from dsd_caffe.caffe_env import make_net
from dsd_caffe.caffeproto import caffe_pb2
from dsd_caffe.errors import UserError
from helpers import DC_DEPLOY, DC_NET, REFERENCE, shared_file, tool

onnx = pytest.importorskip("onnx")
from onnx import numpy_helper  # noqa: E402

CAFFE_MODELS = os.path.join(REFERENCE, "caffe-models")


def randomize(net, seed=0):
    """Random weights, a third of them exactly 0.0; BatchNorm gets positive variances and a scale factor."""
    rng = np.random.default_rng(seed)
    for name, layer in zip(net._layer_names, net.layers):
        if name not in net.params:
            continue
        blobs = net.params[name]
        if layer.type == "BatchNorm":
            c = blobs[0].data.size
            blobs[0].data[...] = rng.standard_normal(c) * 3
            blobs[1].data[...] = rng.random(c) * 5 + 0.1
            blobs[2].data[...] = 0.0 if "zero" in name else 2.5  # Caffe divides the sums by this factor
            continue
        for b in blobs:
            fan_in = max(1, b.data[0].size) if b.data.ndim > 1 else 1
            v = np.array(rng.standard_normal(b.data.shape) / np.sqrt(fan_in), np.float32)
            v[np.asarray(rng.random(v.shape) < 1 / 3)] = 0.0
            b.data[...] = v


def random_caffemodel(net_param, path, seed=0, input_shape=None):
    net = make_net(onnxexport.deploy_param(net_param, input_shape), "TEST")
    randomize(net, seed)
    net.save(os.fspath(path))
    return os.fspath(path)


def exported(tmp_path, prototxt, seed=0, input_shape=None, **kw):
    """Export ``prototxt`` (a path, or a NetParameter written to tmp_path) with random weights; returns
    (result, caffemodel path, onnx path)."""
    if not isinstance(prototxt, (str, os.PathLike)):
        path = tmp_path / "net.prototxt"
        fileio.write_prototxt(path, prototxt)
        prototxt = path
    weights = random_caffemodel(fileio.read_net_prototxt(prototxt), tmp_path / "w.caffemodel", seed, input_shape)
    out = tmp_path / "model.onnx"
    result = onnxexport.export(prototxt, weights, out, input_shape=input_shape, **kw)
    return result, weights, out


def initializer_zeros(path):
    model = onnx.load(os.fspath(path))
    return {t.name: int(np.sum(numpy_helper.to_array(t) == 0)) for t in model.graph.initializer}


def caffemodel_zeros(weights, deploy_names):
    """{initializer name: zeros} of the caffemodel's weights and biases, read on their own (not by the exporter)."""
    param = fileio.read_caffemodel(weights)
    out = {}
    for layer in param.layer:
        if layer.name in deploy_names and layer.type in masks.WEIGHTED:
            for blob, what in zip(layer.blobs, ("weights", "bias")):
                out[f"{layer.name}/{what}"] = int(np.sum(masks.blob_array(blob) == 0))
    return out


def assert_zeros_equal(result, weights, onnx_path):
    onnx_zeros = initializer_zeros(onnx_path)
    record = fileio.read_json(fileio.sidecar_path(onnx_path))
    assert record["zeros"] == result["zeros"] == {k: onnx_zeros[k] for k in result["zeros"]}
    names = {n.rsplit("/", 1)[0] for n in result["zeros"]}
    expected = caffemodel_zeros(weights, names)
    assert expected and {k: result["zeros"][k] for k in expected} == expected
    assert sum(expected.values()) > 0  # the third of zeros is there


def assert_parity(result):
    check = result["check"]
    assert check["batch"] == onnxexport.CHECK_BATCH and check["tolerance"] == onnxexport.TOLERANCE
    for name, o in check["outputs"].items():
        assert 0 <= o["max_rel"] <= onnxexport.TOLERANCE and o["max_abs"] >= 0, name
    assert check["top5_agreement"] == 1.0


# ------------------------------------------------------------------------------------------------ generated nets
def test_small_net_trainval(tmp_path):
    net = netgen.small_squeezenet()
    result, weights, out = exported(tmp_path, net)
    assert_parity(result)
    assert_zeros_equal(result, weights, out)
    props = result["props"]
    assert props["classes"] == "10" and props["source"] == "w.caffemodel"
    assert json.loads(props["preprocessing"]) == {
        "formula": "(pixel - mean) * scale", "mean_value": [128.0], "mean_file": None, "scale": 1 / 256,
        "crop_size": 28, "channel_order": "gray", "input": [1, 28, 28], "layer": "data"}
    density = json.loads(props["density"])
    assert density == pytest.approx(masks.layer_densities_of(weights), abs=0) and set(density) == set(
        netgen.weighted_layers(net))
    model = onnx.load(os.fspath(out))
    assert [i.name for i in model.graph.input] == ["data"] and [o.name for o in model.graph.output] == ["prob"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", 1, 28, 28]
    assert model.opset_import[0].version == onnxexport.DEFAULT_OPSET
    assert not any(n.op_type in ("Dropout", "Identity") for n in model.graph.node)
    record = fileio.read_json(fileio.sidecar_path(out))
    assert record["model"] == "model.onnx" and record["source"] == "w.caffemodel" and record["format"] == "onnx"
    assert record["check"] == result["check"] and record["classes"] == 10 and record["masks"] is None
    assert record["source_sha256"] == fileio.file_digest(weights) and record["prototxt"] == "net.prototxt"
    assert record["density"] == density and record["opset"] == onnxexport.DEFAULT_OPSET


@pytest.mark.parametrize("naming", netgen.NAMINGS)
def test_squeezenet_both_namings(tmp_path, naming):
    net = netgen.squeezenet_v1_0(naming=naming)
    result, weights, out = exported(tmp_path, net)
    assert_parity(result)
    assert_zeros_equal(result, weights, out)
    assert result["props"]["classes"] == "1000"
    pre = json.loads(result["props"]["preprocessing"])
    assert (pre["mean_value"], pre["channel_order"], pre["input"]) == ([104.0, 117.0, 123.0], "BGR", [3, 227, 227])


def test_sparse_model_is_exported_with_its_masks_applied(tmp_path):
    from dsd_caffe import pruning

    net = netgen.small_squeezenet()
    dense = random_caffemodel(net, tmp_path / "dense.caffemodel")
    param = fileio.read_caffemodel(dense)
    weights = masks.weight_arrays(param)
    shapes = {k: w.shape for k, w in weights.items()}
    m = {k: pruning.magnitude_mask(w, 0.5) for k, w in weights.items()}
    sparse_net = masks.sparse_net(net, shapes)
    pruned = tmp_path / "pruned.caffemodel"
    fileio.write_caffemodel(pruned, masks.add_masks_to_caffemodel(param, m, sparse_net))
    fileio.write_prototxt(tmp_path / "sparse_trainval.prototxt", sparse_net)
    result = onnxexport.export(tmp_path / "sparse_trainval.prototxt", pruned, tmp_path / "sparse.onnx")
    assert result["released"] and fileio.read_json(tmp_path / "sparse.onnx.json")["masks"].startswith("applied")
    assert_parity(result)
    for name, mask in m.items():
        assert result["zeros"][f"{name}/weights"] == int(np.sum(masks.weight_arrays(pruned)[name] == 0))
        assert result["zeros"][f"{name}/weights"] >= int(np.sum(~mask))
    # a pruned weight that is not 0.0 (the masks do not hold): refused, nothing written
    bad = masks.add_masks_to_caffemodel(param, m, sparse_net)
    layer = next(l for l in bad.layer if l.name == "conv1")
    first_pruned = int(np.flatnonzero(~m["conv1"].ravel())[0])
    layer.blobs[0].data[first_pruned] = 1.0
    fileio.write_caffemodel(tmp_path / "bad.caffemodel", bad)
    with pytest.raises(UserError, match="pruned weights of layer 'conv1' are not 0.0"):
        onnxexport.export(tmp_path / "sparse_trainval.prototxt", tmp_path / "bad.caffemodel", tmp_path / "bad.onnx")
    assert not os.path.exists(tmp_path / "bad.onnx") and not os.path.exists(tmp_path / "bad.onnx.json")


# ------------------------------------------------------------------------------------------------ BVLC nets
@pytest.mark.parametrize("rel, shape", [
    ("bvlc_alexnet/deploy.prototxt", None),
    ("bvlc_googlenet/deploy.prototxt", None),
    ("mnist/lenet.prototxt", None),
    ("cifar10/cifar10_full_sigmoid_train_test_bn.prototxt", (1, 3, 32, 32)),  # its LMDB is not here: the shape
])
def test_bvlc_nets(tmp_path, rel, shape):
    prototxt = shared_file(os.path.join(CAFFE_MODELS, rel))
    result, weights, out = exported(tmp_path, prototxt, input_shape=shape)
    assert_parity(result)
    assert_zeros_equal(result, weights, out)
    assert result["props"]["classes"] == str(10 if rel.startswith(("mnist", "cifar10")) else 1000)
    ops = {n.op_type for n in onnx.load(os.fspath(out)).graph.node}
    if "alexnet" in rel:
        assert {"LRN", "Gemm", "Conv", "MaxPool"} <= ops
        groups = [a.i for n in onnx.load(os.fspath(out)).graph.node for a in n.attribute if a.name == "group"]
        assert 2 in groups
    if "googlenet" in rel:
        assert {"LRN", "Concat", "AveragePool", "MaxPool", "Gemm"} <= ops
    if "cifar10" in rel:
        assert {"BatchNormalization", "Sigmoid", "AveragePool"} <= ops


# ------------------------------------------------------------------------------------------------ every layer type
EVERY_LAYER = """
name: "every"
input: "data"
input_dim: 3 input_dim: 6 input_dim: 17 input_dim: 19
layer { name: "conv_g" type: "Convolution" bottom: "data" top: "conv_g"
  convolution_param { num_output: 9 kernel_size: 3 pad: 1 stride: 2 group: 3 dilation: 2 bias_term: false } }
layer { name: "leaky" type: "ReLU" bottom: "conv_g" top: "conv_g" relu_param { negative_slope: 0.1 } }
layer { name: "conv_hw" type: "Convolution" bottom: "conv_g" top: "conv_hw"
  convolution_param { num_output: 8 kernel_h: 3 kernel_w: 2 pad_h: 2 pad_w: 0 stride_h: 1 stride_w: 2 } }
layer { name: "prelu" type: "PReLU" bottom: "conv_hw" top: "prelu" }
layer { name: "bn" type: "BatchNorm" bottom: "prelu" top: "bn" batch_norm_param { eps: 0.001 } }
layer { name: "scale" type: "Scale" bottom: "bn" top: "bn" scale_param { bias_term: true } }
layer { name: "bn_zero" type: "BatchNorm" bottom: "conv_hw" top: "bn_zero" }
layer { name: "split" type: "Split" bottom: "bn" top: "s1" top: "s2" }
layer { name: "max_over" type: "Pooling" bottom: "s1" top: "max_over"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "ave_over" type: "Pooling" bottom: "s2" top: "ave_over"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "ave_nopad" type: "Pooling" bottom: "bn_zero" top: "ave_nopad"
  pooling_param { pool: AVE kernel_h: 2 kernel_w: 3 stride_h: 2 stride_w: 2 } }
layer { name: "ave_nopad_c" type: "Convolution" bottom: "ave_nopad" top: "ave_nopad_c"
  convolution_param { num_output: 8 kernel_size: 1 pad: 0 } }
layer { name: "sig" type: "Sigmoid" bottom: "max_over" top: "sig" }
layer { name: "tanh" type: "TanH" bottom: "ave_over" top: "tanh" }
layer { name: "sum" type: "Eltwise" bottom: "sig" bottom: "tanh" bottom: "max_over" top: "sum"
  eltwise_param { operation: SUM coeff: 0.5 coeff: -2 coeff: 1.5 } }
layer { name: "prod" type: "Eltwise" bottom: "sig" bottom: "tanh" bottom: "sum" top: "prod"
  eltwise_param { operation: PROD } }
layer { name: "max" type: "Eltwise" bottom: "prod" bottom: "sum" top: "max" eltwise_param { operation: MAX } }
layer { name: "plain_sum" type: "Eltwise" bottom: "max" bottom: "prod" top: "plain_sum" }
layer { name: "concat" type: "Concat" bottom: "plain_sum" bottom: "max" top: "concat" }
layer { name: "lrn" type: "LRN" bottom: "concat" top: "lrn" lrn_param { local_size: 3 alpha: 0.3 beta: 0.6 k: 2 } }
layer { name: "drop" type: "Dropout" bottom: "lrn" top: "lrn" dropout_param { dropout_ratio: 0.3 } }
layer { name: "relu" type: "ReLU" bottom: "lrn" top: "lrn" }
layer { name: "gpool" type: "Pooling" bottom: "lrn" top: "gpool" pooling_param { pool: MAX global_pooling: true } }
layer { name: "gave" type: "Pooling" bottom: "lrn" top: "gave" pooling_param { pool: AVE global_pooling: true } }
layer { name: "flat" type: "Flatten" bottom: "gpool" top: "flat" }
layer { name: "ip_axis2" type: "InnerProduct" bottom: "lrn" top: "ip_axis2"
  inner_product_param { num_output: 4 axis: 2 } }
layer { name: "ip_t" type: "InnerProduct" bottom: "gave" top: "ip_t"
  inner_product_param { num_output: 7 transpose: true bias_term: false } }
layer { name: "reshape" type: "Reshape" bottom: "ip_axis2" top: "reshape"
  reshape_param { shape { dim: 0 dim: -1 dim: 2 } } }
layer { name: "soft2" type: "Softmax" bottom: "reshape" top: "soft2" softmax_param { axis: 2 } }
layer { name: "shared" type: "PReLU" bottom: "ip_t" top: "shared" prelu_param { channel_shared: true } }
layer { name: "ip_flat" type: "InnerProduct" bottom: "flat" top: "ip_flat" inner_product_param { num_output: 7 } }
layer { name: "out" type: "Eltwise" bottom: "shared" bottom: "ip_flat" top: "out" }
layer { name: "prob" type: "Softmax" bottom: "out" top: "prob" }
"""


def every_layer_net():
    return fileio.parse_prototxt(EVERY_LAYER, caffe_pb2().NetParameter())


@pytest.mark.parametrize("seed", [0, 1])
def test_every_layer_type_with_odd_shapes(tmp_path, seed):
    result, weights, out = exported(tmp_path, every_layer_net(), seed=seed)
    assert_parity(result)
    assert set(result["check"]["outputs"]) == {"soft2", "ave_nopad_c", "prob"}  # every output compared
    types = {l.type for l in every_layer_net().layer} | {"Input"}
    assert types == set(onnxexport.CONVERTERS)  # the test net holds every converter's type
    model = onnx.load(os.fspath(out))
    divisors = [t for t in model.graph.initializer if t.name.endswith("/divisor")]
    assert {t.name for t in divisors} == {"ave_over/divisor", "ave_nopad/divisor"}  # windows past the bounds
    names = {t.name for t in model.graph.initializer}
    assert {"prelu/slope", "shared/slope", "scale/scale", "scale/bias", "conv_g/weights"} <= names
    assert "conv_g/bias" not in names and "ip_t/bias" not in names
    assert [o.name for o in model.graph.output] == ["ave_nopad_c", "prob", "soft2"]  # Caffe's net.outputs


# ------------------------------------------------------------------------------------------------ pooling edges
POOL = """
name: "pool"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 2 dim: 3 dim: {h} dim: {w} }} }} }}
layer {{ name: "pool" type: "Pooling" bottom: "data" top: "pool"
  pooling_param {{ pool: {pool} kernel_size: {k} stride: {s} pad: {p} {extra} }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "pool" top: "ip" inner_product_param {{ num_output: 5 }} }}
"""

POOL_CASES = [  # (h, w, k, s, pad): windows hanging over the edge, pad > 0 with ceil rounding and its clip
    (6, 6, 3, 2, 1), (5, 5, 2, 2, 1), (10, 9, 2, 3, 1), (7, 8, 3, 2, 0), (8, 8, 3, 3, 2), (13, 13, 3, 2, 0),
    (9, 11, 5, 3, 2), (4, 4, 4, 1, 3), (3, 3, 2, 5, 1),
]


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
@pytest.mark.parametrize("h, w, k, s, p", POOL_CASES)
def test_pooling_edges(tmp_path, pool, h, w, k, s, p):
    net = fileio.parse_prototxt(POOL.format(h=h, w=w, k=k, s=s, p=p, pool=pool, extra=""),
                                caffe_pb2().NetParameter())
    result, _, _ = exported(tmp_path, net)
    assert_parity(result)
    # the pooled values themselves, not only through the InnerProduct: compared on the model's Pooling node
    model, _, read, _ = onnxexport.build(tmp_path / "net.prototxt", tmp_path / "w.caffemodel")
    caffe_net = read["net"]
    x = np.random.default_rng(3).standard_normal((2, 3, h, w)).astype(np.float32)
    caffe_net.blobs["data"].reshape(*x.shape)
    caffe_net.blobs["data"].data[...] = x
    caffe_net.forward()
    expected = caffe_net.blobs["pool"].data.copy()
    model.graph.output.append(onnx.helper.make_tensor_value_info("pool", onnx.TensorProto.FLOAT, None))
    got = onnxexport.runtime_forward(model, {"data": x})["pool"]
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_pooling_window_past_the_input_is_refused(tmp_path):
    # no pad, ceil rounding, stride > kernel: Caffe's last window starts past the input (it outputs -FLT_MAX)
    net = fileio.parse_prototxt(POOL.format(h=5, w=5, k=1, s=3, p=0, pool="MAX", extra=""),
                                caffe_pb2().NetParameter())
    with pytest.raises(UserError, match="layer 'pool' .*last window starts past the input"):
        exported(tmp_path, net)
    assert not os.path.exists(tmp_path / "model.onnx")


def test_floor_round_mode(tmp_path):
    net = fileio.parse_prototxt(POOL.format(h=8, w=7, k=3, s=2, p=1, pool="AVE", extra="round_mode: FLOOR"),
                                caffe_pb2().NetParameter())
    assert_parity(exported(tmp_path, net)[0])


# ------------------------------------------------------------------------------------------------ real models
@pytest.fixture(scope="module")
def deep_compression(tmp_path_factory):
    from dsd_caffe import deepcompression

    shared_file(DC_NET)
    folder = tmp_path_factory.mktemp("dc")
    weights = folder / "decoded.caffemodel"
    deepcompression.decode_to_caffemodel(DC_NET, DC_DEPLOY, weights)
    return folder, weights


def test_deep_compression_squeezenet_on_real_photos(deep_compression):
    """The real decoded Deep Compression SqueezeNet: ONNX Runtime gives pycaffe's top-5 on scikit-image's photos
    (tests/test_classifier.py's), and its per-layer zero counts are the caffemodel's."""
    skdata = pytest.importorskip("skimage.data")
    from dsd_caffe import classifier

    folder, weights = deep_compression
    preprocess, _ = classifier.known_recipe("imagenet")
    photos = np.stack([preprocess(getattr(skdata, name)()) for name in ("chelsea", "coffee", "camera")])
    out = folder / "squeezenet.onnx"
    result = onnxexport.export(DC_DEPLOY, weights, out, inputs={"data": photos})
    check = result["check"]
    assert check["batch"] == 3 and check["top5_agreement"] == 1.0
    assert check["outputs"]["pool_final"]["max_rel"] <= onnxexport.TOLERANCE
    got = onnxexport.runtime_forward(out.read_bytes(), {"data": photos})["pool_final"].reshape(3, -1)
    assert [int(np.argmax(p)) for p in got][1:] == [967, 872]  # espresso, the cameraman's tripod
    assert 281 <= int(np.argmax(got[0])) <= 285  # a domestic cat
    assert_zeros_equal(result, weights, out)
    zeros = initializer_zeros(out)
    assert sum(zeros[f"{n}/weights"] for n in masks.weight_arrays(weights)) == 1_244_448 - 415_921
    assert "preprocessing" not in result["props"]  # a deploy prototxt carries none
    assert result["props"]["classes"] == "1000"
    cv2 = pytest.importorskip("cv2")  # OpenCV's dnn (4.x here) reads the file too: the same top-5 as pycaffe
    reader = cv2.dnn.readNetFromONNX(str(out))
    reader.setInput(photos)
    opencv = reader.forward().reshape(3, -1)
    assert onnxexport.top_agreement(got, opencv) == 1.0 and np.abs(opencv - got).max() <= 1e-4 * np.abs(got).max()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from dsd_caffe import demo, fashion_mnist

    if not os.path.exists(os.path.join(fashion_mnist.FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz")):
        pytest.skip("Fashion-MNIST (Debian's dataset-fashion-mnist) is not installed")
    out = tmp_path_factory.mktemp("demo") / "run"
    demo.run_demo(out, seed=0, scale=0.02, tests_per_phase=1)  # 80 dense, 20 sparse, 20 redense iterations
    return out


def caffe_test_top1(model, weights, iterations):
    """``caffe test``'s printed accuracy_top1 line value, from the real binary."""
    import re
    import subprocess

    from dsd_caffe.caffe_env import caffe_binary

    r = subprocess.run([caffe_binary(), "test", f"--model={model}", f"--weights={weights}",
                        f"--iterations={iterations}"], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, GLOG_logtostderr="1", GLOG_minloglevel="0"))
    assert r.returncode == 0, r.stderr[-2000:]
    return re.findall(r"\] accuracy_top1 = (\S+)", r.stderr)[-1]


def test_demo_dsd_model_top1_equals_caffe_test(demo_run, tmp_path):
    """The demo's DSD model: ONNX Runtime's top-1 on the Fashion-MNIST test LMDB, accumulated as `caffe test` does
    (a float32 mean of per-batch accuracies), is the binary's, digit for digit; the input is preprocessed from the
    exported model's own metadata."""
    from dsd_caffe import evaluate, lmdbio, sources

    redense = demo_run / "dsd" / "cycle1-redense"
    test_lmdb = demo_run / "data" / "test_lmdb"
    net = netgen.set_data_sources(sources.read_net(redense / "redense_trainval.prototxt"), test=str(test_lmdb))
    model = tmp_path / "test_trainval.prototxt"
    fileio.write_prototxt(model, net)
    weights = redense / "redense.caffemodel"
    out = tmp_path / "dsd.onnx"
    result = onnxexport.export(model, weights, out)
    assert_parity(result)
    record = fileio.read_json(fileio.sidecar_path(out))
    assert record["phase"] == "redense" and record["iteration"] == 20 and record["seed"] == 0
    pre = json.loads(result["props"]["preprocessing"])
    records = list(lmdbio.read_lmdb(str(test_lmdb)))
    images = np.stack([img for _, img, _ in records]).astype(np.float32)
    labels = np.array([label for _, _, label in records])
    x = ((images - np.float32(pre["mean_value"][0])) * np.float32(pre["scale"])).astype(np.float32)
    batch = 100
    score = np.float32(0)
    for i in range(0, len(x), batch):
        prob = onnxexport.runtime_forward(out.read_bytes(), {"data": x[i:i + batch]})["prob"]
        correct = np.sum(np.argmax(prob.reshape(len(prob), -1), axis=1) == labels[i:i + batch])
        score = np.float32(score + np.float32(np.float32(correct) / np.float32(batch)))
    ours = evaluate.cfmt(np.float32(score / np.float32(len(x) // batch)))
    assert ours == caffe_test_top1(model, weights, len(x) // batch)
    assert len(x) == 10_000 and float(ours) > 0.11  # better than chance: the predictions differ


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture
def small(tmp_path):
    prototxt = tmp_path / "deploy.prototxt"
    fileio.write_prototxt(prototxt, netgen.deploy(netgen.small_squeezenet()))
    weights = random_caffemodel(fileio.read_net_prototxt(prototxt), tmp_path / "w.caffemodel")
    return prototxt, weights


def one_line_error(r, *expect):
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("export_onnx.py: error: "), r.stderr
    for e in expect:
        assert e in lines[0], lines[0]
    return lines[0]


def nothing_written(folder, before):
    assert sorted(os.listdir(folder)) == before


def test_cli_writes_model_and_record(small, tmp_path):
    prototxt, weights = small
    r = tool("export_onnx", "--model", prototxt, "--weights", weights, "--output", tmp_path / "m.onnx")
    assert r.returncode == 0, r.stderr
    assert "max abs diff" in r.stdout and "top-5 agreement 100%" in r.stdout
    assert os.path.isfile(tmp_path / "m.onnx") and os.path.isfile(tmp_path / "m.onnx.json")
    r = tool("export_onnx", "--model", prototxt, "--weights", weights, "--output", tmp_path / "m.onnx")
    one_line_error(r, "already exists", "--force")
    r = tool("export_onnx", "--model", prototxt, "--weights", weights, "--output", tmp_path / "m.onnx", "--force",
             "--no-check", "--opset", "13")
    assert r.returncode == 0 and "parity check skipped" in r.stdout, r.stderr
    assert onnx.load(str(tmp_path / "m.onnx")).opset_import[0].version == 13
    assert fileio.read_json(tmp_path / "m.onnx.json")["check"] is None


def test_unsupported_layer_type(small, tmp_path):
    prototxt, weights = small
    net = fileio.read_net_prototxt(prototxt)
    layer = net.layer.add(name="cut", type="Slice", bottom=["prob"], top=["p1", "p2"])
    layer.slice_param.slice_point.append(3)
    fileio.write_prototxt(tmp_path / "slice.prototxt", net)
    before = sorted(os.listdir(tmp_path))
    r = tool("export_onnx", "--model", tmp_path / "slice.prototxt", "--weights", weights, "--output",
             tmp_path / "m.onnx")
    one_line_error(r, "layer 'cut' has type Slice", "does not support")
    nothing_written(tmp_path, before)


def test_caffemodel_that_does_not_fit(small, tmp_path):
    prototxt, _ = small
    other = random_caffemodel(netgen.small_squeezenet(num_classes=7), tmp_path / "other.caffemodel")
    before = sorted(os.listdir(tmp_path))
    r = tool("export_onnx", "--model", prototxt, "--weights", other, "--output", tmp_path / "m.onnx")
    one_line_error(r, "does not fit", "conv_final")
    nothing_written(tmp_path, before)


@pytest.mark.parametrize("which", ["weights", "model", "json"])
def test_output_that_is_an_input(small, tmp_path, which):
    prototxt, weights = small
    target = {"weights": weights, "model": prototxt, "json": str(weights)[:-len(".json")]}[which]
    if which == "json":  # the record beside the output would overwrite an input
        os.rename(weights, tmp_path / "w.onnx.json")
        weights, target = tmp_path / "w.onnx.json", tmp_path / "w.onnx"
    sums = {p: fileio.file_digest(p) for p in (prototxt, weights)}
    before = sorted(os.listdir(tmp_path))
    r = tool("export_onnx", "--model", prototxt, "--weights", weights, "--output", target, "--force")
    one_line_error(r, "the input")
    nothing_written(tmp_path, before)
    assert {p: fileio.file_digest(p) for p in sums} == sums


def test_device_output_refused(small, tmp_path):
    prototxt, weights = small
    r = tool("export_onnx", "--model", prototxt, "--weights", weights, "--output", "/dev/null", "--force")
    one_line_error(r, "/dev/null is a character device")
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")


def test_bad_opset(small, tmp_path):
    prototxt, weights = small
    r = tool("export_onnx", "--model", prototxt, "--weights", weights, "--output", tmp_path / "m.onnx",
             "--opset", "11")
    one_line_error(r, "--opset must be an integer from 13")
    assert not os.path.exists(tmp_path / "m.onnx")


def test_parity_failure_refuses_and_writes_nothing(small, tmp_path, monkeypatch):
    prototxt, weights = small
    real = onnxexport.runtime_forward
    monkeypatch.setattr(onnxexport, "runtime_forward",
                        lambda model, inputs: {k: v * np.float32(1.001) for k, v in real(model, inputs).items()})
    with pytest.raises(UserError, match="parity check failed: .*'prob'.*tolerance 0.0001.*nothing written"):
        onnxexport.export(prototxt, weights, tmp_path / "m.onnx")
    assert not os.path.exists(tmp_path / "m.onnx") and not os.path.exists(tmp_path / "m.onnx.json")


def test_full_disk_leaves_nothing(small, tmp_path):
    """A full disk: one line, exit 2, neither the model nor its record; with --force the old pair is kept whole."""
    from helpers import in_small_tmpfs

    prototxt, weights = small
    out = in_small_tmpfs(tmp_path, "300k", f'''
        "$PY" "$TOOLS/export_onnx.py" --model "{prototxt}" --weights "{weights}" --output "$DISK/old.onnx" \\
            >/dev/null 2>&1 || exit 98
        md5sum "$DISK"/old.onnx* > "{tmp_path}/old.sum"
        cat /dev/zero > "$DISK/filler" 2>/dev/null
        "$PY" "$TOOLS/export_onnx.py" --model "{prototxt}" --weights "{weights}" --output "$DISK/old.onnx" \\
            --force >/dev/null 2>"{tmp_path}/force.err"; echo "force $?"
        "$PY" "$TOOLS/export_onnx.py" --model "{prototxt}" --weights "{weights}" --output "$DISK/new.onnx" \\
            >/dev/null 2>"{tmp_path}/new.err"; echo "new $?"
        rm "$DISK/filler"
        md5sum "$DISK"/old.onnx* | cmp - "{tmp_path}/old.sum" && echo "old kept"
        echo left $(ls -A "$DISK")
    ''')
    assert out.splitlines() == ["force 2", "new 2", "old kept", "left old.onnx old.onnx.json"], out
    for name in ("force.err", "new.err"):
        lines = (tmp_path / name).read_text().strip().splitlines()
        assert len(lines) == 1 and "No space left on device" in lines[0], lines


REFUSED = {  # a layer after conv (8 channels, 6x6) -> (the layer's prototxt, what the one line says)
    "lrn within": ('type: "LRN" lrn_param { norm_region: WITHIN_CHANNEL }', "only LRN across channels"),
    "batch statistics": ('type: "BatchNorm" batch_norm_param { use_global_stats: false }', "use_global_stats: false"),
    "concat axis 0": ('type: "Concat" bottom: "conv" concat_param { axis: 0 }', "across the batch axis"),
    "softmax axis 0": ('type: "Softmax" softmax_param { axis: 0 }', "across the batch axis"),
    "reshape fixes the batch": ('type: "Reshape" reshape_param { shape { dim: 1 dim: -1 } }',
                                "fixes the batch axis to 1"),
    "stochastic": ('type: "Pooling" pooling_param { pool: STOCHASTIC kernel_size: 2 }', "only MAX and AVE"),
    "scale by a bottom": ('type: "Scale" bottom: "conv" scale_param { axis: 0 }', "second bottom"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_inexact_layers_are_refused(tmp_path, case):
    layer, message = REFUSED[case]
    text = ('name: "r" layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 '
            'dim: 8 } } } layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { '
            'num_output: 8 kernel_size: 3 } } layer { name: "odd" bottom: "conv" top: "odd" ' + layer + " }")
    with pytest.raises(UserError, match=f"layer 'odd' .*: .*{message}"):
        exported(tmp_path, fileio.parse_prototxt(text, caffe_pb2().NetParameter()))
    assert not os.path.exists(tmp_path / "model.onnx")


@pytest.mark.parametrize("case", ["empty prototxt", "weights a folder", "weights not a caffemodel"])
def test_unreadable_inputs(small, tmp_path, case):
    prototxt, weights = small
    (tmp_path / "blank.prototxt").write_text("")
    (tmp_path / "folder").mkdir()
    model, weights, expect = {"empty prototxt": (tmp_path / "blank.prototxt", weights, "no layer is included"),
                              "weights a folder": (prototxt, tmp_path / "folder", "is a folder, not a file"),
                              "weights not a caffemodel": (prototxt, prototxt, "truncated or corrupted")}[case]
    r = tool("export_onnx", "--model", model, "--weights", weights, "--output", tmp_path / "m.onnx")
    one_line_error(r, expect)
    assert not os.path.exists(tmp_path / "m.onnx")


def test_output_written_in_place_keeps_its_blob_name(tmp_path):
    """A net ending in an in-place ReLU: the graph's output is the blob's name and holds the value after the ReLU."""
    text = ('name: "inplace" input: "data" input_shape { dim: 1 dim: 2 dim: 5 dim: 5 } layer { name: "c" '
            'type: "Convolution" bottom: "data" top: "c" convolution_param { num_output: 4 kernel_size: 3 } } '
            'layer { name: "r" type: "ReLU" bottom: "c" top: "c" }')
    result, _, out = exported(tmp_path, fileio.parse_prototxt(text, caffe_pb2().NetParameter()))
    assert_parity(result)
    model = onnx.load(os.fspath(out))
    assert [o.name for o in model.graph.output] == ["c"]
    assert [(n.op_type, list(n.output)) for n in model.graph.node] == [("Conv", ["c/before"]), ("Relu", ["c"])]
