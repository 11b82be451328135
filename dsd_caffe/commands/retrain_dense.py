"""Run DSD's redense phase: release the masks and retrain the whole net at a low learning rate.

Writes into --output released.caffemodel (the sparse model without its mask layer: pruned weights restart at
exactly 0.0, survivors keep their values), a plain redense_trainval.prototxt, redense_solver.prototxt (base_lr
1e-4 and 20 epochs by default: solvers.DEFAULTS), Caffe's snapshots and log, and redense.caffemodel with its JSON.
The solver history starts fresh. A progress bar shows the iteration, loss, last test accuracy and ETA. Ctrl-C
stops at a snapshot: the same command resumes. A finished phase is reused with the same settings and refused with
others (--force redoes it).
"""
from dsd_caffe import cli
from dsd_caffe.commands import flags


def run(a):
    from dsd_caffe import phases  # deferred: heavy (numpy, Caffe's messages); --help needs none

    print(phases.retrain_dense(phases.Inputs(a.model, a.weights, a.train_source, a.test_source), a.output,
                               flags.schedule(a), a.recipe, a.engine, flags.device(a), a.force, a.seed,
                               solver=a.solver))


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--model", required=True, help="trainval prototxt (the sparse one is fine)")
    p.add_argument("--weights", required=True, help="sparse caffemodel (e.g. DIR/sparse.caffemodel)")
    cli.add_output(p, "output folder")
    flags.add_schedule(p, "redense")
    flags.add_run_settings(p)
    flags.add_sources(p)
    flags.add_recipe(p)
    flags.add_solver(p)
    flags.add_device(p)
    p.add_argument("--seed", type=int, default=flags.seed_default(), help="random_seed of the solver")
    p.add_argument("--force", action="store_true", help="redo a finished redense phase from scratch")
    cli.main(p, run, argv)
