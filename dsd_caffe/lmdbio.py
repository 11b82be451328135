"""LMDB primitives for Caffe's Data layer: write records into a new LMDB, write numpy arrays as Datums, read an LMDB
back, and inspect one before Caffe opens it.

Writing. An LMDB is built under a temporary name beside its output and renamed into place only when complete
(:func:`new_lmdb`), so a crash never leaves a half-written LMDB under the real name. ``--force`` replaces only an
LMDB (a folder holding nothing but ``data.mdb`` and ``lock.mdb``), never a folder of other data
(:func:`check_output`). A full disk is an OSError (ENOSPC) that leaves the old output or nothing.
"""
import contextlib
import errno
import logging
import os

import numpy as np

from . import fileio
from .caffe_env import caffe_pb2
from .errors import UserError

log = logging.getLogger(__name__)

DEFAULT_MAP_SIZE = 1 << 28  # the starting map size; it doubles whenever the LMDB is full
MAX_KEY_BYTES = 511  # LMDB's default key size limit
LMDB_FILES = ("data.mdb", "lock.mdb")  # what an LMDB folder holds


# ----------------------------------------------------------------------------------------------- writing

def check_output(path, force, tool):
    """Refuse ``path`` unless it is absent, an empty folder or (with ``force``) an LMDB: ``--force`` never
    replaces a folder of other data, a file, or a device. Returns the absolute path."""
    fileio.check_output(path, force)
    if os.path.lexists(path):
        if not os.path.isdir(path) or os.path.islink(path) or not set(os.listdir(path)) <= set(LMDB_FILES):
            raise FileExistsError(f"{path} exists and is not an LMDB; refusing to replace it even with --force")
    return path


class LmdbWriter:
    """Puts records into a new LMDB folder, growing its map as needed, and counts them. :meth:`finish` checks that
    every input is accounted for before the LMDB may be renamed into place.

    A full disk is an OSError (ENOSPC), never a SIGBUS: the environment is opened without LMDB's lock file, whose
    shared memory map faults with SIGBUS when the file system cannot back a page of it (on tmpfs, a full disk).
    Nothing else opens a temporary LMDB, so the lock has nothing to guard. Data pages are written with
    ``pwrite`` (no ``writemap``), so they fail with an error code instead of a fault as well.
    """

    def __init__(self, folder, map_size, name):
        import lmdb

        self.folder, self.name = folder, name
        self.written = 0
        self.finished = False
        self.env = None
        with self._disk_errors():
            self.env = lmdb.open(folder, map_size=int(map_size), subdir=True, lock=False, sync=False,
                                 metasync=False, readahead=False, meminit=False)

    @contextlib.contextmanager
    def _disk_errors(self, size=0):
        """An lmdb.Error from writing ``size`` bytes to disk, as the OSError it is (the tools report an OSError
        in one line). LMDB reports a disk that fills up during a commit as EIO (a short write): an EIO with less
        than ``size`` + 1 MiB free is that, and reported as ENOSPC."""
        import lmdb

        try:
            yield
        except lmdb.Error as e:
            code = errno.ENOSPC if isinstance(e, lmdb.DiskError) else errno.EIO
            if code == errno.EIO:
                st = os.statvfs(self.folder)
                if st.f_bavail * st.f_frsize < size + (1 << 20):
                    code = errno.ENOSPC
            log.debug("LMDB error writing %s: %s", self.folder, e)
            raise OSError(code, os.strerror(code), self.name) from None

    def put(self, records):
        """Write (key, value) pairs in one transaction, doubling the map size and retrying when it is full."""
        import lmdb

        while True:
            txn = self.env.begin(write=True)
            try:
                for key, value in records:
                    txn.put(key, value)
            except lmdb.MapFullError:
                txn.abort()
                size = self.env.info()["map_size"] * 2
                log.debug("LMDB map full; growing the map to %d bytes", size)
                self.env.set_mapsize(size)
                continue
            except BaseException:
                txn.abort()
                raise
            with self._disk_errors(sum(len(k) + len(v) for k, v in records)):
                txn.commit()
            break
        self.written += len(records)

    def finish(self, inputs, skipped=0):
        """Sync and close; then the count invariant: ``inputs`` == records written + ``skipped``, and the LMDB
        holds as many entries as were written (fewer means duplicate keys). A RuntimeError otherwise: a bug
        lost or merged records, and the LMDB must not be renamed into place."""
        entries = self.env.stat()["entries"]
        with self._disk_errors():
            self.env.sync(True)
        self.close()
        if self.written + skipped != inputs or entries != self.written:
            dup = " (duplicate keys)" if entries < self.written else ""
            raise RuntimeError(f"{self.name}: {inputs} inputs, but {self.written} records written + {skipped} "
                               f"skipped, and the LMDB holds {entries}{dup}; not renamed into place")
        self.finished = True

    def close(self):
        """Close without syncing (:meth:`finish` syncs): an unfinished LMDB is deleted anyway."""
        if self.env is not None:
            env, self.env = self.env, None
            env.close()


@contextlib.contextmanager
def new_lmdb(path, map_size=DEFAULT_MAP_SIZE):
    """Yield an :class:`LmdbWriter` on a temporary folder beside ``path`` (already checked with
    :func:`check_output`); it is renamed to ``path`` only when the block ends without an error, after
    :meth:`LmdbWriter.finish` accounted for every input."""
    with fileio.atomic_path(path, force=True, directory=True) as tmp:
        writer = LmdbWriter(tmp, map_size, path)
        try:
            yield writer
        finally:
            writer.close()
        if not writer.finished:
            raise RuntimeError(f"{path}: written without a count check (LmdbWriter.finish); not renamed into place")


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
    path = check_output(os.path.abspath(os.fspath(path)), force, "write_array_lmdb")
    with new_lmdb(path, map_size) as writer:
        datum = pb2.Datum(channels=c, height=h, width=w)
        for start in range(0, len(images), 10000):
            batch = []
            for i in range(start, min(start + 10000, len(images))):
                datum.data = images[i].tobytes()
                datum.label = int(labels[i])
                batch.append(((keys % i).encode(), datum.SerializeToString()))
            writer.put(batch)
        writer.finish(len(images))
    return path


# ----------------------------------------------------------------------------------------------- reading

def _open_readonly(path):
    """Open an existing LMDB read-only, with one clear error for a missing, empty or unreadable one."""
    import lmdb

    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"LMDB {path} does not exist")
    if not os.path.isdir(path):
        raise UserError(f"LMDB {path} is a file; an LMDB is a folder holding data.mdb")
    if not os.path.exists(os.path.join(path, "data.mdb")):
        raise UserError(f"LMDB {path} is empty (no data.mdb in it)")
    try:
        return lmdb.open(path, readonly=True, lock=False, subdir=True, readahead=False)
    except lmdb.Error as e:
        raise UserError(f"LMDB {path} is unreadable ({e})") from None


def decode(data):
    """An encoded image as Caffe's Data layer decodes it by default (natively: OpenCV's IMREAD_UNCHANGED)."""
    import cv2

    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def lmdb_info(path):
    """Return {"count", "channels", "height", "width", "encoded", "label"} of an LMDB of Datums (shape and label from
    its first record). Raises ValueError naming the path when it is missing, empty, unreadable or not Datums."""
    import lmdb
    from google.protobuf.message import DecodeError

    env = _open_readonly(path)
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
        img = decode(datum.data)
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
    lmdb_info(path)
    pb2 = caffe_pb2()
    low = high = None
    env = _open_readonly(path)
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


def read_lmdb(path, limit=None):
    """Yield (key, image CHW uint8, label) from an LMDB of Datums (raw or encoded), in key order."""
    lmdb_info(path)
    pb2 = caffe_pb2()
    env = _open_readonly(path)
    try:
        with env.begin() as txn:
            for n, (key, value) in enumerate(txn.cursor()):
                if limit is not None and n >= limit:
                    break
                d = pb2.Datum()
                d.ParseFromString(value)
                if d.encoded:
                    img = decode(d.data)
                    img = img[None] if img.ndim == 2 else img.transpose(2, 0, 1)
                else:
                    img = np.frombuffer(d.data, np.uint8).reshape(d.channels, d.height, d.width)
                yield key.decode(), img, d.label
    finally:
        env.close()
