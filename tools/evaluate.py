"""Evaluate a trained net like `caffe test`, in pycaffe: the same summary lines (Loss, accuracy_top1, ..., loss with
its weight) with the same values to the last printed digit on the same LMDB and weights.

The code and the full --help are in dsd_caffe/commands/evaluate.py (installed as dsd-evaluate)."""
from dsd_caffe.cli import catch_early_interrupts; catch_early_interrupts()  # Ctrl-C while loading
from dsd_caffe.commands.evaluate import main

if __name__ == "__main__":
    main()
