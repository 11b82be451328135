"""DSD vs the equal-length dense baseline on Fashion-MNIST, over several seeds (default 3), side by side.

Each seed is one full demo run (dsd_caffe.demo.run_demo: dense -> prune 3x -> sparse -> re-dense, and the dense
model trained on for the same iterations at the same learning rates), in ``<output>/seed<N>``; finished seeds are
reused, so an interrupted benchmark resumes. Seeds run ``--jobs`` at a time (separate processes).

Prints the test top-1 of both arms per seed, then mean +- std (sample std) of each arm and of the gain
(DSD - baseline, in points). The hyperparameters are demo.DEFAULTS, chosen on the validation split; the test split
is only read here. ``--scale`` multiplies every phase's iterations ("larger settings where time allows").
"""
import argparse
import concurrent.futures
import json
import logging
import os
import statistics
import subprocess
import sys
import time


def _one(output, seed, scale, engine, overrides):
    """Run one seed in a subprocess (Caffe's state is per process); returns its results dict."""
    folder = os.path.join(output, f"seed{seed}")
    code = ("import json, logging, sys; logging.basicConfig(level=logging.INFO, format='%(asctime)s seed"
            f"{seed} %(name)s: %(message)s', datefmt='%H:%M:%S'); from dsd_caffe import demo; "
            f"demo.run_demo({folder!r}, seed={seed}, scale={scale!r}, engine={engine!r}, **{overrides!r})")
    t0 = time.time()
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, TQDM_DISABLE="1"))
    with open(os.path.join(folder, "results.json")) as f:
        res = json.load(f)
    res["wall_seconds"] = time.time() - t0
    return res


def _mean_std(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--scale", type=float, default=1.0, help="multiply every phase's iterations (default 1)")
    p.add_argument("--output", default="runs/bench-dsd", help="folder for the runs (default runs/bench-dsd)")
    p.add_argument("--jobs", type=int, default=1, help="seeds run at the same time (default 1)")
    p.add_argument("--engine", choices=("binary", "pycaffe"), default="binary")
    p.add_argument("--width", type=float, help="width multiplier of the small net (default: the demo's)")
    p.add_argument("--profile", help="pruning profile (default: the demo's, uniform)")
    a = p.parse_args(argv)
    overrides = {k: v for k, v in (("width", a.width), ("profile", a.profile)) if v is not None}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    output = os.path.abspath(a.output)
    results = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        futures = {pool.submit(_one, output, s, a.scale, a.engine, overrides): s for s in a.seeds}
        for fut in concurrent.futures.as_completed(futures):
            s = futures[fut]
            results[s] = fut.result()
            t = results[s]["test"]
            logging.info("seed %d done: DSD %.2f%%, baseline %.2f%%, gain %+.2f points", s,
                         100 * t["DSD"]["top1"], 100 * t["baseline"]["top1"], 100 * results[s]["gain"])
    cfg = results[a.seeds[0]]["config"]
    print(f"DSD vs equal-length baseline, Fashion-MNIST test top-1, {len(a.seeds)} seeds, scale {a.scale}")
    print(f"dense {cfg['dense_iters']} it @ {cfg['dense_lr']}, sparse {cfg['sparse_iters']} it @ {cfg['sparse_lr']}"
          f" (density {cfg['density']:.3f}, skip {','.join(cfg['skip']) or '-'}), re-dense {cfg['redense_iters']} it"
          f" @ {cfg['redense_lr']}, {cfg['lr_policy']}, width {cfg['width']}, profile {cfg['profile']}")
    print(f"{'seed':>4} {'dense':>7} {'sparse':>7} {'DSD':>7} {'baseline':>8} {'gain':>7} {'val gain':>8}")
    for s in a.seeds:
        t = results[s]["test"]
        print(f"{s:>4} {100 * t['dense']['top1']:7.2f} {100 * t['sparse']['top1']:7.2f} {100 * t['DSD']['top1']:7.2f}"
              f" {100 * t['baseline']['top1']:8.2f} {100 * results[s]['gain']:+7.2f}"
              f" {100 * results[s]['val_gain']:+8.2f}")
    arms = {k: [100 * results[s]["test"][k]["top1"] for s in a.seeds] for k in ("dense", "DSD", "baseline")}
    gains = [100 * results[s]["gain"] for s in a.seeds]
    for k, xs in arms.items():
        m, sd = _mean_std(xs)
        print(f"{k:>8}: {m:.2f} +- {sd:.2f}")
    m, sd = _mean_std(gains)
    print(f"    gain: {m:+.2f} +- {sd:.2f} points (goal: >= +0.30)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
