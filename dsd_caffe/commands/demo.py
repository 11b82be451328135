"""The one-command DSD demo on Fashion-MNIST (`make demo`): dense training, prune 3x, sparse retraining, dense
retraining, and DSD's control (the dense model trained on for as long), all with real Caffe. Prints the table
(dense, sparse, DSD, control: test top-1, top-5, density) and writes accuracy.png and weights_histogram.png into the
output folder. Re-running reuses every finished step (and resumes an interrupted one)."""
import os

from dsd_caffe import cli
from dsd_caffe.commands import flags


def run(a):
    from dsd_caffe import demo, phases, pipeline  # deferred: heavy (numpy, Caffe's messages); --help needs none

    knobs = {k: v for k, v in (("width", a.width), ("profile", a.profile)) if v is not None}
    res = demo.run_demo(a.output, seed=a.seed, scale=0.1 if a.quick else a.scale, engine=a.engine, force=a.force,
                        gpu=flags.device(a), **knobs)
    print(res["table"])
    paths = (os.path.join(a.output, name) for name in (pipeline.PLOT, phases.HISTOGRAM, demo.RESULTS))
    print("plots: {}, {}; numbers: {}".format(*paths))


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--output", "-o", default="runs/demo", help="output folder")
    p.add_argument("--seed", type=int, default=flags.seed_default(), help="seed of the initial weights and dropout")
    length = p.add_mutually_exclusive_group()  # --quick is a scale: both at once, one would be ignored
    length.add_argument("--scale", type=float, default=1.0, help="multiply every phase's iteration count")
    length.add_argument("--quick", action="store_true", help="a short run: --scale 0.1")
    flags.add_device(p)
    p.add_argument("--width", type=float, help="width multiplier of the small net (default: 1)")
    p.add_argument("--profile", help="pruning profile: uniform, global or a JSON file of densities (default: "
                   "uniform)")
    p.add_argument("--force", action="store_true", help="start over in a folder holding another run")
    cli.main(p, run, argv)
