"""Per-layer pruning sensitivity (how Han et al. choose per-layer densities).

Prunes one layer at a time, by magnitude, at each of --densities, evaluates the net on the TEST (validation) LMDB
for a fixed number of batches (the same batches every time), and writes into --output: sensitivity.csv (layer,
density, accuracy, every net output with 4 decimals, and above_current; the first row is the unpruned net),
sensitivity.json (full precision, with each layer's current density) and sensitivity.png (a heat map of the
accuracy drop per layer and density; cells at or above the unpruned accuracy are outlined, * rows hatched). Only
the TEST phase is read: no TRAIN LMDB is needed (--test-source replaces the trainval's). Write the chosen densities
into a JSON profile for prune.py --profile. On an already pruned model, densities above a layer's current one prune
nothing: their rows are marked * (above_current) and are the layer as it is.
"""
from dsd_caffe import cli
from dsd_caffe.commands import flags


def run(a):
    from dsd_caffe import sensitivity  # deferred: heavy (numpy, Caffe's messages); --help needs none

    config = sensitivity.ScanConfig(densities=tuple(a.densities or sensitivity.DEFAULT_DENSITIES),
                                    layers=tuple(a.layers) if a.layers else None,
                                    iterations=a.iterations)
    rows = sensitivity.sensitivity_scan(a.model, a.weights, a.output, config, a.test_source, a.force, flags.device(a))
    print(f"{'layer':<24} {'density':>7} accuracy")
    for r in rows:
        acc = f"{r['accuracy']:.4f}" if r["accuracy"] is not None else "-"
        print(f"{r['layer']:<24} {r['density']:7.2f} {acc}" + (" *" if r["above_current"] else ""))
    if any(r["above_current"] for r in rows):
        print(f"* {sensitivity.ABOVE_CURRENT}")


def main(argv=None):
    from dsd_caffe.sensitivity import DEFAULT_DENSITIES, DEFAULT_ITERATIONS  # deferred: heavy (numpy); --help needs none

    p = cli.parser(__doc__)
    p.add_argument("--model", required=True, help="trainval prototxt (its TEST Data layer is used)")
    p.add_argument("--weights", required=True, help="caffemodel")
    cli.add_output(p, "output folder")
    cli.add_list(p, "--densities", help="densities kept (default: "
                 f"{','.join(str(d) for d in DEFAULT_DENSITIES)})")
    cli.add_list(p, "--layers", help="layer names (default: every Convolution/InnerProduct)")
    p.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS, help="TEST batches per evaluation")
    p.add_argument("--test-source", help="validation LMDB instead of the trainval's TEST source (default: the "
                   "trainval's)")
    flags.add_device(p, engine=False, several=False)
    p.add_argument("--force", action="store_true", help="replace an existing sensitivity folder")
    cli.main(p, run, argv)
