"""Import Fashion-MNIST from Debian's dataset-fashion-mnist (IDX files) into train, val and test LMDBs of 1x28x28
raw Datums. The val split is carved out of the 60k training images with a fixed seed; tune on val, and keep the
test set for final numbers. LMDBs already present from the same settings are reused unless --force.
"""
from dsd_caffe import cli, fashion_mnist, lmdbio


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("output_dir", help="folder for train_lmdb, val_lmdb and test_lmdb")
    p.add_argument("--val-size", type=int, default=5000, help="images carved from train for val (default 5000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the val split (default 0)")
    p.add_argument("--source-dir", default=fashion_mnist.FASHION_MNIST_DIR, help="folder of the *-ubyte.gz IDX files")
    p.add_argument("--force", action="store_true", help="rebuild LMDBs that already exist")

    def run(a):
        paths = fashion_mnist.import_fashion_mnist(a.output_dir, val_size=a.val_size, seed=a.seed, force=a.force,
                                          source_dir=a.source_dir)
        for split, path in paths.items():
            print(f"{split}: {path} ({lmdbio.lmdb_info(path)['count']} images)")

    cli.main(p, run, argv)


if __name__ == "__main__":
    main()
