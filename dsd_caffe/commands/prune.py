"""Prune a dense Caffe model by weight magnitude for DSD's sparse phase.

Writes into --output (whole or not at all): pruned.caffemodel (the masks inside) with its JSON (per-layer
densities and thresholds), masks.npz, sparse_trainval.prototxt (the net with the mask layer that keeps pruned
weights at exactly 0.0 while Caffe trains), sparse_solver.prototxt and weights_histogram.png; prints the per-layer
table. Convolution and InnerProduct weights are pruned, biases never. --ratio 3x keeps 1/3 of the weights (also
--density 0.33 or --sparsity 0.67).

No data is needed: a deploy prototxt, or a trainval whose LMDBs are on another machine, gives the pruned caffemodel
and masks (and the sparse trainval for a trainval); the solver is written when the LMDBs can be counted, else
train_sparse.py writes it where they are. Re-pruning a pruned model: a weight that is already 0 counts as pruned,
so it can only be pruned further; a density above a layer's current one is refused, naming both.

--schedule gradual prunes inside the sparse phase instead (Zhu & Gupta's cubic schedule): pruned.caffemodel then
holds the dense weights, and sparse_trainval.prototxt's mask layer holds the schedule and each layer's final
density; it prunes every --gradual-interval iterations from --gradual-begin, in --gradual-steps steps.

Then: train_sparse.py FOLDER (or, from the folder, caffe train --solver=sparse_solver.prototxt
--weights=pruned.caffemodel).
"""
from dsd_caffe import cli
from dsd_caffe.commands import flags


def run(a):
    from dsd_caffe import phases  # deferred: heavy (numpy, Caffe's messages); --help needs none

    res = phases.prune(phases.Inputs(a.model, a.weights, a.train_source, a.test_source), a.output,
                       flags.prune_config(a, a.seed), flags.schedule(a), a.recipe, force=a.force,
                       solver=a.solver)
    print(res["table"])
    print(f"wrote {res['output_dir']}")


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--model", required=True, help="dense trainval (or deploy) prototxt")
    p.add_argument("--weights", required=True, help="dense caffemodel")
    cli.add_output(p, "output folder")
    flags.add_pruning(p)
    flags.add_gradual(p)
    flags.add_sources(p)
    flags.add_schedule(p, "sparse")
    flags.add_run_settings(p)
    flags.add_recipe(p)
    flags.add_solver(p)
    p.add_argument("--seed", type=int, default=flags.seed_default(), help="random_seed of the sparse solver")
    p.add_argument("--force", action="store_true", help="replace an existing prune folder")
    cli.main(p, run, argv)
