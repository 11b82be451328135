"""Encode a sparse caffemodel in Deep Compression's `.net` format: a k-means codebook per layer (linear
initialisation; 8 bits for convolutions, 4 for InnerProduct, index 0 = zero), 4-bit relative indices with filler
entries for long gaps.

The code and the full --help are in dsd_caffe/commands/compress.py (installed as dsd-compress)."""
from dsd_caffe.cli import catch_early_interrupts; catch_early_interrupts()  # Ctrl-C while loading
from dsd_caffe.commands.compress import main

if __name__ == "__main__":
    main()
