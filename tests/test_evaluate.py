"""evaluate.py reproduces `caffe test` line for line, and refuses bad input with one clear message."""
import os
import re
import subprocess

import numpy as np
import pytest

from dsd_caffe import caffe_env, caffeproto, evaluate, fileio, netcheck
from helpers import tool as run
from dsd_caffe.errors import UserError

NET = """name: "tiny"
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TEST }}
  transform_param {{ scale: 0.00390625 crop_size: {crop} mean_value: 128 }}
  data_param {{ source: "{source}" batch_size: {batch} backend: LMDB }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 8 kernel_size: 3 stride: 2 weight_filler {{ type: "gaussian" std: 0.5 }}
  bias_filler {{ type: "uniform" min: -1 max: 1 }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param {{ pool: AVE global_pooling: true }} }}
layer {{ name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc"
  inner_product_param {{ num_output: {classes} weight_filler {{ type: "gaussian" std: 3 }} }} }}
layer {{ name: "accuracy_top1" type: "Accuracy" bottom: "fc" bottom: "label" top: "accuracy_top1"
  include {{ phase: TEST }} }}
layer {{ name: "accuracy_top5" type: "Accuracy" bottom: "fc" bottom: "label" top: "accuracy_top5"
  include {{ phase: TEST }} accuracy_param {{ top_k: 5 }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" loss_weight: {lw} }}
{extra}"""

EXTRA = """layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
layer { name: "half" type: "Power" bottom: "fc" top: "half" power_param { scale: 0.5 } }
layer { name: "loss2" type: "EuclideanLoss" bottom: "fc" bottom: "half" top: "loss2" loss_weight: 0.25 }
"""


def make_net(folder, source, batch=8, crop=24, classes=10, lw=1, extra="", seed=1, name="net", written_source=None):
    """Write the tiny test net and random weights for it; returns (prototxt, caffemodel).

    ``written_source`` (default ``source``) is the Data source written into the prototxt."""
    caffe = caffe_env.import_caffe()
    proto = os.path.join(folder, f"{name}.prototxt")
    kw = dict(batch=batch, crop=crop, classes=classes, lw=lw, extra=extra)
    with open(proto, "w") as f:
        f.write(NET.format(source=source, **kw))
    caffe.set_random_seed(seed)
    net = caffe.Net(proto, caffe.TEST)
    weights = os.path.join(folder, f"{name}.caffemodel")
    net.save(weights)
    with open(proto, "w") as f:
        f.write(NET.format(source=written_source or source, **kw))
    return proto, weights


def binary_lines(model, weights, iterations, cwd=None):
    """The summary lines of the real `caffe test` (glog prefix removed, per-batch lines dropped)."""
    env = dict(os.environ, GLOG_minloglevel="0", GLOG_logtostderr="1", OMP_NUM_THREADS="1")
    cmd = [caffe_env.caffe_binary(), "test", "--model", model, "--weights", weights,
           "--iterations", str(iterations)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = [re.sub(r"^\S+ \S+\s+\d+ caffe\.cpp:\d+\] ", "", l) for l in p.stderr.splitlines()
             if re.search(r"caffe\.cpp:\d+\] ", l)]
    start = next(i for i, l in enumerate(lines) if l.startswith("Loss: "))
    return lines[start:]


@pytest.mark.parametrize("n,batch,iterations,lw,extra", [
    (40, 8, 5, 1, ""),          # exactly one pass over the LMDB
    (20, 8, 7, 1, ""),          # wraps around the LMDB like the binary's reader
    (30, 4, 9, 0.5, EXTRA),     # multi-element output, two loss layers, a non-unit loss weight
])
def test_same_lines_as_caffe_test(tiny_lmdb, tmp_path, n, batch, iterations, lw, extra):
    lmdb_path = tiny_lmdb(n=n, seed=n)
    proto, weights = make_net(str(tmp_path), lmdb_path, batch=batch, lw=lw, extra=extra)
    expected = binary_lines(proto, weights, iterations)
    results = evaluate.evaluate(proto, weights, iterations=iterations)
    assert evaluate.format_results(results) == expected
    assert list(results)[:3] == ["accuracy_top1", "accuracy_top5", "loss"]
    if extra:
        assert results["prob"].shape == (batch * 10,)
        assert sum(1 for l in expected if l.startswith("prob = ")) == batch * 10
        assert any(l.startswith("loss2 = ") and "(* 0.25 = " in l for l in expected)


def test_tool_prints_binary_lines_with_relative_source(tiny_lmdb, tmp_path):
    """The Data source is relative; both the binary and the tool resolve it against the current folder."""
    path = tiny_lmdb(n=24, seed=3, name="val_lmdb")
    make_net(str(tmp_path), path, batch=6, written_source="val_lmdb")
    expected = binary_lines("net.prototxt", "net.caffemodel", 4, cwd=tmp_path)
    p = run("evaluate", "--model", "net.prototxt", "--weights", "net.caffemodel", "--iterations", "4",
            cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == expected
    # the log line names the model evaluated and the LMDB it reads
    assert f"Running for 4 iterations: net.caffemodel on {tmp_path / 'val_lmdb'}." in p.stderr


def test_float_accumulation_matches_caffe(tmp_path):
    """caffe test sums in float: the mean of 0.1 over 1000 passes is 0.0999999 there, not 0.1."""
    total = np.float32(0)
    for _ in range(1000):
        total += np.float32(0.1)
    assert evaluate.cfmt(total / np.float32(1000)) != evaluate.cfmt(0.1)


def test_cfmt_is_ostream_default():
    cases = {0.617579123: "0.617579", 1.7059: "1.7059", 1e-05: "1e-05", 0.0001: "0.0001", 1234567.0: "1.23457e+06",
             100000.0: "100000", 0.0: "0", 1.0: "1", 2.5e-7: "2.5e-07", float("inf"): "inf", -float("nan"): "-nan"}
    for x, s in cases.items():
        assert evaluate.cfmt(x) == s


def test_confusion_matrix_and_per_class(tiny_lmdb, tmp_path):
    lmdb_path = tiny_lmdb(n=40, seed=5)
    proto, weights = make_net(str(tmp_path), lmdb_path, batch=8)
    res = evaluate.evaluate(proto, weights, iterations=5, confusion=True)
    cm = res.confusion
    assert cm.shape == (10, 10) and cm.sum() == 40
    assert np.trace(cm) / 40 == pytest.approx(float(res["accuracy_top1"]), abs=1e-6)
    out = tmp_path / "cm"
    r = run("evaluate", "--model", proto, "--weights", weights, "--iterations", "5", "--output", out)
    assert r.returncode == 0, r.stderr
    rows = (out / "per_class.csv").read_text().splitlines()
    assert rows[0] == "class,name,images,correct,accuracy" and len(rows) == 11
    assert sum(int(r.split(",")[2]) for r in rows[1:]) == 40
    table = (out / "confusion.csv").read_text().splitlines()
    assert sum(int(x) for r in table[1:] for x in r.split(",")[1:]) == 40
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # existing outputs are refused without --force
    r = run("evaluate", "--model", proto, "--weights", weights, "--iterations", "5", "--output", out)
    assert r.returncode == 2 and "already holds output of evaluate.py" in r.stderr
    # the old spelling still works for one release, with one deprecation line
    r = run("evaluate", "--model", proto, "--weights", weights, "--iterations", "5", "--confusion", out, "--force")
    assert r.returncode == 0 and "--confusion is deprecated" in r.stderr, r.stderr


# --------------------------------------------------------------------------------------------- bad input


def run_tool_error(argv):
    """evaluate.py refuses: exit status 2, one error line, last (after any progress log lines)."""
    r = run("evaluate", *argv)
    err = [line for line in r.stderr.strip().splitlines() if not line[:8].count(":") == 2]  # not hh:mm:ss logs
    assert r.returncode == 2, r.stderr
    assert len(err) == 1 and ": error: " in err[0], err
    return err[0]


@pytest.fixture
def good(tiny_lmdb, tmp_path):
    lmdb_path = tiny_lmdb(n=16, seed=7)
    proto, weights = make_net(str(tmp_path), lmdb_path, batch=4)
    return tmp_path, lmdb_path, proto, weights


def test_gpu_refused_on_cpu_build(good):
    _, _, proto, weights = good
    if caffe_env.has_gpu_support():
        pytest.skip("this Caffe has GPU support")
    p = run("evaluate", "--model", proto, "--weights", weights, "--gpu", "0")
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "CPU-only" in p.stderr


def test_missing_caffemodel(good):
    tmp, _, proto, _ = good
    msg = run_tool_error(["--model", proto, "--weights", str(tmp / "nope.caffemodel")])
    assert "nope.caffemodel" in msg and "does not exist" in msg


def test_truncated_caffemodel(good):
    tmp, _, proto, weights = good
    data = open(weights, "rb").read()
    bad = tmp / "trunc.caffemodel"
    bad.write_bytes(data[: len(data) // 2])
    msg = run_tool_error(["--model", proto, "--weights", str(bad)])
    assert "trunc.caffemodel" in msg and "truncated or corrupted" in msg


def test_caffemodel_from_another_net(good):
    tmp, lmdb_path, proto, _ = good
    _, other = make_net(str(tmp), lmdb_path, batch=4, classes=12, name="other")
    msg = run_tool_error(["--model", proto, "--weights", other])
    assert "'fc'" in msg and "12x8" in msg and "10x8" in msg


def test_caffemodel_with_other_layer_names(good):
    tmp, _, proto, weights = good
    param = fileio.read_caffemodel(weights)
    for layer in param.layer:
        layer.name = "x_" + layer.name
    renamed = tmp / "renamed.caffemodel"
    fileio.write_caffemodel(renamed, param)
    msg = run_tool_error(["--model", proto, "--weights", str(renamed)])
    assert "none of the net's learnable layers" in msg and "conv1" in msg


def test_caffemodel_missing_a_layer(good):
    tmp, _, proto, weights = good
    param = fileio.read_caffemodel(weights)
    param.layer[[l.name for l in param.layer].index("fc")].name = "fc_old"
    part = tmp / "part.caffemodel"
    fileio.write_caffemodel(part, param)
    msg = run_tool_error(["--model", proto, "--weights", str(part)])
    assert "no weights for layer 'fc'" in msg
    res = evaluate.evaluate(proto, str(part), iterations=1, allow_missing=True)
    assert "accuracy_top1" in res


def test_weights_fit_names_the_namings():
    pb2 = caffeproto.caffe_pb2()
    param = pb2.NetParameter()
    for name, shape in [("conv1", (96, 3, 7, 7)), ("fire2/squeeze1x1", (16, 96, 1, 1)), ("conv10", (1000, 512, 1, 1))]:
        layer = param.layer.add(name=name)
        layer.blobs.add().shape.dim.extend(shape)
        layer.blobs[0].data.extend([0.0] * int(np.prod(shape)))
    net = {"conv1": [(64, 3, 3, 3)], "fire2/conv1x1_1": [(16, 64, 1, 1)], "conv_final": [(1000, 512, 1, 1)]}
    with pytest.raises(UserError) as e:
        netcheck.check_weights_fit(net, param)
    assert "'conv1'" in str(e.value) and "96x3x7x7" in str(e.value) and "64x3x3x3" in str(e.value)
    assert "deepscale" in str(e.value).lower() and "han" in str(e.value).lower()


def test_weights_fit_accepts_legacy_4d_shapes():
    pb2 = caffeproto.caffe_pb2()
    param = pb2.NetParameter()
    layer = param.layer.add(name="fc")
    w = layer.blobs.add(num=1, channels=1, height=10, width=8)
    w.data.extend([0.0] * 80)
    b = layer.blobs.add(num=1, channels=1, height=1, width=10)
    b.data.extend([0.0] * 10)
    assert netcheck.check_weights_fit({"fc": [(10, 8), (10,)], "relu": []}, param) == ["fc"]
    with pytest.raises(UserError, match="80 values"):
        del w.data[5:]
        netcheck.check_weights_fit({"fc": [(10, 8), (10,)]}, param)


def test_prototxt_syntax_error_line_col(good):
    tmp, _, _, weights = good
    bad = tmp / "bad.prototxt"
    bad.write_text('name: "x"\nlayer {\n  name: "data"\n  type: Data"\n}\n')
    msg = run_tool_error(["--model", str(bad), "--weights", weights])
    assert re.search(r"bad\.prototxt:4:\d+: prototxt syntax error", msg)


def test_missing_lmdb(good):
    tmp, _, _, weights = good
    proto = tmp / "missing.prototxt"
    proto.write_text(NET.format(source="no_such_lmdb", batch=4, crop=24, classes=10, lw=1, extra=""))
    msg = run_tool_error(["--model", str(proto), "--weights", weights])
    assert "no_such_lmdb" in msg and "not found" in msg and "beside the prototxt" in msg and "current folder" in msg


def test_empty_lmdb(good):
    import lmdb

    tmp, _, _, weights = good
    lmdb.open(str(tmp / "empty_lmdb"), map_size=1 << 20).close()
    proto = tmp / "empty.prototxt"
    proto.write_text(NET.format(source=str(tmp / "empty_lmdb"), batch=4, crop=24, classes=10, lw=1, extra=""))
    msg = run_tool_error(["--model", str(proto), "--weights", weights])
    assert "empty_lmdb" in msg and "is empty" in msg


def test_not_an_lmdb(good):
    tmp, _, _, weights = good
    (tmp / "plain").mkdir()
    proto = tmp / "plain.prototxt"
    proto.write_text(NET.format(source=str(tmp / "plain"), batch=4, crop=24, classes=10, lw=1, extra=""))
    msg = run_tool_error(["--model", str(proto), "--weights", weights])
    assert "plain" in msg and "no data.mdb" in msg


def test_images_smaller_than_crop(good):
    tmp, lmdb_path, _, weights = good
    proto = tmp / "crop.prototxt"
    proto.write_text(NET.format(source=lmdb_path, batch=4, crop=32, classes=10, lw=1, extra=""))
    msg = run_tool_error(["--model", str(proto), "--weights", weights])
    assert "28x28" in msg and "crop_size 32" in msg and "'data'" in msg


def test_unknown_bottom_and_type(good):
    tmp, lmdb_path, _, weights = good
    text = NET.format(source=lmdb_path, batch=4, crop=24, classes=10, lw=1, extra="")
    p1 = tmp / "bottom.prototxt"
    p1.write_text(text.replace('bottom: "pool1" top: "fc"', 'bottom: "pool9" top: "fc"'))
    assert "'pool9'" in run_tool_error(["--model", str(p1), "--weights", weights])
    p2 = tmp / "type.prototxt"
    p2.write_text(text.replace('type: "ReLU"', 'type: "Relu"'))
    assert "'Relu'" in run_tool_error(["--model", str(p2), "--weights", weights])


def test_bad_iterations(good):
    _, _, proto, weights = good
    assert "--iterations" in run_tool_error(["--model", proto, "--weights", weights, "--iterations", "0"])


def test_included_layers_follow_caffe_rules():
    pb2 = caffeproto.caffe_pb2()
    param = pb2.NetParameter()
    param.layer.add(name="all")
    param.layer.add(name="train").include.add(phase=pb2.TRAIN)
    param.layer.add(name="test").include.add(phase=pb2.TEST)
    param.layer.add(name="not_test").exclude.add(phase=pb2.TEST)
    param.layer.add(name="staged").include.add(phase=pb2.TEST, stage=["deploy"])
    param.layer.add(name="leveled").include.add(min_level=1)
    assert [l.name for l in netcheck.included_layers(param, "TEST")] == ["all", "test"]
    assert [l.name for l in netcheck.included_layers(param, "TRAIN")] == ["all", "train", "not_test"]
    assert [l.name for l in netcheck.included_layers(param, "TEST", stages=["deploy"])] == ["all", "test", "staged"]


def test_hdf5_weights_give_the_same_results(good):
    tmp, _, proto, weights = good
    caffe = caffe_env.import_caffe()
    h5 = str(tmp / "net.h5")
    caffe.Net(proto, caffe.TEST, weights=weights).save_hdf5(h5)
    a = evaluate.format_results(evaluate.evaluate(proto, weights, iterations=2))
    b = evaluate.format_results(evaluate.evaluate(proto, h5, iterations=2))
    assert a == b


def test_mirror_in_test_phase_is_warned(good, caplog):
    tmp, lmdb_path, _, _ = good
    param = fileio.read_net_prototxt(str(tmp / "net.prototxt"))
    param.layer[0].transform_param.mirror = True
    with caplog.at_level("WARNING"):
        netcheck.check_data_layers(param, "TEST")
    assert "mirrors images at random" in caplog.text


def test_small_squeezenet_same_lines_as_caffe_test(tiny_lmdb, tmp_path):
    """The project's generated small SqueezeNet (fire modules, concat, dropout, global pooling)."""
    from dsd_caffe import netgen

    lmdb_path = tiny_lmdb(n=30, seed=11)
    proto = str(tmp_path / "small.prototxt")
    fileio.write_prototxt(proto, netgen.small_squeezenet(train_source=lmdb_path, test_source=lmdb_path,
                                                         test_batch=10))
    caffe = caffe_env.import_caffe()
    caffe.set_random_seed(5)
    weights = str(tmp_path / "small.caffemodel")
    caffe.Net(proto, caffe.TEST).save(weights)
    expected = binary_lines(proto, weights, 4)
    assert evaluate.format_results(evaluate.evaluate(proto, weights, iterations=4)) == expected


def test_test_source_replaces_the_trainvals(tiny_lmdb, tmp_path):
    """--test-source evaluates on another LMDB: the same lines as a prototxt that names it."""
    first, second = tiny_lmdb(n=16, seed=1, name="a_lmdb"), tiny_lmdb(n=16, seed=2, name="b_lmdb")
    proto, weights = make_net(str(tmp_path), first, batch=4)
    other, _ = make_net(str(tmp_path), second, batch=4, name="other")
    replaced = evaluate.format_results(evaluate.evaluate(proto, weights, iterations=4, test_source=second))
    assert replaced == evaluate.format_results(evaluate.evaluate(other, weights, iterations=4))
    assert replaced != evaluate.format_results(evaluate.evaluate(proto, weights, iterations=4))


def test_output_names_the_classes_of_the_test_lmdb_evaluate_read(tiny_lmdb, tmp_path):
    """--output takes the class names from the JSON beside the TEST LMDB that evaluate read (Results.test_source):
    the prototxt is read once, so a relative source found both beside it and here is warned about once."""
    (tmp_path / "net").mkdir()
    (tmp_path / "here").mkdir()
    beside, _ = tiny_lmdb(n=16, seed=1, name="net/lmdb"), tiny_lmdb(n=16, seed=2, name="here/lmdb")
    fileio.write_json(beside + ".json", {"classes": [f"class{i}" for i in range(10)]})
    proto, weights = make_net(str(tmp_path / "net"), beside, batch=4, written_source="lmdb")
    r = run("evaluate", "--model", proto, "--weights", weights, "--iterations", "4", "--output", tmp_path / "out",
            cwd=tmp_path / "here")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("beside the prototxt") == 1, r.stderr
    rows = (tmp_path / "out" / "per_class.csv").read_text().splitlines()
    assert [row.split(",")[1] for row in rows[1:]] == [f"class{i}" for i in range(10)]
    assert evaluate.evaluate(proto, weights, iterations=1).test_source == beside
