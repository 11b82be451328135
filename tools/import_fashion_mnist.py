"""Import Fashion-MNIST from Debian's dataset-fashion-mnist (IDX files) into train, val and test LMDBs of 1x28x28 raw
Datums. The val split is carved out of the 60k training images with a fixed seed; tune on val, and keep the test
set for final numbers.

The code and the full --help are in dsd_caffe/commands/import_fashion_mnist.py
(installed as dsd-import-fashion-mnist)."""
from dsd_caffe.cli import catch_early_interrupts; catch_early_interrupts()  # Ctrl-C while loading
from dsd_caffe.commands.import_fashion_mnist import main

if __name__ == "__main__":
    main()
