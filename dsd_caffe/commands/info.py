"""Print the Caffe in use and how it was built: version, BLAS and the kernel it runs, threads, Python layer, OpenCV,
LMDB, HDF5, CPU or GPU, numpy, the paths and the patches applied to Caffe's source, each with its reason. For users
and bug reports: ``dsd-info [--json]`` (or ``python -m dsd_caffe.info``)."""
import json

from dsd_caffe import cli
from dsd_caffe.errors import UserError


def run(a):
    from dsd_caffe import info  # reads pycaffe: loaded once the flags are parsed

    try:
        d = info.collect()
    except ImportError as e:  # no numpy or protobuf beside pycaffe: say which, in one line
        raise UserError(str(e)) from e
    print(json.dumps(d, indent=1, default=str) if a.json else info.format_text(d))


def main(argv=None):
    p = cli.parser(__doc__, prog=cli.prog("dsd_caffe.info"))
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    cli.main(p, run, argv)
