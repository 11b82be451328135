"""Run DSD's redense phase: release the masks and retrain the whole net at a low learning rate.

The code and the full --help are in dsd_caffe/commands/retrain_dense.py (installed as dsd-retrain-dense)."""
from dsd_caffe.cli import catch_early_interrupts; catch_early_interrupts()  # Ctrl-C while loading
from dsd_caffe.commands.retrain_dense import main

if __name__ == "__main__":
    main()
