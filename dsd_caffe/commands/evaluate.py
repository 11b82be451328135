"""Evaluate a trained net like `caffe test`, in pycaffe: the same summary lines (Loss, accuracy_top1, ..., loss
with its weight) with the same values to the last printed digit on the same LMDB and weights.

Inputs are checked first (prototxt syntax, layer types, caffemodel fit, crop size, a data layer to read: a deploy
net is refused, since `caffe test` would run it on zeros). Data sources resolve beside the prototxt first, then in
the current folder (where `caffe test` looks), so this runs from any folder. With --output DIR it also writes a
confusion matrix and per-class accuracy (confusion.csv, per_class.csv, confusion.png), with the class names of the
TEST LMDB's JSON (or --class-names).

A model whose loss or outputs are not finite (NaN or infinite weights: training diverged) is reported as diverged:
the lines above, then one warning line, and exit status 3 (Caffe's Accuracy layer counts a NaN score as a hit, so
its accuracy reads 1); --allow-diverged reports it and exits 0.
"""
import os
import sys

from dsd_caffe import cli
from dsd_caffe.commands import flags


def run(a):
    from dsd_caffe import evaluate  # deferred: heavy (numpy, Caffe's messages); --help needs none

    if a.output is not None:
        evaluate.check_confusion_folder(a.output, a.force)
    results = evaluate.evaluate(a.model, a.weights, iterations=a.iterations, gpu=flags.device(a),
                                confusion=a.output is not None, allow_missing=a.allow_missing,
                                test_source=a.test_source)
    for line in evaluate.format_results(results):
        print(line, flush=True)
    why = evaluate.diverged(results)
    if why:
        print(f"{os.path.basename(sys.argv[0])}: warning: the model {why}: its accuracy above means nothing "
              "(Caffe counts a NaN score as a hit)" + ("" if a.allow_diverged else
                                                       "; exit status 3 (--allow-diverged: 0)"),
              file=sys.stderr, flush=True)
    if a.output is not None:
        names = None
        if a.class_names:
            with open(a.class_names) as f:
                names = [line.strip() for line in f if line.strip()]
        else:
            source = a.test_source or results.test_source
            names = evaluate.lmdb_class_names(source) if source else None
        paths = evaluate.write_confusion(results.confusion, a.output, names, force=a.force)
        print(f"wrote {', '.join(paths.values())}", flush=True)
    return cli.DIVERGED if why and not a.allow_diverged else 0


def main(argv=None):
    from dsd_caffe.evaluate import CAFFE_TEST_ITERATIONS  # deferred: heavy (numpy); loaded for the parser only

    p = cli.parser(__doc__)
    p.add_argument("--model", required=True, help="trainval/test prototxt (its TEST phase is used)")
    p.add_argument("--weights", required=True, help="caffemodel")
    p.add_argument("--iterations", type=int, default=CAFFE_TEST_ITERATIONS,
                   help="forward passes, as caffe test's --iterations")
    p.add_argument("--test-source", help="TEST LMDB instead of the trainval's (e.g. the test split; default: the "
                   "trainval's)")
    flags.add_device(p, engine=False, several=False)
    cli.add_output(p, "folder for confusion.csv, per_class.csv and confusion.png (default: none written)",
                   required=False)
    cli.add_deprecated(p, "--confusion", "--output", "output")
    p.add_argument("--class-names", help="text file with one class name per line, for --output (default: the "
                   "classes in the TEST LMDB's JSON, else the class numbers)")
    p.add_argument("--allow-missing", action="store_true",
                   help="accept a caffemodel that leaves some learnable layers at their initial values")
    p.add_argument("--allow-diverged", action="store_true",
                   help="exit 0 also for a diverged model (a loss or output that is not finite; else exit 3)")
    p.add_argument("--force", action="store_true", help="replace existing --output files")
    cli.main(p, run, argv)
