"""Export a caffemodel and its prototxt to one ONNX file, with the JSON record beside it (OUTPUT.json).

The prototxt is a deploy net (an Input layer or the legacy input:/input_dim: header) or a trainval: its TEST
phase is taken, its data layers become the graph's input with the crop's shape, and loss, accuracy and Dropout go.
A pruned or sparse-phase caffemodel (under the mask layer) is exported with its masks applied, as its release:
every pruned weight must already be exactly 0.0. The graph keeps the weights' exact zeros and carries the class
count, the preprocessing (mean, scale, channel order) and the per-layer density as metadata_props.

Exported layer types: Convolution, InnerProduct, Pooling (MAX, AVE, global), ReLU, PReLU, Sigmoid, TanH, LRN,
Softmax, Concat, Eltwise, BatchNorm, Scale, Flatten, Reshape, Dropout, Split, Input; any other is refused.

Unless --no-check, the export is checked before anything is written: onnx.checker (full check), then a seeded
batch through pycaffe and ONNX Runtime (CPU); it prints the max absolute and relative differences and the top-5
agreement, and refuses past a tolerance of 1e-4 of each output's largest value."""
from dsd_caffe import cli, onnxexport
from dsd_caffe.commands import flags


def run(a):
    result = onnxexport.export(a.model, a.weights, a.output, opset=a.opset, force=a.force, check=a.check)
    print(onnxexport.format_result(result), flush=True)
    return 0


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--model", required=True, help="deploy or trainval prototxt")
    p.add_argument("--weights", required=True, help="the caffemodel to export")
    flags.add_file_output(p, "the .onnx file to write")
    p.add_argument("--opset", type=int, default=onnxexport.DEFAULT_OPSET,
                   help=f"ONNX opset ({onnxexport.MIN_OPSET} or newer)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the parity check against pycaffe with ONNX Runtime (default: it runs)")
    cli.main(p, run, argv)
