"""Print the Caffe in use and how it was built (BLAS, threads, layers, libraries, CPU or GPU, patches); also
`python -m dsd_caffe.info`.

The code and the full --help are in dsd_caffe/commands/info.py (installed as dsd-info)."""
from dsd_caffe.cli import catch_early_interrupts; catch_early_interrupts()  # Ctrl-C while loading
from dsd_caffe.commands.info import main

if __name__ == "__main__":
    main()
