"""Facts about Caffe's layers and the SqueezeNet namings that the toolkit relies on, stated once.

Every other module reads them from here: which layer types carry the weights DSD prunes, which read data, which
parameter message names a layer's source, and how Han's SqueezeNet names map to DeepScale's. Pure Python (no
Caffe import), so ``pruning`` can use it on a machine without Caffe.
"""

#: Layer types whose first blob is a weight that DSD prunes and masks (Caffe's V1 enums CONVOLUTION=4,
#: INNER_PRODUCT=14, DECONVOLUTION=39 in ``V1_WEIGHTED``). Deconvolution belongs: its weight blob is pruned and
#: masked like a convolution's (the mask layer multiplies any blob element-wise).
WEIGHTED = ("Convolution", "InnerProduct", "Deconvolution")
V1_WEIGHTED = (4, 14, 39)

#: Layer types that read data from outside the net (files, or memory the caller feeds), and their V1 enums
#: (DATA=5, IMAGE_DATA=12, HDF5_DATA=9, WINDOW_DATA=24, MEMORY_DATA=29). A net with one cannot be built for its
#: shapes without that data.
DATA_TYPES = ("Data", "ImageData", "HDF5Data", "WindowData", "MemoryData", "AnnotatedData", "VideoData")
V1_DATA_TYPES = (5, 12, 9, 24, 29)
#: Layer types that feed a net without reading anything outside it: made-up data, or a Python layer with no
#: bottom. With ``DATA_TYPES`` they are the layers a net's data can come from (a deploy net has neither).
GENERATED_DATA_TYPES = ("DummyData", "Python")

#: layer type -> name of its parameter message, for the layers that read a source file
SOURCE_PARAMS = {"Data": "data_param", "ImageData": "image_data_param", "HDF5Data": "hdf5_data_param",
                 "WindowData": "window_data_param"}

#: The two SqueezeNet v1.0 namings: Han's (the DSD release) and DeepScale's (the original release).
NAMINGS = ("han", "deepscale")
#: Names of the parts of a fire module and of the net's head, per naming.
SQUEEZENET_NAMES = {
    "han": {"squeeze": "conv1x1_1", "expand1x1": "conv1x1_2", "expand3x3": "conv3x3_2",
            "final": "conv_final", "pool_final": "pool_final"},
    "deepscale": {"squeeze": "squeeze1x1", "expand1x1": "expand1x1", "expand3x3": "expand3x3",
                  "final": "conv10", "pool_final": "pool10"},
}
_FIRE_PARTS = ("squeeze", "expand1x1", "expand3x3")


def _convert(name, src, dst):
    a, b = SQUEEZENET_NAMES[src], SQUEEZENET_NAMES[dst]
    if name == a["final"]:
        return b["final"]
    head, sep, tail = name.rpartition("/")
    for part in _FIRE_PARTS:
        if sep and tail == a[part]:
            return f"{head}/{b[part]}"
    return name


def han_name(name):
    """DeepScale SqueezeNet layer name -> Han's (``fire2/squeeze1x1`` -> ``fire2/conv1x1_1``, ``conv10`` ->
    ``conv_final``). Other names are returned unchanged."""
    return _convert(name, "deepscale", "han")


def deepscale_name(name):
    """Han's SqueezeNet layer name -> DeepScale's (the inverse of :func:`han_name`)."""
    return _convert(name, "han", "deepscale")


def is_weighted(layer_type):
    """True for a layer type (a name, or a V1 enum) whose weights DSD prunes."""
    return layer_type in WEIGHTED or layer_type in V1_WEIGHTED
