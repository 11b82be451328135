"""The model zoo verifies files by git blob id, works offline from local files, and loads ready nets."""
import argparse
import dataclasses
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from helpers import DC_NET
from dsd_caffe import caffe_env, loading, netgen, zoo
from dsd_caffe.commands import zoo as zoo_command

DC = "deep-compression-squeezenet"
needs_dc = pytest.mark.skipif(not os.path.exists(DC_NET), reason=f"reference file {DC_NET} is absent")


def test_blob_id_matches_git_hash_object(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"hello\x00world\n" * 1000)
    git = subprocess.run(["git", "hash-object", str(f)], capture_output=True, text=True)
    if git.returncode != 0:
        pytest.skip("git is not available")
    assert zoo.git_blob_id(f) == git.stdout.strip()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert zoo.git_blob_id(empty) == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # git's empty blob


@needs_dc
def test_shared_compressed_squeezenet_verifies():
    assert zoo.git_blob_id(DC_NET) == zoo.ZOO[DC].blob_id
    assert zoo.verify(DC_NET, DC) == DC_NET


@needs_dc
def test_wrong_blob_id_refused():
    with pytest.raises(ValueError, match="git blob id b28ec20a.*expected ffce3635"):
        zoo.verify(DC_NET, "dsd-squeezenet")
    fake = dataclasses.replace(zoo.ZOO[DC], blob_id="0" * 40)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(zoo.ZOO, DC, fake)
        with pytest.raises(ValueError, match="expected 0000"):
            zoo.verify(DC_NET, DC)


def test_zoo_entries_are_complete():
    for m in zoo.ZOO.values():
        assert m.url.startswith("https://raw.githubusercontent.com/") and m.url.endswith(m.filename)
        assert m.blob_id or m.sha256 or m.sha1
        if m.architecture:  # the generated net carries the released weights' layer names
            for kind in ("deploy", "trainval"):
                assert netgen.detect_naming(netgen.weighted_layers(m.net_param(kind))) == m.naming
        else:
            assert m.net_param("deploy") is None
    with pytest.raises(ValueError, match="unknown zoo model"):
        zoo.get("alexnet")
    with pytest.raises(ValueError, match="'solver'"):
        zoo.get(DC).net_param("solver")


def test_fake_file_refused_and_nothing_left(tmp_path):
    fake = tmp_path / "fake.net"
    fake.write_bytes(os.urandom(675763))  # right size, wrong content
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(ValueError, match="not the released compressed_SqueezeNet.net"):
        zoo.fetch(DC, dest, url=str(fake))
    assert os.listdir(dest) == []
    short = tmp_path / "short.net"
    short.write_bytes(b"x" * 10)
    with pytest.raises(ValueError, match="10 bytes, expected 675763"):
        zoo.verify(short, DC)


@needs_dc
def test_fetch_from_local_path_and_file_url(tmp_path):
    a = zoo.fetch(DC, tmp_path, url=DC_NET)
    assert a == str(tmp_path / "compressed_SqueezeNet.net") and zoo.git_blob_id(a) == zoo.ZOO[DC].blob_id
    b = zoo.fetch(DC, tmp_path / "b.net", url=pathlib.Path(DC_NET).resolve().as_uri())
    assert open(b, "rb").read() == open(DC_NET, "rb").read()
    # a verified file already at dest is used as it is (the bogus URL is never opened)
    assert zoo.fetch(DC, tmp_path / "b.net", url="http://invalid.invalid/x") == str(tmp_path / "b.net")
    assert sorted(os.listdir(tmp_path)) == ["b.net", "compressed_SqueezeNet.net"]


@needs_dc
def test_existing_wrong_file_refused_unless_force(tmp_path):
    dest = tmp_path / "compressed_SqueezeNet.net"
    dest.write_bytes(b"not it")
    with pytest.raises(ValueError, match="--force"):
        zoo.fetch(DC, tmp_path, url=DC_NET)
    assert dest.read_bytes() == b"not it"
    zoo.fetch(DC, tmp_path, url=DC_NET, force=True)
    assert zoo.git_blob_id(dest) == zoo.ZOO[DC].blob_id


def test_missing_local_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.net"):
        zoo.fetch(DC, tmp_path, url=str(tmp_path / "nope.net"))


def _main(argv):
    with pytest.raises(SystemExit) as e:
        zoo_command.main(argv)
    return e.value.code


@needs_dc
def test_cli_fetch_and_verify(tmp_path, capsys, caplog):
    assert _main(["fetch", DC, "--output", str(tmp_path / "a.net"), "--from-file", DC_NET]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "a.net")
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]
    # the old positional destination still works for one release, with one deprecation line
    assert _main(["fetch", DC, str(tmp_path / "b.net"), "--from-file", DC_NET]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "b.net")
    assert [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()] == [
        "the positional output argument is deprecated and goes in the next release; use --output"]
    assert zoo.git_blob_id(tmp_path / "a.net") == zoo.git_blob_id(tmp_path / "b.net") == zoo.ZOO[DC].blob_id
    assert _main(["fetch", DC, "--from-file", DC_NET]) == 2
    assert "required: --output" in capsys.readouterr().err
    assert _main(["verify", "dsd-squeezenet", DC_NET]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "git blob id" in err[0]


def test_cli_help_names_the_module_and_every_flag_has_help(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [zoo.__file__])  # as `python -m dsd_caffe.zoo` starts it
    for argv in (["--help"], ["fetch", "--help"], ["verify", "--help"], ["list", "--help"]):
        assert _main(argv) == 0
        assert capsys.readouterr().out.startswith(" ".join(["usage: python -m dsd_caffe.zoo", *argv[:-1]]))
    top = zoo_command.parser()
    subs = next(a for a in top._actions if a.dest == "cmd").choices
    for p in [top, *subs.values()]:
        for action in p._actions:
            if action.help != argparse.SUPPRESS and action.dest not in ("help", "cmd"):
                assert action.help, (p.prog, action.dest)


TINY_DEPLOY = """name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 1 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


def test_load_zoo_name_and_prototxt(tmp_path):
    caffe = caffe_env.import_caffe()
    proto = tmp_path / "deploy.prototxt"
    proto.write_text(TINY_DEPLOY)
    caffe.set_random_seed(3)
    src = caffe.Net(str(proto), caffe.TEST)
    weights = tmp_path / "tiny.caffemodel"
    src.save(str(weights))
    entry = zoo.ZooModel(name="tiny", description="test", url="https://example.invalid/tiny.caffemodel",
                         filename="tiny.caffemodel", blob_id=zoo.git_blob_id(weights))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(zoo.ZOO, "tiny", entry)
        net = loading.load("tiny", weights=str(weights), prototxt=str(proto))
        assert loading.loaded_model(net) is entry
        cache = tmp_path / "cache"
        net2 = loading.load("tiny", url=str(weights), cache=str(cache), prototxt=proto)  # offline "download"
        assert os.listdir(cache) == ["tiny.caffemodel"]
        other = tmp_path / "other.caffemodel"
        caffe.set_random_seed(4)
        caffe.Net(str(proto), caffe.TEST).save(str(other))
        with pytest.raises(ValueError, match="git blob id"):
            loading.load("tiny", weights=str(other), prototxt=str(proto))
        with pytest.raises(ValueError, match="generates no net for it; pass prototxt="):
            loading.load("tiny", weights=str(weights))
    net3 = loading.load(str(proto), weights=str(weights))
    assert loading.loaded_model(net3) is None
    from google.protobuf import text_format

    param = text_format.Parse(TINY_DEPLOY, caffe_env.caffe_pb2().NetParameter())
    net4 = loading.load(param, weights=weights)  # a NetParameter in memory
    param.layer[1].convolution_param.num_output = 5
    with pytest.raises(ValueError, match="does not fit net 'tiny': layer 'conv1'"):
        loading.load(param, weights=weights)
    for n in (net, net2, net3, net4):
        for name in ("conv1", "fc"):
            assert np.array_equal(n.params[name][0].data, src.params[name][0].data)
    with pytest.raises(ValueError, match="neither a zoo model"):
        loading.load("no-such-model")


@needs_dc
def test_load_compressed_squeezenet():
    net = loading.load(DC, weights=DC_NET)  # the deploy net is generated in memory: no prototxt file involved
    convs = [k for k, l in zip(net._layer_names, net.layers) if l.type == "Convolution"]
    total = sum(net.params[k][0].data.size for k in convs)
    nonzero = sum(np.count_nonzero(net.params[k][0].data) for k in convs)
    assert (nonzero, total) == (415921, 1244448)


def test_sha256_used_when_no_blob_id(tmp_path):
    f = tmp_path / "squeezenet_v1.1.caffemodel"
    f.write_bytes(b"\0" * 4950080)  # the right size, not the right bytes
    with pytest.raises(ValueError, match="SHA-256 .* expected 72b912ace5"):
        zoo.verify(f, "squeezenet-v1.1")
