"""Dense-Sparse-Dense from a dense caffemodel: prune -> sparse phase -> re-dense phase, --cycles N times.

Everything lands in --output: cycleK-sparse/ and cycleK-dense/ (each with its prototxts, snapshots, log and final
model + provenance JSON), dsd_state.json (settings, per-phase test accuracy and density) and accuracy.png.
Re-running the same command after an interruption (even SIGKILL) resumes from the newest complete snapshot of
the current phase. A finished run is refused unless --force (start over).
"""
from dsd_caffe import cli, phases


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--model", required=True, help="dense trainval prototxt")
    p.add_argument("--weights", required=True, help="dense caffemodel")
    p.add_argument("--output", required=True, help="run folder")
    p.add_argument("--ratio", help='e.g. "3x"')
    p.add_argument("--density")
    p.add_argument("--sparsity")
    p.add_argument("--profile", default="uniform")
    p.add_argument("--skip", action="append", default=[])
    p.add_argument("--cycles", type=int, default=1, help="1 = DSD, 2 = DSDSD, ...")
    p.add_argument("--sparse-epochs", type=float)
    p.add_argument("--sparse-iters", type=int)
    p.add_argument("--sparse-lr", type=float)
    p.add_argument("--dense-epochs", type=float, default=20)
    p.add_argument("--dense-iters", type=int)
    p.add_argument("--dense-lr", type=float, default=1e-4)
    p.add_argument("--snapshot", type=int, help="snapshot every N iterations (default: a tenth of each phase)")
    p.add_argument("--iter-size", type=int, default=1)
    p.add_argument("--test-iterations", type=int, help="evaluation batches (default: the whole TEST LMDB)")
    p.add_argument("--train-source")
    p.add_argument("--test-source")
    p.add_argument("--engine", choices=phases.ENGINES, default="binary")
    p.add_argument("--gpu", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="start a finished or different run over")

    def run(a):
        st = phases.run_dsd(
            a.model, a.weights, a.output, ratio=a.ratio, density=a.density, sparsity=a.sparsity, profile=a.profile,
            skip=a.skip, cycles=a.cycles, sparse_epochs=a.sparse_epochs, sparse_iters=a.sparse_iters,
            sparse_lr=a.sparse_lr, dense_epochs=a.dense_epochs, dense_iters=a.dense_iters, dense_lr=a.dense_lr,
            snapshot=a.snapshot, solver_args={"iter_size": a.iter_size}, engine=a.engine,
            test_iterations=a.test_iterations, seed=a.seed, force=a.force, gpu=a.gpu,
            train_source=a.train_source, test_source=a.test_source)
        for ph in st["phases"]:
            print(f"{ph['name']:<16} accuracy {ph['accuracy']}  density {ph['density']:.4f}  {ph['model']}")

    cli.main(p, run, argv)


if __name__ == "__main__":
    main()
