"""Per-layer pruning sensitivity (how Han et al. choose per-layer densities).

Prunes one layer at a time, by magnitude, at each --densities value, evaluates the net on the TEST LMDB for a
fixed number of batches (the same batches every time), and writes sensitivity.csv (layer, density, accuracy and
every net output; the first row is the unpruned net) and sensitivity.png into --output.
"""
from dsd_caffe import cli, phases


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--model", required=True, help="trainval prototxt (its TEST Data layer is used)")
    p.add_argument("--weights", required=True, help="caffemodel")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--densities", default=",".join(str(d) for d in phases.DEFAULT_SENSITIVITY_DENSITIES),
                   help="comma-separated densities kept (default %(default)s)")
    p.add_argument("--layers", help="comma-separated layer names (default: every Convolution/InnerProduct)")
    p.add_argument("--iterations", type=int, default=10, help="TEST batches per evaluation")
    p.add_argument("--test-source", help="validation LMDB (default: the trainval's TEST source)")
    p.add_argument("--gpu", type=int)
    p.add_argument("--force", action="store_true")

    def run(a):
        try:
            dens = [float(x) for x in a.densities.split(",")]
        except ValueError:
            raise ValueError(f"--densities must be comma-separated numbers, got {a.densities!r}") from None
        rows = phases.sensitivity(a.model, a.weights, a.output, densities=dens,
                                  layers=a.layers.split(",") if a.layers else None, iterations=a.iterations,
                                  test_source=a.test_source, force=a.force, gpu=a.gpu)
        for r in rows:
            print(f"{r['layer']:<24} {r['density']:.2f} {r['accuracy']}")

    cli.main(p, run, argv)


if __name__ == "__main__":
    main()
