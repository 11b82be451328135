"""Encode a sparse caffemodel in Deep Compression's `.net` format: a k-means codebook per layer (linear
initialisation; 8 bits for convolutions, 4 for InnerProduct, index 0 = zero), 4-bit relative indices with filler
entries for long gaps. Layers that already hold few enough distinct values are stored losslessly. With
`--format huffman`, writes dsd-caffe's entropy-coded variant instead (Huffman over codes and gaps; `--bits` may
then change the codebook width). Prints bytes per layer, the total and the ratio to the caffemodel."""
from dsd_caffe import cli, deepcompression
from dsd_caffe.commands import flags


def run(a):
    result = deepcompression.compress(a.model, a.weights, a.output, format=a.format, bits=a.bits, force=a.force)
    print(deepcompression.format_report(result), flush=True)
    return 0


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--model", required=True, help="deploy prototxt (with an Input layer)")
    p.add_argument("--weights", required=True, help="the sparse caffemodel to encode")
    flags.add_file_output(p, "the .net file to write")
    p.add_argument("--format", choices=deepcompression.FORMATS, default="net",
                   help="net: Deep Compression's format (default); huffman: dsd-caffe's entropy-coded variant")
    p.add_argument("--bits", type=int, default=None,
                   help="codebook width for every layer (huffman format only; default 8 conv / 4 fc)")
    cli.main(p, run, argv)

