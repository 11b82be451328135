"""LMDB building, Fashion-MNIST import and LMDB inspection, read back through a real Caffe Data layer."""
import collections
import dataclasses
import functools
import os
import platform
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time

import cv2
import lmdb
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsd_caffe import fashion_mnist, fileio, imagedb, lmdbio
from dsd_caffe.caffe_env import import_caffe
from dsd_caffe.caffeproto import caffe_pb2
from dsd_caffe.errors import AccessDenied, InputMissing, OutputExists, UserError
import paused_tool
from helpers import in_small_tmpfs, tool, tool_cmd


def make_folder(root, per_class=4, size=(30, 40), seed=0):
    """cat/ and dog/ with PNG and JPEG images of different sizes, plus a corrupt PNG and a text file."""
    rng = np.random.default_rng(seed)
    for c in ("dog", "cat"):
        os.makedirs(root / c)
        for i in range(per_class):
            img = rng.integers(0, 256, (size[0] + i, size[1], 3), dtype=np.uint8)
            cv2.imwrite(str(root / c / (f"{i}.png" if i % 2 else f"{i}.jpg")), img)
    (root / "cat" / "notes.txt").write_text("not an image\n")
    good = (root / "dog" / "1.png").read_bytes()
    (root / "dog" / "broken.png").write_bytes(good[:80])
    return root


def expected_image(path, resize=None, gray=False):
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR)
    if resize:
        img = cv2.resize(img, (resize[1], resize[0]))
    return img[None] if gray else img.transpose(2, 0, 1)


def data_net(tmp_path, source, batch):
    """A prototxt of one Data layer reading ``batch`` images of ``source``."""
    net_file = tmp_path / f"data_{os.path.basename(source)}.prototxt"
    net_file.write_text(f'layer {{ name: "data" type: "Data" top: "data" top: "label"\n'
                        f'  data_param {{ source: "{source}" backend: LMDB batch_size: {batch} }} }}\n')
    return str(net_file)


def data_layer_read(tmp_path, source, batch):
    """Read one batch of ``batch`` images through a real pycaffe Data layer."""
    caffe = import_caffe()
    net = caffe.Net(data_net(tmp_path, source, batch), caffe.TEST)
    net.forward()
    return net.blobs["data"].data.copy(), net.blobs["label"].data.copy()


def refused(name, *args, expect=()):
    """Run tools/<name>.py and check it is refused as bad input: exit status 2 and exactly one stderr line
    `<name>.py: error: ...` containing every string of ``expect``. Returns that line."""
    r = tool(name, *args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stderr[-3000:])
    assert lines[0].startswith(f"{name}.py: error: "), lines[0]
    for s in expect:
        assert s in lines[0], (s, lines[0])
    return lines[0]


def raw_records(path):
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        out = list(txn.cursor())
    env.close()
    return out


# ------------------------------------------------------------------------------------------- make_lmdb

def test_folder_count_labels_shapes_skipped_and_data_layer(tmp_path):
    src = make_folder(tmp_path / "img")
    out = tmp_path / "out_lmdb"
    stats = imagedb.make_lmdb(src, out, resize=(24, 20), workers=2, mean_file=tmp_path / "mean.binaryproto",
                           progress=False)
    assert stats["count"] == 8 and stats["classes"] == ["cat", "dog"]
    assert stats["counts"] == {"0": 4, "1": 4}
    assert sorted(s["path"] for s in stats["skipped"]) == ["cat/notes.txt", "dog/broken.png"]
    assert fileio.read_json(str(out) + ".json")["skipped"] == stats["skipped"]
    assert lmdbio.lmdb_info(out) == {"count": 8, "channels": 3, "height": 24, "width": 20, "encoded": False,
                                   "label": 0}
    keys = [k.decode() for k, _ in raw_records(out)]
    assert keys == ["00000000_cat/0.jpg", "00000001_cat/1.png", "00000002_cat/2.jpg", "00000003_cat/3.png",
                    "00000005_dog/0.jpg", "00000006_dog/1.png", "00000007_dog/2.jpg", "00000008_dog/3.png"]
    names = [k.split("_", 1)[1] for k in keys]
    expected = np.stack([expected_image(src / n, (24, 20)) for n in names])
    pixels, labels = data_layer_read(tmp_path, out, 8)
    assert pixels.shape == (8, 3, 24, 20)
    np.testing.assert_array_equal(pixels, expected.astype(np.float32))
    np.testing.assert_array_equal(labels, [0, 0, 0, 0, 1, 1, 1, 1])
    mean = imagedb.read_mean_file(tmp_path / "mean.binaryproto")
    np.testing.assert_allclose(mean, expected.mean(axis=0), atol=1e-3)
    np.testing.assert_allclose(stats["mean_values"], expected.mean(axis=(0, 2, 3)), atol=1e-3)


def test_mean_file_matches_compute_image_mean(tmp_path):
    from dsd_caffe.caffe_env import caffe_tool

    src = make_folder(tmp_path / "img")
    imagedb.make_lmdb(src, tmp_path / "out", resize=(12, 10), workers=2, mean_file=tmp_path / "ours.binaryproto",
                   progress=False)
    subprocess.run([caffe_tool("compute_image_mean"), "--backend=lmdb", str(tmp_path / "out"),
                    str(tmp_path / "caffe.binaryproto")], check=True, capture_output=True)
    theirs = imagedb.read_mean_file(tmp_path / "caffe.binaryproto")
    np.testing.assert_allclose(imagedb.read_mean_file(tmp_path / "ours.binaryproto"), theirs, rtol=1e-6)


def test_list_file_gray_with_root(tmp_path):
    src = make_folder(tmp_path / "img")
    listing = tmp_path / "lists" / "train.txt"
    listing.parent.mkdir()
    listing.write_text("dog/3.png 7\ncat/0.jpg 2\n\ncat/notes.txt 1\nmissing.jpg 0\n")
    out = tmp_path / "gray_lmdb"
    stats = imagedb.make_lmdb(listing, out, root=src, resize=None, gray=True, workers=1, progress=False)
    assert stats["count"] == 2 and stats["classes"] is None
    assert [s["path"] for s in stats["skipped"]] == ["cat/notes.txt", "missing.jpg"]
    assert "FileNotFoundError" in stats["skipped"][1]["error"]
    recs = list(lmdbio.read_lmdb(out))
    assert [(k, lab) for k, _, lab in recs] == [("00000000_dog/3.png", 7), ("00000001_cat/0.jpg", 2)]
    np.testing.assert_array_equal(recs[0][1], expected_image(src / "dog" / "3.png", gray=True))
    all_pixels = np.concatenate([r[1].ravel() for r in recs])  # two sizes: the mean weighs every pixel
    np.testing.assert_allclose(stats["mean_values"], [all_pixels.mean()], atol=1e-3)
    pixels, labels = data_layer_read(tmp_path, out, 1)  # first record through Caffe: 1x33x40 grey
    np.testing.assert_array_equal(pixels[0], recs[0][1])
    assert labels.tolist() == [7]


def test_bad_list_file_line_named(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("a.jpg 1\nb.jpg cat\n")
    with pytest.raises(UserError, match=r"list.txt:2"):
        imagedb.make_lmdb(listing, tmp_path / "o", progress=False)


def test_encoded_png_reads_back_equal_to_raw(tmp_path):
    src = make_folder(tmp_path / "img")
    raw = imagedb.make_lmdb(src, tmp_path / "raw", resize=(16, 16), workers=1, progress=False)
    enc = imagedb.make_lmdb(src, tmp_path / "enc", resize=(16, 16), encoded="png", workers=1, progress=False)
    assert enc["count"] == raw["count"] == 8
    assert lmdbio.lmdb_info(tmp_path / "enc")["encoded"] is True
    datum = caffe_pb2().Datum()
    datum.ParseFromString(raw_records(tmp_path / "enc")[0][1])
    assert datum.encoded and datum.data[:4] == b"\x89PNG"
    a, la = data_layer_read(tmp_path, tmp_path / "raw", 8)
    b, lb = data_layer_read(tmp_path, tmp_path / "enc", 8)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)


def test_encoded_without_resize_keeps_file_bytes(tmp_path):
    src = make_folder(tmp_path / "img")
    imagedb.make_lmdb(src, tmp_path / "enc", resize=None, encoded=True, workers=1, progress=False)
    for key, value in raw_records(tmp_path / "enc"):
        datum = caffe_pb2().Datum()
        datum.ParseFromString(value)
        assert datum.encoded
        assert datum.data == (src / key.decode().split("_", 1)[1]).read_bytes()


def test_storage_format_and_whether_a_file_is_in_it():
    """datums._encoding: the record's format, and whether the file is in it already (a JPEG is .jpg or .jpeg;
    ``encoded=True`` keeps a file's own format, and makes PNG of any other)."""
    from dsd_caffe import datums

    cases = {(False, "a/x.png"): (None, False), (True, "a/x.JPEG"): ("jpeg", True), (True, "a/x.tif"): ("png", False),
             ("jpg", "a/x.jpeg"): ("jpg", True), ("png", "a/x.jpg"): ("png", False), ("bmp", "a/x.bmp"): ("bmp", True)}
    for (encoded, path), expected in cases.items():
        assert datums._encoding(imagedb.LmdbOptions(encoded=encoded), path) == expected, (encoded, path)


def test_encoded_grey_file_in_colour_lmdb_is_reencoded(tmp_path):
    """A grey PNG in a colour LMDB is stored as a 3-channel PNG, so Caffe's native decoding gives 3 channels."""
    (tmp_path / "img" / "a").mkdir(parents=True)
    grey = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    cv2.imwrite(str(tmp_path / "img" / "a" / "g.png"), grey)
    imagedb.make_lmdb(tmp_path / "img", tmp_path / "enc", resize=None, encoded=True, workers=1, progress=False)
    assert lmdbio.lmdb_info(tmp_path / "enc")["channels"] == 3
    pixels, _ = data_layer_read(tmp_path, tmp_path / "enc", 1)
    np.testing.assert_array_equal(pixels[0], np.stack([grey] * 3))
    imagedb.make_lmdb(tmp_path / "img", tmp_path / "genc", resize=None, encoded=True, gray=True, workers=1,
                   progress=False)
    assert lmdbio.lmdb_info(tmp_path / "genc")["channels"] == 1
    datum = caffe_pb2().Datum()
    datum.ParseFromString(raw_records(tmp_path / "genc")[0][1])
    assert datum.data == (tmp_path / "img" / "a" / "g.png").read_bytes()


def test_parallel_equals_serial_and_shuffle_is_seeded(tmp_path):
    src = make_folder(tmp_path / "img", per_class=40)
    imagedb.make_lmdb(src, tmp_path / "w1", resize=(8, 8), workers=1, progress=False)
    imagedb.make_lmdb(src, tmp_path / "w2", resize=(8, 8), workers=2, progress=False)
    assert raw_records(tmp_path / "w1") == raw_records(tmp_path / "w2")
    imagedb.make_lmdb(src, tmp_path / "s1", resize=(8, 8), shuffle=True, seed=3, workers=2, progress=False)
    imagedb.make_lmdb(src, tmp_path / "s2", resize=(8, 8), shuffle=True, seed=3, workers=1, progress=False)
    s1 = raw_records(tmp_path / "s1")
    assert s1 == raw_records(tmp_path / "s2")
    unshuffled = {k.split(b"_", 1)[1]: v for k, v in raw_records(tmp_path / "w1")}
    shuffled = {k.split(b"_", 1)[1]: v for k, v in s1}
    assert shuffled == unshuffled
    assert [k.split(b"_", 1)[1] for k, _ in s1] != [k.split(b"_", 1)[1] for k, _ in raw_records(tmp_path / "w1")]


def test_map_size_grows_from_tiny(tmp_path):
    src = make_folder(tmp_path / "img", per_class=10)
    stats = imagedb.make_lmdb(src, tmp_path / "big", resize=(64, 64), workers=1, map_size=32 << 10, progress=False)
    assert stats["count"] == 20
    env = lmdb.open(str(tmp_path / "big"), readonly=True, lock=False)
    assert env.info()["map_size"] > 20 * 3 * 64 * 64 > 32 << 10
    env.close()
    pixels, labels = data_layer_read(tmp_path, tmp_path / "big", 20)
    assert pixels.shape == (20, 3, 64, 64) and labels.tolist() == [0] * 10 + [1] * 10


def test_exception_mid_build_leaves_nothing(tmp_path):
    """A KeyboardInterrupt while an image is being read removes the temporary LMDB; no output appears."""
    src = make_folder(tmp_path / "img")
    os.mkfifo(tmp_path / "img" / "dog" / "z_fifo.png")  # reading it blocks until interrupted
    main = threading.main_thread()
    done = threading.Event()

    def interrupt_when_blocked():
        """SIGINT once the main thread sits in openat (syscall 257 on x86-64: the FIFO), not on a timer: a signal
        that lands earlier, on a loaded machine, may run its handler where Python swallows the exception."""
        syscall, openat = f"/proc/self/task/{main.native_id}/syscall", {"x86_64": "257", "aarch64": "56"}
        seen = 0
        while not done.wait(0.1):
            with open(syscall) as f:
                seen = seen + 1 if f.read().split(" ", 1)[0] == openat[platform.machine()] else 0
            if seen == 2:  # in openat at two looks 0.1 s apart: blocked there
                signal.pthread_kill(main.ident, signal.SIGINT)
                return

    watcher = threading.Thread(target=interrupt_when_blocked, daemon=True)
    # a shell's background job starts with SIGINT ignored, and Python then keeps it so: Ctrl-C's handler, here
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    watcher.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            imagedb.make_lmdb(src, tmp_path / "out", resize=(8, 8), workers=1, progress=False)
    finally:
        done.set()
        watcher.join()
        signal.signal(signal.SIGINT, handler)
    assert sorted(os.listdir(tmp_path)) == ["img"]  # the lock file goes too (fileio.output_lock)


def test_killed_build_leaves_no_lmdb_under_real_name(tmp_path):
    src = make_folder(tmp_path / "img")
    os.mkfifo(tmp_path / "img" / "dog" / "z_fifo.png")
    proc = subprocess.Popen(tool_cmd("make_lmdb", src, "--output", tmp_path / "out", "--workers", 1, "--resize", "8x8"),
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not any(n.startswith(".out.tmp-") for n in os.listdir(tmp_path)) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert proc.poll() is None, "the build should be blocked on the FIFO"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not os.path.exists(tmp_path / "out")
    os.unlink(tmp_path / "img" / "dog" / "z_fifo.png")
    assert imagedb.make_lmdb(src, tmp_path / "out", resize=(8, 8), workers=1, progress=False)["count"] == 8


def test_killed_at_every_rename_the_lmdb_is_absent_or_whole(tmp_path):
    """SIGKILL before each rename of a build of 200 images in turn (paused there, so every kill lands where it is
    meant to): the LMDB is absent or holds every image, with its JSON; the next build removes what the killed ones
    left."""
    src = make_folder(tmp_path / "img", per_class=100, size=(60, 80))
    out = tmp_path / "out"
    args = (src, "--output", out, "--resize", "32x32", "--mean-file", tmp_path / "mean.binaryproto", "--force")
    assert paused_tool.kill_at(1, "make_lmdb", *args)
    assert not out.exists() and any(n.startswith(".") and ".tmp-" in n for n in os.listdir(tmp_path))
    k = 2
    while paused_tool.kill_at(k, "make_lmdb", *args):
        if out.exists():  # renamed last, after its JSON and the mean file
            assert lmdbio.lmdb_info(out)["count"] == 200 and fileio.read_json(f"{out}.json")["count"] == 200
            assert imagedb.read_mean_file(tmp_path / "mean.binaryproto").shape == (3, 32, 32)
        k += 1
    assert lmdbio.lmdb_info(out)["count"] == 200  # the run that had no k-th rename finished
    assert subprocess.run(tool_cmd("make_lmdb", *args), capture_output=True).returncode == 0
    assert sorted(n for n in os.listdir(tmp_path) if n != "img") == ["mean.binaryproto", "out", "out.json"]


def test_two_builds_of_one_lmdb(tmp_path):
    """The first holds the output's lock while it waits for an image (a FIFO): the second is refused naming its
    pid, --force or not; then the first finishes."""
    src = make_folder(tmp_path / "img")
    os.mkfifo(tmp_path / "img" / "dog" / "z_fifo.png")
    args = tool_cmd("make_lmdb", src, "--output", tmp_path / "out", "--workers", 1, "--resize", "8x8")
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = fileio.lock_path(tmp_path / "out")
        deadline = time.time() + 60
        while not (os.path.exists(lock) and open(lock).read().strip() == str(first.pid)):
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.02)
        for extra in ((), ("--force",)):
            r = refused("make_lmdb", *args[2:], *extra)
            assert f"in use by another dsd-caffe process (pid {first.pid})" in r, r
        with open(tmp_path / "img" / "dog" / "z_fifo.png", "wb") as f:  # the first reads it now
            f.write(cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
        assert first.wait(timeout=120) == 0, first.communicate()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert lmdbio.lmdb_info(tmp_path / "out")["count"] == 9


def test_output_exists_refused_unless_force(tmp_path):
    src = make_folder(tmp_path / "img")
    imagedb.make_lmdb(src, tmp_path / "out", resize=(8, 8), workers=1, progress=False)
    with pytest.raises(OutputExists, match="out already holds output of make_lmdb; pass --force"):
        imagedb.make_lmdb(src, tmp_path / "out", resize=(8, 8), workers=1, progress=False)
    assert refused("make_lmdb", src, "--output", tmp_path / "out") == \
        f"make_lmdb.py: error: output folder {tmp_path / 'out'} already holds output of make_lmdb; pass --force " \
        "to replace it"
    stats = imagedb.make_lmdb(src, tmp_path / "out", resize=(4, 4), workers=1, force=True, progress=False)
    assert lmdbio.lmdb_info(tmp_path / "out")["height"] == 4 and stats["count"] == 8
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExists, match="holds 'notes.txt', which make_lmdb did not write; refusing to replace "
                                              "it, also with --force"):  # never a folder of other data
        imagedb.make_lmdb(src, tmp_path / "precious", resize=(4, 4), workers=1, force=True, progress=False)
    assert (tmp_path / "precious" / "notes.txt").read_text() == "mine"
    with pytest.raises(UserError, match="is the input"):
        imagedb.make_lmdb(src, src, resize=(4, 4), workers=1, force=True, progress=False)
    assert (src / "cat" / "0.jpg").exists()


def test_unwritable_output_folder(tmp_path):
    src = make_folder(tmp_path / "img")
    if os.geteuid() == 0:  # root writes anywhere chmod allows nothing; a read-only file system still refuses it
        target = "/proc/dsd_caffe_test_lmdb"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        target = locked / "out"
    with pytest.raises(AccessDenied, match="output folder .* is not writable"):
        imagedb.make_lmdb(src, target, resize=(8, 8), workers=1, progress=False)
    assert not os.path.exists(target)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(AccessDenied, match="afile is not writable"):
        lmdbio.write_array_lmdb(tmp_path / "afile" / "out", np.zeros((1, 1, 2, 2), np.uint8), [0])


def test_missing_source_and_no_images(tmp_path):
    with pytest.raises(InputMissing, match="nowhere"):
        imagedb.make_lmdb(tmp_path / "nowhere", tmp_path / "out", progress=False)
    (tmp_path / "junk" / "a").mkdir(parents=True)
    (tmp_path / "junk" / "a" / "x.jpg").write_text("no")
    with pytest.raises(UserError, match="none of the 1 files"):
        imagedb.make_lmdb(tmp_path / "junk", tmp_path / "out", workers=1, progress=False)
    assert not os.path.exists(tmp_path / "out")


# ------------------------------------------------------------------------------------------- the tools

def test_tools_take_output_and_keep_the_positional_one_for_a_release(tmp_path):
    src = make_folder(tmp_path / "img")
    r = tool("make_lmdb", src, "--output", tmp_path / "new", "--resize", "8x8")
    assert r.returncode == 0 and "deprecated" not in r.stderr, r.stderr
    r = tool("make_lmdb", src, tmp_path / "old", "--resize", "8x8")
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if "deprecated" in line]
    assert len(notes) == 1 and "positional output argument is deprecated" in notes[0] and "--output" in notes[0]
    assert raw_records(tmp_path / "old") == raw_records(tmp_path / "new")
    for name, args, expect in [("make_lmdb", (src, tmp_path / "a", "--output", tmp_path / "b"), "not both"),
                               ("make_lmdb", (src,), "required: --output"),
                               ("import_fashion_mnist", (), "required: --output")]:
        r = tool(name, *args)  # argparse's usage errors: the usage, then the one error line
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(f"{name}.py: error: ")
        assert expect in r.stderr.strip().splitlines()[-1], r.stderr


# ------------------------------------------------------------------------------------------- lmdb_info

def test_lmdb_info_missing(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        lmdbio.lmdb_info(tmp_path / "nope")


def test_lmdb_info_empty_folder_and_empty_lmdb(tmp_path):
    (tmp_path / "e").mkdir()
    with pytest.raises(UserError, match="empty"):
        lmdbio.lmdb_info(tmp_path / "e")
    lmdb.open(str(tmp_path / "z")).close()
    with pytest.raises(UserError, match="empty .0 records"):
        lmdbio.lmdb_info(tmp_path / "z")


def test_lmdb_info_unreadable(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "data.mdb").write_bytes(b"garbage" * 1000)
    with pytest.raises(UserError, match="unreadable"):
        lmdbio.lmdb_info(tmp_path / "bad")
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        lmdbio.lmdb_info(tmp_path / "f")


def test_lmdb_info_not_datums(tmp_path):
    env = lmdb.open(str(tmp_path / "nd"))
    with env.begin(write=True) as txn:
        txn.put(b"0", b"\xff\xff\xff not a protobuf")
    env.close()
    with pytest.raises(UserError, match="not a"):
        lmdbio.lmdb_info(tmp_path / "nd")


def test_check_lmdb_crop_and_channels(tiny_lmdb):
    path = tiny_lmdb(n=3, channels=1, size=28)
    assert lmdbio.check_lmdb(path, crop_size=28, channels=1)["count"] == 3
    with pytest.raises(UserError, match="28x28 image, smaller than the crop size 32"):
        lmdbio.check_lmdb(path, crop_size=32)
    with pytest.raises(UserError, match="1-channel images, the net expects 3"):
        lmdbio.check_lmdb(path, channels=3)


def lmdb_of(path, shapes, labels=None, encoded=None):
    """An LMDB with one raw Datum of each (c, h, w) in ``shapes`` (or ``encoded`` images as PNG), keys %08d."""
    pb2 = caffe_pb2()
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i, shape in enumerate(shapes if encoded is None else encoded):
            label = 0 if labels is None else labels[i]
            if encoded is None:
                d = pb2.Datum(channels=shape[0], height=shape[1], width=shape[2], label=label,
                              data=bytes(int(np.prod(shape))))
            else:
                d = pb2.Datum(data=cv2.imencode(".png", shape)[1].tobytes(), encoded=True, label=label)
            txn.put(b"%08d" % i, d.SerializeToString())
    env.close()
    return str(path)


def test_check_lmdb_checks_every_record_of_a_small_lmdb(tmp_path):
    """Caffe aborts on ANY record smaller than the crop, not only the first one."""
    path = lmdb_of(tmp_path / "mixed", [(3, 32, 32)] * 5 + [(3, 16, 40)] + [(3, 32, 32)] * 5)
    assert lmdbio.check_lmdb(path, crop_size=16)["checked"] == 11
    with pytest.raises(UserError, match=r"record 00000005 holds a 16x40 image, smaller than the crop size 28 "
                                         r"\(1 of the 11 records checked are\)"):
        lmdbio.check_lmdb(path, crop_size=28)
    path = lmdb_of(tmp_path / "channels", [(3, 8, 8)] * 3 + [(1, 8, 8)])
    with pytest.raises(UserError, match="record 00000003 holds a 1-channel image, record 00000000 a 3-channel"):
        lmdbio.check_lmdb(path)


def test_label_range_covers_every_record_of_a_small_lmdb(tmp_path):
    labels = [3] * 2500
    labels[2400] = 10
    path = lmdb_of(tmp_path / "labels", [(1, 2, 2)] * 2500, labels)
    assert lmdbio.label_range(path) == (3, 10)
    assert lmdbio.check_lmdb(path)["label_range"] == (3, 10)


def test_check_data_walks_each_lmdb_once(tiny_lmdb, monkeypatch):
    """A phase start's check (netcheck.check_data) reads each LMDB's records once: check_labels takes the label
    range check_lmdb found (the TRAIN and TEST layers are both named "data")."""
    from dsd_caffe import netcheck, netgen

    train, val = tiny_lmdb(name="train_lmdb"), tiny_lmdb(name="val_lmdb", seed=1)
    walked = collections.Counter()
    records = lmdbio._checked_records
    monkeypatch.setattr(lmdbio, "_checked_records", lambda path: walked.update([path]) or records(path))
    netcheck.check_data(netgen.small_squeezenet(train, val, train_batch=4, test_batch=4))
    assert walked == {train: 1, val: 1}


def test_check_lmdb_samples_a_large_lmdb_evenly_and_says_so(tmp_path, monkeypatch, caplog):
    shapes = [(1, 30, 30)] * 3000
    for bad in (0, 1497, 2997):  # on the sample's grid of every 3rd record (1000 of 3000)
        shapes[bad] = (1, 10, 30)
    path = lmdb_of(tmp_path / "large", shapes, labels=[i % 7 for i in range(3000)])
    monkeypatch.setattr(lmdbio, "FULL_CHECK_BYTES", 0)
    with caplog.at_level("INFO", logger="dsd_caffe.lmdbio"):
        with pytest.raises(UserError, match=r"record 00000000 holds a 10x30 image.*\(3 of the 1000 records checked"):
            lmdbio.check_lmdb(path, crop_size=20)
    assert "checked 1,000 of 3,000 records of" in caplog.text
    assert lmdbio.check_lmdb(path, crop_size=10)["checked"] == 1000
    assert lmdbio.label_range(path) == (0, 6)


def test_check_lmdb_refuses_encoded_images_caffe_cannot_decode(tmp_path):
    """convert_imageset --encoded stores a 16-bit or RGBA PNG as it is; the Data layer then aborts on it."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), rng.integers(0, 65536, (8, 8, 3), dtype=np.uint16)]
    path = lmdb_of(tmp_path / "deep", None, encoded=images)
    with pytest.raises(UserError, match="record 00000001 holds an encoded 16-bit 3-channel image"):
        lmdbio.check_lmdb(path)
    assert lmdbio.check_lmdb(path, force_color=True)["channels"] == 3  # decoded with IMREAD_COLOR: 8 bits
    path = lmdb_of(tmp_path / "alpha", None, encoded=[rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)])
    with pytest.raises(UserError, match="record 00000000 holds an encoded 8-bit 4-channel image"):
        lmdbio.check_lmdb(path)


# ------------------------------------------------------------------------------------------- arrays, IDX

def test_write_array_lmdb_roundtrip_and_validation(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (5, 3, 6, 7), dtype=np.uint8)
    labels = np.array([4, 3, 2, 1, 0])
    lmdbio.write_array_lmdb(tmp_path / "a", images, labels)
    recs = list(lmdbio.read_lmdb(tmp_path / "a"))
    np.testing.assert_array_equal(np.stack([r[1] for r in recs]), images)
    assert [r[2] for r in recs] == labels.tolist()
    with pytest.raises(OutputExists):
        lmdbio.write_array_lmdb(tmp_path / "a", images, labels)
    with pytest.raises(TypeError, match="uint8"):
        lmdbio.write_array_lmdb(tmp_path / "b", images.astype(np.float32), labels)
    with pytest.raises(UserError, match="labels"):
        lmdbio.write_array_lmdb(tmp_path / "b", images, labels[:3])


def test_read_idx_roundtrip_and_truncated(tmp_path):
    import gzip

    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    blob = b"\x00\x00\x08\x03" + np.array(arr.shape, ">u4").tobytes() + arr.tobytes()
    (tmp_path / "x.gz").write_bytes(gzip.compress(blob))
    np.testing.assert_array_equal(fashion_mnist.read_idx(str(tmp_path / "x.gz")), arr)
    (tmp_path / "t").write_bytes(blob[:-1])
    with pytest.raises(UserError, match="header"):
        fashion_mnist.read_idx(str(tmp_path / "t"))
    (tmp_path / "m").write_bytes(b"\x01\x02" + blob[2:])
    with pytest.raises(UserError, match="not an IDX file"):
        fashion_mnist.read_idx(str(tmp_path / "m"))


# ------------------------------------------------------------------------------------------- Fashion-MNIST

@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    if not os.path.exists(os.path.join(fashion_mnist.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")):
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    out = tmp_path_factory.mktemp("fmnist")
    return out, fashion_mnist.import_fashion_mnist(out, val_size=5000, seed=0)


def test_fashion_mnist_counts_and_split(fashion):
    out, paths = fashion
    counts = {s: lmdbio.lmdb_info(p)["count"] for s, p in paths.items()}
    assert counts == {"train": 55000, "val": 5000, "test": 10000}
    for p in paths.values():
        info = lmdbio.lmdb_info(p)
        assert (info["channels"], info["height"], info["width"]) == (1, 28, 28)
    meta = fileio.read_json(paths["val"] + ".json")
    assert meta["count"] == 5000 and meta["seed"] == 0 and sum(meta["counts_by_class"].values()) == 5000
    images, labels = (fashion_mnist.read_idx(os.path.join(fashion_mnist.FASHION_MNIST_DIR, f"train-{f}.gz"))
                      for f in ("images-idx3-ubyte", "labels-idx1-ubyte"))
    val_idx = np.sort(np.random.default_rng(0).permutation(60000)[:5000])
    train_idx = np.setdiff1d(np.arange(60000), val_idx)
    assert len(np.intersect1d(val_idx, train_idx)) == 0 and len(val_idx) + len(train_idx) == 60000
    for split, idx in (("val", val_idx), ("train", train_idx)):  # every image and label, in the file's order
        got_images, got_labels = _lmdb_arrays(paths[split])
        np.testing.assert_array_equal(got_images, images[idx])
        np.testing.assert_array_equal(got_labels, labels[idx])


def _lmdb_arrays(path):
    """(images N x 28 x 28, labels) of a 1-channel LMDB, in key order."""
    records = list(lmdbio.read_lmdb(path))
    return np.stack([img[0] for _, img, _ in records]), np.array([label for _, _, label in records])


def test_fashion_mnist_data_layer_reads_test_set(fashion, tmp_path):
    out, paths = fashion
    test_images = fashion_mnist.read_idx(os.path.join(fashion_mnist.FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz"))
    test_labels = fashion_mnist.read_idx(os.path.join(fashion_mnist.FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz"))
    pixels, labels = data_layer_read(tmp_path, paths["test"], 50)  # Caffe's own reader, one batch
    np.testing.assert_array_equal(pixels[:, 0], test_images[:50].astype(np.float32))
    np.testing.assert_array_equal(labels, test_labels[:50])
    got_images, got_labels = _lmdb_arrays(paths["test"])  # and all 10,000
    np.testing.assert_array_equal(got_images, test_images)
    np.testing.assert_array_equal(got_labels, test_labels)


def test_fashion_mnist_rerun_reuses_and_refuses_other_settings(fashion):
    out, paths = fashion
    before = os.stat(os.path.join(paths["train"], "data.mdb")).st_mtime_ns
    assert fashion_mnist.import_fashion_mnist(out, val_size=5000, seed=0) == paths
    assert os.stat(os.path.join(paths["train"], "data.mdb")).st_mtime_ns == before
    with pytest.raises(OutputExists, match="other settings"):
        fashion_mnist.import_fashion_mnist(out, val_size=1000, seed=0)



def test_fashion_mnist_reuse_needs_no_idx_files(tmp_path):
    """A complete import is reused on a machine without Debian's package (the IDX files are read only to build)."""
    out = tmp_path / "fm"
    for split, n in (("train", 3), ("val", 2), ("test", 1)):
        path = lmdbio.write_array_lmdb(out / f"{split}_lmdb", np.zeros((n, 28, 28), np.uint8), np.zeros(n, int))
        fileio.write_json(path + ".json", {"count": n, "val_size": 5000, "seed": 0})
    paths = fashion_mnist.import_fashion_mnist(out, source_dir=tmp_path / "no_idx")
    assert paths == {split: str(out / f"{split}_lmdb") for split in fashion_mnist.SPLITS}
    os.remove(out / "test_lmdb.json")
    shutil.rmtree(out / "test_lmdb")
    with pytest.raises(InputMissing, match="no_idx.*install Debian's dataset-fashion-mnist"):
        fashion_mnist.import_fashion_mnist(out, source_dir=tmp_path / "no_idx")
# ------------------------------------------------------------------------------------------- counts

@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 9, 17])
@pytest.mark.parametrize("ahead", [1, 2, 4])
def test_in_order_yields_every_item_once_in_order(n, ahead):
    from concurrent.futures import ThreadPoolExecutor

    from dsd_caffe.imagedb import _in_order

    with ThreadPoolExecutor(2) as pool:
        assert list(_in_order(pool, lambda x: x * 10, range(n), ahead)) == [10 * i for i in range(n)]


def test_parallel_build_of_more_than_two_chunks_per_worker_loses_nothing(tmp_path):
    """200 files, 2 workers: more chunks of 32 than the 4 queued ahead (the old queue lost one chunk: 168 images)."""
    src = make_folder(tmp_path / "img", per_class=100, size=(4, 4))
    stats = imagedb.make_lmdb(src, tmp_path / "out", resize=None, workers=2, progress=False)
    assert stats["count"] + len(stats["skipped"]) == 202
    assert stats["count"] == 200 == len(raw_records(tmp_path / "out"))


def _drop_first_record(monkeypatch):
    """Make every LMDB writer silently lose the first record it is given (a stand-in for any lost-record bug)."""
    put = lmdbio.LmdbWriter.put

    def lossy(self, records):
        if not getattr(self, "dropped", False):
            self.dropped, records = True, records[1:]
        return put(self, records)

    monkeypatch.setattr(lmdbio.LmdbWriter, "put", lossy)


@pytest.mark.parametrize("build", ["make_lmdb", "write_array_lmdb", "import_fashion_mnist"])
def test_a_lost_record_refuses_to_finish_and_leaves_no_output(build, tmp_path, monkeypatch):
    """Counts are invariants: N inputs must give written + skipped == N, else no output is renamed into place."""
    if build == "import_fashion_mnist" and not os.path.exists(fashion_mnist.FASHION_MNIST_DIR):
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    src = make_folder(tmp_path / "img")
    _drop_first_record(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="inputs, but .* records written"):
        if build == "make_lmdb":
            imagedb.make_lmdb(src, out, resize=(8, 8), workers=1, progress=False)
        elif build == "write_array_lmdb":
            lmdbio.write_array_lmdb(out, np.zeros((5, 1, 2, 2), np.uint8), np.arange(5))
        else:
            fashion_mnist.import_fashion_mnist(out)
    assert [n for n in os.listdir(tmp_path) if not n.endswith(".lock")] == ["img"]


def test_duplicate_keys_refuse_to_finish(tmp_path):
    with pytest.raises(RuntimeError, match="5 inputs, but 5 records written .* holds 1 .duplicate keys."):
        lmdbio.write_array_lmdb(tmp_path / "dup", np.zeros((5, 1, 2, 2), np.uint8), np.arange(5), keys="k%.0s")
    assert os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def image_pool(tmp_path_factory):
    """Tiny distinct PNGs in three class folders, and a few files in them that are not images."""
    root = tmp_path_factory.mktemp("pool")
    rng = np.random.default_rng(5)
    names = []
    for i in range(96):
        name = f"c{i % 3}/{i:03d}.png" if i < 90 else f"c{i % 3}/junk{i}.jpg"
        os.makedirs(root / os.path.dirname(name), exist_ok=True)
        if i < 90:
            cv2.imwrite(str(root / name), rng.integers(0, 256, (3 + i % 4, 5, 3), dtype=np.uint8))
        else:
            (root / name).write_text("not an image")
        names.append(name)
    return root, names


@settings(max_examples=40, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(draw=st.data(), files=st.integers(1, 70), workers=st.integers(1, 4), chunk=st.integers(1, 9),
       shuffle=st.booleans(), listed=st.booleans(), seed=st.integers(0, 3))
def test_make_lmdb_property_every_input_once(image_pool, tmp_path_factory, draw, files, workers, chunk, shuffle,
                                             listed, seed):
    """Any files, workers, chunk size, shuffle, list file or folder: every decodable input is a record exactly
    once, under the key of its input position, with its label; every other input is listed as skipped; the JSON
    counts agree."""
    pool, names = image_pool
    chosen = draw.draw(st.lists(st.sampled_from(names), min_size=files, max_size=files, unique=not listed))
    work = tmp_path_factory.mktemp("prop")
    if listed:  # a list file may repeat a path: convert_imageset writes it twice, under two keys
        source, root = work / "list.txt", pool
        labels = draw.draw(st.lists(st.integers(0, 4), min_size=len(chosen), max_size=len(chosen)))
        source.write_text("".join(f"{n} {lab}\n" for n, lab in zip(chosen, labels)))
    else:
        source = root = work / "img"
        for n in chosen:
            os.makedirs(source / os.path.dirname(n), exist_ok=True)
            os.link(pool / n, source / n)
        chosen = sorted(chosen)
        classes = sorted({n.split("/")[0] for n in chosen})
        labels = [classes.index(n.split("/")[0]) for n in chosen]
    expected = sorted((n, lab) for n, lab in zip(chosen, labels) if "junk" not in n)
    build = functools.partial(imagedb.make_lmdb, source, work / "out", root=root, resize=None, workers=workers,
                              chunk=chunk, shuffle=shuffle, seed=seed, progress=False)
    if not expected:
        with pytest.raises(UserError, match=f"none of the {len(chosen)} files"):
            build()
        return
    stats = build()
    records = [(k.split("_", 1), lab) for k, _, lab in lmdbio.read_lmdb(work / "out")]
    assert sorted((name, lab) for (_, name), lab in records) == expected
    positions = [int(pos) for (pos, _), _ in records]
    skipped = [s["path"] for s in stats["skipped"]]
    assert sorted(skipped) == sorted(n for n in chosen if "junk" in n)
    assert len(set(positions)) == len(positions) and set(positions) <= set(range(len(chosen)))
    if not shuffle:
        assert [name for (_, name), _ in records] == [n for n in chosen if "junk" not in n]
        assert [chosen[p] for p in positions] == [name for (_, name), _ in records]
    meta = fileio.read_json(str(work / "out") + ".json")
    assert meta["count"] == stats["count"] == len(records) == len(chosen) - len(skipped)
    assert meta["counts"] == {str(k): v for k, v in sorted(collections.Counter(lab for _, lab in expected).items())}
    assert meta["skipped"] == stats["skipped"]


# ------------------------------------------------------------------------------------------- file names

def test_file_names_not_utf8_are_skipped_and_named(tmp_path):
    """A file (or class folder) name that is not UTF-8 cannot be an LMDB key: skipped and named, not fatal."""
    src = make_folder(tmp_path / "img")
    png = (src / "cat" / "1.png").read_bytes()
    with open(os.path.join(os.fsencode(src / "cat"), b"caf\xe9.png"), "wb") as f:
        f.write(png)
    os.mkdir(os.path.join(os.fsencode(src), b"d\xf6g"))
    with open(os.path.join(os.fsencode(src), b"d\xf6g", b"x.png"), "wb") as f:
        f.write(png)
    r = tool("make_lmdb", src, "--output", tmp_path / "out", "--resize", "8x8")
    assert r.returncode == 0, r.stderr
    meta = fileio.read_json(str(tmp_path / "out") + ".json")
    assert meta["count"] == 8 and meta["classes"] == ["cat", "dog", "d\\xf6g"]  # sorted as bytes are
    not_utf8 = [s["path"] for s in meta["skipped"] if "not valid UTF-8" in s["error"]]
    assert not_utf8 == ["cat/caf\\xe9.png", "d\\xf6g/x.png"]
    assert "skipped cat/caf\\xe9.png" in r.stdout
    assert len(raw_records(tmp_path / "out")) == 8


def test_path_too_long_for_a_key_is_skipped_and_named(tmp_path):
    src = make_folder(tmp_path / "img")
    long_name = "x" * 250 + ".png"
    deep = src / "cat" / ("y" * 250)
    deep.mkdir()
    (deep / long_name).write_bytes((src / "cat" / "1.png").read_bytes())
    stats = imagedb.make_lmdb(src, tmp_path / "out", resize=(8, 8), workers=1, progress=False)
    assert stats["count"] == 8
    assert [s["error"] for s in stats["skipped"] if s["path"].endswith(long_name)] == [
        "path too long for an LMDB key (518 bytes > 511)"]


def test_list_file_not_utf8_is_one_line(tmp_path):
    make_folder(tmp_path / "img")
    listing = tmp_path / "img" / "list.txt"
    listing.write_bytes(b"cat/0.jpg 0\ndog/caf\xe9.png 1\n")
    refused("make_lmdb", listing, "--output", tmp_path / "out",
            expect=("list.txt:2: not valid UTF-8 (byte 0xe9 at column 8)",))
    assert not os.path.exists(tmp_path / "out")


# ------------------------------------------------------------------------------------------- encoded images

def deep_and_alpha_pngs(root):
    """PNGs a Data layer cannot take as they are (it decodes natively and needs 8-bit, 1 or 3 channels), and
    one it can."""
    rng = np.random.default_rng(2)
    os.makedirs(root / "a")
    files = {"grey16.png": rng.integers(0, 65536, (6, 7), dtype=np.uint16),
             "bgr16.png": rng.integers(0, 65536, (6, 7, 3), dtype=np.uint16),
             "bgra.png": rng.integers(0, 256, (6, 7, 4), dtype=np.uint8),
             "plain.png": rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)}
    for name, img in files.items():
        cv2.imwrite(str(root / "a" / name), img)
    return root


@pytest.mark.parametrize("gray", [False, True])
def test_encoded_16_bit_and_alpha_pngs_are_converted_for_caffe(tmp_path, gray):
    src = deep_and_alpha_pngs(tmp_path / "img")
    flag = cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR
    stats = imagedb.make_lmdb(src, tmp_path / "enc", resize=None, encoded=True, gray=gray, workers=1,
                              progress=False)
    assert stats["count"] == 4 and stats["skipped"] == []
    converted = {c["path"]: c["reason"] for c in stats["converted"]}
    assert sorted(converted) == ["a/bgr16.png", "a/bgra.png", "a/grey16.png"] + (["a/plain.png"] if gray else [])
    assert converted["a/bgra.png"] == f"8-bit 4-channel, stored as 8-bit {1 if gray else 3}-channel"
    assert converted["a/grey16.png"] == f"16-bit 1-channel, stored as 8-bit {1 if gray else 3}-channel"
    assert fileio.read_json(str(tmp_path / "enc") + ".json")["converted"] == stats["converted"]
    for key, value in raw_records(tmp_path / "enc"):
        datum = caffe_pb2().Datum()
        datum.ParseFromString(value)
        native = lmdbio.decode(datum.data)  # as Caffe's Data layer decodes it
        name = key.decode().split("_", 1)[1]
        assert native.dtype == np.uint8, name
        np.testing.assert_array_equal(native, cv2.imread(str(src / name), flag), err_msg=name)
        if name not in converted:
            assert datum.data == (src / name).read_bytes()  # what Caffe can decode is stored as it is


def test_encoded_lmdb_of_16_bit_pngs_reads_through_caffe(tmp_path):
    """The whole LMDB through a real Data layer, in a subprocess (a Caffe abort must not take pytest down)."""
    src = deep_and_alpha_pngs(tmp_path / "img")
    imagedb.make_lmdb(src, tmp_path / "enc", resize=None, encoded=True, workers=1, progress=False)
    code = ("from dsd_caffe.caffe_env import import_caffe; caffe = import_caffe(); "
            f"net = caffe.Net({data_net(tmp_path, tmp_path / 'enc', 4)!r}, caffe.TEST); net.forward(); "
            "print(net.blobs['data'].data.shape)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[:4] == ["(4,", "3,", "6,", "7)"]


# ------------------------------------------------------------------------------------------- full disk

def one_error_line(path, tool_name):
    """The stderr saved in ``path`` ends with the one error line of a tool (log lines may come before it)."""
    lines = path.read_text().strip().splitlines()
    assert "Traceback" not in path.read_text() and sum(": error:" in line for line in lines) == 1, lines
    assert lines[-1].startswith(f"{tool_name}.py: error: "), lines
    return lines[-1]


def test_full_disk_make_lmdb_is_one_line_and_keeps_the_old_output(tmp_path):
    """Filling up during the build (LMDB's EIO on a short write) and full from the start (SIGBUS from LMDB's
    lock file on tmpfs): exit 2, one line, the old LMDB and its JSON kept, no temporaries left."""
    small = make_folder(tmp_path / "small")
    big = make_folder(tmp_path / "big", per_class=100, size=(4, 4))
    out = in_small_tmpfs(tmp_path, "4m", f'''
        "$PY" "$TOOLS/make_lmdb.py" {small} --output "$DISK/out" --resize 8x8 >/dev/null 2>&1 || exit 98
        "$PY" "$TOOLS/make_lmdb.py" {big} --output "$DISK/out" --resize 256x256 --force \\
            --mean-file "$DISK/mean.binaryproto" 2>{tmp_path}/filling.err
        echo "filling $?"
        cat /dev/zero > "$DISK/filler" 2>/dev/null
        "$PY" "$TOOLS/make_lmdb.py" {small} --output "$DISK/other" --resize 8x8 2>{tmp_path}/full.err
        echo "full $?"
        rm "$DISK/filler"
        echo "left" $(ls -A "$DISK")
        "$PY" -c "from dsd_caffe import lmdbio; print('count', lmdbio.lmdb_info('$DISK/out')['count'])"
    ''')
    assert out.split("\n")[:2] == ["filling 2", "full 2"], out
    assert one_error_line(tmp_path / "filling.err", "make_lmdb") == (
        f"make_lmdb.py: error: No space left on device: {tmp_path}/disk/out; free some space and run the same "
        "command again")
    full = one_error_line(tmp_path / "full.err", "make_lmdb")
    assert full.startswith("make_lmdb.py: error: No space left on device") and "free some space" in full
    assert sorted(out.split("\n")[2].split()[1:]) == ["out", "out.json"]
    assert "count 8" in out


def test_full_disk_import_fashion_mnist_is_one_line_and_keeps_the_old_import(tmp_path):
    if not os.path.exists(os.path.join(fashion_mnist.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")):
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    out = in_small_tmpfs(tmp_path, "100m", f'''
        "$PY" "$TOOLS/import_fashion_mnist.py" --output "$DISK/fm" >/dev/null 2>&1 || exit 98
        "$PY" "$TOOLS/import_fashion_mnist.py" --output "$DISK/fm" --force --seed 1 2>{tmp_path}/force.err
        echo "force $?"
        "$PY" "$TOOLS/import_fashion_mnist.py" --output "$DISK/new" 2>{tmp_path}/new.err
        echo "new $?"
        echo "left" $(ls -A "$DISK") "|" $(ls -A "$DISK/fm")
        "$PY" -c "from dsd_caffe import fileio, lmdbio; print('old', lmdbio.lmdb_info('$DISK/fm/train_lmdb')['count'],
                  fileio.read_json('$DISK/fm/train_lmdb.json')['seed'])"
    ''')
    lines = out.strip().split("\n")
    assert lines[:2] == ["force 2", "new 2"], out
    assert "No space left on device" in one_error_line(tmp_path / "force.err", "import_fashion_mnist")
    assert "No space left on device" in one_error_line(tmp_path / "new.err", "import_fashion_mnist")
    assert lines[2].split() == ["left", "fm", "|", "test_lmdb", "test_lmdb.json",
                                "train_lmdb", "train_lmdb.json", "val_lmdb", "val_lmdb.json"]
    assert lines[3] == "old 55000 0"


# ------------------------------------------------------------------------------------------- outputs

def special_file(path, kind):
    """A FIFO, or a character device like /dev/null, at ``path`` (created in the test's own folder)."""
    if kind == "fifo":
        os.mkfifo(path)
    else:
        try:
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        except OSError as e:
            pytest.skip(f"cannot create a device node here ({e.strerror})")
    return path


@pytest.mark.parametrize("kind", ["fifo", "device"])
@pytest.mark.parametrize("where", ["output", "json", "mean"])
def test_special_files_at_any_output_path_are_refused_even_with_force(tmp_path, kind, where):
    """Checked before the build: the LMDB, its JSON sidecar and the mean file are only ever regular files and
    folders; nothing is written when one of them is a FIFO or a device."""
    src = make_folder(tmp_path / "img")
    out, mean = tmp_path / "out", tmp_path / "mean.binaryproto"
    special = special_file({"output": out, "json": tmp_path / "out.json", "mean": mean}[where], kind)
    refused("make_lmdb", src, "--output", out, "--mean-file", mean, "--resize", "8x8", "--force",
            expect=(str(special), "a FIFO" if kind == "fifo" else "a character device", "also with --force"))
    left = sorted(n for n in os.listdir(tmp_path) if not n.endswith(".lock"))
    assert left == sorted(["img", special.name])
    assert stat.S_ISFIFO(os.stat(special).st_mode) if kind == "fifo" else stat.S_ISCHR(os.stat(special).st_mode)


def test_import_fashion_mnist_never_replaces_a_fifo_or_a_folder_of_other_data(tmp_path):
    special_file(tmp_path / "fifo", "fifo")
    refused("import_fashion_mnist", "--output", tmp_path / "fifo", "--force", expect=("a FIFO",))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    refused("import_fashion_mnist", "--output", tmp_path / "mine", "--force",
            expect=("'notes.txt'", "did not write", "also with --force"))
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]


@pytest.mark.parametrize("case", ["missing source", "bad list file", "bad resize", "fashion: no IDX files",
                                  "fashion: bad val size"])
def test_a_refused_input_creates_no_output_folder(tmp_path, case):
    make_folder(tmp_path / "img")
    (tmp_path / "list.txt").write_text("cat/0.jpg zero\n")
    new = tmp_path / "new" / "deeper"
    tool_name, args = {
        "missing source": ("make_lmdb", (tmp_path / "nowhere", "--output", new / "out")),
        "bad list file": ("make_lmdb", (tmp_path / "list.txt", "--root", tmp_path / "img", "--output", new / "out")),
        "bad resize": ("make_lmdb", (tmp_path / "img", "--output", new / "out", "--resize=0x-4")),
        "fashion: no IDX files": ("import_fashion_mnist", ("--output", new, "--source-dir", tmp_path / "nothing")),
        "fashion: bad val size": ("import_fashion_mnist", ("--output", new, "--val-size", "60000")),
    }[case]
    refused(tool_name, *args)
    assert not os.path.exists(tmp_path / "new")


def test_no_decodable_image_leaves_no_lmdb_and_no_json(tmp_path):
    (tmp_path / "junk" / "a").mkdir(parents=True)
    (tmp_path / "junk" / "a" / "x.jpg").write_text("no")
    r = tool("make_lmdb", tmp_path / "junk", "--output", tmp_path / "out")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        f"make_lmdb.py: error: none of the 1 files in {tmp_path / 'junk'} could be decoded as an image")
    assert sorted(os.listdir(tmp_path)) == ["junk"]


def test_lmdb_options_are_validated_once_and_name_the_bad_value():
    opts = imagedb.LmdbOptions(resize=64, encoded="JPEG", workers=3, chunk=5)
    assert (opts.resize, opts.encoded, opts.workers, opts.chunk) == ((64, 64), "jpeg", 3, 5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.chunk = 7
    for bad, text in [(dict(chunk=0), "chunk must be an integer >= 1, got 0"),
                      (dict(workers=True), "workers must be an integer >= 1, got True"),
                      (dict(resize=(0, 3)), "resize must be positive, got (0, 3)"),
                      (dict(encoded="tiff"), "encoded must be True, False or one of"),
                      (dict(seed=-1), "seed must be an integer >= 0, got -1")]:
        with pytest.raises(UserError, match=re.escape(text)):
            imagedb.LmdbOptions(**bad)
    with pytest.raises(TypeError):  # a misspelt option is a programming error
        imagedb.make_lmdb("src", "out", worker=2)
