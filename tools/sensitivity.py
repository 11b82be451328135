"""Per-layer pruning sensitivity (how Han et al. choose per-layer densities).

The code and the full --help are in dsd_caffe/commands/sensitivity.py (installed as dsd-sensitivity)."""
from dsd_caffe.cli import catch_early_interrupts; catch_early_interrupts()  # Ctrl-C while loading
from dsd_caffe.commands.sensitivity import main

if __name__ == "__main__":
    main()
