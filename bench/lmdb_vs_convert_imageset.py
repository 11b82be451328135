"""make_lmdb (all cores) against Caffe's own convert_imageset on the same generated JPEG folder and list file,
same 256x256 resize, timed side by side in one run. Prints images/s for both and the ratio (goal >= 1.5x on 2
cores), and checks that both LMDBs hold the same keys in the same order with near-identical pixels.

    python bench/lmdb_vs_convert_imageset.py [--images 2000] [--size 300] [--repeat 1] [--workdir DIR]
"""
import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import cv2
import numpy as np

from dsd_caffe import caffe_env, caffeproto, fashion_mnist, imagedb, lmdbio


def make_images(folder, n, size, seed=0):
    """n JPEGs of size x size: Fashion-MNIST items upscaled and tinted (real structure, not noise), one
    sub-folder per class. Returns the list file's path."""
    files = fashion_mnist.idx_files()
    images, labels = (fashion_mnist.read_idx(files[f"train-{what}"])[:n] for what in ("images", "labels"))
    rng = np.random.default_rng(seed)
    lines = []
    for i, (img, label) in enumerate(zip(images, labels)):
        big = cv2.resize(img, (size, size), interpolation=cv2.INTER_CUBIC).astype(np.float32)
        tint = rng.uniform(0.4, 1.0, 3).astype(np.float32)
        bg = rng.uniform(0, 80, 3).astype(np.float32)
        colour = np.clip(big[:, :, None] * tint + bg + rng.normal(0, 6, (size, size, 3)), 0, 255).astype(np.uint8)
        rel = f"{label:02d}/{i:05d}.jpg"
        os.makedirs(os.path.join(folder, f"{label:02d}"), exist_ok=True)
        cv2.imwrite(os.path.join(folder, rel), colour, [cv2.IMWRITE_JPEG_QUALITY, 90])
        lines.append(f"{rel} {label}\n")
    listing = os.path.join(folder, "list.txt")
    with open(listing, "w") as f:
        f.writelines(lines)
    return listing


def cpu_seconds():
    """User + system CPU seconds of this process and its reaped children."""
    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


def timed(fn, *args):
    """(wall seconds, CPU seconds) of fn(*args)."""
    c, t = cpu_seconds(), time.perf_counter()
    fn(*args)
    return time.perf_counter() - t, cpu_seconds() - c


def convert_imageset(folder, listing, out, workers=None):
    cmd = [caffe_env.caffe_tool("convert_imageset"), "--resize_height=256", "--resize_width=256",
           "--backend=lmdb", folder + os.sep, listing, out]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=dict(os.environ, GLOG_minloglevel="2", OMP_NUM_THREADS="1"))


def make_lmdb(folder, listing, out, workers):
    imagedb.make_lmdb(listing, out, root=folder, resize=(256, 256), workers=workers, progress=False)


def make_lmdb_cli(folder, listing, out, workers):
    tool = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools", "make_lmdb.py")
    subprocess.run([sys.executable, tool, listing, "--output", out, "--root", folder, "--resize", "256x256",
                    "--workers", str(workers)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))


def compare(a, b, n=20):
    ra, rb = list(lmdbio.read_lmdb(a, limit=n)), list(lmdbio.read_lmdb(b, limit=n))
    same_keys = [k for k, _, _ in ra] == [k for k, _, _ in rb]
    diff = max(int(np.abs(x[1].astype(int) - y[1].astype(int)).max()) for x, y in zip(ra, rb))
    return same_keys, diff


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--size", type=int, default=300)
    p.add_argument("--repeat", type=int, default=1, help="alternating runs of each; the best is reported")
    p.add_argument("--workers", type=int, default=None, help="make_lmdb workers (default: all cores)")
    p.add_argument("--workdir", help="keep the images here (default: a temporary folder, removed)")
    a = p.parse_args()
    work = a.workdir or tempfile.mkdtemp(prefix="lmdb_bench_")
    try:
        folder = os.path.join(work, "images")
        listing = os.path.join(folder, "list.txt")
        if not os.path.exists(listing):
            t = time.perf_counter()
            make_images(folder, a.images, a.size)
            print(f"generated {a.images} JPEGs of {a.size}x{a.size} in {time.perf_counter() - t:.1f}s")
        n = sum(1 for _ in open(listing))
        workers = a.workers or os.cpu_count()
        caffeproto.caffe_pb2()  # pycaffe's import is a fixed start-up cost of the library: timed only in the CLI row
        runs = {"convert_imageset": convert_imageset, "make_lmdb": make_lmdb, "make_lmdb.py (CLI)": make_lmdb_cli}
        outs = {"convert_imageset": "convert_imageset_lmdb", "make_lmdb": "make_lmdb_lmdb",
                "make_lmdb.py (CLI)": "make_lmdb_cli_lmdb"}
        times = {k: [] for k in runs}
        cpu = {k: [] for k in runs}
        for r in range(a.repeat):
            for name in list(runs) if r % 2 == 0 else list(runs)[::-1]:
                out = os.path.join(work, outs[name])
                shutil.rmtree(out, ignore_errors=True)
                wall, used = timed(runs[name], folder, listing, out, workers)
                times[name].append(wall)
                cpu[name].append(used)
        same_keys, diff = compare(os.path.join(work, "convert_imageset_lmdb"), os.path.join(work, "make_lmdb_lmdb"))
        best = {k: min(v) for k, v in times.items()}
        best_cpu = {k: min(v) for k, v in cpu.items()}
        print(f"{n} images {a.size}x{a.size} JPEG -> 256x256 raw BGR, {os.cpu_count()} cores, "
              f"make_lmdb workers={workers}, best of {a.repeat}")
        for k in runs:
            print(f"  {k:19s} {best[k]:7.2f} s wall {n / best[k]:8.1f} images/s | {best_cpu[k]:7.2f} s CPU "
                  f"{n / best_cpu[k]:8.1f} images/CPU-s   (wall runs: " + ", ".join(f"{t:.2f}" for t in times[k]) + ")")
        print(f"  ratio make_lmdb / convert_imageset: {best['convert_imageset'] / best['make_lmdb']:.2f}x wall-clock "
              f"(goal >= 1.5x), {best_cpu['convert_imageset'] / best_cpu['make_lmdb']:.2f}x per CPU-second")
        print(f"  CLI (pycaffe import and Python start-up included): "
              f"{best['convert_imageset'] / best['make_lmdb.py (CLI)']:.2f}x wall-clock")
        print(f"  load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print(f"  same keys in the same order: {same_keys}; max pixel difference (first 20): {diff}")
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
