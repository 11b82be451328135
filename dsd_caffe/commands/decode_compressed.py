"""Decode a Deep Compression `.net` file (or dsd-caffe's Huffman variant) with its deploy prototxt into a
caffemodel, plus the provenance JSON beside it. Weighted layers are chosen by type (Convolution: 8-bit codes,
InnerProduct: 4-bit); a truncated or oversized file is refused, naming the layer and the byte counts.

The `.net` format has no checksum: a file damaged without changing its length decodes to wrong weights without
any error. Verify a downloaded .net by its git blob id (python -m dsd_caffe.zoo verify), or keep models in
dsd-caffe's Huffman variant (tools/compress.py --format huffman), which ends with a CRC-32 checked on decoding."""
from dsd_caffe import cli, deepcompression
from dsd_caffe.commands import flags


def run(a):
    out = deepcompression.decode_to_caffemodel(a.net, a.model, a.output, force=a.force)
    print(f"wrote {out}", flush=True)
    return 0


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--model", required=True, help="deploy prototxt (with an Input layer) of the compressed net")
    p.add_argument("--net", required=True, help="the compressed .net file")
    flags.add_file_output(p, "caffemodel to write")
    cli.main(p, run, argv)

