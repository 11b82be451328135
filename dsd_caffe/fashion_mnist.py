"""Fashion-MNIST from Debian's dataset-fashion-mnist (IDX files) as train, val and test LMDBs of 1x28x28 raw
Datums, each with a JSON beside it; and the IDX reader it needs."""
import gzip
import logging
import os
import struct

import numpy as np

from . import fileio, lmdbio
from .errors import InputMissing, OutputExists, UserError
from .checks import count

log = logging.getLogger(__name__)

#: Fashion-MNIST as packaged by Debian's dataset-fashion-mnist.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path):
    """Read an IDX file (gzip or plain), as MNIST and Fashion-MNIST ship, into a numpy array."""
    path = fileio.require_file(path, "IDX file")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"IDX file {path} is unreadable ({e})") from e
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


SPLITS = ("train", "val", "test")


def lmdb_name(split):
    """The LMDB folder of a split: ``train_lmdb``, ``val_lmdb``, ``test_lmdb``."""
    return f"{split}_lmdb"


#: what import_fashion_mnist writes in its folder (with the temporaries and locks of its writers)
_OWNED = tuple(lmdb_name(split) + ext for split in SPLITS for ext in ("", ".json")) + (".*.tmp-*", ".*.lock")


def idx_files(source_dir=FASHION_MNIST_DIR):
    """{"train-images", "train-labels", "t10k-images", "t10k-labels": path of its gzipped IDX file} in
    ``source_dir``; a missing one is named."""
    files = {name: os.path.join(source_dir, f"{name}-idx{3 if 'images' in name else 1}-ubyte.gz")
             for name in ("train-images", "train-labels", "t10k-images", "t10k-labels")}
    for p in files.values():
        if not os.path.exists(p):
            raise InputMissing(f"{p} not found; install Debian's dataset-fashion-mnist package")
    return files


def _present(paths, settings):
    """True when every split is in place from ``settings``; False when some are missing (and those present are
    from ``settings``). Raises when one is from other settings or does not match its JSON (--force rebuilds)."""
    missing = False
    for split, path in paths.items():
        if not os.path.lexists(path):
            missing = True
            continue
        sidecar = fileio.sidecar_path(path)
        meta = fileio.read_json(sidecar) if os.path.exists(sidecar) else {}
        if split != "test" and any(meta.get(k) != v for k, v in settings.items()):
            raise OutputExists(f"{path} exists from other settings ({ {k: meta.get(k) for k in settings} }); "
                               f"pass --force to rebuild it with {settings}")
        info = lmdbio.lmdb_info(path)
        if info["count"] != meta.get("count"):
            raise UserError(f"{path} holds {info['count']} records, its JSON says {meta.get('count')}; "
                            "pass --force to rebuild it")
    return not missing


def _splits(files, val_size, seed):
    """{split: (images, labels, origin)}: ``val_size`` training images chosen with ``seed`` become val (both
    splits keep the file's order)."""
    arrays = {}
    for origin in ("train", "t10k"):
        images, labels = read_idx(files[f"{origin}-images"]), read_idx(files[f"{origin}-labels"])
        if len(images) != len(labels):
            raise UserError(f"Fashion-MNIST {origin}: {len(images)} images but {len(labels)} labels")
        arrays[origin] = images, labels
    images, labels = arrays["train"]
    val_idx = np.sort(np.random.default_rng(seed).permutation(len(images))[:val_size])
    train_mask = np.ones(len(images), bool)
    train_mask[val_idx] = False
    return {"train": (images[train_mask], labels[train_mask], "train"),
            "val": (images[val_idx], labels[val_idx], "train"), "test": (*arrays["t10k"], "t10k")}


def _write_split(path, split, images, labels, origin, settings):
    """One split's LMDB and the JSON beside it."""
    lmdbio.write_array_lmdb(path, images[:, None], labels.astype(np.int64), map_size=images.nbytes * 2 + (16 << 20))
    counts = np.bincount(labels, minlength=len(FASHION_MNIST_CLASSES))
    meta = {"lmdb": os.path.basename(path), "source": f"fashion-mnist {origin}", "split": split,
            "count": int(len(images)), "channels": 1, "height": 28, "width": 28, "encoded": False,
            "classes": FASHION_MNIST_CLASSES,
            "counts_by_class": {c: int(n) for c, n in zip(FASHION_MNIST_CLASSES, counts)},
            "mean_values": [round(float(images.mean()), 4)]}
    if split != "test":
        meta.update(settings)
    fileio.write_json(fileio.sidecar_path(path), meta)


def import_fashion_mnist(output_dir, val_size=5000, seed=0, force=False, source_dir=FASHION_MNIST_DIR):
    """Write Fashion-MNIST as ``train_lmdb``, ``val_lmdb`` and ``test_lmdb`` (1x28x28 raw Datums) in ``output_dir``,
    each with a JSON beside it. ``val_size`` images, chosen with ``seed``, are carved out of the 60k training images
    (both splits keep the file's order). Returns {"train": path, "val": path, "test": path}.

    The three are written into one temporary folder renamed to ``output_dir`` when complete, so a failure leaves
    the old folder or none. A complete import from the same settings is reused; an incomplete one is rebuilt;
    one from other settings is replaced only with ``force``, and a folder holding anything else never.
    """
    if isinstance(val_size, bool) or not isinstance(val_size, (int, np.integer)) or not 0 < val_size < 60000:
        raise UserError(f"val_size must be an integer in 1..59999, got {val_size!r}")
    count(seed, "seed", 0)
    output_dir = os.path.abspath(os.fspath(output_dir))
    paths = {split: os.path.join(output_dir, lmdb_name(split)) for split in SPLITS}
    settings = {"val_size": int(val_size), "seed": int(seed)}
    with fileio.output_lock(output_dir):
        fileio.check_replaceable(output_dir, _OWNED, True, "import_fashion_mnist")
        if not force and _present(paths, settings):
            log.info("Fashion-MNIST LMDBs already in %s; reusing them", output_dir)
            return paths
        splits = _splits(idx_files(source_dir), val_size, seed)  # reuse needs no IDX files
        with fileio.atomic_path(output_dir, directory=True) as stage:
            for split in SPLITS:
                _write_split(os.path.join(stage, lmdb_name(split)), split, *splits[split], settings)
    for split in SPLITS:
        log.info("wrote %d Fashion-MNIST %s images to %s", len(splits[split][0]), split, paths[split])
    return paths
