"""The order a seed reads its TRAIN data in.

Caffe's Data layer reads an LMDB in key order, the same order on every run, and this Caffe (1.0) ignores
``data_param.rand_skip`` (only the ImageData layer reads it; ``bench/seed_variation.py`` measures it: bit-identical
models with and without it). A seed that is to change the data order therefore reads its own copy of the TRAIN
LMDB, its records in an order drawn from the seed (numpy's ``default_rng(seed)``). The copy costs as much disk as
the TRAIN LMDB, once per seed, and the time to write it (measured in docs/own-net.md); it is written once
(atomically, with a JSON beside it naming its source, record count and seed) and reused by a resumed run.

The orders, the words used in flags and JSON: ``fixed`` (the LMDB's own order, every seed) and ``shuffled``.
"""
import logging
import os

import numpy as np

from . import fileio, lmdbio
from .errors import UserError

log = logging.getLogger(__name__)

ORDERS = ("fixed", "shuffled")
BATCH = 1000  # records per write transaction


def check_order(order):
    if order not in ORDERS:
        raise UserError(f"data order must be one of {', '.join(ORDERS)}, got {order!r}")
    return order


def shuffled_copy(source, dest, seed):
    """``dest``: the LMDB ``source`` with its records in the order ``default_rng(seed)`` draws, keys renumbered
    ``%08d`` (written atomically; reused when its JSON names the same source, count and seed). Returns ``dest``."""
    source, dest = os.path.abspath(os.fspath(source)), os.path.abspath(os.fspath(dest))
    count = lmdbio.lmdb_info(source)["count"]
    record = {"source": source, "count": count, "seed": seed, "order": "shuffled"}
    sidecar = fileio.sidecar_path(dest)
    if os.path.isdir(dest) and os.path.isfile(sidecar) and fileio.read_json(sidecar) == record:
        return dest
    fileio.check_apart(dest, [source])
    log.info("seed %d: writing the TRAIN data in the seed's order (%d records): %s", seed, count, dest)
    env = lmdbio._open_readonly(source)
    try:
        with env.begin() as txn:
            keys = list(txn.cursor().iternext(keys=True, values=False))
            order = np.random.default_rng(seed).permutation(len(keys))
            with lmdbio.new_lmdb(dest) as writer:
                for start in range(0, len(order), BATCH):
                    writer.put([(b"%08d" % i, txn.get(keys[j])) for i, j in
                                enumerate(order[start:start + BATCH], start)])
                writer.finish(len(keys))
    finally:
        env.close()
    fileio.write_json(sidecar, record)
    return dest
