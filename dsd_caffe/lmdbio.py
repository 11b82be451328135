"""LMDB primitives for Caffe's Data layer: write records into a new LMDB, write numpy arrays as Datums, read an LMDB
back, and inspect one before Caffe opens it.

Writing. An LMDB is built under a temporary name beside its output and renamed into place only when complete
(:func:`new_lmdb`), so a crash never leaves a half-written LMDB under the real name. ``--force`` replaces only an
LMDB (a folder holding nothing but ``data.mdb`` and ``lock.mdb``), never a folder of other data
(:func:`check_output`). A full disk is a DiskFull error (ENOSPC) that leaves the old output or nothing. Every writer
checks its counts before the rename (:meth:`LmdbWriter.finish`).

Checking. :func:`check_lmdb` and :func:`label_range` read every record of an LMDB up to FULL_CHECK_BYTES and an
evenly spread sample of a larger one, and say so in a log line: Caffe aborts on any record that does not fit.
"""
import contextlib
import errno
import logging
import os

import lmdb
import numpy as np
from google.protobuf.message import DecodeError

from . import fileio
from .caffeproto import caffe_pb2
from .errors import DiskFull, UserError

log = logging.getLogger(__name__)

DEFAULT_MAP_SIZE = 1 << 28  # the starting map size; it doubles whenever the LMDB is full
MAX_KEY_BYTES = 511  # LMDB's default key size limit
LMDB_FILES = ("data.mdb", "lock.mdb")  # what an LMDB folder holds


# ----------------------------------------------------------------------------------------------- writing

def check_output(path, force, tool):
    """Refuse ``path`` unless it is absent, an empty folder or (with ``force``) an LMDB: ``--force`` never
    replaces a folder of other data, a file, a device or a FIFO. ``tool`` names the writer in the message.
    Returns the absolute path."""
    path = fileio.check_replaceable(path, LMDB_FILES, force, tool)
    return fileio.check_output(path, force=True)


class LmdbWriter:
    """Puts records into a new LMDB folder, growing its map as needed, and counts them. :meth:`finish` checks that
    every input is accounted for before the LMDB may be renamed into place.

    A full disk is a DiskFull error (ENOSPC), never a SIGBUS: the environment is opened without LMDB's lock file, whose
    shared memory map faults with SIGBUS when the file system cannot back a page of it (on tmpfs, a full disk).
    Nothing else opens a temporary LMDB, so the lock has nothing to guard. Data pages are written with
    ``pwrite`` (no ``writemap``), so they fail with an error code instead of a fault as well.
    """

    def __init__(self, folder, map_size, name):
        self.folder, self.name = folder, name
        self.written = 0
        self.finished = False
        self.env = None
        with self._disk_errors():
            self.env = lmdb.open(folder, map_size=int(map_size), subdir=True, lock=False, sync=False,
                                 metasync=False, readahead=False, meminit=False)

    @contextlib.contextmanager
    def _disk_errors(self, size=0):
        """An lmdb.Error from writing ``size`` bytes to disk, as the OSError it is: a full disk is DiskFull (a
        UserError: one line in the tools), an I/O error an OSError (a traceback). LMDB reports a disk that fills
        up during a commit as EIO (a short write): an EIO with less than ``size`` + 1 MiB free is that, and
        reported as ENOSPC."""
        try:
            yield
        except lmdb.Error as e:
            code = errno.ENOSPC if isinstance(e, lmdb.DiskError) else errno.EIO
            if code == errno.EIO:
                st = os.statvfs(self.folder)
                if st.f_bavail * st.f_frsize < size + (1 << 20):
                    code = errno.ENOSPC
            log.debug("LMDB error writing %s: %s", self.folder, e)
            raise (DiskFull if code == errno.ENOSPC else OSError)(code, os.strerror(code), self.name) from e

    def put(self, records):
        """Write (key, value) pairs in one transaction, doubling the map size and retrying when it is full."""
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
        raise UserError(f"LMDB {path} is unreadable ({e})") from e


def check_caffe_can_open(path):
    """Caffe opens an LMDB read-only but with its lock file, which it opens for writing (creating it when absent;
    this module's readers open none): an LMDB whose ``lock.mdb`` this user cannot write, such as a shared dataset,
    is refused here, before Caffe aborts on it (``mdb_status == 0 (13 vs. 0) Permission denied``). On a read-only
    file system LMDB reads without a lock, and so does Caffe: that passes."""
    path = os.fspath(path)
    lock = os.path.join(path, "lock.mdb")
    if os.statvfs(path).f_flag & os.ST_RDONLY:
        return
    try:
        if os.path.exists(lock):
            os.close(os.open(lock, os.O_RDWR))  # as mdb_env_open does (nothing written)
        elif not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
    except OSError as e:
        raise UserError(f"LMDB {path}: Caffe opens its lock file {lock} for writing (creating it when absent), even "
                        f"to read, and cannot here ({e.strerror}); copy the LMDB to a folder you can write, or get "
                        "write access to it") from e


def decode(data):
    """An encoded image as Caffe's Data layer decodes it by default (natively: OpenCV's IMREAD_UNCHANGED)."""
    import cv2  # deferred: heavy (OpenCV), needed only to decode an encoded record

    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def _datum(path, key, value):
    """Parse one record as a Datum, or a UserError naming it."""
    datum = caffe_pb2().Datum()
    try:
        datum.ParseFromString(value)
    except DecodeError:
        # from None: the DecodeError says no more
        raise UserError(f"LMDB {path}: record {_name(key)} is not a caffe Datum") from None
    return datum


def _name(key):
    return key.decode("utf-8", "backslashreplace")


def _dims(path, key, datum):
    """(channels, height, width, bits per sample) of a record: a raw Datum's declared shape (checked against its
    data), an encoded one's image as the Data layer decodes it. A UserError naming a record that is neither."""
    c, h, w = datum.channels, datum.height, datum.width
    if datum.encoded:
        img = decode(datum.data)
        if img is None:
            raise UserError(f"LMDB {path}: record {_name(key)} holds an encoded image OpenCV cannot decode")
        return (1 if img.ndim == 2 else img.shape[2]), img.shape[0], img.shape[1], 8 * img.dtype.itemsize
    if c * h * w == 0 or (datum.data and len(datum.data) != c * h * w) or \
            (not datum.data and len(datum.float_data) != c * h * w):
        raise UserError(f"LMDB {path}: record {_name(key)} is not a valid Datum (shape {c}x{h}x{w}, "
                        f"{len(datum.data) or len(datum.float_data)} values)")
    return c, h, w, 8


def lmdb_info(path):
    """Return {"count", "channels", "height", "width", "encoded", "label"} of an LMDB of Datums (shape and label from
    its first record). Raises ValueError naming the path when it is missing, empty, unreadable or not Datums."""
    env = _open_readonly(path)
    try:
        count = env.stat()["entries"]
        if count == 0:
            raise UserError(f"LMDB {path} is empty (0 records)")
        with env.begin() as txn:
            key, value = next(iter(txn.cursor()))
    except lmdb.Error as e:
        raise UserError(f"LMDB {path} is unreadable ({e})") from e
    finally:
        env.close()
    datum = _datum(path, key, value)
    c, h, w, _ = _dims(path, key, datum)
    return {"count": int(count), "channels": int(c), "height": int(h), "width": int(w),
            "encoded": bool(datum.encoded), "label": int(datum.label)}


#: LMDBs up to this size are checked record by record; larger ones through an evenly spread sample of SAMPLE
#: records (an ImageNet LMDB holds 1.28M records and about 250 GB)
FULL_CHECK_BYTES = 64 << 20
SAMPLE = 1000


def _checked_records(path):
    """Yield (key, Datum) of every record of an LMDB of at most FULL_CHECK_BYTES, else of SAMPLE records evenly
    spread over its key order (keys alone are walked to find them); log how many were checked. The caller has
    checked ``path`` with :func:`lmdb_info` first, for its clear errors."""
    env = _open_readonly(path)
    try:
        stat = env.stat()
        count, size = stat["entries"], env.info()["last_pgno"] * stat["psize"]
        whole = size <= FULL_CHECK_BYTES or count <= SAMPLE
        with env.begin() as txn:
            if whole:
                records = txn.cursor().iternext()
            else:
                wanted = {i * count // SAMPLE for i in range(SAMPLE)}
                keys = (k for n, k in enumerate(txn.cursor().iternext(values=False)) if n in wanted)
                records = ((k, txn.get(k)) for k in keys)
            for key, value in records:
                yield key, _datum(path, key, value)
    finally:
        env.close()
    if whole:
        log.debug("checked all %d records of %s", count, path)
    else:
        log.info("checked %s of %s records of %s (evenly spread: it holds %.1f GB)", f"{SAMPLE:,}", f"{count:,}",
                 path, size / 1e9)


def check_lmdb(path, crop_size=0, channels=None, *, force_color=False, force_gray=False):
    """lmdb_info, plus what a Data layer would otherwise abort on, for every record of a small LMDB and an evenly
    spread sample of a large one (see FULL_CHECK_BYTES): images at least ``crop_size`` on each side, one channel
    count for all (``channels`` when given), and encoded images that decode to 8 bits and 1 or 3 channels (a Data
    layer decodes natively unless the net's transform_param says ``force_color`` or ``force_gray``).

    Returns the info dict with "checked" (records checked) and "label_range" ((smallest, largest) label among
    them), so a caller needs no second pass for :func:`label_range`.
    """
    info = lmdb_info(path)
    forced = 3 if force_color else 1 if force_gray else None
    first, small, labels, checked = None, [], [], 0
    for key, datum in _checked_records(path):
        c, h, w, bits = _dims(path, key, datum)
        if datum.encoded and forced:
            c, bits = forced, 8
        if datum.encoded and (bits != 8 or c not in (1, 3)):
            raise UserError(f"LMDB {path}: record {_name(key)} holds an encoded {bits}-bit {c}-channel image; a "
                            "Data layer decodes it natively and aborts on anything but 8 bits and 1 or 3 channels "
                            "(make_lmdb --encoded converts such files)")
        first = first or (key, c)
        if c != first[1]:
            raise UserError(f"LMDB {path}: record {_name(key)} holds a {c}-channel image, record "
                            f"{_name(first[0])} a {first[1]}-channel one; a Data layer needs one channel count")
        if crop_size and (h < crop_size or w < crop_size):
            small.append(f"record {_name(key)} holds a {h}x{w} image")
        labels.append(datum.label)
        checked += 1
    if channels is not None and first[1] != channels:
        raise UserError(f"LMDB {path} holds {first[1]}-channel images, the net expects {channels}")
    if small:
        raise UserError(f"LMDB {path}: {small[0]}, smaller than the crop size {crop_size} ({len(small)} of the "
                        f"{checked} records checked are)")
    return dict(info, checked=checked, label_range=(min(labels), max(labels)))


def label_range(path):
    """(smallest, largest) label of an LMDB of Datums, over every record of a small LMDB and an evenly spread
    sample of a large one (see FULL_CHECK_BYTES)."""
    lmdb_info(path)
    labels = [datum.label for _, datum in _checked_records(path)]
    return min(labels), max(labels)


def read_lmdb(path, limit=None):
    """Yield (key, image CHW uint8, label) from an LMDB of Datums (raw or encoded), in key order."""
    lmdb_info(path)
    env = _open_readonly(path)
    try:
        with env.begin() as txn:
            for n, (key, value) in enumerate(txn.cursor()):
                if limit is not None and n >= limit:
                    break
                d = _datum(path, key, value)
                if d.encoded:
                    img = decode(d.data)
                    img = img[None] if img.ndim == 2 else img.transpose(2, 0, 1)
                else:
                    img = np.frombuffer(d.data, np.uint8).reshape(d.channels, d.height, d.width)
                yield key.decode(), img, d.label
    finally:
        env.close()
