"""Build a Caffe LMDB of Datums from an image folder (one sub-folder per class; labels follow the sorted class
names) or a Caffe list file (`relative/path label` per line), like convert_imageset but in parallel.

    make_lmdb.py SOURCE --output LMDB [--resize 256x256] [--shuffle] [--encoded] [--mean-file MEAN]

Images are resized (default 256x256), stored grey or colour (BGR), raw or encoded. Files that fail to decode are
skipped and listed. A JSON beside the LMDB records the classes, counts, mean values and skipped files; --mean-file
also writes a binaryproto mean like compute_image_mean. The LMDB appears under its name only when complete.
"""
from dsd_caffe import cli, imagedb


def size(text):
    if text.lower() in ("0", "none", "no"):
        return None
    h, _, w = text.lower().partition("x")
    return (int(h), int(w or h))


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("source", help="image folder with one sub-folder per class, or a list file")
    cli.add_output(p, "LMDB folder to create", legacy_positional=True)
    p.add_argument("--root", help="folder the list file's paths are relative to (default: the list file's folder)")
    p.add_argument("--resize", type=size, default="256x256", metavar="HxW",
                   help="resize every image to HEIGHTxWIDTH; 0 keeps each image's own size")
    p.add_argument("--shuffle", action="store_true", help="shuffle the images (with --seed)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed")
    p.add_argument("--gray", action="store_true", help="store one grey channel instead of BGR")
    p.add_argument("--encoded", action="store_true",
                   help="store encoded images, in each file's own format unless --encode-type says otherwise")
    p.add_argument("--encode-type", choices=["png", "jpg", "bmp"], help="encode as this format (implies --encoded)")
    p.add_argument("--workers", type=int, help="decoding threads (default: all cores)")
    p.add_argument("--mean-file", help="also write the per-pixel mean as a binaryproto here")
    p.add_argument("--force", action="store_true", help="replace an existing LMDB (never a folder of other data)")

    def run(a):
        stats = imagedb.make_lmdb(a.source, a.output, root=a.root, resize=a.resize, shuffle=a.shuffle, seed=a.seed,
                                  gray=a.gray, encoded=a.encode_type or a.encoded, workers=a.workers,
                                  mean_file=a.mean_file, force=a.force)
        print(f"{stats['path']}: {stats['count']} images, {len(stats['skipped'])} skipped, "
              f"mean values {stats['mean_values']}")
        for s in stats["skipped"]:
            print(f"  skipped {s['path']}: {s['error']}")

    cli.main(p, run, argv)

