"""Prune a dense Caffe model by weight magnitude for DSD's sparse phase.

The code and the full --help are in dsd_caffe/commands/prune.py (installed as dsd-prune)."""
from dsd_caffe.cli import catch_early_interrupts; catch_early_interrupts()  # Ctrl-C while loading
from dsd_caffe.commands.prune import main

if __name__ == "__main__":
    main()
