"""Write the generated prototxts: SqueezeNet v1.0 trainval and deploy in Han's (DSD release) and DeepScale's
namings under models/squeezenet_v1.0/, the small Fashion-MNIST SqueezeNet under models/small_squeezenet/, and
dense / sparse / re-dense solvers under solvers/<net>/. Paths inside are relative to each file's folder: run
`caffe train` from the solver's folder. Unchanged files are left alone; changed ones need --force."""
import os

from dsd_caffe import cli, netgen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args):
    result = netgen.generate(args.output, force=args.force, small=not args.no_small)
    for rel, state in result.items():
        print(f"{state:9s} {os.path.join(args.output, rel)}")


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("-o", "--output", default=ROOT, help="root folder to write models/ and solvers/ into "
                   "(default: this repository)")
    p.add_argument("--force", action="store_true", help="overwrite files whose content differs")
    p.add_argument("--no-small", action="store_true", help="skip the small Fashion-MNIST net and its solvers")
    cli.main(p, run, argv)


if __name__ == "__main__":
    main()
