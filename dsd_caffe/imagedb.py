"""Build a Caffe LMDB of Datums from images, as ``convert_imageset`` does but in parallel, with a JSON summary and,
optionally, a per-pixel mean like ``compute_image_mean``.

The input is an image folder (one sub-folder per class; labels are the sorted class names' positions) or a Caffe
list file (``relative/path label`` per line). Keys follow ``convert_imageset`` (``%08d_<path>``) so a Data layer
reads the images in the same order. Worker threads only decode and resize, in chunks of ``chunk`` images; the
calling thread alone writes the LMDB, one transaction per chunk, in input order.
"""
import collections
import contextlib
import dataclasses
import functools
import itertools
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

from . import blas, datums, fileio, lmdbio
from .caffeproto import caffe_pb2
from .errors import InputMissing, UserError
from .checks import INT_MAX, count as _count

log = logging.getLogger(__name__)

CHUNK = 32  # images per worker task (and per LMDB transaction)


def _parse_resize(resize):
    if resize is None or resize == 0 or resize is False:
        return None
    if isinstance(resize, (int, np.integer)) and not isinstance(resize, bool):
        resize = (resize, resize)
    try:
        h, w = (int(v) for v in resize)
    except (TypeError, ValueError):
        # from None: the int() error says no more
        raise UserError(f"resize must be (height, width), an int or None, got {resize!r}") from None
    if h <= 0 or w <= 0:
        raise UserError(f"resize must be positive, got {resize!r}")
    return h, w


def _parse_encoded(encoded):
    if encoded is False or encoded is None:
        return None
    if encoded is True:
        return "auto"  # the file's own format, like convert_imageset --encoded
    enc = str(encoded).lower().lstrip(".")
    if enc not in datums.ENCODINGS:
        raise UserError(f"encoded must be True, False or one of {sorted(datums.ENCODINGS)}, got {encoded!r}")
    return enc


@dataclasses.dataclass(frozen=True)
class LmdbOptions:
    """How :func:`make_lmdb` builds an LMDB; validated and normalised once, when created.

    ``root``: the folder a list file's paths are relative to (default: the list file's folder). ``resize``:
    (height, width), an int, or None to keep each image's size. ``shuffle``: in an order drawn with ``seed``
    (keys are numbered in that order, as convert_imageset --shuffle does). ``gray``: one channel, else three
    (BGR). ``encoded``: False (raw pixels), True (the file's own format) or "png"/"jpg"/"bmp"; normalised to None,
    "auto" or the format. ``workers``: decoding threads (None: all cores). ``chunk``: images per worker task and
    per LMDB transaction. ``mean_file``: also write a binaryproto mean there. ``force``: replace an existing LMDB
    (never other data). ``map_size``: the LMDB's starting map size (it grows as needed). ``progress``: a tqdm bar
    when stderr is a terminal.
    """
    root: str = None
    resize: tuple = (256, 256)
    shuffle: bool = False
    seed: int = 0
    gray: bool = False
    encoded: object = False
    workers: int = None
    chunk: int = CHUNK
    mean_file: str = None
    force: bool = False
    map_size: int = lmdbio.DEFAULT_MAP_SIZE
    progress: bool = True

    def __post_init__(self):
        put = functools.partial(object.__setattr__, self)
        put("resize", _parse_resize(self.resize))
        if self.resize and self.resize[0] * self.resize[1] * (1 if self.gray else 3) > INT_MAX:
            raise UserError(f"resize {self.resize[0]}x{self.resize[1]} is too large: a record would hold more "
                            f"than {INT_MAX} bytes, the most a Datum (a protobuf message) can")
        put("encoded", _parse_encoded(self.encoded))
        put("workers", blas.cpu_count() if self.workers is None else _count(self.workers, "workers"))
        put("chunk", _count(self.chunk, "chunk"))
        put("map_size", _count(self.map_size, "map_size", 4096, maximum=None))  # 64-bit in LMDB
        put("seed", _count(self.seed, "seed", 0))
        for name in ("root", "mean_file"):
            if getattr(self, name) is not None:
                put(name, os.fspath(getattr(self, name)))


# ----------------------------------------------------------------------------------------------- inputs

def read_list_file(path):
    """Read a Caffe list file (``relative/path label`` per line, split at the last space like
    ``convert_imageset``) into a list of (path, label). Blank lines are ignored. The file must be UTF-8 (paths
    become LMDB keys)."""
    path = fileio.require_file(path, "list file")
    items = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                # from None: the message holds the decode error's facts
                raise UserError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                f"{e.start + 1}); save the list file as UTF-8") from None
            if not line.strip():
                continue
            name, _, label = line.rstrip().rpartition(" ")
            try:
                label = int(label)
            except ValueError:
                # from None: the int() error says no more
                raise UserError(f"{path}:{lineno}: expected `<path> <integer label>`, got {line!r}") from None
            if not name or label < 0:
                raise UserError(f"{path}:{lineno}: expected `<path> <label >= 0>`, got {line!r}")
            items.append((name, label))
    if not items:
        raise UserError(f"list file {path} lists no images")
    return items


def readable(name):
    """A file name as text that can always be printed and stored in JSON: bytes that are not UTF-8 (which
    Python keeps as surrogates) are shown as ``\\xNN``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def list_folder(root):
    """List an image folder with one sub-folder per class. Returns (items, class_names): class labels are the
    sorted sub-folder names' positions; items are (``class/file`` path, label), sorted. Hidden files are left out;
    every other file is listed (non-images are skipped later, and reported)."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise InputMissing(f"image folder {root} does not exist")
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


def _inputs(source, root):
    """(items, classes, root) of an image folder or a list file; classes is None for a list file."""
    if os.path.isdir(source):
        return (*list_folder(source), source)
    if not os.path.exists(source):
        raise InputMissing(f"image folder or list file {source} does not exist")
    items = read_list_file(source)
    root = os.path.dirname(os.path.abspath(source)) if root is None else root
    if not os.path.isdir(root):
        raise InputMissing(f"image root folder {root} does not exist")
    return items, None, root


def _tasks(items, root):
    """(index, key, full path, label) of every item, keys as convert_imageset writes them; and (index, error) of
    the items whose path cannot be a key (not UTF-8, or too long), which are skipped."""
    tasks, unusable = [], []
    for i, (name, label) in enumerate(items):
        try:
            key = f"{i:08d}_{name}".encode()
        except UnicodeEncodeError:
            unusable.append((i, "file name is not valid UTF-8, which an LMDB key must be"))
            continue
        if len(key) > lmdbio.MAX_KEY_BYTES:
            unusable.append((i, f"path too long for an LMDB key ({len(key)} bytes > {lmdbio.MAX_KEY_BYTES})"))
            continue
        tasks.append((i, key, os.path.join(root, name), label))
    return tasks, unusable


# ----------------------------------------------------------------------------------------------- workers

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


# ----------------------------------------------------------------------------------------------- building

class _Totals:
    """What the converted chunks add up to: records per label, failures and conversions (index, text), and per
    image shape the image count, per-channel sums and (for a mean file) per-pixel sums."""

    def __init__(self):
        self.counts = collections.Counter()
        self.failures, self.converted = [], []
        self.sums = {}

    @property
    def written(self):
        return sum(self.counts.values())

    def add(self, chunk):
        self.counts.update(label for _, _, _, label in chunk.records)
        self.failures.extend(chunk.failures)
        self.converted.extend(chunk.converted)
        for shape, (n, channel, pixels) in chunk.sums.items():
            acc = self.sums.setdefault(shape, [0, 0.0, 0.0 if pixels is not None else None])
            acc[0] += n
            acc[1] = acc[1] + channel
            if pixels is not None:
                acc[2] = acc[2] + pixels.astype(np.float64)


def _convert_all(tasks, writer, opts, desc):
    """Convert every task on the worker threads and write the records in input order. Returns the _Totals."""
    chunks = [tasks[i:i + opts.chunk] for i in range(0, len(tasks), opts.chunk)]
    with datums.quiet_opencv():
        return _convert_chunks(chunks, len(tasks), writer, opts, desc)


def _convert_chunks(chunks, n_tasks, writer, opts, desc):
    workers = min(opts.workers, max(1, len(chunks)))
    convert = functools.partial(datums.convert_chunk, opts, caffe_pb2())
    # Threads, not processes: OpenCV decodes and resizes without the GIL, and a process pool spent as much CPU
    # again on pickling the decoded pixels back (bench/lmdb_vs_convert_imageset.py).
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    results = _in_order(pool, convert, chunks, ahead=2 * workers) if pool else map(convert, chunks)
    totals = _Totals()
    try:
        with tqdm(total=n_tasks, unit="img", desc=desc, disable=None if opts.progress else True) as bar:
            for chunk in results:
                writer.put([(key, value) for _, key, value, _ in chunk.records])
                totals.add(chunk)
                bar.update(len(chunk.records) + len(chunk.failures))
    finally:
        if pool is not None:
            # On an error, queued chunks are dropped and running ones left to finish on their own: the threads
            # only decode, they never touch the LMDB, so the temporary folder can go at once.
            pool.shutdown(wait=False, cancel_futures=True)
    return totals


def _summary(source, output, items, classes, totals, opts):
    """The JSON summary written beside the LMDB."""
    skipped = [{"path": readable(items[i][0]), "error": err} for i, err in sorted(totals.failures)]
    converted = [{"path": readable(items[i][0]), "reason": note} for i, note in sorted(totals.converted)]
    channel_sum = sum(channel for _, channel, _ in totals.sums.values())
    channel_px = sum(n * shape[0] * shape[1] for shape, (n, _, _) in totals.sums.items())
    counts = totals.counts
    stats = {
        "lmdb": os.path.basename(output),
        "source": os.path.basename(os.path.abspath(source)),
        "count": totals.written,
        "classes": None if classes is None else [readable(c) for c in classes],
        "counts": {str(k): counts[k] for k in sorted(counts)},
        "skipped": skipped,
        "converted": converted,
        "resize": list(opts.resize) if opts.resize else None,
        "channels": 1 if opts.gray else 3,
        "color": "gray" if opts.gray else "BGR",
        "encoded": opts.encoded or False,
        "shuffle": bool(opts.shuffle),
        "seed": opts.seed if opts.shuffle else None,
        "mean_values": [round(float(v), 4) for v in channel_sum / channel_px],
        "mean_file": None,
    }
    if classes is not None:
        stats["counts_by_class"] = {stats["classes"][k]: counts[k] for k in sorted(counts)}
    return stats


def make_lmdb(source, output, **options):
    """Build an LMDB of ``caffe_pb2.Datum`` from an image folder (one sub-folder per class; labels are the sorted
    class names' positions) or a Caffe list file (``path label``; paths relative to ``root``, default the list
    file's folder). ``options`` are those of :class:`LmdbOptions`.

    Files that fail to decode are skipped and listed. Writes ``<output>.json`` (classes, counts, per-channel mean
    values, skipped and converted files) and, with ``mean_file``, a binaryproto mean like ``compute_image_mean``.
    The three are staged under temporary names and renamed into place together at the end, so a failure (a full
    disk, an interruption) leaves the old outputs or none. Returns the summary as a dict, with the LMDB's ``path``.
    """
    opts = LmdbOptions(**options)
    source, output = os.fspath(source), os.path.abspath(os.fspath(output))
    items, classes, root = _inputs(source, opts.root)
    for path in (output, fileio.sidecar_path(output), opts.mean_file):
        if path is not None:  # an output inside an image folder would be read as a class by the next build
            fileio.check_apart(path, (source,))
    order = np.random.default_rng(opts.seed).permutation(len(items)) if opts.shuffle else range(len(items))
    items = [items[i] for i in order]
    with contextlib.ExitStack() as stack:  # left in reverse order: renames first, then the lock
        fileio.check_output(output, force=True)  # a writable folder, for the lock too
        stack.enter_context(fileio.output_lock(output))
        fileio.check_replaceable(output, lmdbio.LMDB_FILES, opts.force, "make_lmdb")  # lmdbio.check_output's rest
        fileio.check_output(fileio.sidecar_path(output), force=True)
        if opts.mean_file is not None:
            fileio.check_output(opts.mean_file, opts.force)
        log.info("building %s from %d files (%s, %d workers)", output, len(items),
                 "{}x{}".format(*opts.resize) if opts.resize else "no resize", opts.workers)
        stats, sums = _build(stack, source, output, items, classes, root, opts)
        if opts.mean_file is not None:
            stats["mean_file"] = _stage_mean(stack, opts.mean_file, output, sums, stats["mean_values"], opts.force)
        fileio.write_json(stack.enter_context(fileio.atomic_path(fileio.sidecar_path(output))), stats)
    for s in stats["skipped"]:
        log.warning("skipped %s: %s", s["path"], s["error"])
    if stats["converted"]:
        log.warning("converted %d encoded files that Caffe's Data layer cannot decode as they are (it needs 8 bits, "
                    "%d channels) before storing them; listed under \"converted\" in %s", len(stats["converted"]),
                    stats["channels"], fileio.sidecar_path(output))
    log.info("wrote %d images to %s (%d skipped)", stats["count"], output, len(stats["skipped"]))
    return dict(stats, path=output)


def _build(stack, source, output, items, classes, root, opts):
    """Write the LMDB under a temporary name entered on ``stack``; returns (summary, pixel sums per shape)."""
    tasks, unusable = _tasks(items, root)
    writer = stack.enter_context(lmdbio.new_lmdb(output, opts.map_size))
    totals = _convert_all(tasks, writer, opts, os.path.basename(output))
    totals.failures.extend(unusable)
    if totals.written == 0:
        raise UserError(f"none of the {len(items)} files in {source} could be decoded as an image")
    writer.finish(len(items), skipped=len(totals.failures))
    return _summary(source, output, items, classes, totals, opts), totals.sums


# ----------------------------------------------------------------------------------------------- mean files

def _stage_mean(stack, mean_file, output, sums, mean_values, force):
    """Write the per-pixel mean, when every image has one shape, under a temporary name entered on ``stack``.
    Returns its path relative to the LMDB's folder, or None."""
    if len(sums) != 1:
        log.warning("images differ in size (%d shapes): no per-pixel mean file written; use resize, or the "
                    "mean values %s", len(sums), mean_values)
        return None
    (n, _, pixels), = sums.values()
    write_mean_file(stack.enter_context(fileio.atomic_path(mean_file, force=force)),
                    (pixels / n).transpose(2, 0, 1), force=True)
    return os.path.relpath(os.path.abspath(mean_file), os.path.dirname(output))


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
