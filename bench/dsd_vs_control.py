"""DSD vs its control (the dense model trained on for as long) on Fashion-MNIST over seeds, with the verdict.

A thin wrapper: each seed is one demo run (dsd_caffe.demo.run_demo: the small net trained dense from seeded random
weights, then dsd_caffe.pipeline.run_dsd with control=True), in ``<output>/seed<N>``, ``--jobs`` at a time in
separate processes; finished seeds are reused, so an interrupted benchmark resumes. The paired gains (DSD - control,
test top-1, points) go through dsd_caffe.verdict: mean +- std, the 95% t interval and its sentence.

The hyperparameters are the demo's (solvers.DEFAULTS["fashion-mnist"], chosen on the validation split); the test
split is only read here. ``--scale`` multiplies every phase's iterations. A seed whose dense training ended at chance
on the validation split (it diverged: both arms then compare untrained nets, as the demo warns) is listed but left
out of the verdict; the rule looks at the dense model alone, on validation, so it cannot favour either arm.
"""
import argparse
import concurrent.futures
import logging
import multiprocessing
import os
import statistics
import sys


def _one(folder, seed, scale, engine, overrides):
    """One seed's demo in a child process; returns its results dict."""
    os.environ["TQDM_DISABLE"] = "1"  # a child process of ours: parallel bars would interleave
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s seed{seed} %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from dsd_caffe import demo

    return demo.run_demo(folder, seed=seed, scale=scale, engine=engine, **overrides)


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
    ctx = multiprocessing.get_context("spawn")
    results = {}
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, a.jobs), mp_context=ctx) as pool:
        futures = {pool.submit(_one, os.path.join(output, f"seed{s}"), s, a.scale, a.engine, overrides): s
                   for s in a.seeds}
        for fut in concurrent.futures.as_completed(futures):
            results[futures[fut]] = fut.result()
    from dsd_caffe import demo, fileio, verdict

    cfg = results[a.seeds[0]]["config"]
    print(f"DSD vs its equal-length control, Fashion-MNIST test top-1, {len(a.seeds)} seeds, scale {a.scale}")
    print(f"dense {cfg['dense_max_iter']} it @ {cfg['dense_base_lr']}, sparse {cfg['sparse_max_iter']} it @ "
          f"{cfg['sparse_base_lr']} (density {cfg['density']:.3f}, skip {','.join(cfg['skip']) or '-'}), redense "
          f"{cfg['redense_max_iter']} it @ {cfg['redense_base_lr']}, width {cfg['width']}, profile {cfg['profile']}")
    print(f"{'seed':>4} {'dense':>7} {'sparse':>7} {'DSD':>7} {'control':>8} {'gain':>7} {'val gain':>8}")
    for s in a.seeds:
        t = results[s]["test"]
        print(f"{s:>4} {100 * t['dense']['top1']:7.2f} {100 * t['sparse']['top1']:7.2f} {100 * t['DSD']['top1']:7.2f}"
              f" {100 * t['control']['top1']:8.2f} {100 * results[s]['gain']:+7.2f}"
              f" {100 * results[s]['val_gain']:+8.2f}")
    diverged = [s for s in a.seeds if demo.untrained(results[s]["val"]["dense"]["top1"])]
    for s in diverged:
        print(f"seed {s}: the dense training diverged (validation top-1 {results[s]['val']['dense']['top1']:.4f},"
              " chance 0.1): left out")
    kept = [s for s in a.seeds if s not in diverged]
    for k in ("dense", "DSD", "control"):
        xs = [100 * results[s]["test"][k]["top1"] for s in kept]
        print(f"{k:>8}: {statistics.mean(xs):.2f} +- {statistics.stdev(xs) if len(xs) > 1 else 0:.2f}")
    v = verdict.paired_verdict([100 * results[s]["gain"] for s in kept], seeds=kept)
    print(v.format())
    fileio.write_json(os.path.join(output, "summary.json"), {"seeds": kept, "diverged": diverged, "gains": v.gains,
                                                             "low": v.low, "high": v.high, "sentence": v.sentence})
    return 0


if __name__ == "__main__":
    sys.exit(main())
