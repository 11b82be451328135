"""Run DSD's sparse phase in a folder written by tools/prune.py.

Trains sparse_solver.prototxt from pruned.caffemodel with the mask layer holding every pruned weight at exactly
0.0 (or resumes from the newest complete snapshot in the folder), checks the final snapshot, and writes
sparse.caffemodel with its JSON. A progress bar shows the iteration, loss, last test accuracy and ETA; Caffe's
full log is FOLDER/train.log. Ctrl-C stops at a snapshot: run the same command again to resume. A finished phase
is reused when the settings are the same and refused when they differ (--force redoes it from scratch).

A folder pruned with --schedule gradual trains the same way: its mask layer prunes at the iterations its schedule
names (each step logged with its target density), and sparse.caffemodel's JSON records the density curve.

--max-iter/--epochs/--base-lr/--snapshot/--iter-size change the solver recorded at pruning (without them the
folder's sparse_solver.prototxt is used as it is, also when edited by hand before training). --engine binary runs
the `caffe train` binary; --engine pycaffe runs pycaffe's Solver in this process. Then run tools/retrain_dense.py.
"""
from dsd_caffe import cli
from dsd_caffe.commands import flags


def run(a):
    from dsd_caffe import phases  # deferred: heavy (numpy, Caffe's messages); --help needs none

    print(phases.train_sparse(a.folder, flags.schedule(a),
                              engine=a.engine, gpu=flags.device(a), force=a.force, solver=a.solver))


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("folder", help="folder written by tools/prune.py (the outputs go there too)")
    flags.add_schedule(p, "sparse", default="as recorded at pruning")
    flags.add_run_settings(p)
    flags.add_solver(p)
    flags.add_device(p)
    p.add_argument("--force", action="store_true", help="redo the sparse phase from scratch")
    cli.main(p, run, argv)
