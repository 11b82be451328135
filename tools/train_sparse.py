"""Run DSD's sparse phase in a folder written by tools/prune.py.

The code and the full --help are in dsd_caffe/commands/train_sparse.py (installed as dsd-train-sparse)."""
from dsd_caffe.cli import catch_early_interrupts; catch_early_interrupts()  # Ctrl-C while loading
from dsd_caffe.commands.train_sparse import main

if __name__ == "__main__":
    main()
