"""Prune a dense Caffe model by weight magnitude for DSD's sparse phase.

Writes into --output: pruned.caffemodel (+ .json provenance with per-layer densities and thresholds), masks.npz,
sparse_trainval.prototxt (with the mask layer that keeps pruned weights at 0.0 while Caffe trains),
sparse_solver.prototxt and weights_histogram.png; prints the per-layer table. Convolution and InnerProduct
weights are pruned, biases never. Example: --ratio 3x keeps 1/3 of the weights (also --density 0.33 or
--sparsity 0.67). Then run tools/train_sparse.py on the folder.
"""
from dsd_caffe import cli, phases


def add_solver_args(p, lr_help):
    p.add_argument("--base-lr", type=float, help=lr_help)
    p.add_argument("--epochs", type=float, help="training epochs (default 20)")
    p.add_argument("--max-iter", type=int, help="training iterations (instead of --epochs)")
    p.add_argument("--snapshot", type=int, help="snapshot every N iterations (default: max_iter / 10)")
    p.add_argument("--iter-size", type=int, default=1, help="solver iter_size (default 1)")


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--model", required=True, help="dense trainval prototxt")
    p.add_argument("--weights", required=True, help="dense caffemodel")
    p.add_argument("--output", required=True, help="output folder")
    g = p.add_argument_group("how much to keep (give one)")
    g.add_argument("--ratio", help='e.g. "3x" keeps 1/3')
    g.add_argument("--density", help="fraction kept, e.g. 0.33")
    g.add_argument("--sparsity", help="fraction removed, e.g. 0.67")
    p.add_argument("--profile", default="uniform", help="uniform, global, squeezenet-3x or a JSON file")
    p.add_argument("--skip", action="append", default=[], help="layer name or pattern to keep dense (repeatable)")
    p.add_argument("--train-source", help="TRAIN LMDB (default: the trainval's)")
    p.add_argument("--test-source", help="TEST LMDB (default: the trainval's)")
    add_solver_args(p, "sparse-phase base_lr (default 0.004)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")

    def run(a):
        res = phases.prune(a.model, a.weights, a.output, ratio=a.ratio, density=a.density, sparsity=a.sparsity,
                           profile=a.profile, skip=a.skip, force=a.force, seed=a.seed, train_source=a.train_source,
                           test_source=a.test_source, base_lr=a.base_lr, epochs=a.epochs, max_iter=a.max_iter,
                           snapshot=a.snapshot, solver_args={"iter_size": a.iter_size})
        print(res["table"])
        print(f"wrote {res['output_dir']}")

    cli.main(p, run, argv)


if __name__ == "__main__":
    main()
