"""Export a caffemodel and its prototxt to one ONNX file, checked against pycaffe with ONNX Runtime.

The code and the full --help are in dsd_caffe/commands/export_onnx.py (installed as dsd-export-onnx)."""
from dsd_caffe.commands.export_onnx import main

if __name__ == "__main__":
    main()
