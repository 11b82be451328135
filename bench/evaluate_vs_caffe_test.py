"""evaluate.py against the `caffe test` binary on the same LMDB, net and weights, side by side in one run.

Builds an LMDB of Fashion-MNIST test images (random images when the dataset is missing), the project's small
SqueezeNet (netgen.small_squeezenet) with random weights, then alternates for --repeats rounds:
- `caffe test` (a subprocess; its forward loop timed from its own glog timestamps, "Running for" .. "Loss:"),
- dsd_caffe.evaluate.run on the same net in this process (its forward loop timed),
and also the end-to-end wall time of both command lines (`caffe test` vs `python tools/evaluate.py`).
Prints images/s and the ratio evaluate/binary (goal >= 0.97), and checks the printed lines are identical.

    OMP_NUM_THREADS=1 .venv/bin/python bench/evaluate_vs_caffe_test.py --images 5000
"""
import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOOL = os.path.join(HERE, "..", "tools", "evaluate.py")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="OMP/OpenBLAS threads for both sides")
    p.add_argument("--workdir", help="keep the LMDB and net here (default: a temporary folder)")
    return p.parse_args()


def make_inputs(folder, n, batch):
    import numpy as np

    from dsd_caffe import caffe_env, fashion_mnist, fileio, lmdbio, netgen

    lmdb_path = os.path.join(folder, "bench_lmdb")
    if not os.path.exists(lmdb_path):
        try:
            files = fashion_mnist.idx_files()
        except FileNotFoundError:  # not installed: random pixels below
            files = None
        if files:
            images = fashion_mnist.read_idx(files["t10k-images"])[:n, None]
            labels = fashion_mnist.read_idx(files["t10k-labels"])[:n]
            what = "Fashion-MNIST test images"
        else:
            rng = np.random.default_rng(0)
            images = rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)
            labels = rng.integers(0, 10, n)
            what = "random 28x28 images"
        lmdbio.write_array_lmdb(lmdb_path, images, labels)
        print(f"LMDB: {len(labels)} {what} -> {lmdb_path}")
    proto = os.path.join(folder, "small_squeezenet.prototxt")
    weights = os.path.join(folder, "small_squeezenet.caffemodel")
    net_param = netgen.small_squeezenet(train_source=lmdb_path, test_source=lmdb_path, test_batch=batch)
    fileio.write_prototxt(proto, net_param)
    if not os.path.exists(weights):
        caffe = caffe_env.import_caffe()
        caffe.set_random_seed(0)
        caffe.Net(proto, caffe.TEST).save(weights)
    return proto, weights


def _seconds(line):
    h, m, s = re.search(r" (\d\d):(\d\d):(\d\d\.\d+) ", line).groups()
    return int(h) * 3600 + int(m) * 60 + float(s)


def run_binary(proto, weights, iterations, env):
    from dsd_caffe import caffe_env

    env = dict(env, GLOG_minloglevel="0", GLOG_logtostderr="1")
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run([caffe_env.caffe_binary(), "test", "--model", proto, "--weights", weights,
                        "--iterations", str(iterations)], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    if p.returncode:
        sys.exit(f"caffe test failed:\n{p.stderr[-3000:]}")
    lines = [l for l in p.stderr.splitlines() if re.search(r"caffe\.cpp:\d+\] ", l)]
    start = next(l for l in lines if "] Running for " in l)
    end_i = next(i for i, l in enumerate(lines) if "] Loss: " in l)
    loop = _seconds(lines[end_i]) - _seconds(start)
    summary = [re.sub(r"^.*caffe\.cpp:\d+\] ", "", l) for l in lines[end_i:]]
    return loop, wall, cpu, summary


def run_tool(proto, weights, iterations, env):
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, TOOL, "--model", proto, "--weights", weights, "--iterations",
                        str(iterations)], capture_output=True, text=True, env=env)
    if p.returncode:
        sys.exit(f"tools/evaluate.py failed:\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0


def main():
    a = parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(a.threads)
    from dsd_caffe import evaluate, loading

    folder = a.workdir or tempfile.mkdtemp(prefix="bench_evaluate_")
    os.makedirs(folder, exist_ok=True)
    proto, weights = make_inputs(folder, a.images, a.batch)
    iterations = a.images // a.batch
    images = iterations * a.batch
    env = dict(os.environ)
    bin_loop, bin_wall, py_loop, py_wall, bin_cpu, py_cpu = [], [], [], [], [], []

    def ours():
        c0 = time.process_time()
        net = loading.load_net(proto, weights, "TEST", iterations=iterations)  # fresh reader, from the start
        t0 = time.perf_counter()
        res = evaluate.run(net, iterations, progress=False)
        py_loop.append(time.perf_counter() - t0)
        del net
        py_cpu.append(time.process_time() - c0)
        return res

    for r in range(a.repeats):
        if r % 2:  # alternate who goes first, so a drifting machine load does not favour one side
            res = ours()
        loop, wall, cpu, expected = run_binary(proto, weights, iterations, env)
        bin_loop.append(loop)
        bin_wall.append(wall)
        bin_cpu.append(cpu)
        if not r % 2:
            res = ours()
        lines = evaluate.format_results(res)
        if lines != expected:
            sys.exit(f"MISMATCH\nbinary:   {expected}\nevaluate: {lines}")
        py_wall.append(run_tool(proto, weights, iterations, env))
        print(f"round {r + 1}: caffe test loop {loop:.2f}s cpu {cpu:.2f}s wall {wall:.2f}s | evaluate loop "
              f"{py_loop[-1]:.2f}s cpu {py_cpu[-1]:.2f}s, tool wall {py_wall[-1]:.2f}s | lines identical: "
              f"{' ; '.join(lines)}", flush=True)
    bl, pl = statistics.median(bin_loop), statistics.median(py_loop)
    bw, pw = statistics.median(bin_wall), statistics.median(py_wall)
    print(f"\n{images} images, batch {a.batch}, {a.threads} thread(s), {a.repeats} rounds, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"forward loop (median): caffe test {images / bl:8.1f} img/s   evaluate {images / pl:8.1f} img/s   "
          f"ratio {bl / pl:.3f}x (goal >= 0.97x)")
    bm, pm = min(bin_loop), min(py_loop)
    print(f"forward loop (best):   caffe test {images / bm:8.1f} img/s   evaluate {images / pm:8.1f} img/s   "
          f"ratio {bm / pm:.3f}x")
    bc, pc = statistics.median(bin_cpu), statistics.median(py_cpu)
    print(f"CPU time (median):     caffe test {bc:6.2f} s (whole process)   evaluate {pc:6.2f} s (net set-up + "
          f"loop)   ratio {bc / pc:.3f}x")
    print(f"end to end:   caffe test {bw:8.2f} s       tools/evaluate.py {pw:8.2f} s   ratio {bw / pw:.3f}x "
          "(includes Python start-up and imports)")


if __name__ == "__main__":
    main()
