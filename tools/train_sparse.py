"""Run DSD's sparse phase in a folder written by tools/prune.py.

Trains sparse_solver.prototxt from pruned.caffemodel with the mask layer holding every pruned weight at exactly
0.0 (or resumes from the newest complete snapshot in the folder), checks the final snapshot, and writes
sparse.caffemodel with its provenance JSON. --engine binary runs the `caffe train` binary; --engine pycaffe runs
pycaffe's Solver in this process. Then run tools/retrain_dense.py.
"""
from dsd_caffe import cli, phases


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("folder", help="folder written by tools/prune.py")
    p.add_argument("--engine", choices=phases.ENGINES, default="binary")
    p.add_argument("--gpu", type=int, help="GPU device (CUDA builds only)")
    p.add_argument("--force", action="store_true", help="redo a finished sparse phase")
    cli.main(p, lambda a: print(phases.train_sparse(a.folder, engine=a.engine, gpu=a.gpu, force=a.force)), argv)


if __name__ == "__main__":
    main()
