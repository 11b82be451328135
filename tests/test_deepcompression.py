"""Deep Compression: decoding the published compressed SqueezeNet, re-encoding it losslessly (.net and Huffman),
refusing truncated/oversized/corrupted files, and k-means quantization of a small net checked in real Caffe."""
import os
import struct

import numpy as np
import pytest

from helpers import DC_DEPLOY, DC_NET, tool, write_tiny_lmdb
from dsd_caffe import deepcompression as dc
from dsd_caffe import fileio
from dsd_caffe.errors import OutputExists, UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAN_DEPLOY = os.path.join(REPO, "models", "squeezenet_v1.0", "deploy_han.prototxt")
HAN_TRAINVAL = os.path.join(REPO, "models", "squeezenet_v1.0", "trainval_han.prototxt")
NET_BYTES = 675_763
HUFFMAN_BYTES = 538_458  # measured; deterministic (no timing). The 470,000-byte goal is not met losslessly.

pytestmark = pytest.mark.skipif(not os.path.exists(DC_NET), reason=f"reference file {DC_NET} is absent (a clone "
                                "of the repository alone has no ../shared; it is Deep Compression's "
                                "compressed_SqueezeNet.net); set DSD_SHARED to run these tests")


@pytest.fixture(scope="module")
def specs():
    return dc.layer_specs(DC_DEPLOY)


@pytest.fixture(scope="module")
def net_bytes():
    with open(DC_NET, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def decoded(specs, net_bytes):
    return dc.decode_bytes(net_bytes, specs, DC_NET)


@pytest.fixture(scope="module")
def caffemodel(tmp_path_factory):
    out = tmp_path_factory.mktemp("dc") / "decoded.caffemodel"
    dc.decode_to_caffemodel(DC_NET, DC_DEPLOY, out)
    return out


def identical(a, b):
    """Bit-identical layers {name: (weights, bias)}."""
    return list(a) == list(b) and all(
        a[k][0].shape == b[k][0].shape and a[k][0].dtype == b[k][0].dtype == np.float32
        and np.array_equal(a[k][0].view(np.uint32), b[k][0].view(np.uint32))
        and np.array_equal(a[k][1].view(np.uint32), b[k][1].view(np.uint32)) for k in a)


# ------------------------------------------------------------------------------------------------ decoding
def test_decoded_counts(decoded, specs, net_bytes):
    assert identical(readme_decoder(net_bytes, specs), decoded)
    assert len(decoded) == 26 and all(s.type == "Convolution" and s.bits == 8 for s in specs)
    assert sum(w.size for w, _ in decoded.values()) == 1_244_448
    assert sum(int(np.count_nonzero(w)) for w, _ in decoded.values()) == 415_921
    assert decoded["conv1"][0].shape == (96, 3, 7, 7) and decoded["conv1"][1].shape == (96,)
    assert decoded["conv_final"][0].shape == (1000, 512, 1, 1)
    assert 0.19 < np.count_nonzero(decoded["conv_final"][0]) / 512000 < 0.21


def test_fillers_and_sizes():
    stats = dc.net_file_stats(DC_NET, DC_DEPLOY)
    assert sum(s["entries"] for s in stats.values()) == 422_083
    assert sum(s["fillers"] for s in stats.values()) == 6_162
    assert sum(s["nonzero"] for s in stats.values()) == 415_921
    assert 4 * len(stats) + sum(s["bytes"] for s in stats.values()) == NET_BYTES


def test_layers_chosen_by_type_not_name(tmp_path, decoded):
    with open(DC_DEPLOY) as f:
        text = f.read()
    renamed = tmp_path / "renamed.prototxt"
    renamed.write_text(text.replace('name: "conv1"', 'name: "stem"', 1))
    out = dc.decode(DC_NET, renamed)
    assert list(out)[0] == "stem" and len(out) == 26
    assert np.array_equal(out["stem"][0], decoded["conv1"][0])


def test_caffemodel_is_deterministic_and_has_provenance(tmp_path, caffemodel):
    again = tmp_path / "again.caffemodel"
    dc.decode_to_caffemodel(DC_NET, DC_DEPLOY, again)
    assert again.read_bytes() == caffemodel.read_bytes()
    prov = fileio.read_json(fileio.sidecar_path(again))
    assert prov["nonzero"] == 415_921 and prov["weights"] == 1_244_448 and prov["format"] == "net"
    assert not os.path.isabs(prov["source"]) and len(prov["density"]) == 26
    assert (prov["phase"], prov["made_by"]) == ("sparse", "decode_compressed")  # the phase field holds a phase
    assert prov["source_sha256"] == fileio.file_digest(DC_NET)  # which .net was decoded, not only where it was


def test_existing_output_refused_unless_force(caffemodel):
    with pytest.raises(OutputExists, match="already exists"):
        dc.decode_to_caffemodel(DC_NET, DC_DEPLOY, caffemodel)
    dc.decode_to_caffemodel(DC_NET, DC_DEPLOY, caffemodel, force=True)


@pytest.mark.parametrize("prototxt", [DC_DEPLOY, HAN_DEPLOY])
def test_loads_into_deploy_nets(prototxt, caffemodel, decoded):
    if not os.path.exists(prototxt):
        pytest.skip(f"{prototxt} not generated yet")
    from dsd_caffe.caffe_env import import_caffe

    caffe = import_caffe()
    assert [(s.name, s.shape) for s in dc.layer_specs(prototxt)] == [(k, w.shape) for k, (w, _) in decoded.items()]
    net = caffe.Net(prototxt, caffe.TEST, weights=str(caffemodel))
    for name, (w, b) in decoded.items():
        assert np.array_equal(net.params[name][0].data, w) and np.array_equal(net.params[name][1].data, b)


def test_loads_into_han_trainval(tmp_path, caffemodel, decoded):
    if not os.path.exists(HAN_TRAINVAL):
        pytest.skip("models/squeezenet_v1.0/trainval_han.prototxt not generated yet")
    from dsd_caffe import netgen
    from dsd_caffe.caffe_env import import_caffe

    caffe = import_caffe()
    rng = np.random.default_rng(0)
    lmdb = write_tiny_lmdb(tmp_path / "val_lmdb", rng.integers(0, 256, (2, 3, 227, 227)), [0, 1])
    param = fileio.read_net_prototxt(HAN_TRAINVAL)
    netgen.set_data_sources(param, train=lmdb, test=lmdb)
    for layer in param.layer:
        if layer.type == "Data":
            layer.data_param.batch_size = 1
    path = fileio.write_prototxt(tmp_path / "trainval.prototxt", param)
    net = caffe.Net(path, caffe.TEST, weights=str(caffemodel))
    for name, (w, _) in decoded.items():
        assert np.array_equal(net.params[name][0].data, w)


# ------------------------------------------------------------------------------------------------ bad files
@pytest.mark.parametrize("cut", [1, 1000, NET_BYTES - 104, NET_BYTES - 50])
def test_truncated_refused(tmp_path, net_bytes, specs, cut):
    bad = tmp_path / "cut.net"
    bad.write_bytes(net_bytes[:-cut])
    with pytest.raises(UserError, match=r"cut\.net is truncated") as e:
        dc.decode_bytes(bad.read_bytes(), specs, str(bad))
    msg = str(e.value)
    if cut < NET_BYTES - 104:
        assert "layer '" in msg and f"file has {NET_BYTES - cut} bytes" in msg and f"need {NET_BYTES}" in msg


def test_truncated_names_the_layer(net_bytes, specs):
    with pytest.raises(UserError, match=r"layer 'conv_final' needs 163984 bytes .* only 163983 remain"):
        dc.decode_bytes(net_bytes[:-1], specs, "x.net")
    with pytest.raises(UserError, match=r"layer 'conv1' needs"):
        dc.decode_bytes(net_bytes[:2000], specs, "x.net")


@pytest.mark.parametrize("extra", [1, 4096])
def test_oversized_refused(net_bytes, specs, extra):
    with pytest.raises(UserError, match=rf"x\.net is too long: {extra} bytes left over after the last layer "
                                         rf"'conv_final' \(file has {NET_BYTES + extra} bytes"):
        dc.decode_bytes(net_bytes + b"\0" * extra, specs, "x.net")


def test_corrupted_net_refused(net_bytes, specs):
    data = bytearray(net_bytes)
    data[4 * 26:4 * 26 + 4] = struct.pack("<f", 0.5)  # conv1's codebook[0]
    with pytest.raises(UserError, match=r"'conv1' has codebook\[0\] = .*0\.5"):
        dc.decode_bytes(bytes(data), specs, "x.net")
    data = bytearray(net_bytes)
    data[-1000:] = b"\xff" * 1000  # conv_final's gaps: all 15 -> past the end of the blob
    with pytest.raises(UserError, match=r"'conv_final': its index stream points to position .* past the end"):
        dc.decode_bytes(bytes(data), specs, "x.net")
    data = bytearray(net_bytes)
    data[0:4] = struct.pack("<I", 20000)  # conv1 claims more entries than weights
    with pytest.raises(UserError, match=r"'conv1' claims 20000 entries but its blob holds only 14112"):
        dc.decode_bytes(bytes(data), specs, "x.net")


def test_cli_one_line_error(tmp_path, net_bytes):
    bad = tmp_path / "short.net"
    bad.write_bytes(net_bytes[:-7])
    r = tool("decode_compressed", "--model", DC_DEPLOY, "--net", bad, "--output", tmp_path / "o.caffemodel")
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "short.net is truncated" in err[0] and "conv_final" in err[0]
    assert not (tmp_path / "o.caffemodel").exists()


def test_trainval_prototxt_gives_the_deploy_shapes(specs):
    shared_trainval = os.path.join(os.path.dirname(DC_DEPLOY), "..", "squeezenet-dsd", "trainval.prototxt")
    for trainval in (HAN_TRAINVAL, shared_trainval):
        if os.path.exists(trainval):
            assert dc.layer_specs(trainval) == specs


# ------------------------------------------------------------------------------------------------ re-encoding
def readme_decoder(data, specs):
    """The .net decoding steps exactly as ../shared/README.md lays them out, independent of dsd_caffe."""
    counts = np.frombuffer(data, np.uint32, len(specs))
    offset, out = 4 * len(specs), {}
    for s, n in zip(specs, counts.astype(int)):
        codebook = np.frombuffer(data, np.float32, 2 ** s.bits, offset)
        offset += 4 * 2 ** s.bits
        bias = np.frombuffer(data, np.float32, s.bias_size, offset)
        offset += 4 * s.bias_size
        nbytes = (n - 1) // (8 // s.bits) + 1
        stream = np.frombuffer(data, np.uint8, nbytes, offset)
        offset += nbytes
        codes = stream if s.bits == 8 else np.stack([stream % 16, stream // 16], 1).ravel()[:n]
        nbytes = (n - 1) // 2 + 1
        stream = np.frombuffer(data, np.uint8, nbytes, offset)
        offset += nbytes
        gaps = np.stack([stream % 16, stream // 16], 1).ravel()[:n]
        flat = np.zeros(int(np.prod(s.shape)), np.float32)
        flat[np.cumsum(gaps.astype(int) + 1) - 1] = codebook[codes]
        out[s.name] = (flat.reshape(s.shape), bias)
    assert offset == len(data)
    return out


def test_net_reencoding_is_lossless_and_no_larger(decoded, specs):
    data, rows = dc.encode_net_bytes(decoded, specs)
    assert len(data) <= NET_BYTES
    assert identical(readme_decoder(data, specs), decoded)
    assert sum(r["fillers"] for r in rows) == 6_162
    assert identical(dc.decode_bytes(data, specs), decoded)
    assert dc.encode_net_bytes(decoded, specs)[0] == data  # deterministic


def test_huffman_round_trip(decoded, specs):
    data, rows = dc.encode_huffman_bytes(decoded, specs)
    assert data[:4] == dc.MAGIC and data[4] == dc.VERSION
    assert len(data) <= HUFFMAN_BYTES
    assert identical(dc.decode_bytes(data, specs), decoded)


def test_six_bit_squeezenet_is_lossless_and_under_470k(decoded, specs):
    """The SqueezeNet paper's 0.47 MB model is a 6-bit one: our variant holds a 6-bit SqueezeNet losslessly in far
    less (359,284 bytes), while the 8-bit weights of the shared file cannot go below ~530 KB (bench/compress_size)."""
    six_bit = dc.decode_bytes(dc.encode_huffman_bytes(decoded, specs, bits=6)[0], specs)
    assert all(len(np.unique(w[w != 0])) <= 63 for w, _ in six_bit.values())
    data, _ = dc.encode_huffman_bytes(six_bit, specs)
    assert len(data) == 359_284
    assert identical(dc.decode_bytes(data, specs), six_bit)


def test_huffman_corruption_refused(decoded, specs):
    small = {k: decoded[k] for k in list(decoded)[:3]}
    sub = specs[:3]
    data, _ = dc.encode_huffman_bytes(small, sub)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    with pytest.raises(UserError, match=r"y\.net is corrupted or truncated: its CRC32 does not match"):
        dc.decode_bytes(bytes(flipped), sub, "y.net")
    with pytest.raises(UserError, match=r"y\.net is corrupted or truncated"):
        dc.decode_bytes(data[:-10], sub, "y.net")
    with pytest.raises(UserError, match="version 9 is not supported"):
        dc.decode_bytes(data[:4] + b"\x09" + data[5:], sub, "y.net")
    with pytest.raises(UserError, match="holds 3 layers, the prototxt has 26"):
        dc.decode_bytes(data, specs, "y.net")


# ------------------------------------------------------------------------------------------------ quantization
def test_kmeans_quantization_properties():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(20, 30, 3, 3)).astype(np.float32)
    w[np.abs(w) < 0.8] = 0
    for bits in (4, 8):
        codebook, codes = dc.quantize_layer(w, bits)
        assert len(codebook) == 2 ** bits - 1 and np.all(np.diff(codebook) > 0) and np.all(codebook != 0)
        assert np.array_equal(codes != 0, w != 0)  # the sparsity pattern survives exactly
        q = np.concatenate([[0], codebook]).astype(np.float32)[codes]
        v = w[w != 0]
        nearest = np.abs(v[:, None] - codebook[None, :]).min(axis=1)  # each weight takes its nearest centroid
        assert np.allclose(np.abs(q[w != 0] - v), nearest, rtol=0, atol=1e-6)
        linear = np.linspace(v.min(), v.max(), 2 ** bits - 1)  # Lloyd's iterations only lower the error
        assert np.mean((q[w != 0] - v) ** 2) <= np.mean(np.abs(v[:, None] - linear[None, :]).min(axis=1) ** 2)
        c2, k2 = dc.quantize_layer(w, bits)
        assert np.array_equal(c2, codebook) and np.array_equal(k2, codes)
    few = np.where(w != 0, np.round(w, 1), 0).astype(np.float32)  # few distinct values: stored exactly
    codebook, codes = dc.quantize_layer(few, 8)
    assert np.array_equal(np.concatenate([[0], codebook]).astype(np.float32)[codes], few)


@pytest.fixture(scope="module")
def small_net(tmp_path_factory):
    """A tiny conv + InnerProduct net: deploy and test prototxts, a tiny LMDB, sparse random weights."""
    from caffe import layers as L

    from dsd_caffe.caffe_env import import_caffe

    caffe = import_caffe()
    d = tmp_path_factory.mktemp("small")
    rng = np.random.default_rng(2)
    lmdb = write_tiny_lmdb(d / "lmdb", rng.integers(0, 256, (40, 1, 8, 8)), rng.integers(0, 5, 40))

    def body(n, bottom):
        n.conv = L.Convolution(bottom, num_output=6, kernel_size=3, weight_filler=dict(type="xavier"))
        n.relu = L.ReLU(n.conv, in_place=True)
        n.fc = L.InnerProduct(n.relu, num_output=5, weight_filler=dict(type="xavier"))
        return n.fc

    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 8, 8]))
    body(n, n.data)
    deploy = fileio.write_prototxt(d / "deploy.prototxt", n.to_proto())
    n = caffe.NetSpec()
    n.data, n.label = L.Data(source=lmdb, backend=caffe.params.Data.LMDB, batch_size=40, ntop=2,
                             transform_param=dict(scale=1 / 256))
    n.accuracy = L.Accuracy(body(n, n.data), n.label)
    test = fileio.write_prototxt(d / "test.prototxt", n.to_proto())
    specs = dc.layer_specs(deploy)
    layers = {}
    for s in specs:
        w = rng.normal(size=s.shape).astype(np.float32)
        w[np.abs(w) < np.quantile(np.abs(w), 2 / 3)] = 0
        layers[s.name] = (w, rng.normal(size=s.bias_size).astype(np.float32))
    return dict(dir=d, deploy=deploy, test=test, specs=specs, layers=layers)


def _accuracy(test, weights):
    from dsd_caffe.caffe_env import import_caffe

    caffe = import_caffe()
    net = caffe.Net(str(test), caffe.TEST, weights=str(weights))
    return float(net.forward()["accuracy"])


def test_small_net_encode_decode_in_caffe(small_net):
    d, specs, layers = small_net["dir"], small_net["specs"], small_net["layers"]
    assert [s.bits for s in specs] == [8, 4]
    quantized = dc.quantize(layers, {s.name: s.bits for s in specs})
    assert 1 < len(np.unique(quantized["fc"][0][quantized["fc"][0] != 0])) <= 15  # linear init: some stay empty
    qmodel = fileio.write_caffemodel(d / "quantized.caffemodel", dc.to_net_parameter(quantized, specs))
    result = dc.encode(layers, d / "model.net", small_net["deploy"])
    assert result["bytes"] == os.path.getsize(d / "model.net")
    assert result["layers"][1]["bits"] == 4 and result["layers"][1]["codebook"] == 15
    decoded_model = dc.decode_to_caffemodel(d / "model.net", small_net["deploy"], d / "decoded.caffemodel")
    assert identical(dc.decode(d / "model.net", small_net["deploy"]), quantized)
    assert _accuracy(small_net["test"], decoded_model) == _accuracy(small_net["test"], qmodel)
    huf = dc.encode(layers, d / "model.huf", small_net["deploy"], format="huffman", bits=3)
    assert huf["layers"][0]["codebook"] == 7
    assert identical(dc.decode(d / "model.huf", small_net["deploy"]), dc.quantize(layers, 3))


def test_data_prototxt_without_input_shape_refused(small_net):
    with pytest.raises(UserError, match=r"test\.prototxt reads data \(layer 'data' of type Data\).*give the deploy"):
        dc.layer_specs(small_net["test"])


def test_compress_tool_reports_and_refuses_wrong_model(small_net):
    d = small_net["dir"]
    model = fileio.write_caffemodel(d / "sparse.caffemodel", dc.to_net_parameter(small_net["layers"],
                                                                                  small_net["specs"]))
    r = tool("compress", "--model", small_net["deploy"], "--weights", model, "--output", d / "tool.net")
    assert r.returncode == 0 and "total: " in r.stdout and "ratio" in r.stdout and "fc" in r.stdout
    r = tool("compress", "--model", DC_DEPLOY, "--weights", model, "--output", d / "bad.net")
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "has no weights for layer 'conv1'" in err[0]
    assert not (d / "bad.net").exists()


def test_edge_layers_round_trip():
    """All-zero, fully dense, one-valued and odd-count 4-bit layers, with hand-made specs (no prototxt)."""
    rng = np.random.default_rng(3)
    specs = [dc.LayerSpec("zero", "Convolution", 8, (2, 3, 3, 3), 2),
             dc.LayerSpec("dense", "InnerProduct", 4, (7, 5), 7),
             dc.LayerSpec("one", "Convolution", 8, (4, 1, 5, 5), 0),
             dc.LayerSpec("sparse", "InnerProduct", 4, (3, 101), 3)]
    sparse = rng.normal(size=(3, 101)).astype(np.float32)
    sparse[rng.random((3, 101)) < 0.9] = 0
    one = np.zeros((4, 1, 5, 5), np.float32)
    one[0, 0, 0, 0] = one[3, 0, 4, 4] = 0.25
    layers = {"zero": (np.zeros((2, 3, 3, 3), np.float32), np.ones(2, np.float32)),
              "dense": (rng.normal(size=(7, 5)).astype(np.float32) + 5, np.zeros(7, np.float32)),
              "one": (one, None),
              "sparse": (sparse, np.arange(3, dtype=np.float32))}
    expected = dc.quantize({k: (w, np.zeros(0, np.float32) if b is None else b) for k, (w, b) in layers.items()},
                           {s.name: s.bits for s in specs})
    data, _ = dc.encode_huffman_bytes(layers, specs)
    assert identical(dc.decode_bytes(data, specs), expected)
    with pytest.raises(UserError, match="'zero' is all zeros"):
        dc.encode_net_bytes(layers, specs)
    del layers["zero"], expected["zero"]
    data, rows = dc.encode_net_bytes(layers, specs[1:])
    assert identical(dc.decode_bytes(data, specs[1:]), expected)
    assert identical(readme_decoder(data, specs[1:]), expected)
    assert (rows[1]["nonzero"], rows[1]["fillers"], rows[1]["entries"]) == (2, 6, 8)  # 98 zeros: 6 fillers
    gaps = np.diff(np.concatenate([[-1], np.flatnonzero(sparse)])) - 1
    assert rows[2]["fillers"] == int((gaps // 16).sum()) and rows[2]["entries"] == len(gaps) + rows[2]["fillers"]
