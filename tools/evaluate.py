"""Score a trained net like `caffe test`, in pycaffe: the same summary lines (Loss, accuracy_top1, ...,
loss with its weight) with the same values to the last printed digit on the same LMDB and weights.
Inputs are checked first (prototxt syntax, caffemodel fit, LMDB sources relative to the current folder,
crop size). Optionally writes a confusion matrix and per-class accuracy (CSV and PNG) with --confusion DIR."""
from dsd_caffe import cli, evaluate


def run(a):
    results = evaluate.evaluate(a.model, a.weights, iterations=a.iterations, gpu=a.gpu,
                                confusion=a.confusion is not None, allow_missing=a.allow_missing)
    for line in evaluate.format_results(results):
        print(line, flush=True)
    if a.confusion is not None:
        names = None
        if a.class_names:
            with open(a.class_names) as f:
                names = [line.strip() for line in f if line.strip()]
        paths = evaluate.write_confusion(results.confusion, a.confusion, names, force=a.force)
        print(f"wrote {', '.join(paths.values())}", flush=True)
    return 0


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--model", required=True, help="trainval/test prototxt (its TEST phase is used)")
    p.add_argument("--weights", required=True, help="caffemodel")
    p.add_argument("--iterations", type=int, default=50, help="forward passes (default 50, like caffe test)")
    p.add_argument("--gpu", type=int, default=None, help="GPU device (refused on a CPU-only build)")
    p.add_argument("--confusion", metavar="DIR", help="write confusion.csv, per_class.csv, confusion.png here")
    p.add_argument("--class-names", help="text file with one class name per line, for --confusion")
    p.add_argument("--allow-missing", action="store_true",
                   help="accept a caffemodel that leaves some learnable layers at their initial values")
    p.add_argument("--force", action="store_true", help="overwrite existing --confusion outputs")
    cli.main(p, run, argv)


if __name__ == "__main__":
    main()
