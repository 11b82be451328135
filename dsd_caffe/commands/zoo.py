"""List, fetch and verify the released SqueezeNet models (git blob id checked)."""
from dsd_caffe import cli, zoo


def parser():
    """The command line's ArgumentParser (``python -m dsd_caffe.zoo``)."""
    p = cli.parser(__doc__, prog=cli.prog("dsd_caffe.zoo"))
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    sub.add_parser("list", help="list the known models, their files, checksums and URLs")
    f = sub.add_parser("fetch", help="download (or copy --from-file) and verify")
    f.add_argument("name", choices=sorted(zoo.ZOO), help="the model to fetch")
    cli.add_output(f, "file or folder to write the verified model to (a folder gets the release's file name)",
                   legacy_positional=True)
    f.add_argument("--from-file", "--url", dest="url", help="local file, file:// or http(s) URL to use instead "
                   "of the release URL")
    f.add_argument("--force", action="store_true", help="replace a file at --output that does not verify")
    v = sub.add_parser("verify", help="check a local file against the recorded git blob id")
    v.add_argument("name", choices=sorted(zoo.ZOO), help="the model the file should be")
    v.add_argument("path", help="the local file to check")
    return p


def _run(a):
    if a.cmd == "list":
        for m in zoo.ZOO.values():
            check = m.blob_id or (f"sha256:{m.sha256}" if m.sha256 else f"sha1:{m.sha1}")
            print(f"{m.name:30s} {m.filename:60s} {check}")
            print(f"{'':30s} {m.url}")
    elif a.cmd == "fetch":
        print(zoo.fetch(a.name, a.output, url=a.url, force=a.force))
    else:
        zoo.verify(a.path, a.name)
        print(f"{a.path}: OK ({a.name})")


def main(argv=None):
    cli.main(parser(), _run, argv)
