"""One-shot DSD, gradual DSD and their control on the demo's net and data (Fashion-MNIST), over seeds, side by side.

Per seed, in ``<output>/seed<N>``: the demo (dsd_caffe.demo.run_demo: the small net trained dense from seeded random
weights, then one-shot DSD beside its equal-length control), then gradual DSD from the same dense model
(dsd_caffe.pipeline.run_dsd with ``PruneConfig(schedule="gradual")``) in ``seed<N>/gradual``: the same sparse and
redense solvers (iterations, learning rates, seed), so the demo's control is the control of both arms and all
three train for the same total iterations. Finished seeds are reused, so an interrupted bench resumes.

No setting is chosen here: the demo's are those of solvers.DEFAULTS["fashion-mnist"] (chosen on the validation split)
and the only new one, the gradual schedule, takes its defaults (solvers.DEFAULTS: from the dense model at the phase's
start, the final density at 2/3 of the sparse phase, 15 steps), fixed before any run. The test split is read only
for the table: the three top-1s per seed, both paired gains over the control with their 95% intervals and the
verdict sentences (dsd_caffe.verdict). The validation gains are printed beside them.
"""
import argparse
import logging
import os
import statistics
import sys


def gradual_run(folder, seed, scale, engine):
    """Gradual DSD from the demo's dense model in ``folder`` (a finished demo run); returns its state."""
    from dsd_caffe import demo, fashion_mnist, phases, pipeline
    from dsd_caffe.phases import PruneConfig

    cfg = demo.config_for(seed=seed, scale=scale)
    lmdbs = fashion_mnist.import_fashion_mnist(os.path.join(folder, demo.DATA_DIR), val_size=5000, seed=0)
    dense = os.path.join(folder, demo.DENSE_DIR)
    config = pipeline.RunConfig(
        model=os.path.join(dense, phases.net_file("dense")), weights=os.path.join(dense, phases.DENSE),
        prune=PruneConfig(density=cfg["density"], profile=cfg["profile"], skip=tuple(cfg["skip"]), seed=seed,
                          schedule="gradual"),
        sparse=demo._schedule(cfg, "sparse"), redense=demo._schedule(cfg, "redense"), recipe=demo.RECIPE,
        holdout_source=lmdbs["test"], control=False, seed=seed)
    return pipeline.run_dsd(config, os.path.join(folder, "gradual"), engine, reuse=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--scale", type=float, default=1.0, help="multiply every phase's iterations (default 1)")
    p.add_argument("--output", default="runs/bench-gradual", help="folder for the runs (default runs/bench-gradual)")
    p.add_argument("--engine", choices=("binary", "pycaffe"), default="binary")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from dsd_caffe import demo, fileio, runreport, verdict

    output = os.path.abspath(a.output)
    rows = {}
    for s in a.seeds:
        folder = os.path.join(output, f"seed{s}")
        oneshot = demo.run_demo(folder, seed=s, scale=a.scale, engine=a.engine)
        state = gradual_run(folder, s, a.scale, a.engine)
        rows[s] = {split: {"oneshot": oneshot[key]["DSD"]["top1"], "control": oneshot[key]["control"]["top1"],
                           "gradual": runreport.results_table(state, name)["DSD"]["top1"],
                           "gradual_sparse": runreport.results_table(state, name)["sparse"]["top1"],
                           "oneshot_sparse": oneshot[key]["sparse"]["top1"]}
                   for split, key, name in (("test", "test", "holdout"), ("val", "val", "val"))}
    cfg = demo.config_for(seed=a.seeds[0], scale=a.scale)
    print(f"one-shot DSD, gradual DSD and the control, Fashion-MNIST, {len(a.seeds)} seeds, scale {a.scale}: dense "
          f"{cfg['dense_max_iter']} it, sparse {cfg['sparse_max_iter']} it @ {cfg['sparse_base_lr']} (density "
          f"{cfg['density']:.3f}, skip {','.join(cfg['skip'])}), redense {cfg['redense_max_iter']} it @ "
          f"{cfg['redense_base_lr']}; the control trains {cfg['sparse_max_iter'] + cfg['redense_max_iter']} it at "
          "the same rates")
    print(f"{'seed':>4} {'one-shot':>9} {'gradual':>8} {'control':>8} {'1s-ctl':>7} {'gr-ctl':>7} "
          f"{'val 1s-ctl':>10} {'val gr-ctl':>10}   (test top-1 %; sparse-phase test top-1: one-shot / gradual)")
    for s, r in rows.items():
        t, v = r["test"], r["val"]
        print(f"{s:>4} {100 * t['oneshot']:9.2f} {100 * t['gradual']:8.2f} {100 * t['control']:8.2f} "
              f"{100 * (t['oneshot'] - t['control']):+7.2f} {100 * (t['gradual'] - t['control']):+7.2f} "
              f"{100 * (v['oneshot'] - v['control']):+10.2f} {100 * (v['gradual'] - v['control']):+10.2f}   "
              f"{100 * t['oneshot_sparse']:.2f} / {100 * t['gradual_sparse']:.2f}")
    for k in ("oneshot", "gradual", "control"):
        xs = [100 * r["test"][k] for r in rows.values()]
        print(f"{k:>8}: {statistics.mean(xs):.2f} +- {statistics.stdev(xs) if len(xs) > 1 else 0:.2f}")
    summary = {"seeds": list(rows), "rows": rows}
    for arm in ("oneshot", "gradual"):
        v = verdict.paired_verdict([100 * (r["test"][arm] - r["test"]["control"]) for r in rows.values()],
                                   seeds=list(rows))
        print(f"\n{arm} DSD - control (test):")
        print(v.format())
        summary[arm] = {"gains": v.gains, "mean": v.mean, "low": v.low, "high": v.high, "sentence": v.sentence}
    fileio.write_json(os.path.join(output, "summary.json"), summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
