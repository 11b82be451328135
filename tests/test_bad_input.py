"""The bad-input catalogue across tools: every case runs the real tool as a subprocess and expects exit status 2 and
exactly one line on stderr, `<tool>.py: error: ...`, naming the bad file, layer or value, with no traceback (a
traceback only with --debug, tested once). Bad images during an LMDB build are skipped and listed (exit 0).
Besides the message, a case checks what the refusal leaves: no output (no folder made for it, no lock file beside
a device), inputs untouched, and on a full disk (a small private tmpfs) the old output or none. Odd inputs that
must simply work (paths with spaces and non-ASCII characters) are here too.

Other files test more cases of single tools (tests/test_evaluate.py, test_data.py, test_deepcompression.py,
test_phases.py, test_netgen.py); this one is the consolidated catalogue."""
import json
import os
import shutil
import subprocess

import lmdb
import numpy as np
import pytest

from dsd_caffe import fileio, lmdbio, masks, netgen, phases, pipeline, sources, training
from dsd_caffe.caffe_env import caffe_pb2, make_net
from dsd_caffe.solvers import Schedule
from helpers import DC_DEPLOY, DC_NET, tool, write_tiny_lmdb

caffe = pytest.importorskip("caffe")


def bad(name, *args, expect=(), logs_ok=False, env=None):
    """Run tools/<name>.py (``python -m name`` for a dotted name) and check: exit status 2, one stderr line
    `<name>.py: error: ...` containing every string of ``expect``, no traceback. ``logs_ok``: the error comes after
    work that logs progress, so log lines may precede it (the error is still the one last line). Returns the
    message."""
    r = tool(name, *args, env=env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr and "Check failed" not in r.stderr, r.stderr[-3000:]
    if logs_ok:
        assert sum(": error:" in line for line in lines) == 1, r.stderr[-3000:]
        lines = lines[-1:]
    assert len(lines) == 1, r.stderr[-3000:]
    prog = f"python -m {name}" if "." in name else f"{name}.py"
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    for s in expect:
        assert s in lines[0], (s, lines[0])
    if os.environ.get("SHOW_MESSAGES"):
        print("\nMESSAGE", lines[0])
    return lines[0]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def net(tmp_path_factory):
    """A folder with tiny LMDBs, the small SqueezeNet trainval, its dense caffemodel and bad variants of it."""
    folder = tmp_path_factory.mktemp("bad_input")
    rng = np.random.default_rng(0)
    write_tiny_lmdb(folder / "train_lmdb", rng.integers(0, 256, (8, 1, 28, 28)), rng.integers(0, 10, 8))
    write_tiny_lmdb(folder / "val_lmdb", rng.integers(0, 256, (8, 1, 28, 28)), rng.integers(0, 10, 8))
    write_tiny_lmdb(folder / "small_lmdb", rng.integers(0, 256, (4, 1, 16, 16)), rng.integers(0, 10, 4))
    (folder / "empty_lmdb").mkdir()
    (folder / "garbage_lmdb").mkdir()
    (folder / "garbage_lmdb" / "data.mdb").write_bytes(b"this is not an lmdb" * 100)
    tv = netgen.small_squeezenet("train_lmdb", "val_lmdb", train_batch=4, test_batch=4)
    model = str(folder / "trainval.prototxt")
    fileio.write_prototxt(model, tv)
    caffe.set_random_seed(0)
    weights = str(folder / "dense.caffemodel")
    make_net(sources.absolute_sources(tv, str(folder)), "TEST").save(weights)
    raw = open(weights, "rb").read()
    (folder / "truncated.caffemodel").write_bytes(raw[: len(raw) // 2])
    (folder / "empty.caffemodel").write_bytes(b"")
    (folder / "garbage.caffemodel").write_bytes(bytes(rng.integers(0, 256, 5000, dtype=np.uint8)))
    other = netgen.small_squeezenet("train_lmdb", "val_lmdb", width=2.0, train_batch=4, test_batch=4)
    make_net(sources.absolute_sources(other, str(folder)), "TEST").save(str(folder / "other.caffemodel"))
    fileio.write_caffemodel(str(folder / "deepscale.caffemodel"),
                            netgen.rename_weights(fileio.read_caffemodel(weights), "han", "deepscale"))
    text = open(model).read().splitlines()
    text[5] = text[5] + " {"  # an unbalanced brace on line 6
    (folder / "syntax.prototxt").write_text("\n".join(text) + "\n")
    fileio.write_prototxt(str(folder / "deploy.prototxt"), netgen.deploy(tv, input_shape=(1, 1, 28, 28)))
    images = rng.integers(0, 256, (8, 1, 28, 28))
    write_tiny_lmdb(folder / "mixed_lmdb", images, rng.integers(0, 10, 8))
    env = lmdb.open(str(folder / "mixed_lmdb"), map_size=1 << 20)  # only a later record is smaller than the crop
    with env.begin(write=True) as txn:
        small = caffe_pb2().Datum(channels=1, height=16, width=16, data=bytes(256), label=1)
        txn.put(b"00000006", small.SerializeToString())
    env.close()
    return {"dir": folder, "model": model, "weights": weights}


@pytest.fixture(scope="module")
def pruned(net):
    out = str(net["dir"] / "pruned")
    phases.prune(phases.Inputs(net["model"], net["weights"]), out, phases.PruneConfig(ratio="3x"),
                 Schedule(max_iter=2, snapshot=1, base_lr=0.01))
    return out


def p(net, name):
    return str(net["dir"] / name)


# ------------------------------------------------------------------------------------------------ caffemodels
@pytest.mark.parametrize("which", ["prune", "evaluate", "retrain_dense", "dsd", "sensitivity"])
def test_truncated_caffemodel(net, tmp_path, which):
    w = p(net, "truncated.caffemodel")
    args = {"prune": ("--ratio", "3x", "--output", tmp_path / "o"),
            "evaluate": ("--iterations", 1),
            "retrain_dense": ("--max-iter", 1, "--output", tmp_path / "o"),
            "dsd": ("--ratio", "3x", "--output", tmp_path / "o", "--sparse-max-iter", 1, "--redense-max-iter", 1),
            "sensitivity": ("--output", tmp_path / "o")}[which]
    bad(which, "--model", net["model"], "--weights", w, *args, expect=("truncated.caffemodel", "truncated"))
    assert not os.path.exists(tmp_path / "o" / "dsd_state.json")


def test_empty_caffemodel(net):
    bad("evaluate", "--model", net["model"], "--weights", p(net, "empty.caffemodel"), expect=("empty.caffemodel",))


def test_corrupted_caffemodel(net, tmp_path):
    bad("prune", "--model", net["model"], "--weights", p(net, "garbage.caffemodel"), "--ratio", "3x", "--output",
        tmp_path / "o", expect=("garbage.caffemodel",))


def test_missing_caffemodel(net, tmp_path):
    bad("dsd", "--model", net["model"], "--weights", p(net, "nope.caffemodel"), "--ratio", "3x", "--output",
        tmp_path / "o", expect=("nope.caffemodel",))


def test_caffemodel_from_another_net(net, tmp_path):
    msg = bad("prune", "--model", net["model"], "--weights", p(net, "other.caffemodel"), "--ratio", "3x",
              "--output", tmp_path / "o", expect=("other.caffemodel", "'conv1'"))
    assert "16" in msg and "32" in msg  # both shapes of conv1's weights
    assert not os.path.exists(tmp_path / "o" / phases.PRUNED)


def test_caffemodel_in_the_other_naming(net, tmp_path):
    msg = bad("retrain_dense", "--model", net["model"], "--weights", p(net, "deepscale.caffemodel"), "--max-iter",
              1, "--output", tmp_path / "o", expect=("deepscale.caffemodel",))
    assert "deepscale" in msg.lower().replace("deepscale.caffemodel", "") and "naming" in msg.lower(), msg


# ------------------------------------------------------------------------------------------------ prototxts
@pytest.mark.parametrize("which", ["prune", "evaluate", "dsd", "retrain_dense"])
def test_prototxt_syntax_error_line_and_column(net, tmp_path, which):
    args = {"prune": ("--ratio", "3x", "--output", tmp_path / "o"), "evaluate": (),
            "dsd": ("--ratio", "3x", "--output", tmp_path / "o"),
            "retrain_dense": ("--max-iter", 1, "--output", tmp_path / "o")}[which]
    bad(which, "--model", p(net, "syntax.prototxt"), "--weights", net["weights"], *args,
        expect=("syntax.prototxt:6:16:", "syntax error"))
    assert not os.path.exists(tmp_path / "o") or not os.listdir(tmp_path / "o")  # prune's write probe: empty


def test_truncated_pruned_model_in_a_sparse_folder(pruned, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(pruned, run, ignore=shutil.ignore_patterns("snapshots"))
    path = os.path.join(run, phases.PRUNED)
    raw = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(raw[: len(raw) - 100])
    bad("train_sparse", run, expect=(phases.PRUNED, "truncated"))


def test_compress_truncated_caffemodel(net, tmp_path):
    bad("compress", "--model", p(net, "deploy.prototxt"), "--weights", p(net, "truncated.caffemodel"),
        "--output", tmp_path / "o.net", expect=("truncated.caffemodel", "truncated"))
    assert not os.path.exists(tmp_path / "o.net")


@pytest.mark.parametrize("which", ["prune", "evaluate", "dsd", "retrain_dense"])
def test_caffemodel_given_as_the_prototxt(net, tmp_path, which):
    """A binary file where a prototxt belongs (the caffemodel as --model, or as --solver) is one line, not a
    UnicodeDecodeError traceback."""
    args = {"prune": ("--ratio", "3x", "--output", tmp_path / "o"), "evaluate": (),
            "dsd": ("--ratio", "3x", "--output", tmp_path / "o"),
            "retrain_dense": ("--max-iter", 1, "--output", tmp_path / "o")}[which]
    bad(which, "--model", net["weights"], "--weights", net["weights"], *args,
        expect=("dense.caffemodel", "not a text prototxt"))
    if which != "evaluate":
        bad(which, "--model", net["model"], "--weights", net["weights"], "--solver", net["weights"], *args,
            expect=("dense.caffemodel", "not a text prototxt"))


def test_missing_prototxt(net):
    bad("evaluate", "--model", p(net, "nope.prototxt"), "--weights", net["weights"], expect=("nope.prototxt",))


# ------------------------------------------------------------------------------------------------ LMDBs
def test_missing_lmdb(net, tmp_path):
    bad("retrain_dense", "--model", net["model"], "--weights", net["weights"], "--max-iter", 1, "--output",
        tmp_path / "o", "--train-source", p(net, "no_such_lmdb"), expect=("no_such_lmdb", "not found"))


def test_empty_lmdb(net, tmp_path):
    bad("retrain_dense", "--model", net["model"], "--weights", net["weights"], "--max-iter", 1, "--output",
        tmp_path / "o", "--test-source", p(net, "empty_lmdb"), expect=("empty_lmdb", "empty"))


def test_unreadable_lmdb(net, tmp_path):
    bad("dsd", "--model", net["model"], "--weights", net["weights"], "--ratio", "3x", "--output", tmp_path / "o",
        "--train-source", p(net, "garbage_lmdb"), expect=("garbage_lmdb",))


def test_lmdb_is_a_file(net, tmp_path):
    bad("prune", "--model", net["model"], "--weights", net["weights"], "--ratio", "3x", "--output", tmp_path / "o",
        "--train-source", net["weights"], expect=("dense.caffemodel",))


def test_lmdb_images_smaller_than_the_crop(net, tmp_path):
    bad("dsd", "--model", net["model"], "--weights", net["weights"], "--ratio", "3x", "--output", tmp_path / "o",
        "--test-source", p(net, "small_lmdb"), expect=("small_lmdb", "16x16", "crop_size 28"))


def test_evaluate_lmdb_smaller_than_the_crop(net, tmp_path):
    tv = netgen.small_squeezenet("train_lmdb", p(net, "small_lmdb"), train_batch=4, test_batch=4)
    fileio.write_prototxt(str(tmp_path / "small.prototxt"), tv)
    bad("evaluate", "--model", tmp_path / "small.prototxt", "--weights", net["weights"],
        expect=("small_lmdb", "16x16", "crop_size 28"))


def test_lmdb_labels_outside_the_classes(net, tmp_path):
    """Caffe only DCHECKs labels: a release build reads past the scores and prints a meaningless accuracy."""
    rng = np.random.default_rng(1)
    write_tiny_lmdb(tmp_path / "lab_lmdb", rng.integers(0, 256, (8, 1, 28, 28)), [3, 15, 2, 1, 0, 4, 5, 6])
    tv = netgen.small_squeezenet("train_lmdb", str(tmp_path / "lab_lmdb"), train_batch=4, test_batch=4)
    fileio.write_prototxt(str(tmp_path / "lab.prototxt"), tv)
    bad("evaluate", "--model", tmp_path / "lab.prototxt", "--weights", net["weights"], "--iterations", 2,
        expect=("label 15", "10 classes"), logs_ok=True)


def test_train_lmdb_labels_outside_the_classes(net, tmp_path):
    rng = np.random.default_rng(2)
    write_tiny_lmdb(tmp_path / "lab_lmdb", rng.integers(0, 256, (8, 1, 28, 28)), [15] * 8)
    bad("retrain_dense", "--model", net["model"], "--weights", net["weights"], "--output", tmp_path / "o",
        "--max-iter", 2, "--train-source", tmp_path / "lab_lmdb", expect=("label 15",), logs_ok=True)


def test_sensitivity_lmdb_smaller_than_the_crop(net, tmp_path):
    bad("sensitivity", "--model", net["model"], "--weights", net["weights"], "--output", tmp_path / "o",
        "--test-source", p(net, "small_lmdb"), expect=("small_lmdb",))


# ------------------------------------------------------------------------------------------------ ratios
RATIOS = [("--ratio", "1x"), ("--ratio", "0x"), ("--ratio", "-3x"), ("--ratio", "nanx"), ("--ratio", "NaN"),
          ("--ratio", "3"), ("--ratio", "x"), ("--density", "0"), ("--density", "1"), ("--density", "-0.3"),
          ("--density", "nan"), ("--density", "3x"), ("--sparsity", "1.5"), ("--sparsity", "0"),
          ("--sparsity", "inf")]


@pytest.mark.parametrize("flag,value", RATIOS, ids=[f"{f[2:]}={v}" for f, v in RATIOS])
def test_invalid_ratio_forms(net, tmp_path, flag, value):
    msg = bad("prune", "--model", net["model"], "--weights", net["weights"], "--output", tmp_path / "o",
              f"{flag}={value}", expect=(value, "accepted forms"))
    assert not os.path.exists(tmp_path / "o")
    if value == "3":
        assert '"3x"' in msg  # the hint for a bare number


def test_two_ratio_flags_at_once(net, tmp_path):
    bad("dsd", "--model", net["model"], "--weights", net["weights"], "--output", tmp_path / "o", "--ratio", "3x",
        "--sparsity", "0.6", expect=("--ratio and --sparsity", "accepted forms"))
    assert not os.path.exists(tmp_path / "o")


def test_no_ratio_with_uniform_profile(net, tmp_path):
    bad("prune", "--model", net["model"], "--weights", net["weights"], "--output", tmp_path / "o",
        expect=("uniform",))


# ------------------------------------------------------------------------------------------------ profiles, masks
def test_profile_naming_unknown_layers(net, tmp_path):
    prof = tmp_path / "profile.json"
    prof.write_text(json.dumps({"*": 0.33, "conv1": 1.0, "fire9/squeeze1x1": 0.5}))
    bad("prune", "--model", net["model"], "--weights", net["weights"], "--output", tmp_path / "o", "--profile", prof,
        expect=("fire9/squeeze1x1",))
    assert not os.path.exists(tmp_path / "o" / phases.PRUNED)


def test_profile_not_json(net, tmp_path):
    prof = tmp_path / "profile.json"
    prof.write_text("{conv1: 0.5")
    bad("prune", "--model", net["model"], "--weights", net["weights"], "--output", tmp_path / "o", "--profile", prof,
        expect=("profile.json",))


def test_unknown_profile_name(net, tmp_path):
    bad("prune", "--model", net["model"], "--weights", net["weights"], "--output", tmp_path / "o", "--ratio", "3x",
        "--profile", "squeezenet-4x", expect=("squeezenet-4x",))


def test_mask_that_does_not_fit_the_net(pruned, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(pruned, run, ignore=shutil.ignore_patterns("snapshots"))
    path = os.path.join(run, phases.SPARSE_NET)
    net = fileio.read_net_prototxt(path)
    layer = next(l for l in net.layer if l.type == "Python")
    spec = json.loads(layer.python_param.param_str)
    spec["layers"][1]["shape"] = [s + 1 for s in spec["layers"][1]["shape"]]
    layer.python_param.param_str = json.dumps(spec)
    fileio.write_prototxt(path, net)
    bad("train_sparse", run, expect=(spec["layers"][1]["name"], "does not fit"))


def test_masks_file_that_does_not_fit(pruned, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(pruned, run, ignore=shutil.ignore_patterns("snapshots"))
    kept = masks.load_masks(os.path.join(run, phases.MASKS))
    name = next(iter(kept))
    kept[name] = np.ones((3, 3), bool)
    masks.save_masks(os.path.join(run, phases.MASKS), kept, force=True)
    bad("train_sparse", run, expect=(phases.MASKS, repr(name), "(3, 3)"))


def test_folder_not_written_by_prune(net, tmp_path):
    bad("train_sparse", tmp_path, expect=(str(tmp_path), "prune"))


def test_sensitivity_unknown_layer(net, tmp_path):
    bad("sensitivity", "--model", net["model"], "--weights", net["weights"], "--output", tmp_path / "o",
        "--layers", "conv1,fire99/conv3x3_2", expect=("fire99/conv3x3_2",))


# ------------------------------------------------------------------------------------------------ .net files
@pytest.fixture(scope="module")
def net_bytes():
    if not os.path.exists(DC_NET):
        pytest.skip("shared reference .net not available")
    with open(DC_NET, "rb") as f:
        return f.read()


def test_net_file_truncated(net_bytes, tmp_path):
    (tmp_path / "cut.net").write_bytes(net_bytes[:-100])
    bad("decode_compressed", "--model", DC_DEPLOY, "--net", tmp_path / "cut.net", "--output", tmp_path / "o.caffemodel",
        expect=("cut.net", "truncated"))
    assert not os.path.exists(tmp_path / "o.caffemodel")


def test_net_file_too_long(net_bytes, tmp_path):
    (tmp_path / "long.net").write_bytes(net_bytes + b"\0" * 7)
    bad("decode_compressed", "--model", DC_DEPLOY, "--net", tmp_path / "long.net", "--output",
        tmp_path / "o.caffemodel", expect=("long.net", "too long"))
    assert not os.path.exists(tmp_path / "o.caffemodel")


def test_net_file_with_the_wrong_prototxt(net, net_bytes, tmp_path):
    (tmp_path / "x.net").write_bytes(net_bytes)
    bad("decode_compressed", "--model", p(net, "deploy.prototxt"), "--net", tmp_path / "x.net", "--output",
        tmp_path / "o.caffemodel", expect=("x.net",))


# ------------------------------------------------------------------------------------------------ output folders
@pytest.fixture
def locked(tmp_path):
    """A folder this process cannot write into (chattr +i for root, else mode 0555)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("running as root without chattr: every folder is writable")
    else:
        folder.chmod(0o555)
    yield folder
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    folder.chmod(0o755)


@pytest.mark.parametrize("which", ["prune", "dsd", "retrain_dense"])
def test_unwritable_output_folder(net, locked, which):
    extra = {"prune": ("--ratio", "3x"), "dsd": ("--ratio", "3x"), "retrain_dense": ("--max-iter", 1)}[which]
    bad(which, "--model", net["model"], "--weights", net["weights"], "--output", locked / "run", *extra,
        expect=("locked", "not writable"))


def test_make_lmdb_unwritable_output(locked, writers):
    bad("make_lmdb", writers["img"], "--output", locked / "out_lmdb", "--resize", "8x8", expect=("locked",))


def test_output_folder_holding_a_finished_dsd_run(net, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    fileio.write_json(str(out / pipeline.STATE), {"config": {}, "phases": [], "finished": True})
    bad("dsd", "--model", net["model"], "--weights", net["weights"], "--output", out, "--ratio", "3x",
        expect=(str(out), "finished", "--force"))


def test_output_folder_holding_an_unfinished_run_with_other_settings(net, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    fileio.write_json(str(out / pipeline.STATE), {"config": {"cycles": 9}, "phases": [], "finished": False})
    bad("dsd", "--model", net["model"], "--weights", net["weights"], "--output", out, "--ratio", "3x",
        expect=(str(out), "other settings", "cycles"))


def test_output_folder_holding_other_files(net, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    bad("dsd", "--model", net["model"], "--weights", net["weights"], "--output", out, "--ratio", "3x",
        expect=(str(out), "not empty"))
    assert (out / "thesis.tex").read_text() == "do not delete"


@pytest.mark.parametrize("flag,value", [("--sparse-base-lr", "0"), ("--redense-base-lr", "-1e-4"),
                                        ("--redense-base-lr", "nan"), ("--sparse-max-iter", "0"),
                                        ("--redense-epochs", "inf"), ("--snapshot", "-5"), ("--iter-size", "0"),
                                        ("--seed", "-1"), ("--profile", "nonsense"), ("--seeds", "0"),
                                        ("--jobs", "0"), ("--iterations", "0")])
def test_dsd_bad_numbers_refused_before_the_run_exists(net, tmp_path, flag, value):
    out = tmp_path / "o"
    bad("dsd", "--model", net["model"], "--weights", net["weights"], "--output", out, "--ratio", "3x",
        f"{flag}={value}",
        expect=(flag if flag != "--profile" else "nonsense",))
    assert not (out / pipeline.STATE).exists()


def test_output_folder_holding_a_pruned_model(net, pruned):
    bad("prune", "--model", net["model"], "--weights", net["weights"], "--output", pruned, "--ratio", "3x",
        expect=(pruned, "--force"))


def test_output_lmdb_exists(net, writers):
    bad("make_lmdb", writers["img"], "--output", p(net, "train_lmdb"), "--resize", "8x8",
        expect=("train_lmdb", "--force"))


def test_decode_output_exists(net, net_bytes, tmp_path):
    out = tmp_path / "o.caffemodel"
    out.write_bytes(b"precious")
    bad("decode_compressed", "--model", DC_DEPLOY, "--net", DC_NET, "--output", out, expect=("o.caffemodel",))
    assert out.read_bytes() == b"precious"


# ------------------------------------------------------------------------------------------------ make_lmdb
def test_make_lmdb_skips_and_lists_bad_images(tmp_path):
    import cv2

    src = tmp_path / "img"
    for cls in ("cat", "dog"):
        (src / cls).mkdir(parents=True)
        for i in range(2):
            cv2.imwrite(str(src / cls / f"{i}.png"), np.full((10, 12, 3), 40 * i, np.uint8))
    (src / "cat" / "notes.jpg").write_text("not an image at all")
    good = (src / "dog" / "0.png").read_bytes()
    (src / "dog" / "broken.png").write_bytes(good[: len(good) // 2])
    r = tool("make_lmdb", src, "--output", tmp_path / "out_lmdb", "--resize", "8x8")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    said = r.stdout + r.stderr
    assert "notes.jpg" in said and "broken.png" in said, said
    assert lmdbio.lmdb_info(str(tmp_path / "out_lmdb"))["count"] == 4


def test_make_lmdb_no_image_at_all(tmp_path):
    src = tmp_path / "img" / "cat"
    src.mkdir(parents=True)
    (src / "a.jpg").write_text("nope")
    bad("make_lmdb", tmp_path / "img", "--output", tmp_path / "out_lmdb", expect=("none of the 1 files", "img"),
        logs_ok=True)
    assert not os.path.exists(tmp_path / "out_lmdb")


def test_make_lmdb_missing_source(tmp_path):
    bad("make_lmdb", tmp_path / "nowhere", "--output", tmp_path / "out_lmdb", expect=("nowhere",))


def test_import_fashion_mnist_missing_files(tmp_path):
    bad("import_fashion_mnist", "--output", tmp_path / "o", "--source-dir", tmp_path / "nothing_here",
        expect=("nothing_here",))


# ------------------------------------------------------------------------------------------------ --gpu
@pytest.mark.parametrize("which", ["evaluate", "retrain_dense", "dsd", "train_sparse", "sensitivity"])
def test_gpu_on_a_cpu_only_build(net, pruned, tmp_path, which):
    from dsd_caffe.caffe_env import has_gpu_support

    if has_gpu_support():
        pytest.skip("this Caffe is a CUDA build")
    common = ("--model", net["model"], "--weights", net["weights"])
    args = {"evaluate": common,
            "retrain_dense": common + ("--max-iter", 1, "--output", tmp_path / "o"),
            "dsd": common + ("--ratio", "3x", "--output", tmp_path / "o"),
            "train_sparse": (pruned,),
            "sensitivity": common + ("--output", tmp_path / "o")}[which]
    bad(which, *args, "--gpu", 0, expect=("--gpu", "CPU-only"))
    assert not os.path.exists(tmp_path / "o")  # a refusal leaves no output folder behind


# ------------------------------------------------------------------------------------------------ others
def test_dsd_cycles_zero(net, tmp_path):
    bad("dsd", "--model", net["model"], "--weights", net["weights"], "--output", tmp_path / "o", "--ratio", "3x",
        "--cycles", "0", expect=("--cycles", "0"))


def test_evaluate_iterations_zero(net):
    bad("evaluate", "--model", net["model"], "--weights", net["weights"], "--iterations", "0",
        expect=("iterations",))


@pytest.mark.parametrize("flag,value,what", [("--iter-size", "0", "--iter-size"), ("--base-lr", "-1", "--base-lr"),
                                             ("--max-iter", "0", "--max-iter")])
def test_retrain_dense_bad_solver_numbers(net, tmp_path, flag, value, what):
    args = () if flag == "--max-iter" else ("--max-iter", 2)
    bad("retrain_dense", "--model", net["model"], "--weights", net["weights"], "--output", tmp_path / "o", flag,
        value, *args, expect=(what, value))


def test_sparse_solver_syntax_error(pruned, tmp_path):
    run = os.path.join(os.path.dirname(pruned), "run-syntax")  # beside the LMDBs its sources name
    shutil.copytree(pruned, run, ignore=shutil.ignore_patterns("snapshots"))
    with open(os.path.join(run, phases.SPARSE_SOLVER), "a") as f:
        f.write("max_iter: lots\n")
    bad("train_sparse", run, expect=(phases.SPARSE_SOLVER, "syntax error"))


def test_traceback_only_with_debug(net, tmp_path):
    r = tool("prune", "--model", net["model"], "--weights", p(net, "truncated.caffemodel"), "--ratio", "3x",
             "--output", tmp_path / "o", "--debug")
    assert r.returncode != 0 and "Traceback (most recent call last)" in r.stderr
    assert "truncated.caffemodel" in r.stderr


# ------------------------------------------------------------------------------------------------ unbuildable layers
BROKEN_MODULE = "dsd_broken_layer"  # a module with a syntax error, in the fixture's pymods/ (on PYTHONPATH)
LAYER_CASES = {"misspelt type": ("'conv1'", "'Convolutoin'", "did you mean 'Convolution'"),
               "no module": ("'py'", "'no_such_layer_module'", "cannot be imported"),
               "no class": ("'py'", "'dsd_caffe.masklayer'", "no class 'NoSuchLayer'"),
               "module fails to import": ("'py'", f"'{BROKEN_MODULE}'", "SyntaxError")}


def _with_python_layer(tv, module, cls):
    """The trainval with a Python layer ``py`` (no bottom, one unused top) right after its two data layers."""
    net = sources.copy_message(tv)
    layers = list(net.layer)
    py = type(layers[0])(name="py", type="Python", top=["py_out"])
    py.python_param.module, py.python_param.layer = module, cls
    del net.layer[:]
    net.layer.extend(layers[:2] + [py] + layers[2:])
    return net


@pytest.fixture(scope="module")
def broken(net):
    """{case: (trainval, its deploy form)} that Caffe cannot build (LAYER_CASES), and ``pymods`` holding the module
    that fails to import."""
    folder = net["dir"]
    (folder / "pymods").mkdir()
    (folder / "pymods" / f"{BROKEN_MODULE}.py").write_text("class Layer(:\n    pass\n")
    tv = fileio.read_net_prototxt(net["model"])
    typo = sources.copy_message(tv)
    next(l for l in typo.layer if l.name == "conv1").type = "Convolutoin"
    variants = {"misspelt type": typo, "no module": _with_python_layer(tv, "no_such_layer_module", "Layer"),
                "no class": _with_python_layer(tv, "dsd_caffe.masklayer", "NoSuchLayer"),
                "module fails to import": _with_python_layer(tv, BROKEN_MODULE, "Layer")}
    out = {"pymods": {"PYTHONPATH": str(folder / "pymods")}}
    for i, (case, variant) in enumerate(variants.items()):
        model, deploy = str(folder / f"broken{i}.prototxt"), str(folder / f"broken{i}_deploy.prototxt")
        fileio.write_prototxt(model, variant)
        fileio.write_prototxt(deploy, netgen.deploy(variant, input_shape=(1, 1, 28, 28)))
        out[case] = (model, deploy)
    return out


@pytest.mark.parametrize("case", list(LAYER_CASES))
@pytest.mark.parametrize("which", ["prune", "retrain_dense", "dsd", "evaluate", "sensitivity", "compress",
                                   "decode_compressed"])
def test_unbuildable_layer_is_named_before_caffe_builds_the_net(net, pruned, broken, tmp_path, which, case):
    """Caffe answers these with a glog abort (exit 134) or a 20-line Boost.Python traceback."""
    model, deploy = broken[case]
    common = ("--model", model, "--weights", net["weights"])
    sparse = os.path.join(pruned, phases.PRUNED)
    args = {"prune": common + ("--ratio", "3x", "--output", tmp_path / "o"),
            "retrain_dense": common + ("--max-iter", 1, "--output", tmp_path / "o"),
            "dsd": common + ("--ratio", "3x", "--output", tmp_path / "o"),
            "evaluate": common + ("--iterations", 1),
            "sensitivity": common + ("--output", tmp_path / "o"),
            "compress": ("--model", deploy, "--weights", sparse, "--output", tmp_path / "o"),
            "decode_compressed": ("--model", deploy, "--net", sparse, "--output", tmp_path / "o")}[which]
    bad(which, *args, expect=LAYER_CASES[case], env=broken["pymods"])
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("engine", ["binary", "pycaffe"])
@pytest.mark.parametrize("case", ["misspelt type", "mask layer's module", "mask layer's class",
                                  "module fails to import"])
def test_train_sparse_unbuildable_layer_in_the_folder(pruned, broken, tmp_path, case, engine):
    """The folder's sparse_trainval edited by hand: the layer and the module or type are named (not "holds no
    mask layer"), before Caffe starts."""
    run = str(tmp_path / "run")
    shutil.copytree(pruned, run, ignore=shutil.ignore_patterns("snapshots"))
    path = os.path.join(run, phases.SPARSE_NET)
    sparse = fileio.read_net_prototxt(path)
    mask = next(l for l in sparse.layer if masks.is_mask_layer(l))
    expect = (repr(mask.name),)
    if case == "misspelt type":
        next(l for l in sparse.layer if l.name == "conv1").type = "Convolutoin"
        expect = LAYER_CASES[case]
    elif case == "mask layer's module":
        mask.python_param.module = "dsd_caffe.no_such_masklayer"
        expect += ("'dsd_caffe.no_such_masklayer'", "cannot be imported")
    elif case == "mask layer's class":
        mask.python_param.layer = "NoSuchLayer"
        expect += ("no class 'NoSuchLayer'",)
    else:
        mask.python_param.module = BROKEN_MODULE
        expect += (f"'{BROKEN_MODULE}'", "SyntaxError")
    fileio.write_prototxt(path, sparse)
    bad("train_sparse", run, "--engine", engine, expect=expect + (phases.SPARSE_NET,), env=broken["pymods"])
    assert not os.path.exists(os.path.join(run, training.LOG)) and not os.path.exists(os.path.join(run, phases.SPARSE))


# ------------------------------------------------------------------------------------------------ data needed
@pytest.mark.parametrize("which", ["evaluate", "sensitivity", "retrain_dense", "dsd"])
def test_deploy_net_where_data_is_needed(net, tmp_path, which):
    """A deploy net (an Input layer, no data): caffe test runs it on zeros and prints meaningless numbers."""
    args = {"evaluate": ("--iterations", 1), "sensitivity": ("--output", tmp_path / "o"),
            "retrain_dense": ("--max-iter", 1, "--output", tmp_path / "o"),
            "dsd": ("--ratio", "3x", "--output", tmp_path / "o")}[which]
    bad(which, "--model", p(net, "deploy.prototxt"), "--weights", net["weights"], *args,
        expect=("deploy.prototxt", "only Input layers", "deploy net"))
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("which", ["prune", "retrain_dense", "dsd", "sensitivity", "evaluate"])
def test_lmdb_with_one_later_record_smaller_than_the_crop(net, tmp_path, which):
    """The first record is 28x28 (what lmdb_info sees); record 00000006 is 16x16, which aborts Caffe mid-run."""
    common = ("--model", net["model"], "--weights", net["weights"])
    if which == "evaluate":
        tv = netgen.small_squeezenet("train_lmdb", p(net, "mixed_lmdb"), train_batch=4, test_batch=4)
        fileio.write_prototxt(str(tmp_path / "mixed.prototxt"), tv)
        common = ("--model", tmp_path / "mixed.prototxt", "--weights", net["weights"])
    args = {"prune": ("--ratio", "3x", "--output", tmp_path / "o"),
            "retrain_dense": ("--max-iter", 1, "--output", tmp_path / "o"),
            "dsd": ("--ratio", "3x", "--output", tmp_path / "o"), "sensitivity": ("--output", tmp_path / "o"),
            "evaluate": ()}[which]
    source = () if which == "evaluate" else ("--test-source", p(net, "mixed_lmdb"))
    bad(which, *common, *args, *source, expect=("mixed_lmdb", "record 00000006", "16x16", "crop size 28"))
    assert not os.path.exists(tmp_path / "o")


# ------------------------------------------------------------------------------------------------ outputs
@pytest.fixture(scope="module")
def writers(net, pruned):
    """Inputs for every tool that writes: an image folder, a folder of IDX files that are not IDX files, the small
    net's deploy prototxt with a .net file of its pruned model."""
    import cv2

    from dsd_caffe import deepcompression

    folder = net["dir"]
    (folder / "img" / "cat").mkdir(parents=True)
    cv2.imwrite(str(folder / "img" / "cat" / "a.png"), np.zeros((8, 8, 3), np.uint8))
    (folder / "idx").mkdir()
    for name in ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1"):
        (folder / "idx" / f"{name}-ubyte.gz").write_bytes(b"not an IDX file")
    deploy, small = p(net, "deploy.prototxt"), p(net, "small.net")
    deepcompression.compress(deploy, os.path.join(pruned, phases.PRUNED), small)
    return {"img": p(net, "img"), "idx": p(net, "idx"), "deploy": deploy, "net": small,
            "sparse": os.path.join(pruned, phases.PRUNED)}


WRITERS = ["prune", "train_sparse", "retrain_dense", "dsd", "evaluate", "sensitivity", "make_lmdb",
           "make_lmdb --mean-file", "import_fashion_mnist", "decode_compressed", "compress", "generate", "demo",
           "dsd_caffe.zoo", "export_onnx"]


def writer_args(which, out, net, w, elsewhere):
    """(tool, args) writing ``out``; ``elsewhere`` is a folder for its other outputs."""
    common = ("--model", net["model"], "--weights", net["weights"])
    args = {"prune": common + ("--ratio", "3x", "--output", out),
            "train_sparse": (out,),
            "retrain_dense": common + ("--max-iter", 1, "--output", out),
            "dsd": common + ("--ratio", "3x", "--output", out),
            "evaluate": common + ("--iterations", 1, "--output", out),
            "sensitivity": common + ("--iterations", 1, "--densities", 0.5, "--output", out),
            "make_lmdb": (w["img"], "--output", out, "--resize", "8x8"),
            "make_lmdb --mean-file": (w["img"], "--output", elsewhere / "out_lmdb", "--mean-file", out, "--resize",
                                      "8x8"),
            "import_fashion_mnist": ("--output", out, "--source-dir", w["idx"]),
            "decode_compressed": ("--model", w["deploy"], "--net", w["net"], "--output", out),
            "compress": ("--model", w["deploy"], "--weights", w["sparse"], "--output", out),
            "generate": ("--output", out),
            "demo": ("--output", out, "--quick"),
            "dsd_caffe.zoo": ("fetch", "squeezenet-v1.0", "--output", out, "--from-file", net["weights"]),
            "export_onnx": common + ("--output", out)}[which]
    return which.split()[0], args


def special(kind, folder):
    """(path, its stat test, the message's word) of /dev/null, or a FIFO or socket made in ``folder``."""
    import socket
    import stat

    if kind == "/dev/null":
        return "/dev/null", stat.S_ISCHR, "a character device"
    path = folder / kind
    if kind == "fifo":
        os.mkfifo(path)
        return str(path), stat.S_ISFIFO, "a FIFO"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))  # the socket file stays after the socket closes
    return str(path), stat.S_ISSOCK, "a socket"


@pytest.mark.parametrize("kind", ["/dev/null", "fifo", "socket"])
@pytest.mark.parametrize("which", WRITERS)
def test_special_file_as_output_is_refused_and_left_alone(net, writers, tmp_path, which, kind):
    """Also with --force: one line naming it, the file still what it was, nothing made beside it (no lock file in
    /dev either)."""
    (tmp_path / "here").mkdir()
    out, is_kind, word = special(kind, tmp_path / "here")
    before = sorted(os.listdir(os.path.dirname(out)))
    name, args = writer_args(which, out, net, writers, tmp_path / "elsewhere")
    for force in ((), ("--force",)):
        bad(name, *args, *force, expect=(f"{out} is {word}", "also with --force"), logs_ok=name == "evaluate")
        assert is_kind(os.stat(out).st_mode)
    assert sorted(os.listdir(os.path.dirname(out))) == before
    assert not os.path.exists(tmp_path / "elsewhere")


REFUSALS = {  # a refused input, and the tool it goes to: (tool, args with the output at NEW)
    "prune: truncated weights": ("prune", ("--model", "MODEL", "--weights", "TRUNCATED", "--ratio", "3x",
                                           "--output", "NEW")),
    "prune: --skip every layer": ("prune", ("--model", "MODEL", "--weights", "WEIGHTS", "--ratio", "3x", "--skip",
                                            "*", "--output", "NEW")),
    "retrain_dense: truncated weights": ("retrain_dense", ("--model", "MODEL", "--weights", "TRUNCATED",
                                                           "--output", "NEW")),
    "retrain_dense: --gpu 0": ("retrain_dense", ("--model", "MODEL", "--weights", "WEIGHTS", "--gpu", 0, "--output",
                                                 "NEW")),
    "dsd: truncated weights": ("dsd", ("--model", "MODEL", "--weights", "TRUNCATED", "--ratio", "3x", "--output",
                                       "NEW")),
    "sensitivity: truncated weights": ("sensitivity", ("--model", "MODEL", "--weights", "TRUNCATED", "--output",
                                                       "NEW")),
    "sensitivity: --gpu 0": ("sensitivity", ("--model", "MODEL", "--weights", "WEIGHTS", "--gpu", 0, "--output",
                                             "NEW")),
    "evaluate: truncated weights": ("evaluate", ("--model", "MODEL", "--weights", "TRUNCATED", "--output", "NEW")),
    "make_lmdb: no image": ("make_lmdb", ("JUNK", "--output", "NEW")),
    "import_fashion_mnist: not IDX files": ("import_fashion_mnist", ("--output", "NEW", "--source-dir", "IDX")),
    "decode_compressed: another net's file": ("decode_compressed", ("--model", "DEPLOY", "--net", "WEIGHTS",
                                                                    "--output", "NEW")),
    "compress: truncated weights": ("compress", ("--model", "DEPLOY", "--weights", "TRUNCATED", "--output", "NEW")),
    "demo: --width 0": ("demo", ("--width", 0, "--quick", "--output", "NEW")),
    "demo: unknown --profile": ("demo", ("--profile", "nonsense", "--quick", "--output", "NEW")),
    "zoo fetch: not the release": ("dsd_caffe.zoo", ("fetch", "squeezenet-v1.0", "--from-file", "WEIGHTS",
                                                     "--output", "NEW")),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_refused_input_leaves_no_output_folder(net, writers, tmp_path, case):
    """The output is two folders deep in folders that do not exist: none of them is left behind (no lock file,
    no empty folder), whatever the refusal and wherever it is found (before or after the output's lock)."""
    if "--gpu" in case:
        from dsd_caffe.caffe_env import has_gpu_support

        if has_gpu_support():
            pytest.skip("this Caffe is a CUDA build")
    (tmp_path / "junk" / "a").mkdir(parents=True)
    (tmp_path / "junk" / "a" / "x.jpg").write_text("not an image")
    name, args = REFUSALS[case]
    values = {"MODEL": net["model"], "WEIGHTS": net["weights"], "TRUNCATED": p(net, "truncated.caffemodel"),
              "NEW": tmp_path / "new" / "deeper" / "out", "JUNK": tmp_path / "junk", "IDX": writers["idx"],
              "DEPLOY": writers["deploy"]}
    bad(name, *[values.get(a, a) if isinstance(a, str) else a for a in args], logs_ok=True)
    assert not os.path.exists(tmp_path / "new")


@pytest.mark.parametrize("which", ["prune", "retrain_dense", "dsd", "evaluate", "sensitivity", "train_sparse",
                                   "make_lmdb", "import_fashion_mnist", "generate", "demo"])
def test_output_is_a_file(net, writers, tmp_path, which):
    """A file where the output folder should be is named, and never replaced, also with --force."""
    afile = tmp_path / "afile"
    afile.write_text("mine")
    name, args = writer_args(which, afile, net, writers, tmp_path / "elsewhere")
    bad(name, *args, "--force", expect=(str(afile), "not a folder"), logs_ok=name == "evaluate")
    assert afile.read_text() == "mine" and [n for n in os.listdir(tmp_path) if not n.endswith(".lock")] == ["afile"]


@pytest.mark.parametrize("which", ["prune", "sensitivity", "evaluate", "make_lmdb"])
def test_output_is_a_symlink_to_a_folder(net, writers, tmp_path, which):
    """Tools that replace their output folder whole never replace a link (nor write through it)."""
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to("target")
    name, args = writer_args(which, tmp_path / "link", net, writers, tmp_path / "elsewhere")
    bad(name, *args, "--force", expect=(str(tmp_path / "link"), "not a folder"), logs_ok=name == "evaluate")
    assert os.path.islink(tmp_path / "link") and os.listdir(tmp_path / "target") == []


@pytest.mark.parametrize("which", ["retrain_dense", "dsd", "demo"])
def test_output_is_a_dangling_symlink(net, writers, tmp_path, which):
    (tmp_path / "link").symlink_to("nowhere")
    name, args = writer_args(which, tmp_path / "link", net, writers, tmp_path / "elsewhere")
    bad(name, *args, expect=(str(tmp_path / "link"), "symbolic link to nowhere, which does not exist"))
    assert os.path.islink(tmp_path / "link") and not os.path.exists(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------------ full disk
def _full_disk(tmp_path, size, script, **paths):
    """Run ``script`` on a private tmpfs of ``size`` ($DISK), with shell variables for ``paths`` and $ERR, the
    test's folder. Returns its stdout."""
    from helpers import in_small_tmpfs

    names = "".join(f'{k.upper()}="{v}"; ' for k, v in dict(paths, err=tmp_path).items())
    return in_small_tmpfs(tmp_path, size, names + "\n" + script)


def full_disk_line(path, name):
    """The one error line a tool printed (log lines may precede it) into ``path``: ENOSPC, or Caffe's own check."""
    text = path.read_text()
    lines = text.strip().splitlines()
    assert "Traceback" not in text and sum(": error:" in line for line in lines) == 1, text[-3000:]
    assert lines[-1].startswith(f"{name}.py: error: "), lines
    assert "No space left on device" in lines[-1] and "free some space" in lines[-1], lines[-1]
    return lines[-1]


def no_temporaries(root):
    left = [os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files
            if ".tmp-" in n or n.startswith((".write-test-", ".resume-", ".pycaffe-"))]
    assert not left, left


FULL_OLD_NEW = {  # tools whose output is replaced whole: (tmpfs size, arguments of the run, of the --force run)
    "prune": ("400k", '--model "$MODEL" --weights "$WEIGHTS" --ratio 3x --output', "--ratio 4x --force"),
    "decode_compressed": ("200k", '--model "$DEPLOY" --net "$NET" --output', "--force"),
    "evaluate": ("200k", '--model "$MODEL" --weights "$WEIGHTS" --iterations 1 --output', "--force"),
}


@pytest.mark.parametrize("which", list(FULL_OLD_NEW))
def test_full_disk_keeps_the_old_output_or_leaves_none(net, writers, tmp_path, which):
    """A full disk: exit 2 and one line; a --force run keeps the old output whole, a new one leaves nothing, and
    no temporary stays."""
    size, args, force = FULL_OLD_NEW[which]
    out = _full_disk(tmp_path, size, f'''
        "$PY" "$TOOLS/{which}.py" {args} "$DISK/old" >/dev/null 2>&1 || exit 98
        find "$DISK"/old* -type f | sort | xargs md5sum > "$ERR/old.sum"
        cat /dev/zero > "$DISK/filler" 2>/dev/null
        "$PY" "$TOOLS/{which}.py" {args} "$DISK/old" {force} >/dev/null 2>"$ERR/force.err"; echo "force $?"
        "$PY" "$TOOLS/{which}.py" {args} "$DISK/new" >/dev/null 2>"$ERR/new.err"; echo "new $?"
        rm "$DISK/filler"
        find "$DISK"/old* -type f | sort | xargs md5sum | cmp - "$ERR/old.sum" && echo "old kept"
        echo "left" $(ls -A "$DISK" | grep -v '^\\..*\\.lock$')
        find "$DISK" -name '.*tmp-*' -o -name '.write-test-*'
    ''', model=net["model"], weights=net["weights"], deploy=writers["deploy"], net=writers["net"])
    assert out.splitlines()[:3] == ["force 2", "new 2", "old kept"], out
    for err in ("force.err", "new.err"):
        full_disk_line(tmp_path / err, which)
    assert out.splitlines()[3:] == ["left old old.json" if which == "decode_compressed" else "left old"], out


@pytest.mark.parametrize("which", ["retrain_dense", "dsd"])
def test_full_disk_while_training_leaves_no_truncated_file(net, tmp_path, which):
    """The disk fills up while Caffe trains (its snapshots and log): exit 2 and one line; no final model, every
    snapshot left is complete (Caffe writes them unchecked: the truncated ones are removed), no temporaries."""
    args = {"retrain_dense": "--max-iter 4", "dsd": "--ratio 3x --sparse-max-iter 4 --redense-max-iter 4"}[which]
    out = _full_disk(tmp_path, "300k", f'''
        "$PY" "$TOOLS/{which}.py" --model "$MODEL" --weights "$WEIGHTS" --snapshot 1 {args} --output "$DISK/run" \\
            >/dev/null 2>"$ERR/full.err"; echo "full $?"
        cp -a "$DISK/run" "$ERR/left"
    ''', model=net["model"], weights=net["weights"])
    assert out.splitlines() == ["full 2"], out
    full_disk_line(tmp_path / "full.err", which)
    left = tmp_path / "left"
    no_temporaries(left)
    assert not list(left.rglob(phases.REDENSE))
    for snaps in left.rglob(training.SNAPSHOT_DIR):
        files = sorted(os.listdir(snaps))
        complete = training.snapshots(str(snaps), files[0].split("_iter_")[0]) if files else []
        assert len(files) == 2 * len(complete), files  # a caffemodel and a solverstate each, all readable


# ------------------------------------------------------------------------------------------------ odd inputs
@pytest.fixture(scope="module")
def odd(net):
    """The trainval, its LMDBs and the dense model in a folder whose path has spaces and non-ASCII characters."""
    folder = net["dir"] / "dossier à part" / "ünï cødé"
    folder.mkdir(parents=True)
    for lmdb_name in ("train_lmdb", "val_lmdb"):
        shutil.copytree(net["dir"] / lmdb_name, folder / lmdb_name)
    shutil.copy(net["model"], folder / "tv é.prototxt")
    shutil.copy(net["weights"], folder / "dé nse.caffemodel")
    return folder


@pytest.mark.parametrize("which", ["prune", "retrain_dense", "evaluate", "sensitivity"])
def test_paths_with_spaces_and_non_ascii_characters_work(odd, tmp_path, which):
    out = tmp_path / "sortie à part" / "ünï"
    args = {"prune": ("--ratio", "3x"), "retrain_dense": ("--max-iter", 1), "evaluate": ("--iterations", 1),
            "sensitivity": ("--iterations", 1, "--densities", 0.5)}[which]
    r = tool(which, "--model", odd / "tv é.prototxt", "--weights", odd / "dé nse.caffemodel", *args, "--output", out)
    assert r.returncode == 0, r.stderr[-3000:]
    made = {"prune": phases.PRUNED, "retrain_dense": phases.REDENSE, "evaluate": "confusion.csv",
            "sensitivity": "sensitivity.csv"}[which]
    assert os.path.isfile(out / made)


@pytest.fixture(scope="module")
def trained(net, pruned):
    """A prune folder beside the LMDBs after its sparse phase (snapshots, log, record, sparse.caffemodel)."""
    folder = str(net["dir"] / "trained")
    shutil.copytree(pruned, folder)
    phases.train_sparse(folder)
    return folder


def test_prune_into_the_folder_holding_its_weights(trained, tmp_path):
    """Re-pruning a sparse model into its own folder would replace the folder, sparse.caffemodel with it."""
    run = str(tmp_path / "run")
    shutil.copytree(trained, run)
    weights = os.path.join(run, phases.SPARSE)
    bad("prune", "--model", os.path.join(run, phases.SPARSE_NET), "--weights", weights, "--ratio", "4x", "--output",
        run, "--force", expect=(run, "holds the input"))
    assert sorted(os.listdir(run)) == sorted(os.listdir(trained))


def test_dsd_force_with_weights_inside_the_run_folder(net, tmp_path):
    """--force clears the run folder: weights from an earlier run in it (DSDSD by hand) would go first."""
    run = tmp_path / "run"
    (run / "cycle1-redense").mkdir(parents=True)
    fileio.write_json(str(run / pipeline.STATE), {"config": {}, "phases": [], "finished": True})
    weights = run / "cycle1-redense" / phases.REDENSE
    shutil.copy(net["weights"], weights)
    bad("dsd", "--model", net["model"], "--weights", weights, "--ratio", "3x", "--output", run, "--force",
        expect=(str(run), "holds the input", str(weights)))
    assert weights.read_bytes() == open(net["weights"], "rb").read()


def test_dsd_force_with_a_bad_input_keeps_the_old_run(net, tmp_path):
    """The inputs are checked before --force clears anything."""
    run = tmp_path / "run"
    (run / "cycle1-sparse").mkdir(parents=True)
    fileio.write_json(str(run / pipeline.STATE), {"config": {}, "phases": [], "finished": True})
    bad("dsd", "--model", net["model"], "--weights", p(net, "truncated.caffemodel"), "--ratio", "3x", "--output",
        run, "--force", expect=("truncated.caffemodel",))
    assert sorted(os.listdir(run)) == ["cycle1-sparse", pipeline.STATE]


@pytest.mark.parametrize("force", [False, True])
def test_retrain_dense_into_a_folder_of_another_phase(net, trained, tmp_path, force):
    """The sparse phase's snapshots, log and record share their names with the redense phase's: they are not
    mixed or, with --force, removed."""
    run = str(tmp_path / "run")
    shutil.copytree(trained, run)
    bad("retrain_dense", "--model", net["model"], "--weights", net["weights"], "--max-iter", 1, "--output", run,
        *(["--force"] if force else []), expect=(run, "another phase", phases.SPARSE_NET))
    assert sorted(os.listdir(os.path.join(run, training.SNAPSHOT_DIR))) == \
        sorted(os.listdir(os.path.join(trained, training.SNAPSHOT_DIR)))
    assert training.record_of(run) == training.record_of(trained)


@pytest.mark.parametrize("which", ["prune", "retrain_dense", "dsd", "compress", "decode_compressed"])
def test_the_same_path_as_input_and_output(net, writers, tmp_path, which):
    """--force never writes over an input."""
    shutil.copy(net["weights"], tmp_path / "w.caffemodel")
    shutil.copy(writers["net"], tmp_path / "x.net")
    same = tmp_path / ("x.net" if which == "decode_compressed" else "w.caffemodel")
    args = {"prune": ("--model", net["model"], "--weights", same, "--ratio", "3x"),
            "retrain_dense": ("--model", net["model"], "--weights", same, "--max-iter", 1),
            "dsd": ("--model", net["model"], "--weights", same, "--ratio", "3x"),
            "compress": ("--model", writers["deploy"], "--weights", same),
            "decode_compressed": ("--model", writers["deploy"], "--net", same)}[which]
    before = same.read_bytes()
    bad(which, *args, "--output", same, "--force", expect=(f"{same} is the input",))
    assert same.read_bytes() == before


@pytest.mark.parametrize("where", ["a class folder", "the image folder"])
def test_make_lmdb_output_inside_the_image_folder(writers, tmp_path, where):
    """It would be read as an image (or, at the top, as a class) by the next build of the same folder."""
    img = tmp_path / "img"
    shutil.copytree(writers["img"], img)
    out = img / "cat" / "out_lmdb" if where == "a class folder" else img / "out_lmdb"
    bad("make_lmdb", img, "--output", out, "--resize", "8x8", expect=(str(out), "is inside the input", str(img)))
    assert sorted(os.listdir(img)) == ["cat"] and os.listdir(img / "cat") == ["a.png"]


def test_make_lmdb_mean_file_over_its_list_file(writers, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("cat/a.png 0\n")
    bad("make_lmdb", listing, "--root", writers["img"], "--output", tmp_path / "out", "--mean-file", listing,
        "--force", "--resize", "8x8", expect=(f"{listing} is the input",))
    assert listing.read_text() == "cat/a.png 0\n" and not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("which", ["prune", "retrain_dense", "dsd", "evaluate", "sensitivity", "compress",
                                   "decode_compressed"])
def test_weights_given_as_a_folder(net, writers, tmp_path, which):
    folder = tmp_path / "weights"
    folder.mkdir()
    args = {"prune": ("--model", net["model"], "--weights", folder, "--ratio", "3x", "--output", tmp_path / "o"),
            "retrain_dense": ("--model", net["model"], "--weights", folder, "--output", tmp_path / "o"),
            "dsd": ("--model", net["model"], "--weights", folder, "--ratio", "3x", "--output", tmp_path / "o"),
            "evaluate": ("--model", net["model"], "--weights", folder),
            "sensitivity": ("--model", net["model"], "--weights", folder, "--output", tmp_path / "o"),
            "compress": ("--model", writers["deploy"], "--weights", folder, "--output", tmp_path / "o"),
            "decode_compressed": ("--model", writers["deploy"], "--net", folder, "--output", tmp_path / "o")}[which]
    bad(which, *args, expect=(f"{folder} is a folder, not a file",))
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("which", ["prune", "retrain_dense", "dsd", "evaluate", "sensitivity", "compress",
                                   "decode_compressed"])
def test_empty_prototxt(net, writers, tmp_path, which):
    (tmp_path / "blank.prototxt").write_text("")
    m = ("--model", tmp_path / "blank.prototxt")
    args = {"prune": m + ("--weights", net["weights"], "--ratio", "3x", "--output", tmp_path / "o"),
            "retrain_dense": m + ("--weights", net["weights"], "--output", tmp_path / "o"),
            "dsd": m + ("--weights", net["weights"], "--ratio", "3x", "--output", tmp_path / "o"),
            "evaluate": m + ("--weights", net["weights"]),
            "sensitivity": m + ("--weights", net["weights"], "--output", tmp_path / "o"),
            "compress": m + ("--weights", writers["sparse"], "--output", tmp_path / "o"),
            "decode_compressed": m + ("--net", writers["net"], "--output", tmp_path / "o")}[which]
    msg = bad(which, *args, expect=("blank.prototxt",))
    assert "no layer" in msg or "no data layer" in msg, msg
    assert not os.path.exists(tmp_path / "o")


@pytest.fixture(scope="module")
def other_deepscale(net):
    """The caffemodel of another net (the small net at twice the width) in DeepScale's naming."""
    path = p(net, "other_deepscale.caffemodel")
    fileio.write_caffemodel(path, netgen.rename_weights(fileio.read_caffemodel(p(net, "other.caffemodel")), "han",
                                                        "deepscale"))
    return path


@pytest.mark.parametrize("which", ["prune", "retrain_dense", "dsd", "evaluate", "sensitivity"])
def test_caffemodel_of_another_net_in_the_other_naming(net, other_deepscale, tmp_path, which):
    args = {"prune": ("--ratio", "3x", "--output", tmp_path / "o"), "retrain_dense": ("--output", tmp_path / "o"),
            "dsd": ("--ratio", "3x", "--output", tmp_path / "o"), "evaluate": (),
            "sensitivity": ("--output", tmp_path / "o")}[which]
    bad(which, "--model", net["model"], "--weights", other_deepscale, *args,
        expect=("other_deepscale.caffemodel", "'conv1'", "32x1x3x3", "16x1x3x3", "deepscale naming", "han naming"),
        logs_ok=which == "evaluate")
    assert not os.path.exists(tmp_path / "o")


# ------------------------------------------------------------------------------------------------ numbers
BIG = str(2**31)  # one more than Caffe's int32 (max_iter, snapshot, iter_size, test_iter, --iterations, seeds)
NUMBERS = [  # (tool, flag, value, what the message says); every integer fits Caffe's int32, every float its float
    ("prune", "--max-iter", "-1", ">= 1"), ("prune", "--max-iter", BIG, "at most 2147483647"),
    ("prune", "--snapshot", "0", ">= 1"), ("prune", "--iter-size", BIG, "at most"), ("prune", "--seed", "-1", ">= 0"),
    ("prune", "--seed", BIG, "at most"), ("prune", "--base-lr", "nan", "positive"),
    ("prune", "--base-lr", "1e39", "Caffe's float"), ("prune", "--base-lr", "1e-46", "Caffe's float"),
    ("prune", "--epochs", "-2", "positive"), ("prune", "--epochs", "1e300", "give fewer epochs"),
    ("prune", "--ratio", "1.0000001x", "nothing to prune"), ("dsd", "--ratio", "1.0000001x", "nothing to prune"),
    ("retrain_dense", "--max-iter", BIG, "at most"), ("retrain_dense", "--seed", "-1", ">= 0"),
    ("retrain_dense", "--seed", BIG, "at most"), ("retrain_dense", "--base-lr", "1e39", "Caffe's float"),
    ("retrain_dense", "--base-lr", "inf", "positive"), ("retrain_dense", "--epochs", "1e300", "give fewer epochs"),
    ("retrain_dense", "--iter-size", "-2", ">= 1"),
    ("dsd", "--cycles", BIG, "at most"), ("dsd", "--seeds", BIG, "at most"), ("dsd", "--jobs", BIG, "at most"),
    ("dsd", "--iterations", BIG, "at most"), ("dsd", "--sparse-max-iter", BIG, "at most"),
    ("dsd", "--redense-epochs", "1e300", "give fewer epochs"), ("dsd", "--sparse-base-lr", "1e-46", "Caffe's float"),
    ("dsd", "--seed", BIG, "at most"),
    ("evaluate", "--iterations", BIG, "at most"), ("evaluate", "--iterations", "-1", ">= 1"),
    ("sensitivity", "--iterations", BIG, "at most"), ("sensitivity", "--iterations", "-3", ">= 1"),
    ("sensitivity", "--densities", "nan", "(0, 1]"), ("sensitivity", "--densities", "1.5", "(0, 1]"),
    ("train_sparse", "--max-iter", BIG, "at most"), ("train_sparse", "--base-lr", "1e39", "Caffe's float"),
    ("train_sparse", "--epochs", "1e300", "give fewer epochs"), ("train_sparse", "--snapshot", "-3", ">= 1"),
    ("make_lmdb", "--resize", "100000x100000", "too large"), ("make_lmdb", "--resize=-4x4", None, "positive"),
    ("make_lmdb", "--workers", BIG, "at most"), ("make_lmdb", "--seed", "-1", ">= 0"),
    ("import_fashion_mnist", "--seed", "-1", ">= 0"), ("import_fashion_mnist", "--seed", BIG, "at most"),
    ("import_fashion_mnist", "--val-size", "-1", "1..59999"),
    ("compress", "--bits", "0", "between 1 and 8"), ("compress", "--bits", BIG, "between 1 and 8"),
    ("demo", "--scale", "nan", "(0, 100]"), ("demo", "--scale", "1e300", "(0, 100]"),
    ("demo", "--width", "-1", "(0, 16]"), ("demo", "--seed", BIG, "at most"), ("demo", "--seed", "-1", ">= 0"),
]
NOT_NUMBERS = [("retrain_dense", "--max-iter", "nan"), ("evaluate", "--iterations", "1e3"),
               ("dsd", "--cycles", "inf")]  # argparse's own error: the usage, then the one error line


@pytest.mark.parametrize("which,flag,value,what", NUMBERS, ids=[f"{t}{f}={v}" for t, f, v, _ in NUMBERS])
def test_negative_nan_and_huge_numbers(net, pruned, writers, tmp_path, which, flag, value, what):
    """Refused before anything is written: nothing overflows into a protobuf traceback, nothing silently becomes
    inf or 0 in Caffe's float, nothing runs for ever (decided: integers up to Caffe's int32, 2147483647)."""
    common = ("--model", net["model"], "--weights", net["weights"], "--output", tmp_path / "o")
    ratio = ("--ratio", "3x") if flag != "--ratio" else ()
    args = {"prune": common + ratio, "retrain_dense": common, "dsd": common + ratio,
            "evaluate": common[:4], "sensitivity": common,
            "train_sparse": (pruned,),
            "make_lmdb": (writers["img"], "--output", tmp_path / "o"),
            "import_fashion_mnist": ("--output", tmp_path / "o", "--source-dir", writers["idx"]),
            "compress": ("--model", writers["deploy"], "--weights", writers["sparse"], "--output", tmp_path / "o",
                         "--format", "huffman"),
            "demo": ("--output", tmp_path / "o") + (() if flag == "--scale" else ("--quick",))}[which]
    flag_value = (flag,) if value is None else (flag, value)
    msg = bad(which, *args, *flag_value, expect=(what,), logs_ok=flag == "--ratio")
    assert flag.split("=")[0].lstrip("-").split("-")[-1] in msg.replace("_", "-"), msg
    assert not os.path.exists(tmp_path / "o")
    assert not os.path.exists(os.path.join(pruned, phases.SPARSE))


@pytest.mark.parametrize("which,flag,value", NOT_NUMBERS)
def test_integer_flags_that_are_not_integers(net, tmp_path, which, flag, value):
    bad(which, "--model", net["model"], "--weights", net["weights"], "--output", tmp_path / "o", flag, value,
        expect=(flag, "invalid int value", repr(value)), logs_ok=True)
    assert not os.path.exists(tmp_path / "o")
