"""ONNX export: its time and file size, its differences from pycaffe, and ONNX Runtime against pycaffe, in one run.

For SqueezeNet v1.0 (netgen's deploy form, 227x227) and GoogLeNet (BVLC's deploy prototxt from ../shared, when
there; 224x224), each with seeded random weights, a third of them exactly 0.0 (a 3x-pruned model's density):

  - export: wall time of ``onnxexport.export`` (reading, converting, onnx.checker, the parity check, writing),
    the caffemodel's and the .onnx file's sizes;
  - the parity check's max absolute and relative differences and top-5 agreement (batch of 2);
  - forward time of the same SqueezeNet batch through pycaffe and ONNX Runtime (CPU provider, default threads),
    at batch 1 and 32, side by side: the median of ``--repeats`` runs after one warm-up, and their ratio.

    .venv/bin/python bench/onnx_export.py [--repeats 5]
"""
import argparse
import os
import tempfile
import time

import numpy as np

from dsd_caffe import fileio, netgen, onnxexport
from dsd_caffe.caffe_env import make_net

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("DSD_SHARED", os.path.join(HERE, "..", "..", "shared"))  # as the tests find it
GOOGLENET = os.path.join(SHARED, "reference", "caffe-models", "bvlc_googlenet", "deploy.prototxt")


def random_weights(deploy, path, seed=0):
    """A caffemodel of ``deploy`` with seeded random weights, a third of them exactly 0.0."""
    net = make_net(deploy, "TEST")
    rng = np.random.default_rng(seed)
    for blobs in net.params.values():
        for b in blobs:
            v = rng.standard_normal(b.data.shape).astype(np.float32) / np.float32(np.sqrt(max(1, b.data[0].size)))
            v[rng.random(v.shape) < 1 / 3] = 0
            b.data[...] = v
    net.save(path)
    return path


def export_row(name, prototxt, folder):
    weights = random_weights(onnxexport.deploy_param(fileio.read_net_prototxt(prototxt)),
                             os.path.join(folder, f"{name}.caffemodel"))
    out = os.path.join(folder, f"{name}.onnx")
    start = time.perf_counter()
    result = onnxexport.export(prototxt, weights, out)
    seconds = time.perf_counter() - start
    worst = max(result["check"]["outputs"].values(), key=lambda o: o["max_rel"])
    print(f"{name:11s} {seconds:8.1f} s {os.path.getsize(weights) / 1e6:10.2f} MB {result['bytes'] / 1e6:9.2f} MB "
          f"{worst['max_abs']:12.2g} {worst['max_rel']:12.2g} {result['check']['top5_agreement']:8.0%}")
    return weights, out


def median_time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def forward_row(prototxt, weights, onnx_path, batch, repeats):
    import onnxruntime

    net = make_net(fileio.read_net_prototxt(prototxt), "TEST", weights)
    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    x = {"data": np.random.default_rng(1).standard_normal((batch, 3, 227, 227)).astype(np.float32)}
    caffe_s = median_time(lambda: onnxexport.caffe_forward(net, x), repeats)
    ort_s = median_time(lambda: session.run(None, x), repeats)
    print(f"batch {batch:3d} {caffe_s * 1e3:12.1f} ms {ort_s * 1e3:12.1f} ms {caffe_s / ort_s:13.2f}x")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="timed forward passes per runtime and batch")
    a = p.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start (other jobs make wall times "
          "noisy)")
    with tempfile.TemporaryDirectory() as folder:
        squeezenet = os.path.join(folder, "squeezenet_deploy.prototxt")
        fileio.write_prototxt(squeezenet, netgen.deploy(netgen.squeezenet_v1_0()))
        print(f"{'net':11s} {'export':>10s} {'caffemodel':>13s} {'onnx':>12s} {'max abs diff':>12s} "
              f"{'max rel diff':>12s} {'top-5':>8s}")
        weights, onnx_path = export_row("SqueezeNet", squeezenet, folder)
        if os.path.exists(GOOGLENET):
            export_row("GoogLeNet", GOOGLENET, folder)
        else:
            print(f"GoogLeNet: {os.path.abspath(GOOGLENET)} is not here (../shared, or DSD_SHARED); skipped")
        print(f"\nSqueezeNet v1.0 forward (median of {a.repeats})")
        print(f"{'batch':9s} {'pycaffe':>15s} {'ONNX Runtime':>15s} {'pycaffe / ORT':>14s}")
        for batch in (1, 32):
            forward_row(squeezenet, weights, onnx_path, batch, a.repeats)


if __name__ == "__main__":
    main()
