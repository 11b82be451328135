"""Export a Caffe net and its caffemodel to ONNX, checked number for number against pycaffe with ONNX Runtime.
(One module past 400 lines: the layer converters are one table, each converter a few lines beside the Caffe rule
it follows, so that a layer type is added or corrected in one place.)

What goes in and what comes out (:func:`export`):

- **The net**: a deploy prototxt (an ``Input`` layer, or the legacy ``input:``/``input_dim:`` header) or a trainval.
  A trainval's TEST phase is taken; its data layers become the graph's input with the crop's shape (the LMDB's
  when it is on this machine, else the crop and one mean value per channel); loss, accuracy and every layer
  reading the label go, a Softmax ``prob`` is added on the prediction (``netgen.deploy``, as every deploy net here).
  The mask layer is TRAIN-only and goes with the phase. Dropout is the identity at test time (Caffe's
  ``DropoutLayer::Forward_cpu`` copies in TEST) and so is Split: both become aliases, no node.
- **A model still under a mask layer** (a pruned or sparse-phase caffemodel) is exported **with its masks
  applied**, which is the model's release (``masks.release_masks``): every pruned weight must already be exactly
  0.0, else it is refused; the graph then computes what ``caffe test`` computes.
- **The graph**: one node (or two) per Caffe layer, a symbolic batch dimension ``N``, Caffe's blob names as tensor
  names where they are unique (an in-place layer's output gets ``<blob>/<layer>``; graph outputs keep the blob
  name), initializers ``<layer>/weights``, ``<layer>/bias``, ... holding the caffemodel's float32 values as they
  are (so the exact zeros of a sparse model are there, counted per initializer in the JSON record), and
  ``metadata_props``: ``classes``, ``preprocessing`` (JSON: mean, scale, channel order, crop, when the prototxt
  says), ``density`` (JSON: per weighted layer), ``source``.
- **Layer coverage, exact or refused** (:data:`CONVERTERS`): anything else is refused with one line naming the
  layer and its type. A layer that works across the batch axis (axis 0) is refused too: the graph's batch is free.
- **The check** (:func:`check_parity`, on by default): ``onnx.checker.check_model(full_check=True)``, then the same
  seeded batch through pycaffe and ONNX Runtime's CPU provider; max absolute and relative difference of every
  output and top-5 agreement; past :data:`TOLERANCE` the export is refused and nothing is written.

Everything is checked and built in memory before anything is written; the ``.onnx`` file and its JSON record are
then written atomically (``fileio.atomic_path``), the record inside the model's write, so a full disk leaves
neither.
"""
import json
import logging
import os

import numpy as np

from . import __version__, fileio, masks, netcheck, netgen, sources
from .caffe_env import make_net
from .errors import UserError

log = logging.getLogger(__name__)

#: default and lowest opset: 13 is the first whose Softmax works on one axis, as Caffe's does
DEFAULT_OPSET = 17
MIN_OPSET = 13
#: the parity check refuses when max |onnx - caffe| exceeds this times max |caffe| (per output)
TOLERANCE = 1e-4
#: the parity check's batch (2: the graph must work at a batch other than the prototxt's) and its input seed
CHECK_BATCH = 2
CHECK_SEED = 0
#: the name of the graph's free batch dimension
BATCH = "N"


# ------------------------------------------------------------------------------------------------ the net
def _keep(net_param, layers):
    out = sources.copy_message(net_param)
    del out.layer[:]
    out.layer.extend(layers)
    return out


def deploy_param(net_param, input_shape=None):
    """The TEST-phase deploy form of a deploy prototxt or a trainval (see the module doc) as a NetParameter."""
    if len(net_param.layers):
        raise UserError("the prototxt uses Caffe's old V1 'layers' format; upgrade it with Caffe's "
                        "upgrade_net_proto_text first")
    test = _keep(net_param, netcheck.included_layers(net_param, "TEST"))
    if not any(l.type in netcheck.DATA_TYPES and not l.bottom for l in test.layer):
        return test
    if input_shape is None:
        input_shape = netcheck.input_shape(test)  # the LMDB's first record and the crop, when it is here
    try:
        return netgen.deploy(test, input_shape=input_shape)
    except UserError as e:  # no LMDB here, no crop_size or no mean per channel: the input's shape is unknown
        raise UserError(f"{e}, or export the net's deploy prototxt (with an Input layer) instead") from e


def _is_under_masks(model_param):
    return masks.mask_layer_spec(model_param) is not None


# ------------------------------------------------------------------------------------------------ the graph
class _Graph:
    """What the converters write into: nodes, initializers, and where each Caffe blob is now."""

    def __init__(self, net, weights):
        self.net, self.weights = net, weights
        self.nodes, self.inits, self.zeros = [], [], {}
        self.tensor = {b: b for b in net.inputs}  # Caffe blob -> the ONNX tensor holding its current value
        self.used = set(net.inputs)

    def shape(self, blob):
        return tuple(self.net.blobs[blob].data.shape)

    def x(self, layer, i=0):
        return self.tensor[layer.bottom[i]]

    def blobs(self, layer):
        """The layer's parameter blobs from the caffemodel, float32, in the net's shapes."""
        return [np.asarray(a, np.float32).reshape(p.data.shape)
                for a, p in zip(self.weights[layer.name], self.net.params[layer.name])]

    def weight(self, layer, what, array):
        """An initializer holding the caffemodel's values as they are (its zeros are counted)."""
        name = self._fresh(f"{layer.name}/{what}")
        self.inits.append((name, np.ascontiguousarray(array, np.float32)))
        self.zeros[name] = int(array.size - np.count_nonzero(array))
        return name

    def const(self, layer, what, array):
        """An initializer derived by a Caffe rule (shapes, factors), not a caffemodel blob."""
        name = self._fresh(f"{layer.name}/{what}")
        self.inits.append((name, np.ascontiguousarray(array)))
        return name

    def emit(self, op, inputs, layer, top=0, **attrs):
        """A node computing ``layer.top[top]`` (or an intermediate when ``top`` is None); returns its output."""
        from onnx import helper  # deferred: heavy and optional (ONNX export only)

        blob = layer.top[top] if top is not None else f"{layer.name}/{op}"
        out = self._fresh(blob if blob not in self.used else f"{blob}/{layer.name}")
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=self._fresh(f"{layer.name}/{op}"), **attrs))
        if top is not None:
            self.tensor[blob] = out
        return out

    def alias(self, layer, top, tensor):
        self.tensor[layer.top[top]] = tensor

    def _fresh(self, name):
        base, i = name, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name


def _refuse(layer, why):
    raise UserError(f"layer {layer.name!r} (type {layer.type}) cannot be exported to ONNX: {why}")


def _axis(layer, axis, ndim):
    """Caffe's CanonicalAxisIndex (negative axes count from the end); axis 0, the batch, is refused."""
    if not -ndim <= axis < ndim:
        _refuse(layer, f"axis {axis} is outside its {ndim}-D input")
    axis = axis % ndim
    if axis == 0:
        _refuse(layer, "it works across the batch axis (axis 0), and the exported graph's batch is free")
    return axis


def _hw(layer, repeated, h, w, has_hw, default, what):
    """(h, w) of a conv setting: the _h/_w fields when set, else the repeated field (one value for both)."""
    if has_hw:
        return [int(h), int(w)]
    values = list(repeated)
    if len(values) > 2:
        _refuse(layer, f"{len(values)}-D {what}: only 2-D is exported")
    return [int(v) for v in (values * 2 if len(values) == 1 else values or [default, default])]


# ------------------------------------------------------------------------------------------------ converters
def _input(g, l):
    """Input layers are the graph's inputs (net.inputs)."""


def _alias(g, l):
    """Dropout (Caffe copies in TEST) and Split: every top is the bottom."""
    for i in range(len(l.top)):
        g.alias(l, i, g.x(l))


def _convolution(g, l):
    p = l.convolution_param
    if p.axis != 1:
        _refuse(l, f"convolution axis {p.axis}: only the channel axis 1 is exported")
    if len(g.shape(l.bottom[0])) != 4:
        _refuse(l, "only 2-D convolutions (4-D blobs) are exported")
    kernel = _hw(l, p.kernel_size, p.kernel_h, p.kernel_w, p.HasField("kernel_h"), 0, "kernel")
    stride = _hw(l, p.stride, p.stride_h, p.stride_w, p.HasField("stride_h"), 1, "stride")
    pad = _hw(l, p.pad, p.pad_h, p.pad_w, p.HasField("pad_h"), 0, "pad")
    dilation = _hw(l, p.dilation, 0, 0, False, 1, "dilation")
    blobs = g.blobs(l)
    inputs = [g.x(l), g.weight(l, "weights", blobs[0])] + ([g.weight(l, "bias", blobs[1])] if p.bias_term else [])
    # Caffe's output size floor((H + 2 pad - dilation (k - 1) - 1) / stride) + 1 is ONNX's with explicit pads
    g.emit("Conv", inputs, l, kernel_shape=kernel, strides=stride, pads=pad + pad, dilations=dilation, group=p.group)


def _inner_product(g, l):
    p = l.inner_product_param
    shape = g.shape(l.bottom[0])
    axis = _axis(l, p.axis, len(shape))
    blobs = g.blobs(l)
    # Caffe flattens the axes from `axis` on: (M, K) x W^T, with W stored (num_output, K), or (K, num_output)
    # with transpose: true
    flat = g.x(l) if len(shape) == 2 else g.emit("Flatten", [g.x(l)], l, None, axis=axis)
    inputs = [flat, g.weight(l, "weights", blobs[0])] + ([g.weight(l, "bias", blobs[1])] if p.bias_term else [])
    if axis == 1:
        g.emit("Gemm", inputs, l, transB=0 if p.transpose else 1)
        return
    out = g.emit("Gemm", inputs, l, None, transB=0 if p.transpose else 1)
    g.emit("Reshape", [out, _target_shape(g, l)], l)  # back to the axes before `axis`, then num_output


def _target_shape(g, l):
    """The top's shape with the batch left free: -1, then Caffe's per-sample dimensions."""
    return g.const(l, "shape", np.array((-1,) + g.shape(l.top[0])[1:], np.int64))


def _pool_pads(l, size, k, pad, stride, out):
    """(end pad, Caffe's AVE divisor per output index) along one axis of a Pooling layer whose Caffe output size is
    ``out`` (ceil rounding, and with pad > 0 the clip "the last window must start inside the input")."""
    if (out - 1) * stride - pad >= size:
        # no pad and ceil rounding can start the last window past the input: Caffe then gives -FLT_MAX (MAX) or
        # 0 (AVE) there, which no ONNX pooling gives
        _refuse(l, f"its last window starts past the input ({size} wide, kernel {k}, stride {stride}, pad {pad}), "
                   "where Caffe outputs -FLT_MAX or 0")
    end = max(0, (out - 1) * stride + k - size - pad)
    assert (size + pad + end - k) // stride + 1 == out, (l.name, size, k, pad, stride, out)
    # AVE divides by the window clipped to the padded bounds [-pad, size + pad), not to the input
    starts = np.arange(out) * stride - pad
    return end, np.minimum(starts + k, size + pad) - starts


def _pooling(g, l):
    p = l.pooling_param
    pb2 = type(p)
    if p.pool not in (pb2.MAX, pb2.AVE):
        _refuse(l, "only MAX and AVE pooling are exported (STOCHASTIC is random in TRAIN, weighted in TEST)")
    if len(l.top) > 1:
        _refuse(l, "a second top (the max positions) is not exported")
    op = "MaxPool" if p.pool == pb2.MAX else "AveragePool"
    if p.global_pooling:  # kernel = the whole input, pad 0, stride 1: ONNX's global pooling exactly
        g.emit("Global" + op, [g.x(l)], l)
        return
    (h, w), (oh, ow) = g.shape(l.bottom[0])[2:], g.shape(l.top[0])[2:]
    k = [p.kernel_h, p.kernel_w] if p.HasField("kernel_h") else [p.kernel_size] * 2
    pad = [p.pad_h, p.pad_w] if p.HasField("pad_h") else [p.pad] * 2
    stride = [p.stride_h, p.stride_w] if p.HasField("stride_h") else [p.stride] * 2
    (eh, dh), (ew, dw) = (_pool_pads(l, h, k[0], pad[0], stride[0], oh),
                          _pool_pads(l, w, k[1], pad[1], stride[1], ow))
    attrs = dict(kernel_shape=k, strides=stride, pads=pad + [eh, ew])  # explicit pads, floor rounding
    if op == "MaxPool":  # Caffe's max runs over the window clipped to the input; ONNX's pads never win a max
        g.emit(op, [g.x(l)], l, **attrs)
        return
    divisor = np.outer(dh, dw)
    if (divisor == k[0] * k[1]).all():
        g.emit(op, [g.x(l)], l, count_include_pad=1, **attrs)
        return
    # windows hanging past the padded bounds: ONNX divides by the kernel's size, Caffe by the part inside them
    mean = g.emit(op, [g.x(l)], l, None, count_include_pad=1, **attrs)
    factor = (np.float32(k[0] * k[1]) / divisor.astype(np.float32)).astype(np.float32)
    g.emit("Mul", [mean, g.const(l, "divisor", factor)], l)


def _relu(g, l):
    slope = l.relu_param.negative_slope  # Caffe: max(x, 0) + negative_slope * min(x, 0)
    if slope:
        g.emit("LeakyRelu", [g.x(l)], l, alpha=slope)
    else:
        g.emit("Relu", [g.x(l)], l)


def _prelu(g, l):
    shape = g.shape(l.bottom[0])
    slope = g.blobs(l)[0]
    # one slope per channel (axis 1), or one for all (channel_shared); broadcast over the axes after the channel
    slope = slope.reshape((1,) if slope.size == 1 and l.prelu_param.channel_shared else
                          (shape[1],) + (1,) * (len(shape) - 2))
    g.emit("PRelu", [g.x(l), g.weight(l, "slope", slope)], l)


def _unary(op):
    def convert(g, l):
        g.emit(op, [g.x(l)], l)
    return convert


def _lrn(g, l):
    p = l.lrn_param
    if p.norm_region != type(p).ACROSS_CHANNELS:
        _refuse(l, "only LRN across channels is exported")
    # Caffe: x / (k + alpha / n * sum of x^2 over the n channels centred on c)^beta, n odd: ONNX's LRN
    g.emit("LRN", [g.x(l)], l, size=p.local_size, alpha=p.alpha, beta=p.beta, bias=p.k)


def _softmax(g, l):
    axis = _axis(l, l.softmax_param.axis, len(g.shape(l.bottom[0])))
    g.emit("Softmax", [g.x(l)], l, axis=axis)  # opset >= 13: over the one axis, as Caffe


def _concat(g, l):
    p = l.concat_param
    axis = p.concat_dim if p.HasField("concat_dim") else p.axis  # the legacy concat_dim wins when set
    g.emit("Concat", [g.x(l, i) for i in range(len(l.bottom))], l, axis=_axis(l, axis, len(g.shape(l.bottom[0]))))


def _eltwise(g, l):
    p = l.eltwise_param
    pb2 = type(p)
    xs = [g.x(l, i) for i in range(len(l.bottom))]
    if p.operation == pb2.PROD:
        _chain(g, l, "Mul", xs)  # Caffe multiplies the bottoms in order
    elif p.operation == pb2.MAX:
        g.emit("Max", xs, l)
    elif not len(p.coeff) or all(c == 1 for c in p.coeff):
        _chain(g, l, "Add", xs)  # Caffe adds the bottoms in order
    else:
        if len(p.coeff) != len(xs):
            _refuse(l, f"{len(p.coeff)} coeff for {len(xs)} bottoms")
        scaled = [g.emit("Mul", [x, g.const(l, f"coeff{i}", np.array(c, np.float32))], l, None)
                  for i, (x, c) in enumerate(zip(xs, p.coeff))]
        _chain(g, l, "Add", scaled)  # Caffe: y = sum of coeff_i * x_i, in bottom order


def _chain(g, l, op, xs):
    """((x0 op x1) op x2) ..., in Caffe's order; the last node writes the top."""
    if len(xs) == 1:
        g.emit("Identity", xs, l)
    acc = xs[0]
    for i, x in enumerate(xs[1:], 2):
        acc = g.emit(op, [acc, x], l, 0 if i == len(xs) else None)


def _batch_norm(g, l):
    p = l.batch_norm_param
    if p.HasField("use_global_stats") and not p.use_global_stats:
        _refuse(l, "use_global_stats: false normalises by each batch's own statistics at test time")
    mean, var, factor = g.blobs(l)
    # Caffe's TEST statistics: the stored sums times 1 / scale_factor (0 when the factor is 0), in float32
    scale = np.float32(0) if factor.ravel()[0] == 0 else np.float32(1) / factor.ravel()[0]
    channels = mean.size
    ones, zeros = np.ones(channels, np.float32), np.zeros(channels, np.float32)
    g.emit("BatchNormalization", [g.x(l), g.const(l, "gamma", ones), g.const(l, "beta", zeros),
                                  g.const(l, "mean", mean * scale), g.const(l, "var", var * scale)],
           l, epsilon=p.eps)


def _scale(g, l):
    p = l.scale_param
    if len(l.bottom) != 1:
        _refuse(l, "the scale as a second bottom is not exported (only the learned scale blob)")
    shape = g.shape(l.bottom[0])
    axis = _axis(l, p.axis, len(shape))
    n = len(shape) - axis if p.num_axes == -1 else p.num_axes
    # the scale (and bias) span axes [axis, axis + num_axes); they broadcast over the axes after them
    bshape = tuple(shape[axis:axis + n]) + (1,) * (len(shape) - axis - n)
    blobs = g.blobs(l)
    if not p.bias_term:
        g.emit("Mul", [g.x(l), g.weight(l, "scale", blobs[0].reshape(bshape))], l)
        return
    scaled = g.emit("Mul", [g.x(l), g.weight(l, "scale", blobs[0].reshape(bshape))], l, None)
    g.emit("Add", [scaled, g.weight(l, "bias", blobs[1].reshape(bshape))], l)  # Caffe: scale, then its bias


def _flatten(g, l):
    _axis(l, l.flatten_param.axis, len(g.shape(l.bottom[0])))
    g.emit("Reshape", [g.x(l), _target_shape(g, l)], l)


def _reshape(g, l):
    p = l.reshape_param
    ndim = len(g.shape(l.bottom[0]))
    start = p.axis if p.axis >= 0 else ndim + p.axis + 1  # Caffe's Reshape: -1 means after the last axis
    if start == 0 and len(p.shape.dim) and p.shape.dim[0] not in (0, -1):
        _refuse(l, f"its shape fixes the batch axis to {p.shape.dim[0]}")
    bottom, top = g.shape(l.bottom[0]), g.shape(l.top[0])
    if top[0] != bottom[0]:
        _refuse(l, "it moves data across the batch axis")
    g.emit("Reshape", [g.x(l), _target_shape(g, l)], l)


#: Caffe layer type -> converter; every other type is refused, naming the layer
CONVERTERS = {
    "Input": _input, "Dropout": _alias, "Split": _alias,
    "Convolution": _convolution, "InnerProduct": _inner_product, "Pooling": _pooling,
    "ReLU": _relu, "PReLU": _prelu, "Sigmoid": _unary("Sigmoid"), "TanH": _unary("Tanh"), "LRN": _lrn,
    "Softmax": _softmax, "Concat": _concat, "Eltwise": _eltwise, "BatchNorm": _batch_norm, "Scale": _scale,
    "Flatten": _flatten, "Reshape": _reshape,
}


def check_supported(deploy):
    """Refuse the first layer whose type has no converter, in one line naming it."""
    for l in deploy.layer:
        if l.type not in CONVERTERS:
            raise UserError(f"layer {l.name!r} has type {l.type}, which the ONNX export does not support "
                            f"(supported: {', '.join(sorted(CONVERTERS))})")


# ------------------------------------------------------------------------------------------------ the model
def _rename_outputs(g, outputs):
    """Give each graph output its Caffe blob's name (an in-place layer's output is ``<blob>/<layer>``)."""
    for blob in outputs:
        if g.tensor[blob] in g.net.inputs:
            raise UserError(f"the net's output {blob!r} is its input {g.tensor[blob]!r}: no layer computes it")
    renames = {}
    for blob in outputs:
        have = g.tensor[blob]
        if have != blob:
            renames[blob] = g._fresh(f"{blob}/before")  # the earlier value that held the name
            renames[have] = blob
    for node in g.nodes:
        node.input[:] = [renames.get(t, t) for t in node.input]
        node.output[:] = [renames.get(t, t) for t in node.output]
    for blob in outputs:
        g.tensor[blob] = blob


def build_graph(deploy, net, weights):
    """(graph nodes and initializers) of the deploy NetParameter, with blob shapes from the ``caffe.Net``."""
    check_supported(deploy)
    g = _Graph(net, weights)
    for layer in deploy.layer:
        CONVERTERS[layer.type](g, layer)
    _rename_outputs(g, list(net.outputs))
    return g


def _value_info(net, blob):
    from onnx import TensorProto, helper  # deferred: heavy and optional (ONNX export only)

    return helper.make_tensor_value_info(blob, TensorProto.FLOAT, [BATCH] + list(net.blobs[blob].data.shape[1:]))


def make_model(g, opset, name, props):
    """The ModelProto of a built graph, with ``props`` as metadata_props."""
    from onnx import helper, numpy_helper  # deferred: heavy and optional (ONNX export only)

    graph = helper.make_graph(g.nodes, name or "caffe", [_value_info(g.net, b) for b in g.net.inputs],
                              [_value_info(g.net, b) for b in g.net.outputs],
                              [numpy_helper.from_array(a, n) for n, a in g.inits])
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="dsd-caffe",
                              ir_version=helper.find_min_ir_version_for(opsets))
    model.producer_version = __version__
    helper.set_model_props(model, props)
    return model


# ------------------------------------------------------------------------------------------------ reading
def _preprocessing(net_param, net):
    """What the net's TEST data layer does to a stored image (mean, scale, channel order, crop), or None for a
    deploy prototxt (it carries no transform_param)."""
    data = next((l for l in netcheck.included_layers(net_param, "TEST")
                 if l.type in netcheck.DATA_TYPES and not l.bottom and l.HasField("transform_param")), None)
    if data is None:
        return None
    tp = data.transform_param
    shape = [int(d) for d in net.blobs[net.inputs[0]].data.shape[1:]]
    # Caffe's DataTransformer: (pixel - mean) * scale, in the stored image's channel order (OpenCV: BGR)
    order = {3: "BGR", 1: "gray"}.get(shape[0], f"{shape[0]} channels as stored")
    return {"formula": "(pixel - mean) * scale", "mean_value": [float(v) for v in tp.mean_value],
            "mean_file": tp.mean_file or None, "scale": float(tp.scale), "crop_size": int(tp.crop_size),
            "channel_order": order, "input": shape, "layer": data.name}


def read_model(model, weights, input_shape=None):
    """Everything an export needs, checked: {"net_param", "deploy", "caffemodel" (released when it was under a mask
    layer), "released", "net" (a TEST caffe.Net with the weights), "weights" ({layer: [arrays]})}."""
    net_param = sources.read_net(model, require=())
    deploy = deploy_param(net_param, input_shape)
    check_supported(deploy)
    param = fileio.read_caffemodel(weights)
    released = _is_under_masks(param)
    if released:  # the masks must hold already: every pruned weight exactly 0.0 (else refused)
        param, _ = masks.release_masks(param, name=os.fspath(weights))
        log.info("%s holds a mask layer: exported with its masks applied (every pruned weight is 0.0)", weights)
    netcheck.check_structure(deploy, "TEST", name=os.fspath(model))
    net = make_net(deploy, "TEST")
    netcheck.check_weights_fit(netcheck.param_shapes(net), param, weights_name=os.fspath(weights),
                               net_name=os.fspath(model))
    net.copy_from(os.fspath(weights))  # the pycaffe side of the parity check
    # flat values, shaped as the net's blobs later (a scalar blob, e.g. a shared PReLU slope, stores no shape);
    # a name given twice: the last wins, as in Caffe's CopyTrainedLayersFrom
    arrays = {l.name: [np.asarray(b.double_data if len(b.double_data) else b.data, np.float32) for b in l.blobs]
              for l in param.layer if len(l.blobs)}
    return {"net_param": net_param, "deploy": deploy, "caffemodel": param, "released": released, "net": net,
            "weights": arrays}


def _props(read, source):
    """metadata_props of the model: class count, preprocessing, per-layer density, source."""
    net = read["net"]
    out = net.blobs[net.outputs[0]].data.shape
    layers = {l.name for l in read["deploy"].layer}
    density = {k: v for k, v in masks.layer_densities_of(read["caffemodel"]).items() if k in layers}
    props = {"density": json.dumps(density), "source": source}
    if len(out) >= 2:
        props["classes"] = str(out[1])
    pre = _preprocessing(read["net_param"], net)
    if pre is not None:
        props["preprocessing"] = json.dumps(pre)
    return props


# ------------------------------------------------------------------------------------------------ the check
def random_inputs(net, preprocessing=None, batch=CHECK_BATCH, seed=CHECK_SEED):
    """{input blob: float32 batch}: random pixels 0..255 through the net's preprocessing when known, else standard
    normal values. Seeded; the global RNG is not touched."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in net.inputs:
        shape = (batch,) + tuple(net.blobs[name].data.shape[1:])
        if preprocessing is None:
            out[name] = rng.standard_normal(shape).astype(np.float32)
            continue
        mean = np.asarray(preprocessing["mean_value"] or [0.0], np.float32)
        mean = mean.reshape(-1, 1, 1) if mean.size > 1 and len(shape) == 4 else mean.ravel()[:1]
        pixels = rng.integers(0, 256, shape).astype(np.float32)
        out[name] = ((pixels - mean) * np.float32(preprocessing["scale"])).astype(np.float32)
    return out


def caffe_forward(net, inputs):
    """{output blob: array} of a pycaffe forward pass on ``inputs`` (the net is reshaped to their batch)."""
    for name, x in inputs.items():
        net.blobs[name].reshape(*x.shape)
    net.reshape()
    for name, x in inputs.items():
        net.blobs[name].data[...] = x
    net.forward()
    return {o: net.blobs[o].data.copy() for o in net.outputs}


def runtime_forward(model, inputs):
    """{output: array} of ONNX Runtime's CPU provider on ``inputs``; ``model`` is a ModelProto or its bytes."""
    import onnxruntime  # deferred: heavy and optional (ONNX export only)

    data = model if isinstance(model, bytes) else model.SerializeToString()
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs)))


def top_agreement(expected, got, k=5):
    """Fraction of the batch whose top-k classes (in order) are the same in both outputs."""
    a, b = (np.asarray(x).reshape(len(x), -1) for x in (expected, got))
    k = min(k, a.shape[1])
    return float(np.mean([np.array_equal(p, q) for p, q in zip(np.argsort(-a, kind="stable")[:, :k],
                                                                 np.argsort(-b, kind="stable")[:, :k])]))


def check_parity(model, net, inputs, tolerance=TOLERANCE):
    """Run ``inputs`` through pycaffe and ONNX Runtime; refuse (UserError) when an output differs by more than
    ``tolerance`` of its largest magnitude. Returns {"outputs": {name: {"max_abs", "max_rel"}}, "top5_agreement",
    "batch", "tolerance"}."""
    expected = caffe_forward(net, inputs)
    got = runtime_forward(model, inputs)
    result = {"outputs": {}, "batch": int(len(next(iter(inputs.values())))), "tolerance": tolerance}
    for name, a in expected.items():
        diff = float(np.max(np.abs(got[name].astype(np.float64) - a)))
        largest = float(np.max(np.abs(a)))
        rel = diff / largest if largest > 0 else diff
        result["outputs"][name] = {"max_abs": diff, "max_rel": rel}
        if not rel <= tolerance:  # NaN fails too
            raise UserError(f"parity check failed: ONNX Runtime's output {name!r} differs from pycaffe's by up to "
                            f"{diff:.3g} ({rel:.3g} of its largest value; tolerance {tolerance:g}); nothing written")
    first = net.outputs[0]
    result["top5_agreement"] = top_agreement(expected[first], got[first])
    return result


# ------------------------------------------------------------------------------------------------ export
def _check_opset(opset):
    import onnx  # deferred: heavy and optional (ONNX export only)

    top = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= top:
        raise UserError(f"opset must be an integer from {MIN_OPSET} (Softmax over one axis, as Caffe) to {top} "
                        f"(this onnx {onnx.__version__}), got {opset!r}", fields=["opset"])


def _source_record(weights):
    """phase, iteration and seed of the caffemodel from the JSON the toolkit writes beside it, when there is one."""
    sidecar = fileio.sidecar_path(weights)
    record = fileio.read_json(sidecar) if os.path.isfile(sidecar) else {}
    return {"phase": record.get("phase"), "iteration": record.get("iteration") or 0, "seed": record.get("seed")}


def build(model, weights, opset=DEFAULT_OPSET, input_shape=None):
    """(ONNX ModelProto, its bytes, read_model's dict, graph) of a net and its caffemodel, checked by onnx.checker
    (full check: with shape inference)."""
    import onnx  # deferred: heavy and optional (ONNX export only)

    _check_opset(opset)
    read = read_model(model, weights, input_shape)
    g = build_graph(read["deploy"], read["net"], read["weights"])
    onnx_model = make_model(g, opset, read["deploy"].name, _props(read, os.path.basename(os.fspath(weights))))
    data = onnx_model.SerializeToString()
    onnx.checker.check_model(data, full_check=True)
    return onnx_model, data, read, g


def export(model, weights, output, opset=DEFAULT_OPSET, force=False, check=True, input_shape=None, inputs=None):
    """Export the caffemodel ``weights`` of the prototxt ``model`` to the ONNX file ``output`` with its JSON record
    (``output + ".json"``), after the parity check unless ``check`` is False (``inputs``: {input blob: batch}
    instead of the seeded random batch). Returns {"output", "bytes", "check", "zeros", "released", "props"}."""
    for path in (output, fileio.sidecar_path(output)):
        fileio.check_output(path, force)
        fileio.check_apart(path, (model, weights))
    onnx_model, data, read, g = build(model, weights, opset, input_shape)
    props = {p.key: p.value for p in onnx_model.metadata_props}
    result = None
    if check:
        pre = json.loads(props["preprocessing"]) if "preprocessing" in props else None
        result = check_parity(data, read["net"], inputs or random_inputs(read["net"], pre))
    folder = os.path.dirname(os.path.abspath(output))
    with fileio.atomic_path(output, force=force) as tmp:  # the record is written inside: both or neither
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fileio.write_provenance(
            output, **_source_record(weights), densities=json.loads(props["density"]), force=force,
            source=os.path.relpath(os.path.abspath(weights), folder), format="onnx", opset=opset,
            prototxt=os.path.relpath(os.path.abspath(model), folder), source_sha256=fileio.file_digest(weights),
            masks="applied (the model's release)" if read["released"] else None, zeros=g.zeros,
            classes=int(props["classes"]) if "classes" in props else None,
            preprocessing=json.loads(props.get("preprocessing", "null")), check=result)
    log.info("wrote %s (%d bytes)", output, len(data))
    return {"output": os.fspath(output), "bytes": len(data), "check": result, "zeros": g.zeros,
            "released": read["released"], "props": props}


def format_result(result):
    """One or two lines for people: the file, its size, and the parity check's figures."""
    lines = [f"wrote {result['output']} ({result['bytes'] / 1e6:.2f} MB)"
             + ("; the caffemodel's masks applied (its release)" if result["released"] else "")]
    check = result["check"]
    if check is None:
        lines.append("parity check skipped (--no-check)")
    else:
        worst = max(check["outputs"].values(), key=lambda o: o["max_rel"])
        lines.append(f"ONNX Runtime vs pycaffe on a batch of {check['batch']}: max abs diff {worst['max_abs']:.2g}, "
                     f"max rel diff {worst['max_rel']:.2g} (tolerance {check['tolerance']:g}), top-5 agreement "
                     f"{check['top5_agreement']:.0%}")
    return "\n".join(lines)
