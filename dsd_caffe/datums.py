"""One image as a caffe Datum: the worker side of :func:`dsd_caffe.imagedb.make_lmdb`.

Decoding follows Caffe: ``convert_imageset`` reads with OpenCV (IMREAD_COLOR or IMREAD_GRAYSCALE, then a bilinear
resize); a Data layer decodes encoded Datums natively (IMREAD_UNCHANGED), so an encoded record must already be
what the net expects.
"""
import collections
import contextlib
import os

import numpy as np

from .errors import UserError

#: encodings make_lmdb writes, by name, as OpenCV file extensions
ENCODINGS = {"png": ".png", "jpg": ".jpg", "jpeg": ".jpg", "bmp": ".bmp"}


@contextlib.contextmanager
def quiet_opencv():
    """OpenCV on one thread (the parallelism is ours, one image per thread) and without its stderr warnings
    (failures are reported by us, file by file) for the block; its thread count and log level are restored after."""
    import cv2  # deferred: heavy (OpenCV), needed only to decode images

    logging_ = getattr(getattr(cv2, "utils", None), "logging", None)
    threads, level = cv2.getNumThreads(), logging_.getLogLevel() if logging_ else None
    cv2.setNumThreads(1)
    if logging_:
        logging_.setLogLevel(logging_.LOG_LEVEL_ERROR)
    try:
        yield
    finally:
        cv2.setNumThreads(threads)
        if logging_:
            logging_.setLogLevel(level)


def _decode(raw, same_format, opts):
    """(image, keep, note): the image as the LMDB will hold it; ``keep`` when the file's own bytes can be stored
    (encoded, not resized, ``same_format``, and natively decoded to what the LMDB holds: a Data layer decodes
    natively, and aborts on anything but 8 bits); ``note`` says how a file that could not be kept was converted.
    convert_imageset --encoded stores every file as it is, whatever Caffe will make of it later."""
    import cv2  # deferred: heavy (OpenCV), needed only to decode images

    buf = np.frombuffer(raw, np.uint8)
    flag = cv2.IMREAD_GRAYSCALE if opts.gray else cv2.IMREAD_COLOR
    note = None
    if same_format and opts.resize is None:
        native = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        if native is None:
            raise UserError("not an image, or a corrupt one (OpenCV could not decode it)")
        channels = 1 if native.ndim == 2 else native.shape[2]
        if native.dtype == np.uint8 and channels == (1 if opts.gray else 3):
            return native, True, None
        note = (f"{8 * native.dtype.itemsize}-bit {channels}-channel, stored as 8-bit "
                f"{1 if opts.gray else 3}-channel")
    img = cv2.imdecode(buf, flag)
    if img is None:
        raise UserError("not an image, or a corrupt one (OpenCV could not decode it)")
    return img, False, note


def _encoding(opts, path):
    """(enc, same_format): the format the record of the file at ``path`` is stored in, None (raw pixels) or a key
    of ENCODINGS; and whether the file is in that format already (judged by its extension)."""
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    enc = opts.encoded if opts.encoded != "auto" else (ext if ext in ENCODINGS else "png")
    return enc, enc is not None and ENCODINGS[enc] == ENCODINGS.get(ext)


def convert_one(full, label, opts, pb2):
    """Decode, resize and serialise one image. Returns (datum bytes, HWC uint8 image, note): ``note`` says how an
    encoded file Caffe could not decode as it is was converted (None otherwise). Raises ValueError or OSError."""
    import cv2  # deferred: heavy (OpenCV), needed only to decode images

    with open(full, "rb") as f:
        raw = f.read()
    if not raw:
        raise UserError("empty file")
    enc, same_format = _encoding(opts, full)
    img, keep, note = _decode(raw, same_format, opts)
    if opts.resize is not None and img.shape[:2] != opts.resize:
        img = cv2.resize(img, opts.resize[::-1])  # bilinear, as convert_imageset
    if img.ndim == 2:
        img = img[:, :, None]
    h, w, c = img.shape
    datum = pb2.Datum(channels=c, height=h, width=w, label=int(label))
    if enc is None:
        datum.data = np.ascontiguousarray(img.transpose(2, 0, 1)).tobytes()
    else:
        if keep:
            datum.data = raw
        else:
            ok, out = cv2.imencode(ENCODINGS[enc], img)
            if not ok:
                raise UserError(f"OpenCV could not encode it as {enc}")
            datum.data = out.tobytes()
        datum.encoded = True
    return datum.SerializeToString(), img, note


#: what a worker returns for a chunk: records (index, key, value, label), failures and conversions (index, text),
#: and sums: image shape (h, w, c) -> [count, per-channel float64 sum, uint32 per-pixel sum or None]
Chunk = collections.namedtuple("Chunk", "records failures converted sums")


def convert_chunk(opts, pb2, chunk):
    """Worker task: a list of (index, key, full path, label) to a :data:`Chunk`. The per-pixel sum (for a mean
    file) only when asked, since it costs as much as resizing."""
    import cv2  # deferred: heavy (OpenCV), needed only to decode images

    out = Chunk([], [], [], {})
    for index, key, full, label in chunk:
        try:
            value, img, note = convert_one(full, label, opts, pb2)
        except (OSError, ValueError) as e:
            out.failures.append((index, f"{type(e).__name__}: {e}" if isinstance(e, OSError) else str(e)))
            continue
        out.records.append((index, key, value, label))
        if note:
            out.converted.append((index, note))
        acc = out.sums.get(img.shape)
        if acc is None:
            pixels = np.zeros(img.shape, np.uint32) if opts.mean_file is not None else None  # exact to 16M images
            acc = out.sums[img.shape] = [0, np.zeros(img.shape[2]), pixels]
        acc[0] += 1
        acc[1] += cv2.sumElems(img)[:img.shape[2]]
        if acc[2] is not None:
            np.add(acc[2], img, out=acc[2])
    return out
