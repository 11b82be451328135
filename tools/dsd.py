"""Dense-Sparse-Dense from a dense caffemodel: prune -> sparse phase -> redense phase, --cycles N times, and with
--control the equal-length dense control beside it; --seeds N repeats the pair over seeds and says whether DSD
helped.

The code and the full --help are in dsd_caffe/commands/dsd.py (installed as dsd-run)."""
from dsd_caffe.cli import catch_early_interrupts; catch_early_interrupts()  # Ctrl-C while loading
from dsd_caffe.commands.dsd import main

if __name__ == "__main__":
    main()
