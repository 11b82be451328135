"""List, fetch and verify the released SqueezeNet models (git blob id checked); also `python -m dsd_caffe.zoo`.

The code and the full --help are in dsd_caffe/commands/zoo.py (installed as dsd-zoo)."""
from dsd_caffe.cli import catch_early_interrupts; catch_early_interrupts()  # Ctrl-C while loading
from dsd_caffe.commands.zoo import main

if __name__ == "__main__":
    main()
