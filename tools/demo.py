"""The one-command DSD demo on Fashion-MNIST (`make demo`): dense training, prune 3x, sparse retraining, dense
retraining, and DSD's control (the dense model trained on for as long), all with real Caffe.

The code and the full --help are in dsd_caffe/commands/demo.py (installed as dsd-demo)."""
from dsd_caffe.cli import catch_early_interrupts; catch_early_interrupts()  # Ctrl-C while loading
from dsd_caffe.commands.demo import main

if __name__ == "__main__":
    main()
