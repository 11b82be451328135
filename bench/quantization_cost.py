"""Quantization's accuracy cost on a sparse net: test top-1 of the unquantized sparse model against the same model
with shared weights (k-means codebooks, linear init) at the .net widths (8-bit conv / 4-bit fc) and at fewer bits,
plus the size of each encoding, measured side by side in one run.

Two ways to run it:
  - on a sparse model you have (e.g. the DSD demo's sparse-phase output):
        .venv/bin/python bench/quantization_cost.py --model trainval.prototxt --weights sparse.caffemodel \\
            --iterations 50
    (the TEST phase of --model is scored, like `caffe test`);
  - self-contained (no arguments): builds Fashion-MNIST LMDBs (train subset, 5,000-image validation split, fixed
    seed) in a temporary folder, trains the small SqueezeNet dense for --dense-iters, prunes it 3x by magnitude
    (first conv kept dense), retrains under the mask for --sparse-iters, then measures. A few minutes on 2 cores.
Each quantized model is also written as a .net/Huffman file and decoded; the decoded model scores exactly as the
quantized caffemodel (checked, and printed).
"""
import argparse
import os
import tempfile

import numpy as np

from dsd_caffe import deepcompression as dc
from dsd_caffe import evaluate, fileio


def quantized_caffemodel(weights, layers, specs, out):
    """A copy of the caffemodel ``weights`` with the weighted layers' blobs replaced by ``layers``."""
    param = fileio.read_caffemodel(weights)
    new = {l.name: l for l in dc.to_net_parameter(layers, specs).layer}
    for layer in list(param.layer) + list(param.layers):
        if layer.name in new:
            for blob, src in zip(layer.blobs, new[layer.name].blobs):
                del blob.data[:]
                blob.data.extend(src.data)
    return fileio.write_caffemodel(out, param)


def top1(model, weights, iterations):
    results = evaluate.evaluate(model, weights, iterations=iterations)
    keys = [k for k in results if "accuracy" in k and "top5" not in k and "top_5" not in k]
    if not keys:
        raise ValueError(f"{model} has no accuracy output in its TEST phase")
    return float(results[keys[0]])


def self_contained(tmp, dense_iters, sparse_iters, train_size, width=1.0, seed=0):
    """Train, prune 3x and sparse-retrain the small SqueezeNet on Fashion-MNIST; return (trainval, sparse model,
    validation iterations)."""
    from tqdm import tqdm

    from dsd_caffe import fashion_mnist, lmdbio, netgen, phases, pruning
    from dsd_caffe.caffe_env import import_caffe
    from dsd_caffe.caffeproto import caffe_pb2

    caffe = import_caffe()
    caffe.set_mode_cpu()
    caffe.set_random_seed(seed)
    files = fashion_mnist.idx_files()
    images, labels = fashion_mnist.read_idx(files["train-images"]), fashion_mnist.read_idx(files["train-labels"])
    order = np.random.default_rng(seed).permutation(len(images))
    val, train = order[:5000], order[5000:5000 + train_size]
    train_db, val_db = (lmdbio.write_array_lmdb(os.path.join(tmp, fashion_mnist.lmdb_name(split)), images[i], labels[i])
                        for split, i in (("train", train), ("val", val)))
    trainval = fileio.write_prototxt(os.path.join(tmp, "trainval.prototxt"),
                                     netgen.small_squeezenet(train_db, val_db, width=width))
    pb2 = caffe_pb2()
    sp = pb2.SolverParameter(net=trainval, base_lr=0.01, momentum=0.9, weight_decay=5e-4, lr_policy="fixed",
                             max_iter=dense_iters + sparse_iters, display=0, random_seed=seed,
                             snapshot_prefix=os.path.join(tmp, "snap"), test_initialization=False)
    solver_path = fileio.write_prototxt(os.path.join(tmp, "solver.prototxt"), sp)
    solver = caffe.SGDSolver(solver_path)
    for _ in tqdm(range(dense_iters), desc="dense", leave=False):
        solver.step(1)
    net = solver.net
    names = [n for n, l in zip(net._layer_names, net.layers) if l.type in dc.NET_BITS]
    weights = {n: net.params[n][0].data.copy() for n in names}
    densities = {n: (1.0 if i == 0 else 1 / 3) for i, n in enumerate(names)}
    masks = pruning.make_masks(weights, densities)
    for n in names:
        net.params[n][0].data[...] *= masks[n]
    for _ in tqdm(range(sparse_iters), desc="sparse", leave=False):
        solver.step(1)
        for n in names:
            net.params[n][0].data[...] *= masks[n]
    sparse = os.path.join(tmp, phases.SPARSE)
    net.save(sparse)
    return trainval, sparse, 5000 // 100


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="trainval/test prototxt (its TEST phase is scored)")
    p.add_argument("--weights", help="the sparse caffemodel")
    p.add_argument("--iterations", type=int, default=None, help="test iterations (default: caffe test's "
                   f"{evaluate.CAFFE_TEST_ITERATIONS}, or the whole "
                   "validation split in the self-contained run)")
    p.add_argument("--bits", default="6,5,4,3,2", help="further widths to try in the Huffman variant")
    p.add_argument("--dense-iters", type=int, default=1500)
    p.add_argument("--sparse-iters", type=int, default=500)
    p.add_argument("--train-size", type=int, default=20000)
    p.add_argument("--width", type=float, default=1.0, help="small SqueezeNet width (self-contained run)")
    a = p.parse_args()
    if (a.model is None) != (a.weights is None):
        p.error("give both --model and --weights, or neither (self-contained run)")

    with tempfile.TemporaryDirectory() as tmp:
        if a.model:
            model, weights, iterations = a.model, a.weights, a.iterations or evaluate.CAFFE_TEST_ITERATIONS
        else:
            model, weights, iterations = self_contained(tmp, a.dense_iters, a.sparse_iters, a.train_size,
                                                        a.width)
            iterations = a.iterations or iterations
        specs = dc.layer_specs(model)
        layers = dc.read_weights(weights, specs)
        nonzero = sum(int(np.count_nonzero(w)) for w, _ in layers.values())
        total = sum(w.size for w, _ in layers.values())
        base = top1(model, weights, iterations)
        print(f"{weights}: {total:,} weights, {nonzero:,} non-zero (density {nonzero / total:.3f}); "
              f"{iterations} test iterations")
        print(f"\n{'model':34s} {'bytes':>10s} {'top-1':>8s} {'vs sparse':>10s}  decoded file scores the same")
        print(f"{'sparse caffemodel (float32)':34s} {os.path.getsize(weights):10,d} {base:8.4f} {0:+10.4f}")
        variants = [(".net (8-bit conv / 4-bit fc)", "net", None)]
        variants += [(f"Huffman, {b}-bit", "huffman", b) for b in (int(x) for x in a.bits.split(",") if x.strip())]
        for label, fmt, bits in variants:
            widths = {s.name: s.bits for s in specs} if bits is None else bits
            qmodel = quantized_caffemodel(weights, dc.quantize(layers, widths), specs,
                                          os.path.join(tmp, f"q{fmt}{bits}.caffemodel"))
            packed = os.path.join(tmp, f"q{fmt}{bits}.bin")
            size = dc.encode(layers, packed, specs, format=fmt, bits=bits, force=True)["bytes"]
            decoded = quantized_caffemodel(weights, dc.decode(packed, model), specs,
                                           os.path.join(tmp, f"d{fmt}{bits}.caffemodel"))
            acc, acc_decoded = top1(model, qmodel, iterations), top1(model, decoded, iterations)
            print(f"{label:34s} {size:10,d} {acc:8.4f} {acc - base:+10.4f}  "
                  f"{'yes' if acc == acc_decoded else f'NO ({acc_decoded:.4f})'}")


if __name__ == "__main__":
    main()
