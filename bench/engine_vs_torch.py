"""Caffe (pycaffe, through dsd-caffe's set-up and BLAS choice) vs PyTorch CPU on SqueezeNet v1.0, batch 32.

Times, side by side in one run and interleaved round by round (the machine may be shared):
  - a training step: forward + backward + SGD update (Caffe: ``solver.step(1)``; PyTorch: zero_grad, forward,
    cross-entropy, backward, ``SGD.step``);
  - forward alone (Caffe: ``net.forward()`` of a TEST-phase net; PyTorch: ``eval()`` under ``torch.no_grad()``).
and prints the ratios Caffe / PyTorch (goal: <= 1.0 for both).

PyTorch is never a dependency of dsd-caffe. Run it from a scratch venv that has torch, e.g.
    python3 -m venv /tmp/torch-venv && /tmp/torch-venv/bin/pip install torch==2.13.0 numpy
    .venv/bin/python bench/engine_vs_torch.py --torch-python /tmp/torch-venv/bin/python
The PyTorch side runs in that interpreter as a child process (``--torch-python``); without it, torch is imported
in this process if present, and skipped with a message if absent. The PyTorch net is built from the same layer list
as Caffe's (Caffe's layout: ceil-mode pooling, ``pad: 1`` on conv_final), so the architectures match exactly.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

BATCH = 32
HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_TRAINVAL = os.path.join(HERE, "..", "..", "shared", "reference", "squeezenet-dsd", "trainval.prototxt")


# ---------------------------------------------------------------- the net (Caffe side)
def squeezenet_param(batch):
    """SqueezeNet v1.0 NetParameter with the data layers replaced by an Input layer (data, label)."""
    from dsd_caffe import caffeproto, fileio

    pb2 = caffeproto.caffe_pb2()
    try:
        from dsd_caffe import netgen

        src = netgen.squeezenet_v1_0(train_batch=batch)
    except (ImportError, AttributeError):
        src = fileio.read_net_prototxt(os.path.normpath(SHARED_TRAINVAL))
    net = pb2.NetParameter(name="squeezenet_v1.0_bench")
    inp = net.layer.add(name="input", type="Input")
    inp.top.extend(["data", "label"])
    inp.input_param.shape.add(dim=[batch, 3, 227, 227])
    inp.input_param.shape.add(dim=[batch])
    for layer in src.layer:
        if layer.type in ("Data", "ImageData", "Input", "Accuracy"):
            continue
        if any(r.phase == pb2.TEST for r in layer.include):
            continue
        new = net.layer.add()
        new.CopyFrom(layer)
        del new.include[:]
    return net


def layer_list(net):
    """The net as plain JSON-able dicts, for building the same graph in PyTorch."""
    out = []
    for l in net.layer:
        d = {"name": l.name, "type": l.type, "bottom": list(l.bottom), "top": list(l.top)}
        if l.type == "Convolution":
            c = l.convolution_param
            d.update(num_output=c.num_output, kernel=c.kernel_size[0], stride=(c.stride[0] if c.stride else 1),
                     pad=(c.pad[0] if c.pad else 0))
        elif l.type == "Pooling":
            p = l.pooling_param
            d.update(pool=("max" if p.pool == 0 else "ave"), kernel=p.kernel_size, stride=p.stride or 1,
                     pad=p.pad, global_pooling=p.global_pooling)
        elif l.type == "Dropout":
            d.update(ratio=l.dropout_param.dropout_ratio)
        elif l.type not in ("ReLU", "Concat", "SoftmaxWithLoss", "Input"):
            raise ValueError(f"layer {l.name!r}: type {l.type} is not supported by the PyTorch translation")
        out.append(d)
    return out


class CaffeRunner:
    def __init__(self, batch):
        from dsd_caffe import caffe_env

        caffe = caffe_env.import_caffe()  # the BLAS env is already in os.environ (main)
        caffe.set_mode_cpu()
        self.tmp = tempfile.TemporaryDirectory(prefix="engine_vs_torch_")
        net = squeezenet_param(batch)
        self.layers = layer_list(net)
        net_path = os.path.join(self.tmp.name, "train.prototxt")
        with open(net_path, "w") as f:
            f.write(str(net))
        solver_path = os.path.join(self.tmp.name, "solver.prototxt")
        with open(solver_path, "w") as f:
            f.write(f'net: "{net_path}"\nbase_lr: 0.01\nmomentum: 0.9\nweight_decay: 0.0002\n'
                    'lr_policy: "fixed"\nmax_iter: 1000000\ndisplay: 0\nsnapshot: 0\nsolver_mode: CPU\n')
        self.solver = caffe.SGDSolver(solver_path)
        self.test_net = caffe.Net(net_path, caffe.TEST)
        self.test_net.share_with(self.solver.net)
        import numpy as np

        rng = np.random.default_rng(0)
        for n in (self.solver.net, self.test_net):
            n.blobs["data"].data[...] = rng.standard_normal(n.blobs["data"].data.shape, dtype=np.float32)
            n.blobs["label"].data[...] = rng.integers(0, 1000, size=batch)
        self.solver.step(1)  # warm-up (allocations)
        self.test_net.forward()

    def train_step(self):
        t, c = time.perf_counter(), time.process_time()
        self.solver.step(1)
        return time.perf_counter() - t, time.process_time() - c

    def forward(self):
        t, c = time.perf_counter(), time.process_time()
        self.test_net.forward()
        return time.perf_counter() - t, time.process_time() - c


# ---------------------------------------------------------------- the net (PyTorch side, runs where torch is)
TORCH_CHILD = r'''
import json, sys, time
import torch
import torch.nn as nn
import torch.nn.functional as F

def build(layers):
    mods = nn.ModuleDict()
    for d in layers:
        if d["type"] == "Convolution":
            # in-channel count is set lazily at the first call
            mods[d["name"].replace("/", "_")] = nn.LazyConv2d(d["num_output"], d["kernel"], d["stride"], d["pad"])
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = mods
        def forward(self, data, label=None):
            blobs = {"data": data}
            loss = None
            for d in layers:
                t, b = d["type"], [blobs[x] for x in d["bottom"] if x in blobs]
                if t == "Input":
                    continue
                if t == "Convolution":
                    y = self.m[d["name"].replace("/", "_")](b[0])
                elif t == "ReLU":
                    y = F.relu(b[0], inplace=True)
                elif t == "Pooling":
                    if d["global_pooling"]:
                        y = F.adaptive_avg_pool2d(b[0], 1) if d["pool"] == "ave" else F.adaptive_max_pool2d(b[0], 1)
                    elif d["pool"] == "max":
                        y = F.max_pool2d(b[0], d["kernel"], d["stride"], d["pad"], ceil_mode=True)
                    else:
                        y = F.avg_pool2d(b[0], d["kernel"], d["stride"], d["pad"], ceil_mode=True)
                elif t == "Concat":
                    y = torch.cat(b, 1)
                elif t == "Dropout":
                    y = F.dropout(b[0], d["ratio"], self.training)
                elif t == "SoftmaxWithLoss":
                    if label is None:
                        return b[0]
                    return F.cross_entropy(b[0].flatten(1), label)
                blobs[d["top"][0]] = y
            return blobs[layers[-1]["top"][0]]
    return Net()

def main():
    cfg = json.loads(sys.stdin.readline())
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    net = build(cfg["layers"])
    x = torch.randn(cfg["batch"], 3, 227, 227)
    y = torch.randint(0, 1000, (cfg["batch"],))
    net(x, y)  # materialise the lazy convs
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=0.0002)
    def train_step():
        net.train()
        t, c = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        net(x, y).backward()
        opt.step()
        return time.perf_counter() - t, time.process_time() - c
    def forward():
        net.eval()
        t, c = time.perf_counter(), time.process_time()
        with torch.no_grad():
            net(x)
        return time.perf_counter() - t, time.process_time() - c
    train_step(); forward()
    print(json.dumps({"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        fn = train_step if cmd["what"] == "train" else forward
        print(json.dumps([fn() for _ in range(cmd["n"])]), flush=True)

main()
'''


class TorchRunner:
    """PyTorch in a child interpreter (``python``), driven over stdin/stdout so the runs can be interleaved."""

    def __init__(self, python, layers, batch, threads):
        self.proc = subprocess.Popen([python, "-c", TORCH_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.proc.stdin.write(json.dumps({"layers": layers, "batch": batch, "threads": threads}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the PyTorch child ({python}) failed to start")
        self.info = json.loads(line)

    def run(self, what, n):
        self.proc.stdin.write(json.dumps({"what": what, "n": n}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def torch_python(arg):
    if arg:
        return arg
    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    return sys.executable


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--torch-python", help="a Python interpreter that has torch (default: this one, if it has torch)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--steps", type=int, default=2, help="timed calls per engine per round (default 2)")
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--threads", type=int, default=None, help="threads for both engines (default: the BLAS choice's)")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    a = p.parse_args(argv)

    from dsd_caffe import blas

    env = blas.runtime_env(threads=a.threads)
    os.environ.update(env)  # before Caffe's OpenBLAS loads
    threads = int(env.get("OPENBLAS_NUM_THREADS", os.cpu_count()))
    caffe = CaffeRunner(a.batch)
    py = torch_python(a.torch_python)
    tr = None
    if py is None:
        print("PyTorch not found: pass --torch-python PATH (see this script's docstring); timing Caffe only")
    else:
        tr = TorchRunner(py, caffe.layers, a.batch, threads)
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    times = {"caffe_train": [], "caffe_forward": [], "torch_train": [], "torch_forward": []}
    for r in range(a.rounds):
        order = ("caffe", "torch") if r % 2 == 0 else ("torch", "caffe")
        for who in order:
            if who == "caffe":
                times["caffe_train"] += [caffe.train_step() for _ in range(a.steps)]
                times["caffe_forward"] += [caffe.forward() for _ in range(a.steps)]
            elif tr is not None:
                times["torch_train"] += tr.run("train", a.steps)
                times["torch_forward"] += tr.run("forward", a.steps)
    if tr is not None:
        tr.close()
    print(f"SqueezeNet v1.0, batch {a.batch}, {threads} thread(s), {a.rounds} interleaved rounds x {a.steps} calls")
    print(f"BLAS env for Caffe: {env or '(none: OpenBLAS defaults)'}; load average before: {load0}")
    if tr is not None:
        print(f"PyTorch {tr.info['torch']} ({tr.info['threads']} threads) via {py}")
    print("median seconds per call; 'CPU' = the engine process's CPU time (less sensitive to other load)")
    print(f"{'':26}{'Caffe':>8}{'PyTorch':>9}{'ratio':>7}{'Caffe CPU':>11}{'Torch CPU':>11}{'ratio':>7}")
    result = {"batch": a.batch, "threads": threads, "env": env, "rounds": a.rounds, "steps": a.steps,
              "load_before": load0, "times": times}
    for what in ("train", "forward"):
        label = "train step (fwd+bwd+upd)" if what == "train" else "forward (inference)"
        cw = statistics.median(x[0] for x in times[f"caffe_{what}"])
        cc = statistics.median(x[1] for x in times[f"caffe_{what}"])
        if not times[f"torch_{what}"]:
            print(f"{label:26}{cw:8.3f}{'-':>9}{'':7}{cc:11.3f}")
            continue
        tw = statistics.median(x[0] for x in times[f"torch_{what}"])
        tc = statistics.median(x[1] for x in times[f"torch_{what}"])
        result[f"ratio_{what}"], result[f"cpu_ratio_{what}"] = cw / tw, cc / tc
        print(f"{label:26}{cw:8.3f}{tw:9.3f}{cw / tw:6.2f}x{cc:11.3f}{tc:11.3f}{cc / tc:6.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
