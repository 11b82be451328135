"""Import Fashion-MNIST from Debian's dataset-fashion-mnist (IDX files) into train, val and test LMDBs of 1x28x28
raw Datums. The val split is carved out of the 60k training images with a fixed seed; tune on val, and keep the
test set for final numbers.

    import_fashion_mnist.py --output DIR [--val-size 5000] [--seed 0]

The three LMDBs appear together when complete. A complete import from the same settings is reused; one from
other settings is replaced only with --force.
"""
from dsd_caffe import cli, fashion_mnist, lmdbio


def main(argv=None):
    p = cli.parser(__doc__)
    cli.add_output(p, "folder for train_lmdb, val_lmdb and test_lmdb (each with a JSON beside it)",
                   legacy_positional=True)
    p.add_argument("--val-size", type=int, default=5000, help="images carved from train for val")
    p.add_argument("--seed", type=int, default=0, help="seed of the val split")
    p.add_argument("--source-dir", default=fashion_mnist.FASHION_MNIST_DIR, help="folder of the *-ubyte.gz IDX files")
    p.add_argument("--force", action="store_true", help="replace an import made with other settings")

    def run(a):
        paths = fashion_mnist.import_fashion_mnist(a.output, val_size=a.val_size, seed=a.seed, force=a.force,
                                                   source_dir=a.source_dir)
        for split, path in paths.items():
            print(f"{split}: {path} ({lmdbio.lmdb_info(path)['count']} images)")

    cli.main(p, run, argv)

