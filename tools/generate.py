"""Write the generated prototxts: SqueezeNet v1.0 trainval, deploy and sparse trainval (with the mask layer) in Han's
(DSD release) and DeepScale's namings under models/squeezenet_v1.0/, the small Fashion-MNIST SqueezeNet under
models/small_squeezenet/, and dense / sparse / redense solvers under solvers/<net>/ from solvers.DEFAULTS.

The code and the full --help are in dsd_caffe/commands/generate.py (installed as dsd-generate)."""
from dsd_caffe.cli import catch_early_interrupts; catch_early_interrupts()  # Ctrl-C while loading
from dsd_caffe.commands.generate import main

if __name__ == "__main__":
    main()
