"""What can make a seed change the order Caffe reads its TRAIN LMDB in, measured side by side in one run.

1. ``data_param.rand_skip`` (Caffe's documented way to start each solver at another record): the small net without
   dropout trains a few iterations from the same weights with rand_skip 0 and rand_skip N, same random_seed. Equal
   weights (SHA-256 of the blobs) mean this Caffe ignores it (Caffe 1.0's Data layer reads it nowhere).
2. A per-seed shuffled copy of the TRAIN LMDB (``dsd_caffe.dataorder.shuffled_copy``, what ``--data-order
   shuffled`` writes): the same training from two seeds' copies; different weights mean the order changed the
   model. Its cost: seconds and bytes to copy the LMDB given with ``--lmdb`` (e.g. Fashion-MNIST's 55,000 TRAIN
   images), next to the LMDB's own size.

    .venv/bin/python bench/seed_variation.py --lmdb runs/demo/data/train_lmdb
"""
import argparse
import os
import tempfile
import time

import numpy as np


def _size(folder):
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def _tiny(folder, n=16, batch=4):
    """The small net without dropout (absolute sources) on random-pixel LMDBs, and its seeded filler weights."""
    from dsd_caffe import lmdbio, netgen, phases
    from dsd_caffe.caffe_env import import_caffe, make_net

    rng = np.random.default_rng(0)
    for name in ("train_lmdb", "val_lmdb"):
        lmdbio.write_array_lmdb(os.path.join(folder, name), rng.integers(0, 256, (n, 1, 28, 28), np.uint8),
                                rng.integers(0, 10, n))
    net = netgen.small_squeezenet(os.path.join(folder, "train_lmdb"), os.path.join(folder, "val_lmdb"),
                                  train_batch=batch, test_batch=batch)
    keep = [l for l in net.layer if l.type != "Dropout"]
    del net.layer[:]
    net.layer.extend(keep)
    import_caffe().set_random_seed(0)
    weights = os.path.join(folder, phases.DENSE)
    make_net(net, "TRAIN").save(weights)
    return net, weights


def _train(folder, name, net, weights, iters=6):
    from dsd_caffe import phases, runreport
    from dsd_caffe.solvers import Schedule

    solver = phases._solver("dense", net, Schedule(max_iter=iters, base_lr=0.05), "fashion-mnist", 7)
    model = phases.train_plain("dense", net, os.path.join(folder, name), solver, weights)
    return runreport.weights_digest(model)  # the weights alone: a caffemodel's bytes also hold the net's text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lmdb", help="a TRAIN LMDB to time the shuffled copy on (default: only the tiny one)")
    p.add_argument("--rand-skip", type=int, default=8)
    a = p.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    from dsd_caffe import dataorder, fileio, sources

    with tempfile.TemporaryDirectory() as tmp:
        net, weights = _tiny(tmp)
        skipped = sources.copy_message(net)
        skipped.layer[0].data_param.rand_skip = a.rand_skip
        plain, skip = _train(tmp, "plain", net, weights), _train(tmp, "skip", skipped, weights)
        print(f"rand_skip 0 vs {a.rand_skip}: models {'bit-identical (ignored)' if plain == skip else 'differ'}")
        train = sources.data_sources(net)[0][0]
        digests = []
        for seed in (0, 1):
            copy = dataorder.shuffled_copy(train, os.path.join(tmp, f"shuffled{seed}"), seed)
            digests.append(_train(tmp, f"seed{seed}", sources.absolute_sources(net, None, train=copy), weights))
        print(f"shuffled copies, seeds 0 and 1: models {'differ' if digests[0] != digests[1] else 'bit-identical'}"
              f"{'' if plain not in digests else ' (one equals the fixed order)'}")
        if a.lmdb:
            t0 = time.monotonic()
            copy = dataorder.shuffled_copy(a.lmdb, os.path.join(tmp, "big"), 0)
            seconds = time.monotonic() - t0
            n = np.int64(fileio.read_json(fileio.sidecar_path(copy))["count"])
            print(f"shuffled copy of {a.lmdb}: {n} records in {seconds:.1f} s, {_size(copy) / 2**20:.1f} MiB "
                  f"(the LMDB: {_size(a.lmdb) / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
