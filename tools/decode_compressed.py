"""Decode a Deep Compression `.net` file (or dsd-caffe's Huffman variant) with its deploy prototxt into a caffemodel,
plus the provenance JSON beside it.

The code and the full --help are in dsd_caffe/commands/decode_compressed.py (installed as dsd-decode-compressed)."""
from dsd_caffe.cli import catch_early_interrupts; catch_early_interrupts()  # Ctrl-C while loading
from dsd_caffe.commands.decode_compressed import main

if __name__ == "__main__":
    main()
