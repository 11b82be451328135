"""Run DSD's re-dense phase: release the masks and retrain the whole net at a low learning rate.

Writes into --output a plain dense_trainval.prototxt (the mask layer removed), dense_solver.prototxt (base_lr
1e-4 and 20 epochs by default), Caffe's snapshots, and dense.caffemodel with its provenance JSON. Training starts
from the sparse model: pruned weights restart at exactly 0.0, survivors keep their values, and the solver
history starts fresh. Re-running resumes from the newest complete snapshot.
"""
from dsd_caffe import cli, phases


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--model", required=True, help="trainval prototxt (the sparse one is fine)")
    p.add_argument("--weights", required=True, help="sparse caffemodel (e.g. DIR/sparse.caffemodel)")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--base-lr", type=float, default=1e-4)
    p.add_argument("--epochs", type=float, default=20)
    p.add_argument("--max-iter", type=int, help="iterations instead of --epochs")
    p.add_argument("--snapshot", type=int, help="snapshot every N iterations (default: max_iter / 10)")
    p.add_argument("--iter-size", type=int, default=1)
    p.add_argument("--train-source", help="TRAIN LMDB (default: the trainval's)")
    p.add_argument("--test-source", help="TEST LMDB (default: the trainval's)")
    p.add_argument("--engine", choices=phases.ENGINES, default="binary")
    p.add_argument("--gpu", type=int, help="GPU device (CUDA builds only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="redo a finished re-dense phase")
    cli.main(p, lambda a: print(phases.retrain_dense(
        a.model, a.weights, a.output, base_lr=a.base_lr, epochs=a.epochs, max_iter=a.max_iter, engine=a.engine,
        gpu=a.gpu, force=a.force, seed=a.seed, snapshot=a.snapshot, solver_args={"iter_size": a.iter_size},
        train_source=a.train_source, test_source=a.test_source)), argv)


if __name__ == "__main__":
    main()
