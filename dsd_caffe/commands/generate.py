"""Write the generated prototxts: SqueezeNet v1.0 trainval, deploy and sparse trainval (with the mask layer) in
Han's (DSD release) and DeepScale's namings under models/squeezenet_v1.0/, the small Fashion-MNIST SqueezeNet
under models/small_squeezenet/, and dense / sparse / redense solvers under solvers/<net>/ from solvers.DEFAULTS.
Paths inside are relative to each file's folder: run `caffe train` from the solver's folder. Unchanged files are
left alone; changed ones need --force."""
import os

from dsd_caffe import cli


def run(args):
    from dsd_caffe import repogen

    result = repogen.generate(args.output, force=args.force, small=not args.no_small)
    for rel, state in result.items():
        print(f"{state:9s} {os.path.join(args.output, rel)}")


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--output", "-o", default=".", help="root folder to write models/ and solvers/ into (the "
                   "repository's root for the committed files)")
    p.add_argument("--force", action="store_true", help="overwrite files whose content differs")
    p.add_argument("--no-small", action="store_true", help="skip the small Fashion-MNIST net and its solvers")
    cli.main(p, run, argv)
