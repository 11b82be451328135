"""The demo's dense schedule, chosen on the validation split: which base_lr trains the small net dense from seeded
random weights without diverging for any of seeds 0-9.

Each (base_lr, seed) is the demo's dense phase alone (dsd_caffe.demo's net and Fashion-MNIST LMDBs, the
fashion-mnist recipe's length and poly policy, ``phases.train_dense``), in ``<output>/lr<LR>/seed<N>``; finished
runs are reused, so an interrupted sweep resumes. A run diverged when its last validation top-1 is at chance
(``demo.untrained``). Printed side by side: per base_lr, every seed's final validation top-1 and the count that
diverged. Only the validation split is read. CPU-heavy (a dense phase per cell): run it with ``nice``.

    nice -n 19 .venv/bin/python bench/demo_dense_sweep.py --lrs 0.04 0.02 --seeds 0 1 2 3 4 5 6 7 8 9
"""
import argparse
import logging
import os


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lrs", type=float, nargs="+", default=[0.04, 0.02])
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    p.add_argument("--output", default="runs/bench-dense-sweep")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the dense phase's iterations (default 1)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TQDM_DISABLE", "1")
    from dsd_caffe import caffelog, demo, fashion_mnist, netgen, phases, sources, training
    from dsd_caffe.phases import Inputs

    out = os.path.abspath(a.output)
    lmdbs = fashion_mnist.import_fashion_mnist(os.path.join(out, demo.DATA_DIR), val_size=5000, seed=0)
    net = sources.absolute_sources(netgen.small_squeezenet(
        train_source=lmdbs["train"], test_source=lmdbs["val"], train_batch=64, test_batch=100,
        width=demo.DEMO["width"]), None)
    table = {}
    for lr in a.lrs:
        for seed in a.seeds:
            cfg = demo.config_for(seed=seed, scale=a.scale, dense_lr=lr)
            folder = os.path.join(out, f"lr{lr:g}", f"seed{seed}")
            phases.train_dense(Inputs(net_param=net), folder, demo._schedule(cfg, "dense"), demo.RECIPE,
                               seed=seed)
            curve = caffelog.read_curve(os.path.join(folder, training.LOG))
            table[lr, seed] = curve[-1][1]
    print(f"demo dense phase ({cfg['dense_iters']} iterations, poly), final validation top-1 per seed")
    print(f"{'base_lr':>8} " + " ".join(f"{s:>6}" for s in a.seeds) + f" {'diverged':>9}")
    for lr in a.lrs:
        tops = [table[lr, s] for s in a.seeds]
        print(f"{lr:8g} " + " ".join(f"{t:6.4f}" for t in tops) +
              f" {sum(demo.untrained(t) for t in tops):>5}/{len(tops)}")


if __name__ == "__main__":
    main()
