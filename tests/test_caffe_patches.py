"""Issue 16: Caffe's parallel CPU layers (``patches/*-perf-*.patch``) compute what Caffe's own loops computed.

- Pooling, against a numpy transcription of Caffe's CPU loops (max: Caffe's scan order, so the same argmax on ties;
  average: Caffe's pad/clip divisor and summation order): outputs and gradients bit-identical, for every pooling
  configuration of SqueezeNet v1.0 and the small net plus odd sizes, pads, strides, ceil/floor edges, the top mask.
- Convolution, against a float64 numpy reference (output, weight, bias and data gradients) within float32
  rounding, for every convolution configuration of both nets plus groups, odd sizes, strides, pads and batches that
  are no multiple of the threads or of the gradient partitions.
- Threads: the same layers and a few SGD steps of both nets give bit-identical results with OMP_NUM_THREADS=1 and
  2; where the unpatched build is in the cache (``python3 -m dsd_caffe.build --unpatched``), they also match it:
  pooling bit for bit, the rest within 1e-6 relative.
Nothing is written outside pytest's tmp dirs.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dsd_caffe import build, netgen
from dsd_caffe.caffe_env import import_caffe
from dsd_caffe.caffeproto import caffe_pb2

FLT_MAX = np.float32(3.4028234663852886e38)


# ---------------------------------------------------------------- Caffe's CPU pooling, transcribed
def pooled_size(size, kernel, stride, pad, ceil):
    n = int((np.ceil if ceil else np.floor)((size + 2 * pad - kernel) / stride)) + 1
    if pad and (n - 1) * stride >= size + pad:
        n -= 1
    return n


def pool_reference(x, kernel, stride, pad, method, ceil=True):
    """Caffe's Forward_cpu: (top, argmax or None)."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad
    n, c, h, w = x.shape
    oh, ow = pooled_size(h, kh, sh, ph, ceil), pooled_size(w, kw, sw, pw, ceil)
    top = np.zeros((n, c, oh, ow), np.float32)
    arg = np.full((n, c, oh, ow), -1, np.int64)
    for i in range(oh):
        for j in range(ow):
            hs, ws = i * sh - ph, j * sw - pw
            if method == "max":
                he, we, hs, ws = min(hs + kh, h), min(ws + kw, w), max(hs, 0), max(ws, 0)
                best, idx = np.full((n, c), -FLT_MAX, np.float32), np.full((n, c), -1, np.int64)
                for y in range(hs, he):
                    for z in range(ws, we):
                        greater = x[:, :, y, z] > best
                        best = np.where(greater, x[:, :, y, z], best)
                        idx = np.where(greater, y * w + z, idx)
                top[:, :, i, j], arg[:, :, i, j] = best, idx
            else:
                he, we = min(hs + kh, h + ph), min(ws + kw, w + pw)
                size = (he - hs) * (we - ws)
                acc = np.zeros((n, c), np.float32)
                for y in range(max(hs, 0), min(he, h)):
                    for z in range(max(ws, 0), min(we, w)):
                        acc = acc + x[:, :, y, z]
                top[:, :, i, j] = acc / np.float32(size)
    return top, (arg if method == "max" else None)


def unpool_reference(top_diff, arg, shape, kernel, stride, pad, method):
    """Caffe's Backward_cpu: the bottom diff, accumulated in Caffe's order."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad
    n, c, h, w = shape
    bottom = np.zeros((n, c, h * w), np.float32)
    nn, cc = np.meshgrid(np.arange(n), np.arange(c), indexing="ij")
    for i in range(top_diff.shape[2]):
        for j in range(top_diff.shape[3]):
            if method == "max":
                bottom[nn, cc, arg[:, :, i, j]] += top_diff[:, :, i, j]
                continue
            hs, ws = i * sh - ph, j * sw - pw
            he, we = min(hs + kh, h + ph), min(ws + kw, w + pw)
            share = top_diff[:, :, i, j] / np.float32((he - hs) * (we - ws))
            for y in range(max(hs, 0), min(he, h)):
                for z in range(max(ws, 0), min(we, w)):
                    bottom[:, :, y * w + z] += share
    return bottom.reshape(shape)


# ---------------------------------------------------------------- float64 convolution
def conv_reference(x, weight, bias, stride, pad, group, top_diff):
    """(output, weight grad, bias grad, data grad) in float64."""
    x, weight, top_diff = (a.astype(np.float64) for a in (x, weight, top_diff))
    (sh, sw), (ph, pw) = stride, pad
    n, c, h, w = x.shape
    co, cg, kh, kw = weight.shape
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    og = co // group
    out, dw, dxp = [], [], np.zeros_like(xp)
    for g in range(group):
        wg, xg, dy = weight[g * og:(g + 1) * og], win[:, g * cg:(g + 1) * cg], top_diff[:, g * og:(g + 1) * og]
        out.append(np.einsum("nchwij,ocij->nohw", xg, wg))
        dw.append(np.einsum("nohw,nchwij->ocij", dy, xg))
        ho, wo = dy.shape[2:]
        for i in range(kh):
            for j in range(kw):
                dxp[:, g * cg:(g + 1) * cg, i:i + sh * ho:sh, j:j + sw * wo:sw] += \
                    np.einsum("nohw,oc->nchw", dy, wg[:, :, i, j])
    out = np.concatenate(out, 1) + (bias.reshape(1, -1, 1, 1) if bias is not None else 0)
    dx = dxp[:, :, ph:ph + h, pw:pw + w]
    return out, np.concatenate(dw, 0), top_diff.sum((0, 2, 3)), dx


# ---------------------------------------------------------------- the layer configurations
def write_prototxt(folder, net_param, name="net.prototxt"):
    path = os.path.join(str(folder), name)
    with open(path, "w") as f:
        f.write(str(net_param))
    return path


def net_layers(folder, net_param, input_shape):
    """[(layer param, bottom shape)] of the Pooling and Convolution layers of a trainval NetParameter."""
    caffe = import_caffe()
    deploy = netgen.deploy(net_param, input_shape=input_shape)
    net = caffe.Net(write_prototxt(folder, deploy), caffe.TEST)
    return [(l, net.blobs[l.bottom[0]].data.shape) for l in deploy.layer if l.type in ("Pooling", "Convolution")]


def pooling(kernel=None, stride=(1, 1), pad=(0, 0), method="max", ceil=True):
    """A Pooling LayerParameter; no kernel: global pooling."""
    pb2 = caffe_pb2()
    l = pb2.LayerParameter(name="pool", type="Pooling")
    p = l.pooling_param
    p.pool = p.MAX if method == "max" else p.AVE
    if kernel is None:
        p.global_pooling = True
    else:
        (p.kernel_h, p.kernel_w), (p.stride_h, p.stride_w), (p.pad_h, p.pad_w) = kernel, stride, pad
    if not ceil:
        p.round_mode = p.FLOOR
    return l


def relu(negative_slope=0.0):
    l = caffe_pb2().LayerParameter(name="relu", type="ReLU")
    l.relu_param.negative_slope = negative_slope
    return l


def convolution(num_output, kernel, stride=(1, 1), pad=(0, 0), group=1, bias=True):
    pb2 = caffe_pb2()
    l = pb2.LayerParameter(name="conv", type="Convolution")
    c = l.convolution_param
    c.num_output, c.group, c.bias_term = num_output, group, bias
    (c.kernel_h, c.kernel_w), (c.stride_h, c.stride_w), (c.pad_h, c.pad_w) = kernel, stride, pad
    c.weight_filler.type, c.weight_filler.std = "gaussian", 0.1
    c.bias_filler.type, c.bias_filler.std = "gaussian", 0.1
    return l


def _first(values, default):
    return values[0] if len(values) else default


def net_cases(folder):
    """(id, layer, bottom shape) of every pooling and convolution of both nets: their spatial sizes and
    parameters, with a small batch and few channels."""
    cases = []
    for tag, net_param, shape in (("squeezenet", netgen.squeezenet_v1_0(train_batch=2), (1, 3, 227, 227)),
                                  ("small", netgen.small_squeezenet(train_batch=2), (1, 1, 28, 28))):
        for layer, (_, c, h, w) in net_layers(folder, net_param, shape):
            if layer.type == "Pooling":
                p = layer.pooling_param
                method = "max" if p.pool == p.MAX else "ave"
                new = pooling(None, method=method) if p.global_pooling else pooling(
                    (p.kernel_size,) * 2, (p.stride,) * 2, (p.pad,) * 2, method, p.round_mode == p.CEIL)
                cases.append((f"{tag}-{layer.name}", new, (2, 3, h, w)))
            else:
                cp = layer.convolution_param
                k, s, pad = cp.kernel_size[0], _first(cp.stride, 1), _first(cp.pad, 0)
                new = convolution(min(cp.num_output, 8), (k, k), (s, s), (pad, pad))
                cases.append((f"{tag}-{layer.name}", new, (3, min(c, 5), h, w)))
    return cases


POOL_EDGES = [  # (id, kernel, stride, pad, ceil, bottom shape); each as max and as average pooling
    ("odd-k3s2p1", (3, 3), (2, 2), (1, 1), True, (2, 3, 7, 9)),
    ("odd-k2s2-ceil", (2, 2), (2, 2), (0, 0), True, (2, 3, 7, 7)),
    ("odd-k2s2-floor", (2, 2), (2, 2), (0, 0), False, (2, 3, 7, 7)),
    ("k3s3p2-clipped-last", (3, 3), (3, 3), (2, 2), True, (3, 2, 10, 11)),
    ("rect-k3x2s1x2p1x0", (3, 2), (1, 2), (1, 0), True, (2, 2, 6, 9)),
    ("k5s1p2", (5, 5), (1, 1), (2, 2), True, (1, 2, 5, 5)),
    ("kernel-over-the-edge", (3, 3), (2, 2), (0, 0), True, (2, 2, 2, 2)),
    ("one-pixel", (1, 1), (1, 1), (0, 0), True, (2, 2, 3, 3)),
    ("global", None, (1, 1), (0, 0), True, (3, 4, 5, 7)),
]
CONV_EDGES = [  # (id, layer, bottom shape)
    ("group2-k3p1", dict(num_output=6, kernel=(3, 3), pad=(1, 1), group=2), (3, 4, 9, 7)),
    ("group3-1x1-stride2", dict(num_output=6, kernel=(1, 1), stride=(2, 2), group=3), (2, 6, 7, 7)),
    ("rect-k3x2s2x1p2x0", dict(num_output=4, kernel=(3, 2), stride=(2, 1), pad=(2, 0)), (5, 3, 11, 8)),
    ("batch1", dict(num_output=4, kernel=(3, 3), pad=(1, 1)), (1, 3, 6, 6)),
    ("batch9-no-bias", dict(num_output=5, kernel=(3, 3), stride=(2, 2), bias=False), (9, 3, 9, 9)),
    ("batch11-1x1", dict(num_output=7, kernel=(1, 1)), (11, 5, 6, 5)),
]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nets")
    out = [(f"{m}-{n}", pooling(k, s, p, m, ceil), shape) for n, k, s, p, ceil, shape in POOL_EDGES
           for m in ("max", "ave")]
    out += [(n, convolution(**kw), shape) for n, kw, shape in CONV_EDGES]
    return out + net_cases(folder)


def one_layer_net(layer, shape, tops=1):
    """An Input ``data`` of ``shape``, then ``layer`` (tops ``out`` and, with tops=2, ``mask``); force_backward."""
    pb2 = caffe_pb2()
    net = pb2.NetParameter(name="one", force_backward=True)
    inp = net.layer.add(name="data", type="Input", top=["data"])
    inp.input_param.shape.add(dim=list(shape))
    new = net.layer.add()
    new.CopyFrom(layer)
    new.bottom.append("data")
    new.top.extend(["out", "mask"][:tops])
    return net


def layer_inputs(layer, shape, seed=0):
    """Bottom data and a top diff for ``layer``: pooling inputs on a coarse grid (many ties)."""
    rng = np.random.default_rng(seed)
    if layer.type == "Pooling":
        return rng.integers(-3, 4, size=shape).astype(np.float32), rng
    return rng.standard_normal(shape, dtype=np.float32), rng


def run_layer(folder, layer, shape, tops=1):
    """Forward and backward of ``layer`` alone in the Caffe in use: {name: array}."""
    caffe = import_caffe()
    caffe.set_mode_cpu()
    caffe.set_random_seed(0)  # the weight fillers
    net = caffe.Net(write_prototxt(folder, one_layer_net(layer, shape, tops)), caffe.TEST)
    x, rng = layer_inputs(layer, shape)
    net.blobs["data"].data[...] = x
    net.forward()
    out = {"out": net.blobs["out"].data.copy()}
    if tops == 2:
        out["mask"] = net.blobs["mask"].data.copy()
    net.blobs["out"].diff[...] = rng.standard_normal(net.blobs["out"].diff.shape, dtype=np.float32)
    out["top_diff"] = net.blobs["out"].diff.copy()
    net.backward()
    out["data_diff"] = net.blobs["data"].diff.copy()
    for i, p in enumerate(net.params.get(layer.name, [])):
        out[f"param{i}"], out[f"param{i}_diff"] = p.data.copy(), p.diff.copy()
    return x, out


def geometry(layer, shape):
    p = layer.pooling_param
    if p.global_pooling:
        return shape[2:], (1, 1), (0, 0)
    return (p.kernel_h, p.kernel_w), (p.stride_h, p.stride_w), (p.pad_h, p.pad_w)


# ---------------------------------------------------------------- the tests
def test_pooling_is_bit_identical_to_caffes_loops(cases, tmp_path):
    pools = [c for c in cases if c[1].type == "Pooling"]
    assert len(pools) >= 24
    for name, layer, shape in pools:
        method = "max" if layer.pooling_param.pool == layer.pooling_param.MAX else "ave"
        kernel, stride, pad = geometry(layer, shape)
        ceil = layer.pooling_param.round_mode == layer.pooling_param.CEIL
        for tops in ((1, 2) if method == "max" else (1,)):
            x, got = run_layer(tmp_path, layer, shape, tops)
            top, arg = pool_reference(x, kernel, stride, pad, method, ceil)
            np.testing.assert_array_equal(got["out"], top, err_msg=name)
            if tops == 2:
                np.testing.assert_array_equal(got["mask"], arg.astype(np.float32), err_msg=name)
            want = unpool_reference(got["top_diff"], arg, shape, kernel, stride, pad, method)
            np.testing.assert_array_equal(got["data_diff"], want, err_msg=f"{name} backward")


def test_max_pooling_ties_route_the_gradient_to_the_first_maximum(tmp_path):
    """All-equal inputs: every window's first element in Caffe's scan order (top row, left) gets the gradient."""
    layer = pooling((3, 3), (2, 2), (1, 1))
    caffe = import_caffe()
    net = caffe.Net(write_prototxt(tmp_path, one_layer_net(layer, (1, 1, 5, 5))), caffe.TEST)
    net.blobs["data"].data[...] = 1.0
    net.forward()
    net.blobs["out"].diff[...] = 1.0
    net.backward()
    got = net.blobs["data"].diff[0, 0]
    want = np.zeros((5, 5), np.float32)
    for h0 in (0, 1, 3):  # windows start at -1, 1, 3 (clipped to 0, 1, 3)
        for w0 in (0, 1, 3):
            want[h0, w0] += 1
    np.testing.assert_array_equal(got, want)


def test_convolution_matches_a_float64_reference(cases, tmp_path):
    convs = [c for c in cases if c[1].type == "Convolution"]
    assert len(convs) >= 30
    for name, layer, shape in convs:
        x, got = run_layer(tmp_path, layer, shape)
        cp = layer.convolution_param
        bias = got.get("param1") if cp.bias_term else None
        want = conv_reference(x, got["param0"], bias, (cp.stride_h, cp.stride_w), (cp.pad_h, cp.pad_w), cp.group,
                              got["top_diff"])
        for key, ref in zip(("out", "param0_diff", "param1_diff", "data_diff"), want):
            if key == "param1_diff" and not cp.bias_term:
                continue
            err = np.abs(got[key] - ref).max() / max(np.abs(ref).max(), 1e-30)
            assert err < 1e-5, f"{name} {key}: max error {err:.2e} of the largest magnitude"


# ---------------------------------------------------------------- threads and the unpatched build
CHILD = r"""
import json, os, sys, tempfile
import numpy as np
sys.path.insert(0, os.environ["DSD_TEST_DIR"])
import test_caffe_patches as t
from dsd_caffe.caffe_env import import_caffe
cfg = json.loads(sys.argv[1])
caffe = import_caffe()
caffe.set_mode_cpu()
out = {}
for name, kind, kw, shape in cfg["layers"]:
    layer = {"pool": t.pooling, "conv": t.convolution, "relu": t.relu}[kind](**kw)
    for k, v in t.run_layer(cfg["folder"], layer, shape)[1].items():
        out[f"{name}/{k}"] = v
for name in ("small", "squeezenet"):
    for k, v in t.sgd_steps(cfg["folder"], name).items():
        out[f"{name}/{k}"] = v
np.savez(cfg["out"], **out)
"""
THREAD_LAYERS = [
    ("pool-max", "pool", dict(kernel=(3, 3), stride=(2, 2)), (4, 5, 23, 23)),
    ("pool-ave", "pool", dict(kernel=(3, 3), stride=(2, 2), pad=(1, 1), method="ave"), (4, 5, 23, 23)),
    ("pool-global", "pool", dict(method="ave"), (3, 6, 13, 13)),
    ("conv-k3", "conv", dict(num_output=16, kernel=(3, 3), pad=(1, 1)), (9, 8, 15, 15)),
    ("conv-k7s2", "conv", dict(num_output=12, kernel=(7, 7), stride=(2, 2)), (4, 3, 31, 31)),
    ("conv-1x1", "conv", dict(num_output=10, kernel=(1, 1)), (10, 16, 7, 7)),
    ("conv-group", "conv", dict(num_output=8, kernel=(3, 3), group=2), (5, 4, 9, 9)),
    ("relu", "relu", dict(), (3, 5, 111, 111)),
    ("relu-leaky", "relu", dict(negative_slope=0.1), (3, 5, 31, 37)),
]
EXACT = ("pool-", "relu")  # layers that must match the unpatched build bit for bit
STEPS = 3


def train_net(name, batch=2):
    """The trainval of ``name`` with an Input (data, label) instead of its Data layers, TRAIN layers only."""
    pb2 = caffe_pb2()
    if name == "small":
        src, shape = netgen.small_squeezenet(train_batch=batch), (batch, 1, 28, 28)
    else:
        src, shape = netgen.squeezenet_v1_0(train_batch=batch), (batch, 3, 227, 227)
    net = pb2.NetParameter(name=name)
    inp = net.layer.add(name="input", type="Input", top=["data", "label"])
    inp.input_param.shape.add(dim=list(shape))
    inp.input_param.shape.add(dim=[batch])
    for layer in src.layer:
        if layer.type in ("Data", "Accuracy") or any(r.phase == pb2.TEST for r in layer.include):
            continue
        net.layer.add().CopyFrom(layer)
    return net


def sgd_steps(folder, name):
    """Losses and weights after STEPS SGD steps (fixed seed and data) of the net ``name``."""
    caffe = import_caffe()
    net_path = write_prototxt(folder, train_net(name), f"{name}.prototxt")
    solver_path = os.path.join(str(folder), f"{name}_solver.prototxt")
    with open(solver_path, "w") as f:
        f.write(f'net: "{net_path}"\nbase_lr: 0.01\nmomentum: 0.9\nweight_decay: 0.0002\nlr_policy: "fixed"\n'
                'max_iter: 100\ndisplay: 0\nsnapshot: 0\nrandom_seed: 7\nsolver_mode: CPU\n')
    solver = caffe.SGDSolver(solver_path)
    net = solver.net
    rng = np.random.default_rng(1)
    net.blobs["data"].data[...] = rng.standard_normal(net.blobs["data"].data.shape, dtype=np.float32)
    net.blobs["label"].data[...] = rng.integers(0, 10, size=2)
    losses = []
    for _ in range(STEPS):
        solver.step(1)
        losses.append(float(net.blobs["loss"].data))
    out = {"losses": np.array(losses)}
    for layer, params in net.params.items():
        for i, p in enumerate(params):
            out[f"{layer}/{i}"] = p.data.copy()
    return out


def run_child(tmp_path, tag, omp_threads, pythonpath=None):
    env = dict(os.environ, OMP_NUM_THREADS=str(omp_threads), DSD_TEST_DIR=os.path.dirname(__file__))
    env.pop("OPENBLAS_NUM_THREADS", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    folder = tmp_path / tag
    folder.mkdir()
    cfg = {"layers": THREAD_LAYERS, "folder": str(folder), "out": str(folder / "out.npz")}
    subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], env=env, check=True, timeout=600)
    with np.load(cfg["out"]) as z:
        return dict(z)


@pytest.fixture(scope="module")
def one_thread(tmp_path_factory):
    return run_child(tmp_path_factory.mktemp("omp1"), "patched", 1)


def test_one_and_two_threads_give_identical_results(one_thread, tmp_path):
    two = run_child(tmp_path, "patched", 2)
    assert set(two) == set(one_thread)
    for key, value in one_thread.items():
        np.testing.assert_array_equal(two[key], value, err_msg=key)


def test_the_unpatched_build_agrees(one_thread, tmp_path):
    prefix = build.cached_prefix(perf=False)
    if prefix is None:
        pytest.skip("no unpatched build in the cache (python3 -m dsd_caffe.build --unpatched)")
    ref = run_child(tmp_path, "unpatched", 1, os.path.join(prefix, "lib", "python3", "dist-packages"))
    for key, value in one_thread.items():
        if key.startswith(EXACT):
            np.testing.assert_array_equal(value, ref[key], err_msg=key)
        else:
            err = np.abs(value - ref[key]).max() / max(np.abs(ref[key]).max(), 1e-30)
            assert err <= 1e-6, f"{key}: differs from the unpatched build by {err:.1e} of its largest magnitude"


def test_perf_patches_are_marked_and_recorded():
    perf = [p for p in build.our_patches() if p not in build.our_patches(perf=False)]
    assert perf and all(build.PERF_MARK in os.path.basename(p) for p in perf)
    for p in perf:
        assert build.patch_reason(p) and not build.patch_reason(p).startswith(("---", "diff"))
    from dsd_caffe import caffe_env

    record = caffe_env.build_info()
    if record:  # the build in use: the CPU one, or the GPU one (DSD_CAFFE_BUILD=gpu make test) with the -cuda- patches
        gpu = not record["cpu_only"]
        assert list(record["patches"]) == [os.path.basename(p) for p in build.our_patches(gpu=gpu)]
