"""Mask layer overhead: ratio of sparse-phase to dense training iteration time, SqueezeNet v1.0, batch 32, CPU
(or a GPU with ``--gpu N``, as ``bench/gpu_check.sh`` runs it).

Both solvers (SGD, momentum 0.9, weight decay) are built side by side in one process on the generated SqueezeNet
v1.0 trainval (Han naming) with its Data layer replaced by DummyData; the sparse one has the mask layer with a
uniform 3x mask. Iterations alternate (dense, sparse, dense, ...) after one warm-up each, and the ratios of the
median wall and process-CPU times are printed. Goal: <= 1.02. Also prints the mask layer's own forward+backward
time and the caffemodel sizes (dense vs sparse-phase with masks).
Usage: OMP_NUM_THREADS=1 python bench/mask_overhead.py [--iters 3] [--gpu 0]
"""
import argparse
import os
import statistics
import tempfile
import time

import numpy as np

from dsd_caffe import fileio, masklayer, masks, netgen, phases, pruning
from dsd_caffe.caffe_env import import_caffe
from dsd_caffe.caffeproto import caffe_pb2


def train_net(batch):
    pb2 = caffe_pb2()
    net = netgen.squeezenet_v1_0("han", train_batch=batch)
    out = pb2.NetParameter(name=net.name)
    dummy = out.layer.add(name="data", type="DummyData", top=["data", "label"])
    dummy.dummy_data_param.shape.add(dim=[batch, 3, 227, 227])
    dummy.dummy_data_param.shape.add(dim=[batch])
    dummy.dummy_data_param.data_filler.add(type="gaussian", std=50.0)
    dummy.dummy_data_param.data_filler.add(type="constant", value=1.0)
    for l in net.layer:
        if l.type == "Data" or any(r.HasField("phase") and r.phase == pb2.TEST for r in l.include):
            continue
        out.layer.add().CopyFrom(l)
    return out


def solver(caffe, net_param, folder, name, gpu=None):
    pb2 = caffe_pb2()
    mode = pb2.SolverParameter.CPU if gpu is None else pb2.SolverParameter.GPU
    s = pb2.SolverParameter(base_lr=1e-4, momentum=0.9, weight_decay=2e-4, lr_policy="fixed", max_iter=1000,
                            display=0, snapshot_prefix=os.path.join(folder, name), solver_mode=mode)
    s.net_param.CopyFrom(net_param)
    path = os.path.join(folder, phases.solver_file(name))
    fileio.write_prototxt(path, s)
    return caffe.get_solver(path)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--iters", type=int, default=3, help="timed iterations of each solver")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--gpu", type=int, help="run on this GPU (bench/gpu_check.sh); default: the CPU")
    a = p.parse_args()
    caffe = import_caffe()
    if a.gpu is None:
        caffe.set_mode_cpu()
    else:
        caffe.set_mode_gpu()
        caffe.set_device(a.gpu)
    where = "CPU" if a.gpu is None else f"GPU {a.gpu}"
    with tempfile.TemporaryDirectory() as tmp:
        dense_param = train_net(a.batch)
        dense = solver(caffe, dense_param, tmp, "dense", a.gpu)
        dense_model = os.path.join(tmp, phases.DENSE)
        dense.net.save(dense_model)
        model = fileio.read_caffemodel(dense_model)
        weights = masks.weight_arrays(model)
        kept = pruning.make_masks(weights, {n: 1 / 3 for n in weights})
        sparse_param = masks.add_mask_layer(dense_param, {n: w.shape for n, w in weights.items()})
        sparse_model = os.path.join(tmp, phases.SPARSE)
        fileio.write_caffemodel(sparse_model, masks.add_masks_to_caffemodel(model, kept, sparse_param))
        sparse = solver(caffe, sparse_param, tmp, "sparse", a.gpu)
        sparse.net.copy_from(sparse_model)
        times = {"dense": [], "sparse": []}
        cpu = {"dense": [], "sparse": []}
        for i in range(a.iters + 1):
            for name, s in (("dense", dense), ("sparse", sparse)):
                t, c = time.perf_counter(), time.process_time()
                s.step(1)
                if i:
                    times[name].append(time.perf_counter() - t)
                    cpu[name].append(time.process_time() - c)
        w = masks.weight_arrays(sparse.net)  # read back from the device on a GPU
        zero = all(np.all(w[n][~m] == 0) for n, m in kept.items())
        print(f"pruned weights exactly 0.0 after {a.iters + 1} steps (momentum 0.9, weight decay 2e-4), {where}: "
              f"{'yes' if zero else 'NO'}")
        # the mask layer's own work, timed alone
        layer = next(l for l in sparse.net.layers if isinstance(l, masklayer.MaskLayer))
        top = [sparse.net.blobs[masks.TOP]]
        t = time.perf_counter()
        for _ in range(10):
            layer.forward([], top)
            layer.backward(top, [], [])
        mask_ms = (time.perf_counter() - t) / 10 * 1000
        n_w = sum(m.size for m in kept.values())
        d_med, s_med = statistics.median(times["dense"]), statistics.median(times["sparse"])
        print(f"SqueezeNet v1.0, batch {a.batch}, {where}, {a.iters} timed iterations each (alternating), "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
        print(f"dense  s/iter: {' '.join(f'{x:.3f}' for x in times['dense'])}  median {d_med:.3f}")
        print(f"sparse s/iter: {' '.join(f'{x:.3f}' for x in times['sparse'])}  median {s_med:.3f}")
        print(f"ratio sparse/dense (median): {s_med / d_med:.4f}   goal <= 1.02")
        print(f"ratio sparse/dense (total):  {sum(times['sparse']) / sum(times['dense']):.4f}")
        print(f"ratio sparse/dense (process CPU time, median; steadier on a shared machine): "
              f"{statistics.median(cpu['sparse']) / statistics.median(cpu['dense']):.4f}")
        print(f"mask layer forward+backward alone: {mask_ms:.2f} ms per iteration over {n_w} weights "
              f"({mask_ms / 1000 / d_med:.4%} of a dense iteration)")
        ds, ss = os.path.getsize(dense_model), os.path.getsize(sparse_model)
        print(f"caffemodel size: dense {ds} bytes, sparse-phase with masks {ss} bytes, ratio {ss / ds:.3f}")
        if a.gpu is not None:  # the layer works on host copies: Caffe syncs weights and diffs both ways each step
            print(f"host copies per step on the GPU: {4 * n_w * 4 / 2**20:.1f} MiB (weights and gradients, each "
                  "device to host and back)")
        if not zero:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
