"""Caffe's CPU layers, patched vs unpatched, against the GEMM bound: SqueezeNet v1.0, batch 32.

Two worker processes, one per Caffe build: the set-up's (with ``patches/*-perf-*.patch``) and the one without the
performance patches (``python3 -m dsd_caffe.build --unpatched`` builds it once under its own cache key). Both get
the same net, data and BLAS settings (the set-up's choice), and their rounds are interleaved (the machine may be
shared). Each round times, per worker: the forward pass (TEST net), a training step (``solver.step(1)``), and every
layer's forward and backward (``net._forward(i, i)``, ``net._backward(i, i)``).

The GEMM bound: each convolution's own GEMMs (per image and group: forward W x col, backward dY x col^T and
W^T x dY) timed through Caffe's OpenBLAS with the set-up's threads, times the batch: the time a pass would take if
it were nothing but those GEMMs at that rate.

Prints forward / bound, training step / bound, patched / unpatched (wall and process CPU time), the per-layer-type
and top per-layer times, and with ``--torch-python`` the ratio to PyTorch (``bench/engine_vs_torch.py``'s net).
Usage: .venv/bin/python bench/caffe_layers.py [--rounds 5] [--torch-python /tmp/torch-venv/bin/python]
"""
import argparse
import collections
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import engine_vs_torch  # noqa: E402  (the same SqueezeNet, Caffe runner and PyTorch runner)

BATCH = engine_vs_torch.BATCH
GEMM_REPEATS = 5
SETTLE = 0.3  # s of idle before each request: the other build's spinning BLAS/OpenMP threads go to sleep


# ---------------------------------------------------------------- worker: one Caffe build
def conv_gemms(net):
    """Per convolution: [(m, n, k, trans_a, trans_b, count, pass)], the GEMMs Caffe runs for one batch."""
    inputs = set(net.inputs)
    out = {}
    for name, layer in zip(net._layer_names, net.layers):
        if layer.type != "Convolution":
            continue
        bottom, top = net.bottom_names[name][0], net.top_names[name][0]
        c_out, c_in_g, kh, kw = net.params[name][0].data.shape
        group = net.blobs[bottom].data.shape[1] // c_in_g
        batch, _, ho, wo = net.blobs[top].data.shape
        m, n, k, count = c_out // group, ho * wo, c_in_g * kh * kw, batch * group
        gemms = [(m, n, k, False, False, count, "forward"), (m, k, n, False, True, count, "backward")]
        if bottom not in inputs:  # no gradient for the net's input
            gemms.append((k, n, m, True, False, count, "backward"))
        out[name] = gemms
    return out


def gemm_seconds(library, gemms):
    """Fastest of GEMM_REPEATS calls of each distinct GEMM shape, through ``library`` (Caffe's BLAS); the parent
    keeps the fastest over all rounds."""
    import numpy as np

    lib = ctypes.CDLL(library)
    fp = ctypes.POINTER(ctypes.c_float)
    rng = np.random.default_rng(0)
    seconds = {}
    for m, n, k, ta, tb in sorted({g[:5] for g in gemms}):
        a = rng.standard_normal((k, m) if ta else (m, k), dtype=np.float32)
        b = rng.standard_normal((n, k) if tb else (k, n), dtype=np.float32)
        c = np.zeros((m, n), np.float32)
        best = float("inf")
        for _ in range(GEMM_REPEATS):
            t = time.perf_counter()
            lib.cblas_sgemm(101, 112 if ta else 111, 112 if tb else 111, m, n, k, ctypes.c_float(1.0),
                            a.ctypes.data_as(fp), a.shape[1], b.ctypes.data_as(fp), b.shape[1],
                            ctypes.c_float(0.0), c.ctypes.data_as(fp), n)
            best = min(best, time.perf_counter() - t)
        seconds[(m, n, k, ta, tb)] = best
    return seconds


def layer_times(net):
    """{layer name: [forward s, backward s]} of one pass over the TRAIN net, layer by layer."""
    names = list(net._layer_names)
    out = {n: [0.0, 0.0] for n in names}
    for i, n in enumerate(names):
        t = time.perf_counter()
        net._forward(i, i)
        out[n][0] = time.perf_counter() - t
    for i in reversed(range(len(names))):
        t = time.perf_counter()
        net._backward(i, i)
        out[names[i]][1] = time.perf_counter() - t
    return out


def worker(batch):
    """Serve timing requests (one JSON line each) for the Caffe this interpreter imports."""
    runner = engine_vs_torch.CaffeRunner(batch)
    net = runner.solver.net
    from dsd_caffe import blas, caffe_env

    info = {"prefix": caffe_env.caffe_prefix(), "patches": caffe_env.build_info().get("patches", {}),
            "types": {n: l.type for n, l in zip(net._layer_names, net.layers)}}
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["what"] == "gemm":
            gemms = conv_gemms(net)
            secs = gemm_seconds(blas.caffe_blas_library(), [g for v in gemms.values() for g in v])
            reply = [[*g, secs[g[:5]]] for v in gemms.values() for g in v]
        elif cmd["what"] == "layers":
            layer_times(net)  # warm-up of the layer-by-layer path
            reply = [layer_times(net) for _ in range(cmd["n"])]
        else:
            fn = runner.train_step if cmd["what"] == "train" else runner.forward
            reply = [fn() for _ in range(cmd["n"])]
        print(json.dumps(reply), flush=True)


class Worker(engine_vs_torch.TorchRunner):
    """A worker process for the Caffe whose pycaffe folder is ``pythonpath`` (None: this venv's); the same
    line protocol as the PyTorch child of ``engine_vs_torch``."""

    def __init__(self, pythonpath, env, batch):
        env = dict(os.environ, **env, GLOG_minloglevel="2")
        if pythonpath:
            env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", "--batch", str(batch)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("a Caffe worker failed to start (see its error above)")
        self.info = json.loads(line)

    def run(self, what, n=1):
        time.sleep(SETTLE)
        return super().run(what, n)


# ---------------------------------------------------------------- the parent: interleave, then print
def median(xs):
    return statistics.median(xs) if xs else float("nan")


def gemm_bound(rows):
    """(forward bound s, training-step bound s, GFLOPS) from the worker's timed GEMM rows."""
    fwd = sum(r[5] * r[7] for r in rows if r[6] == "forward")
    step = sum(r[5] * r[7] for r in rows)
    flops = sum(2.0 * r[0] * r[1] * r[2] * r[5] for r in rows)
    return fwd, step, flops / step / 1e9


def per_layer(samples):
    """{layer: (median forward s, median backward s)} over the sampled passes."""
    return {n: (median([s[n][0] for s in samples]), median([s[n][1] for s in samples])) for n in samples[0]}


def print_layers(types, builds, top):
    """Per layer type and the ``top`` slowest layers (by the first build's forward + backward)."""
    labels = list(builds)
    head = "".join(f"{lab + ' fwd':>13}{lab + ' bwd':>13}" for lab in labels)
    by_type = {lab: collections.defaultdict(lambda: [0.0, 0.0]) for lab in labels}
    for lab, layers in builds.items():
        for n, (f, b) in layers.items():
            by_type[lab][types[n]][0] += f
            by_type[lab][types[n]][1] += b
    print(f"\nper layer type, seconds per batch (median pass){'':6}{head}")
    ref = by_type[labels[-1]]
    for t in sorted(ref, key=lambda t: -sum(ref[t])):
        print(f"  {t:50}" + "".join(f"{by_type[lab][t][0]:13.4f}{by_type[lab][t][1]:13.4f}" for lab in labels))
    print(f"\nthe {top} slowest layers (by {labels[-1]} forward + backward){'':12}{head}")
    last = builds[labels[-1]]
    for n in sorted(last, key=lambda n: -sum(last[n]))[:top]:
        print(f"  {n[:40]:40}{types[n][:10]:>10}" + "".join(f"{builds[lab][n][0]:13.4f}{builds[lab][n][1]:13.4f}"
                                                         for lab in labels))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--steps", type=int, default=2, help="timed calls per build per round (default 2)")
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--top", type=int, default=12, help="slowest layers to list (default 12)")
    p.add_argument("--threads", type=int, help="threads for every engine (default: the set-up's BLAS choice)")
    p.add_argument("--build-unpatched", action="store_true",
                   help="build the unpatched Caffe if it is missing (a few minutes, once)")
    p.add_argument("--torch-python", help="an interpreter with torch, for the ratio to PyTorch (optional)")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a.batch)

    from dsd_caffe import blas, build

    env = blas.runtime_env(threads=a.threads)  # the set-up's choice unless --threads, for both builds
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    threads = int(env.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or os.cpu_count())
    unpatched = build.cached_prefix(perf=False)
    if unpatched is None and a.build_unpatched:
        unpatched = build.caffe_build(None, perf=False)
    workers = {"patched": Worker(None, env, a.batch)}
    if unpatched is None:
        print("no unpatched build in the cache: run `python3 -m dsd_caffe.build --unpatched` (or pass "
              "--build-unpatched) for the patched / unpatched ratios; timing the patched build alone")
    else:
        workers["unpatched"] = Worker(os.path.join(unpatched, "lib", "python3", "dist-packages"), env, a.batch)
    torch = None
    if a.torch_python:
        torch = engine_vs_torch.TorchRunner(a.torch_python, engine_vs_torch.layer_list(
            engine_vs_torch.squeezenet_param(a.batch)), a.batch, threads)
    load0 = os.getloadavg()[0]
    gemm_rounds = []
    times = {f"{w}_{what}": [] for w in list(workers) + ["torch"] for what in ("forward", "train")}
    layers = {w: [] for w in workers}
    for r in range(a.rounds):
        order = list(workers) + (["torch"] if torch else [])
        for who in order if r % 2 == 0 else order[::-1]:
            for what in ("forward", "train"):
                run = torch.run if who == "torch" else workers[who].run
                times[f"{who}_{what}"] += run(what, a.steps)
            if who != "torch":
                layers[who] += workers[who].run("layers", 1)
            if who == "patched":
                gemm_rounds.append(workers[who].run("gemm"))
    for w in list(workers.values()) + ([torch] if torch else []):
        w.close()

    gemm_rows = [r[:7] + [min(rnd[i][7] for rnd in gemm_rounds)] for i, r in enumerate(gemm_rounds[0])]
    fwd_bound, step_bound, gflops = gemm_bound(gemm_rows)
    print(f"SqueezeNet v1.0, batch {a.batch}, {threads} thread(s), BLAS env {env or '(OpenBLAS defaults)'}; "
          f"{a.rounds} interleaved rounds x {a.steps} calls; load average before: {load0:.2f}")
    for name, w in workers.items():
        print(f"  {name:10} {w.info['prefix']}  patches: {', '.join(w.info['patches']) or '-'}")
    print(f"GEMM bound (the convolutions' own GEMMs at {gflops:.0f} GFLOPS, {threads} thread(s)): "
          f"forward {fwd_bound:.3f} s, training step {step_bound:.3f} s")
    print("median seconds per call (wall | process CPU)")
    result = {"batch": a.batch, "threads": threads, "env": env, "load_before": load0, "gemm": gemm_rows,
              "bound": {"forward": fwd_bound, "train": step_bound, "gflops": gflops}, "times": times}
    for what, bound in (("forward", fwd_bound), ("train", step_bound)):
        label = "forward" if what == "forward" else "training step"
        cols = []
        for who in list(workers) + (["torch"] if torch else []):
            xs = times[f"{who}_{what}"]
            wall, cpu = median([x[0] for x in xs]), median([x[1] for x in xs])
            result[f"{who}_{what}"] = {"wall": wall, "cpu": cpu}
            cols.append(f"{who} {wall:.3f} | {cpu:.3f}")
        print(f"  {label:14} " + "; ".join(cols))
        pw = result[f"patched_{what}"]["wall"]
        line = f"    {label} / bound: patched {pw / bound:.2f}x"
        if "unpatched" in workers:
            uw, uc = result[f"unpatched_{what}"]["wall"], result[f"unpatched_{what}"]["cpu"]
            line += f", unpatched {uw / bound:.2f}x; patched / unpatched {pw / uw:.2f} (CPU time " \
                    f"{result[f'patched_{what}']['cpu'] / uc:.2f})"
        if torch:
            line += f"; patched / PyTorch {pw / result[f'torch_{what}']['wall']:.2f}"
        print(line)
    builds = {w: per_layer(layers[w]) for w in workers}
    result["layers"] = builds
    print_layers(workers["patched"].info["types"], builds, a.top)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
