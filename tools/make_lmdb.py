"""Build a Caffe LMDB of Datums from an image folder (one sub-folder per class; labels follow the sorted class names)
or a Caffe list file (`relative/path label` per line), like convert_imageset but in parallel.

The code and the full --help are in dsd_caffe/commands/make_lmdb.py (installed as dsd-make-lmdb)."""
from dsd_caffe.cli import catch_early_interrupts; catch_early_interrupts()  # Ctrl-C while loading
from dsd_caffe.commands.make_lmdb import main

if __name__ == "__main__":
    main()
