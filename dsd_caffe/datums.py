"""One image as a caffe Datum: the worker side of :func:`dsd_caffe.imagedb.make_lmdb`.

Decoding follows Caffe: ``convert_imageset`` reads with OpenCV (IMREAD_COLOR or IMREAD_GRAYSCALE, then a bilinear
resize); a Data layer decodes encoded Datums natively (IMREAD_UNCHANGED), so an encoded record must already be
what the net expects.
"""
import os

import numpy as np

from .errors import UserError

#: encodings make_lmdb writes, by name, as OpenCV file extensions
ENCODINGS = {"png": ".png", "jpg": ".jpg", "jpeg": ".jpg", "bmp": ".bmp"}


def quiet_opencv():
    import cv2

    cv2.setNumThreads(1)  # the parallelism is ours, one image per thread
    try:  # failures are reported by us, file by file, not by OpenCV's stderr warnings
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    except AttributeError:
        pass


def convert_one(full, label, opts, pb2):
    """Decode, resize and serialise one image; returns (datum bytes, HWC uint8 image) or raises ValueError."""
    import cv2

    with open(full, "rb") as f:
        raw = f.read()
    if not raw:
        raise UserError("empty file")
    buf = np.frombuffer(raw, np.uint8)
    flag = cv2.IMREAD_GRAYSCALE if opts.gray else cv2.IMREAD_COLOR
    enc, ext = opts.encoded, os.path.splitext(full)[1].lower().lstrip(".")
    if enc == "auto":
        enc = ext if ext in ENCODINGS else "png"
    # Encoded and not resized: store the file's own bytes when a Data layer (which decodes natively) gets the
    # channels asked for; convert_imageset stores them even when it does not (a grey JPEG in a colour LMDB).
    keep_file = enc is not None and opts.resize is None and ENCODINGS[enc] == ENCODINGS.get(ext)
    img = cv2.imdecode(buf, cv2.IMREAD_ANYCOLOR if keep_file else flag)
    if keep_file and img is not None and (img.ndim == 2) != opts.gray:
        keep_file, img = False, cv2.imdecode(buf, flag)
    if img is None:
        raise UserError("not an image, or a corrupt one (OpenCV could not decode it)")
    if opts.resize is not None:
        h, w = opts.resize
        if img.shape[:2] != (h, w):
            img = cv2.resize(img, (w, h))  # bilinear, as convert_imageset
    if img.ndim == 2:
        img = img[:, :, None]
    h, w, c = img.shape
    datum = pb2.Datum(channels=c, height=h, width=w, label=int(label))
    if enc is None:
        datum.data = np.ascontiguousarray(img.transpose(2, 0, 1)).tobytes()
    else:
        if keep_file:
            datum.data = raw
        else:
            ok, out = cv2.imencode(ENCODINGS[enc], img)
            if not ok:
                raise UserError(f"OpenCV could not encode it as {enc}")
            datum.data = out.tobytes()
        datum.encoded = True
    return datum.SerializeToString(), img


def convert_chunk(opts, pb2, chunk):
    """Worker task: a list of (index, key, full path, label). Returns (records, failures, sums) where sums maps an
    image shape (h, w, c) to [count, per-channel float64 sum, uint32 per-pixel sum or None]; the per-pixel sum (for
    a mean file) only when asked, since it costs as much as resizing."""
    import cv2

    records, failures, sums = [], [], {}
    for index, key, full, label in chunk:
        try:
            value, img = convert_one(full, label, opts, pb2)
        except (OSError, ValueError) as e:
            failures.append((index, f"{type(e).__name__}: {e}" if isinstance(e, OSError) else str(e)))
            continue
        records.append((index, key, value, label))
        acc = sums.get(img.shape)
        if acc is None:
            pixels = np.zeros(img.shape, np.uint32) if opts.mean_file is not None else None  # exact to 16M images
            acc = sums[img.shape] = [0, np.zeros(img.shape[2]), pixels]
        acc[0] += 1
        acc[1] += cv2.sumElems(img)[:img.shape[2]]
        if acc[2] is not None:
            np.add(acc[2], img, out=acc[2])
    return records, failures, sums
