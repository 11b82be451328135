"""Caffe LMDBs in and out: build one from an image folder or a list file (what ``convert_imageset`` does, in
parallel, with a mean and a JSON summary), import Fashion-MNIST, write numpy arrays, and inspect an LMDB.

Every LMDB is built under a temporary name beside the output and renamed only when complete, so a crash never
leaves a half-written LMDB under the real name. Keys follow ``convert_imageset`` (``%08d_<path>``) so a Data layer
reads the images in the same order.
"""
import collections
import functools
import gzip
import itertools
import logging
import os
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import fileio
from .caffe_env import caffe_pb2
from .errors import UserError

log = logging.getLogger(__name__)

#: Fashion-MNIST as packaged by Debian's dataset-fashion-mnist.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DEFAULT_MAP_SIZE = 1 << 28  # the starting map size; it doubles whenever the LMDB is full
MAX_KEY_BYTES = 511  # LMDB's default key size limit
CHUNK = 32  # images per worker task (and per LMDB transaction)


def _check_output(path, force, lmdb=False):
    """fileio.check_output; with ``lmdb``, --force replaces only an LMDB (a folder holding nothing but data.mdb
    and lock.mdb), never other data."""
    fileio.check_output(path, force)
    if lmdb and os.path.lexists(path):
        if not os.path.isdir(path) or os.path.islink(path) or \
                not set(os.listdir(path)) <= {"data.mdb", "lock.mdb"}:
            raise FileExistsError(f"{path} exists and is not an LMDB; refusing to replace it even with --force")
    return path


# ----------------------------------------------------------------------------------------------- inputs

def read_list_file(path):
    """Read a Caffe list file (``relative/path label`` per line, split at the last space like
    ``convert_imageset``) into a list of (path, label). Blank lines are ignored."""
    path = fileio.require_file(path, "list file")
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            name, _, label = line.rstrip().rpartition(" ")
            try:
                label = int(label)
            except ValueError:
                raise UserError(f"{path}:{lineno}: expected `<path> <integer label>`, got {line!r}") from None
            if not name or label < 0:
                raise UserError(f"{path}:{lineno}: expected `<path> <label >= 0>`, got {line!r}")
            items.append((name, label))
    if not items:
        raise UserError(f"list file {path} lists no images")
    return items


def list_folder(root):
    """List an image folder with one sub-folder per class. Returns (items, class_names): class labels are the
    sorted sub-folder names' positions; items are (``class/file`` path, label), sorted. Hidden files are left out;
    every other file is listed (non-images are skipped later, and reported)."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root} does not exist")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise UserError(f"image folder {root} has no class sub-folders (expected <root>/<class>/<image>)")
    items = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(filenames):
                if not fn.startswith("."):
                    items.append((os.path.relpath(os.path.join(dirpath, fn), root), label))
    items.sort()
    if not items:
        raise UserError(f"image folder {root} holds no files in its class sub-folders {classes}")
    return items, classes


def _parse_resize(resize):
    if resize is None or resize == 0 or resize is False:
        return None
    if isinstance(resize, (int, np.integer)) and not isinstance(resize, bool):
        resize = (resize, resize)
    try:
        h, w = (int(v) for v in resize)
    except (TypeError, ValueError):
        raise UserError(f"resize must be (height, width), an int or None, got {resize!r}") from None
    if h <= 0 or w <= 0:
        raise UserError(f"resize must be positive, got {resize!r}")
    return h, w


_ENCODINGS = {"png": ".png", "jpg": ".jpg", "jpeg": ".jpg", "bmp": ".bmp"}


def _parse_encoded(encoded):
    if encoded is False or encoded is None:
        return None
    if encoded is True:
        return "auto"  # the file's own format, like convert_imageset --encoded
    enc = str(encoded).lower().lstrip(".")
    if enc not in _ENCODINGS:
        raise UserError(f"encoded must be True, False or one of {sorted(_ENCODINGS)}, got {encoded!r}")
    return enc


# ----------------------------------------------------------------------------------------------- workers

def _quiet_opencv():
    import cv2

    cv2.setNumThreads(1)  # the parallelism is ours, one image per thread
    try:  # failures are reported by us, file by file, not by OpenCV's stderr warnings
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    except AttributeError:
        pass


def _convert_one(full, label, s):
    """Decode, resize and serialise one image; returns (datum bytes, HWC uint8 image) or raises ValueError."""
    import cv2

    with open(full, "rb") as f:
        raw = f.read()
    if not raw:
        raise UserError("empty file")
    buf = np.frombuffer(raw, np.uint8)
    flag = cv2.IMREAD_GRAYSCALE if s["gray"] else cv2.IMREAD_COLOR
    enc, ext = s["encoded"], os.path.splitext(full)[1].lower().lstrip(".")
    if enc == "auto":
        enc = ext if ext in _ENCODINGS else "png"
    # Encoded and not resized: store the file's own bytes when a Data layer (which decodes natively) gets the
    # channels asked for; convert_imageset stores them even when it does not (a grey JPEG in a colour LMDB).
    keep_file = enc is not None and s["resize"] is None and _ENCODINGS[enc] == _ENCODINGS.get(ext)
    img = cv2.imdecode(buf, cv2.IMREAD_ANYCOLOR if keep_file else flag)
    if keep_file and img is not None and (img.ndim == 2) != s["gray"]:
        keep_file, img = False, cv2.imdecode(buf, flag)
    if img is None:
        raise UserError("not an image, or a corrupt one (OpenCV could not decode it)")
    if s["resize"] is not None:
        h, w = s["resize"]
        if img.shape[:2] != (h, w):
            img = cv2.resize(img, (w, h))  # bilinear, as convert_imageset
    if img.ndim == 2:
        img = img[:, :, None]
    h, w, c = img.shape
    datum = s["pb2"].Datum(channels=c, height=h, width=w, label=int(label))
    if enc is None:
        datum.data = np.ascontiguousarray(img.transpose(2, 0, 1)).tobytes()
    else:
        if keep_file:
            datum.data = raw
        else:
            ok, out = cv2.imencode(_ENCODINGS[enc], img)
            if not ok:
                raise UserError(f"OpenCV could not encode it as {enc}")
            datum.data = out.tobytes()
        datum.encoded = True
    return datum.SerializeToString(), img


def _convert_chunk(s, chunk):
    """Worker task: settings and a list of (index, key, full path, label). Returns (records, failures, sums) where
    sums maps an image shape (h, w, c) to [count, per-channel float64 sum, uint32 per-pixel sum or None]; the
    per-pixel sum (for a mean file) only when asked, since it costs as much as resizing."""
    import cv2

    records, failures, sums = [], [], {}
    for index, key, full, label in chunk:
        try:
            value, img = _convert_one(full, label, s)
        except (OSError, ValueError) as e:
            failures.append((index, f"{type(e).__name__}: {e}" if isinstance(e, OSError) else str(e)))
            continue
        records.append((index, key, value, label))
        acc = sums.get(img.shape)
        if acc is None:
            pixels = np.zeros(img.shape, np.uint32) if s["pixel_mean"] else None  # exact for up to 16M images
            acc = sums[img.shape] = [0, np.zeros(img.shape[2]), pixels]
        acc[0] += 1
        acc[1] += cv2.sumElems(img)[:img.shape[2]]
        if acc[2] is not None:
            np.add(acc[2], img, out=acc[2])
    return records, failures, sums


def _in_order(pool, fn, items, ahead):
    """Like ``map(fn, items)`` on ``pool``, in order, with at most ``ahead`` items queued or done but unconsumed
    (so decoded images never pile up in memory when writing is the slower side)."""
    items = iter(items)
    # islice, not zip(items, range(ahead)): zip takes one more item from ``items`` before it sees the range
    # exhausted, and that item would never be submitted.
    pending = collections.deque(pool.submit(fn, item) for item in itertools.islice(items, ahead))
    while pending:
        result = pending.popleft().result()
        pending.extend(pool.submit(fn, item) for item in itertools.islice(items, 1))
        yield result


# ----------------------------------------------------------------------------------------------- LMDB writing

def _put(env, records):
    """Write (key, value) pairs in one transaction, doubling the map size and retrying when it is full."""
    import lmdb

    while True:
        try:
            with env.begin(write=True) as txn:
                for key, value in records:
                    txn.put(key, value)
            return
        except lmdb.MapFullError:
            size = env.info()["map_size"] * 2
            log.debug("LMDB map full; growing the map to %d bytes", size)
            env.set_mapsize(size)


def _open_env(path, map_size):
    import lmdb

    return lmdb.open(path, map_size=int(map_size), subdir=True, sync=False, metasync=False,
                     readahead=False, meminit=False)


def _close_env(env):
    env.sync(True)
    env.close()


def _mean_blob(mean_chw):
    pb2 = caffe_pb2()
    c, h, w = mean_chw.shape
    blob = pb2.BlobProto(num=1, channels=c, height=h, width=w)
    blob.data.extend(mean_chw.astype(np.float32).ravel().tolist())
    return blob


def write_mean_file(path, mean_chw, force=False):
    """Write a (C, H, W) mean as a binaryproto, as ``compute_image_mean`` does."""
    return fileio.atomic_write(path, _mean_blob(np.asarray(mean_chw)).SerializeToString(), force=force)


def read_mean_file(path):
    """Read a binaryproto mean into a (C, H, W) float32 array."""
    path = fileio.require_file(path, "mean file")
    blob = caffe_pb2().BlobProto()
    with open(path, "rb") as f:
        blob.ParseFromString(f.read())
    shape = tuple(blob.shape.dim) or (blob.num, blob.channels, blob.height, blob.width)
    arr = np.asarray(blob.data, dtype=np.float32)
    if arr.size != int(np.prod(shape)) or arr.size == 0:
        raise UserError(f"mean file {path}: {arr.size} values do not fill its shape {shape}")
    return arr.reshape(shape[-3:])


def make_lmdb(source, output, root=None, resize=(256, 256), shuffle=False, seed=0, gray=False, encoded=False,
              workers=None, mean_file=None, force=False, map_size=DEFAULT_MAP_SIZE, progress=True):
    """Build an LMDB of ``caffe_pb2.Datum`` from an image folder (one sub-folder per class; labels are the sorted
    class names' positions) or a Caffe list file (``path label``; paths relative to ``root``, default the list
    file's folder).

    ``resize`` is (height, width) or None; ``gray`` stores one channel, else three (BGR); ``encoded`` is False
    (raw pixels), True (the file's own format) or "png"/"jpg". Images are decoded by ``workers`` threads (default:
    all cores). Files that fail to decode are skipped and listed. Writes ``<output>.json`` (classes, counts, per-channel
    mean values, skipped files) and, when ``mean_file`` is given, a binaryproto mean like ``compute_image_mean``.
    Returns that summary as a dict.
    """
    output = os.path.abspath(os.fspath(output))
    source = os.fspath(source)
    size = _parse_resize(resize)
    enc = _parse_encoded(encoded)
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UserError(f"workers must be an integer >= 1, got {workers!r}")
    if os.path.isdir(source):
        items, classes = list_folder(source)
        root = source
    elif os.path.exists(source):
        items, classes = read_list_file(source), None
        root = os.path.dirname(os.path.abspath(source)) if root is None else os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image root folder {root} does not exist")
    else:
        raise FileNotFoundError(f"image folder or list file {source} does not exist")
    _check_output(output, force, lmdb=True)
    if mean_file is not None:
        mean_file = os.fspath(mean_file)
        _check_output(mean_file, force)
    if os.path.abspath(source).rstrip(os.sep) == output:
        raise UserError(f"output {output} is the input")
    order = np.random.default_rng(seed).permutation(len(items)) if shuffle else range(len(items))
    items = [items[i] for i in order]
    tasks = []
    for i, (name, label) in enumerate(items):
        key = f"{i:08d}_{name}".encode()
        if len(key) > MAX_KEY_BYTES:
            raise UserError(f"path too long for an LMDB key ({len(key)} bytes > {MAX_KEY_BYTES}): {name}")
        tasks.append((i, key, os.path.join(root, name), label))
    chunks = [tasks[i:i + CHUNK] for i in range(0, len(tasks), CHUNK)]
    settings = {"gray": bool(gray), "resize": size, "encoded": enc, "pb2": caffe_pb2(),
                "pixel_mean": mean_file is not None}
    workers = min(workers, max(1, len(chunks)))
    log.info("building %s from %d files (%s, %d workers)", output, len(items),
             f"{size[0]}x{size[1]}" if size else "no resize", workers)

    from tqdm import tqdm

    counts, failures, sums = {}, [], {}
    with fileio.atomic_path(output, force=force, directory=True) as tmp:
        env = _open_env(tmp, map_size)
        try:
            _quiet_opencv()
            convert = functools.partial(_convert_chunk, settings)
            # Threads, not processes: OpenCV decodes and resizes without the GIL, and a process pool spent as much
            # CPU again on pickling the decoded pixels back (bench/lmdb_vs_convert_imageset.py).
            pool = ThreadPoolExecutor(workers) if workers > 1 else None
            results = _in_order(pool, convert, chunks, ahead=2 * workers) if pool else map(convert, chunks)
            try:
                with tqdm(total=len(tasks), unit="img", desc=os.path.basename(output), disable=not progress) as bar:
                    for records, failed, chunk_sums in results:
                        _put(env, [(key, value) for _, key, value, _ in records])
                        for _, _, _, label in records:
                            counts[label] = counts.get(label, 0) + 1
                        failures.extend(failed)
                        for shape, (n, channel, pixels) in chunk_sums.items():
                            acc = sums.setdefault(shape, [0, 0.0, 0.0 if pixels is not None else None])
                            acc[0] += n
                            acc[1] = acc[1] + channel
                            if pixels is not None:
                                acc[2] = acc[2] + pixels.astype(np.float64)
                        bar.update(len(records) + len(failed))
            finally:
                if pool is not None:
                    # On an error, queued chunks are dropped and running ones left to finish on their own: the
                    # threads only decode, they never touch the LMDB, so the temporary folder can go at once.
                    pool.shutdown(wait=False, cancel_futures=True)
            count = sum(counts.values())
            if count == 0:
                raise UserError(f"none of the {len(tasks)} files in {source} could be decoded as an image")
        finally:
            _close_env(env)

    skipped = [{"path": items[i][0], "error": err} for i, err in sorted(failures)]
    for s in skipped:
        log.warning("skipped %s: %s", s["path"], s["error"])
    channel_sum = sum(channel for _, channel, _ in sums.values())
    channel_px = sum(n * shape[0] * shape[1] for shape, (n, _, _) in sums.items())
    stats = {
        "lmdb": os.path.basename(output),
        "source": os.path.basename(os.path.abspath(source)),
        "count": count,
        "classes": classes,
        "counts": {str(k): counts[k] for k in sorted(counts)},
        "skipped": skipped,
        "resize": list(size) if size else None,
        "channels": 1 if gray else 3,
        "color": "gray" if gray else "BGR",
        "encoded": enc or False,
        "shuffle": bool(shuffle),
        "seed": int(seed) if shuffle else None,
        "mean_values": [round(float(v), 4) for v in channel_sum / channel_px],
        "mean_file": None,
    }
    if classes is not None:
        stats["counts_by_class"] = {classes[k]: counts[k] for k in sorted(counts)}
    if mean_file is not None:
        if len(sums) == 1:
            (n, _, pixels), = sums.values()
            write_mean_file(mean_file, (pixels / n).transpose(2, 0, 1), force=force)
            stats["mean_file"] = os.path.relpath(os.path.abspath(mean_file), os.path.dirname(output))
        else:
            log.warning("images differ in size (%d shapes): no per-pixel mean file written; use resize, or the "
                        "mean values %s", len(sums), stats["mean_values"])
    fileio.write_json(fileio.sidecar_path(output), stats, force=True)
    log.info("wrote %d images to %s (%d skipped)", count, output, len(skipped))
    return dict(stats, path=output)


def write_array_lmdb(path, images, labels, force=False, map_size=DEFAULT_MAP_SIZE, keys="%08d"):
    """Write uint8 images (N, C, H, W), or (N, H, W) for grey, with integer labels as raw Datums (atomically).
    Returns the path."""
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4:
        raise UserError(f"images must be (N, C, H, W) or (N, H, W), got shape {images.shape}")
    if images.dtype != np.uint8:
        raise TypeError(f"images must be uint8, got {images.dtype}")
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"labels must be {len(images)} integers, got shape {labels.shape} of {labels.dtype}")
    if len(images) == 0:
        raise UserError("no images to write")
    pb2 = caffe_pb2()
    _, c, h, w = images.shape
    path = _check_output(os.path.abspath(os.fspath(path)), force, lmdb=True)
    with fileio.atomic_path(path, force=force, directory=True) as tmp:
        env = _open_env(tmp, map_size)
        try:
            datum = pb2.Datum(channels=c, height=h, width=w)
            for start in range(0, len(images), 10000):
                batch = []
                for i in range(start, min(start + 10000, len(images))):
                    datum.data = images[i].tobytes()
                    datum.label = int(labels[i])
                    batch.append(((keys % i).encode(), datum.SerializeToString()))
                _put(env, batch)
        finally:
            _close_env(env)
    return path


# ----------------------------------------------------------------------------------------------- reading

def lmdb_info(path):
    """Return {"count", "channels", "height", "width", "encoded", "label"} of an LMDB of Datums (shape and label from
    its first record). Raises ValueError naming the path when it is missing, empty, unreadable or not Datums."""
    import lmdb
    from google.protobuf.message import DecodeError

    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"LMDB {path} does not exist")
    if not os.path.isdir(path):
        raise UserError(f"LMDB {path} is a file; an LMDB is a folder holding data.mdb")
    if not os.path.exists(os.path.join(path, "data.mdb")):
        raise UserError(f"LMDB {path} is empty (no data.mdb in it)")
    try:
        env = lmdb.open(path, readonly=True, lock=False, subdir=True, readahead=False)
    except lmdb.Error as e:
        raise UserError(f"LMDB {path} is unreadable ({e})") from None
    try:
        count = env.stat()["entries"]
        if count == 0:
            raise UserError(f"LMDB {path} is empty (0 records)")
        with env.begin() as txn:
            key, value = next(iter(txn.cursor()))
    except lmdb.Error as e:
        raise UserError(f"LMDB {path} is unreadable ({e})") from None
    finally:
        env.close()
    datum = caffe_pb2().Datum()
    try:
        datum.ParseFromString(value)
    except DecodeError:
        raise UserError(f"LMDB {path}: record {key!r} is not a caffe Datum") from None
    c, h, w = datum.channels, datum.height, datum.width
    if datum.encoded:
        img = _decode(datum.data)
        if img is None:
            raise UserError(f"LMDB {path}: record {key!r} holds an encoded image OpenCV cannot decode")
        h, w = img.shape[:2]
        c = 1 if img.ndim == 2 else img.shape[2]
    elif c * h * w == 0 or (datum.data and len(datum.data) != c * h * w) or \
            (not datum.data and len(datum.float_data) != c * h * w):
        raise UserError(f"LMDB {path}: record {key!r} is not a valid Datum (shape {c}x{h}x{w}, "
                         f"{len(datum.data) or len(datum.float_data)} values)")
    return {"count": int(count), "channels": int(c), "height": int(h), "width": int(w),
            "encoded": bool(datum.encoded), "label": int(datum.label)}


def check_lmdb(path, crop_size=0, channels=None):
    """lmdb_info, plus the checks a Data layer would otherwise fail on with a glog abort: images at least
    ``crop_size`` on each side and, when given, ``channels`` channels. Returns the info dict."""
    info = lmdb_info(path)
    if crop_size and (info["height"] < crop_size or info["width"] < crop_size):
        raise UserError(f"LMDB {path} holds {info['height']}x{info['width']} images, smaller than the crop "
                         f"size {crop_size}")
    if channels is not None and info["channels"] != channels:
        raise UserError(f"LMDB {path} holds {info['channels']}-channel images, the net expects {channels}")
    return info


def label_range(path, limit=2000):
    """(smallest, largest) label among the first ``limit`` records of an LMDB of Datums (labels only are read)."""
    import lmdb

    lmdb_info(path)
    pb2 = caffe_pb2()
    low = high = None
    env = lmdb.open(os.fspath(path), readonly=True, lock=False, subdir=True)
    try:
        with env.begin() as txn:
            for n, value in enumerate(txn.cursor().iternext(keys=False, values=True)):
                if n >= limit:
                    break
                d = pb2.Datum()
                d.ParseFromString(value)
                low = d.label if low is None else min(low, d.label)
                high = d.label if high is None else max(high, d.label)
    finally:
        env.close()
    return low, high


def _decode(data):
    import cv2

    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def read_lmdb(path, limit=None):
    """Yield (key, image CHW uint8, label) from an LMDB of Datums (raw or encoded), in key order."""
    import lmdb

    lmdb_info(path)
    pb2 = caffe_pb2()
    env = lmdb.open(os.fspath(path), readonly=True, lock=False, subdir=True)
    try:
        with env.begin() as txn:
            for n, (key, value) in enumerate(txn.cursor()):
                if limit is not None and n >= limit:
                    break
                d = pb2.Datum()
                d.ParseFromString(value)
                if d.encoded:
                    img = _decode(d.data)
                    img = img[None] if img.ndim == 2 else img.transpose(2, 0, 1)
                else:
                    img = np.frombuffer(d.data, np.uint8).reshape(d.channels, d.height, d.width)
                yield key.decode(), img, d.label
    finally:
        env.close()


# ----------------------------------------------------------------------------------------------- Fashion-MNIST

_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path):
    """Read an IDX file (gzip or plain), as MNIST and Fashion-MNIST ship, into a numpy array."""
    path = fileio.require_file(path, "IDX file")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"IDX file {path} is unreadable ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise UserError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"IDX file {path} is truncated (header)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_TYPES[data[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise UserError(f"IDX file {path} holds {len(data)} bytes, its header {shape} says {expected}")
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def import_fashion_mnist(output_dir, val_size=5000, seed=0, force=False, source_dir=FASHION_MNIST_DIR):
    """Write Fashion-MNIST as ``train_lmdb``, ``val_lmdb`` and ``test_lmdb`` (1x28x28 raw Datums) in ``output_dir``,
    each with a JSON beside it. ``val_size`` images, chosen with ``seed``, are carved out of the 60k training images
    (both splits keep the file's order). LMDBs already present from the same settings are reused unless ``force``.
    Returns {"train": path, "val": path, "test": path}."""
    if isinstance(val_size, bool) or not isinstance(val_size, (int, np.integer)) or not 0 < val_size < 60000:
        raise UserError(f"val_size must be an integer in 1..59999, got {val_size!r}")
    output_dir = os.path.abspath(os.fspath(output_dir))
    paths = {split: os.path.join(output_dir, f"{split}_lmdb") for split in ("train", "val", "test")}
    settings = {"val_size": int(val_size), "seed": int(seed)}
    todo = []
    for split, path in paths.items():
        if force or not os.path.lexists(path):
            todo.append(split)
            continue
        meta = fileio.read_json(fileio.sidecar_path(path)) if os.path.exists(fileio.sidecar_path(path)) else {}
        if split != "test" and any(meta.get(k) != v for k, v in settings.items()):
            raise FileExistsError(f"{path} exists from other settings ({ {k: meta.get(k) for k in settings} }); "
                                  f"pass --force to rebuild it with {settings}")
        info = lmdb_info(path)
        if info["count"] != meta.get("count"):
            raise UserError(f"{path} holds {info['count']} records, its JSON says {meta.get('count')}; "
                             "pass --force to rebuild it")
    if not todo:
        log.info("Fashion-MNIST LMDBs already in %s; reusing them", output_dir)
        return paths
    for split in todo:
        _check_output(paths[split], force=True, lmdb=True)  # writable folder; --force replaces only LMDBs
    files = {name: os.path.join(source_dir, f"{name}-idx{3 if 'images' in name else 1}-ubyte.gz")
             for name in ("train-images", "train-labels", "t10k-images", "t10k-labels")}
    for p in files.values():
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p} not found; install Debian's dataset-fashion-mnist package")
    arrays = {}
    if "train" in todo or "val" in todo:
        images, labels = read_idx(files["train-images"]), read_idx(files["train-labels"])
        val_idx = np.sort(np.random.default_rng(seed).permutation(len(images))[:val_size])
        train_mask = np.ones(len(images), bool)
        train_mask[val_idx] = False
        arrays["train"] = images[train_mask], labels[train_mask], "train"
        arrays["val"] = images[val_idx], labels[val_idx], "train"
    if "test" in todo:
        arrays["test"] = read_idx(files["t10k-images"]), read_idx(files["t10k-labels"]), "t10k"
    for split in todo:
        images, labels, origin = arrays[split]
        if len(images) != len(labels):
            raise UserError(f"Fashion-MNIST {origin}: {len(images)} images but {len(labels)} labels")
        write_array_lmdb(paths[split], images[:, None], labels.astype(np.int64), force=True,
                         map_size=images.nbytes * 2 + (16 << 20))
        counts = np.bincount(labels, minlength=10)
        meta = {"lmdb": os.path.basename(paths[split]), "source": f"fashion-mnist {origin}", "split": split,
                "count": int(len(images)), "channels": 1, "height": 28, "width": 28, "encoded": False,
                "classes": FASHION_MNIST_CLASSES,
                "counts_by_class": {c: int(n) for c, n in zip(FASHION_MNIST_CLASSES, counts)},
                "mean_values": [round(float(images.mean()), 4)]}
        if split != "test":
            meta.update(settings)
        fileio.write_json(fileio.sidecar_path(paths[split]), meta, force=True)
        log.info("wrote %d Fashion-MNIST %s images to %s", len(images), split, paths[split])
    return paths
