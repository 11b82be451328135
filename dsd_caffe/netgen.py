"""Net generator: SqueezeNet v1.0 (Han's DSD naming or DeepScale's naming), a small SqueezeNet for 28x28/32x32
images, deploy nets, sparse forms, and the rename map that moves weights between the two SqueezeNet namings.
(Past 400 lines: the nets are data written as code. The two builders take a dozen keyword arguments each because
they are the prototxt's own fields — sources, batches, crop, means, classes — as a Caffe user writes them.)

Nets are built in memory as ``caffe_pb2.NetParameter`` messages and written only where the caller asks
(``fileio.write_prototxt``).

SqueezeNet v1.0 (both namings): conv1 7x7/2 with 96 outputs, max pools 3/2 (Caffe's ceil mode) after conv1,
fire4 and fire8, fire modules 2-9 with squeeze/expand widths 16/64, 16/64, 32/128, 32/128, 48/192, 48/192,
64/256, 64/256, dropout 0.5, the final 1x1 conv with ``pad: 1`` (13x13 -> 15x15), ReLU, global AVE pooling,
xavier fillers (gaussian std 0.01 on the final conv), SoftmaxWithLoss ``loss`` and Accuracy ``accuracy_top1`` /
``accuracy_top5``. With ``naming="han"`` the trainval equals the DSD release's ``trainval.prototxt`` (the loss and
accuracy layers carry an empty ``include {}``, so they run in both phases, exactly as released). With
``naming="deepscale"`` only the names change (``fire2/squeeze1x1``, ``fire2/expand1x1``, ``fire2/expand3x3``,
their ``fire2/relu_*``, ``conv10``, ``relu_conv10``, ``pool10``): the loss/accuracy layers keep the names
``loss``/``accuracy_top1``/``accuracy_top5`` so every tool reads the same outputs whatever the naming.

The small net (``small_squeezenet``, the Fashion-MNIST demo and benchmark net), at ``width=1.0``, 1 channel,
10 classes: conv1 3x3/2 (16) -> fire2 (squeeze 8 / expand 16+16) -> max pool 3/2 -> fire3 (8/16+16) ->
fire4 (16/32+32) -> fire5 (16/32+32) -> dropout 0.5 -> conv_final 1x1 (10, no ReLU) -> global AVE pool;
28x28 -> 14x14 -> 7x7 -> 1x1. It has SMALL_PARAMS = 15,770 learnable parameters (weights and biases;
about 34,700 at width 1.5 and 61,000 at width 2). It is kept small because Caffe's CPU convolution is
per-image GEMM: one forward+backward at batch 64 costs about 40 ms of CPU time on this project's machines
(single thread, measured with pycaffe), so dense + sparse + redense + a control fit the demo's budget.
Han's layer naming (``fireN/conv1x1_1`` ...) is used so pruning profiles and tools treat it like SqueezeNet.
"""
import copy
import functools

from . import caffefacts, masks
from .caffe_env import make_net
from .caffeproto import caffe_pb2
from .checks import count
from .errors import UserError

NAMINGS = caffefacts.NAMINGS

#: (name, squeeze, expand) for SqueezeNet v1.0's fire modules, with the max pools between them.
SQUEEZENET_V1_0 = (
    ("conv1", 96), ("pool1",),
    ("fire2", 16, 64), ("fire3", 16, 64), ("fire4", 32, 128), ("pool4",),
    ("fire5", 32, 128), ("fire6", 48, 192), ("fire7", 48, 192), ("fire8", 64, 256), ("pool8",),
    ("fire9", 64, 256),
)

#: Names of the parts of a fire module and of the net's head, per naming.
_NAMES = caffefacts.SQUEEZENET_NAMES

#: Parameter count of small_squeezenet() at its defaults (1 channel, 10 classes, width 1.0).
SMALL_PARAMS = 15770


def _check_naming(naming):
    if naming not in NAMINGS:
        raise UserError(f"naming must be one of {NAMINGS}, got {naming!r}")
    return naming


def _positive_int(value, what):
    return count(value, what)


class _Builder:
    """Appends layers to a NetParameter with Caffe's field layout (the order the released prototxts use)."""

    def __init__(self, name):
        self.net = caffe_pb2().NetParameter(name=name)

    def layer(self, name, type_, bottom=(), top=()):
        l = self.net.layer.add(name=name, type=type_)
        l.bottom.extend(bottom)
        l.top.extend(top)
        return l

    def data(self, phase, source, batch, crop, means, mirror, scale=None):
        pb2 = caffe_pb2()
        l = self.layer("data", "Data", top=("data", "label"))
        l.include.add(phase=pb2.TRAIN if phase == "TRAIN" else pb2.TEST)
        tp = l.transform_param
        if scale is not None:
            tp.scale = scale
        tp.mirror = mirror
        if crop:
            tp.crop_size = crop
        tp.mean_value.extend(means)
        l.data_param.source = source
        l.data_param.batch_size = batch
        l.data_param.backend = pb2.DataParameter.LMDB
        return l

    def conv(self, name, bottom, num_output, kernel, stride=1, pad=0, filler="xavier", std=None):
        l = self.layer(name, "Convolution", (bottom,), (name,))
        cp = l.convolution_param
        cp.num_output = num_output
        if pad:
            cp.pad.append(pad)
        cp.kernel_size.append(kernel)
        if stride != 1:
            cp.stride.append(stride)
        cp.weight_filler.type = filler
        if filler == "gaussian":
            cp.weight_filler.mean = 0.0
            cp.weight_filler.std = std
        return name

    def relu(self, name, blob):
        self.layer(name, "ReLU", (blob,), (blob,))
        return blob

    def max_pool(self, name, bottom):
        l = self.layer(name, "Pooling", (bottom,), (name,))
        l.pooling_param.pool = caffe_pb2().PoolingParameter.MAX
        l.pooling_param.kernel_size = 3
        l.pooling_param.stride = 2
        return name

    def global_ave_pool(self, name, bottom):
        l = self.layer(name, "Pooling", (bottom,), (name,))
        l.pooling_param.pool = caffe_pb2().PoolingParameter.AVE
        l.pooling_param.global_pooling = True
        return name

    def fire(self, fire, bottom, squeeze, expand, names, filler="xavier"):
        s = self.conv(f"{fire}/{names['squeeze']}", bottom, squeeze, 1, filler=filler)
        self.relu(f"{fire}/relu_{names['squeeze']}", s)
        e1 = self.conv(f"{fire}/{names['expand1x1']}", s, expand, 1, filler=filler)
        self.relu(f"{fire}/relu_{names['expand1x1']}", e1)
        e3 = self.conv(f"{fire}/{names['expand3x3']}", s, expand, 3, pad=1, filler=filler)
        self.relu(f"{fire}/relu_{names['expand3x3']}", e3)
        self.layer(f"{fire}/concat", "Concat", (e1, e3), (f"{fire}/concat",))
        return f"{fire}/concat"

    def dropout(self, name, blob, ratio=0.5):
        l = self.layer(name, "Dropout", (blob,), (blob,))
        l.dropout_param.dropout_ratio = ratio
        return blob

    def loss_and_accuracy(self, output):
        l = self.layer("loss", "SoftmaxWithLoss", (output, "label"), ("loss",))
        l.include.add()  # an empty rule, as in the DSD release: the layer runs in both phases
        for k in (1, 5):
            l = self.layer(f"accuracy_top{k}", "Accuracy", (output, "label"), (f"accuracy_top{k}",))
            l.include.add()
            l.accuracy_param.top_k = k


def squeezenet_v1_0(naming="han", train_source="train_lmdb", test_source="val_lmdb", train_batch=32,
                    test_batch=50, crop_size=227, mean_values=(104, 117, 123), num_classes=1000, channels=3,
                    mirror=True, name="FireNet"):
    """SqueezeNet v1.0 trainval (TRAIN and TEST Data layers) as a NetParameter.

    ``naming="han"`` with the defaults and the release's sources equals the DSD release's trainval.prototxt.
    ``channels`` is checked against ``mean_values`` (one mean per channel, or a single mean for all).
    """
    names = _NAMES[_check_naming(naming)]
    for v, what in ((train_batch, "train_batch"), (test_batch, "test_batch"), (crop_size, "crop_size"),
                    (num_classes, "num_classes"), (channels, "channels")):
        _positive_int(v, what)
    means = tuple(mean_values or ())
    if len(means) not in (0, 1, channels):
        raise UserError(f"mean_values {means} must hold 1 or {channels} (channels) values")
    means = means * channels if len(means) == 1 else means  # one per channel: deploy() reads channels from it
    b = _Builder(name)
    b.data("TRAIN", train_source, train_batch, crop_size, means, bool(mirror))
    b.data("TEST", test_source, test_batch, crop_size, means, False)
    top = None
    for entry in SQUEEZENET_V1_0:
        if entry[0] == "conv1":
            top = b.conv("conv1", "data", entry[1], 7, stride=2)
            b.relu("relu_conv1", top)
        elif entry[0].startswith("pool"):
            top = b.max_pool(entry[0], top)
        else:
            top = b.fire(entry[0], top, entry[1], entry[2], names)
    b.dropout("drop9", top)
    final = b.conv(names["final"], top, num_classes, 1, pad=1, filler="gaussian", std=0.01)
    b.relu(f"relu_{names['final']}", final)
    out = b.global_ave_pool(names["pool_final"], final)
    b.loss_and_accuracy(out)
    return b.net


def small_squeezenet(train_source="train_lmdb", test_source="test_lmdb", num_classes=10, channels=1,
                     train_batch=64, test_batch=100, scale=1 / 256, width=1.0, size=28, mean_value=128,
                     mirror=False, name="SmallSqueezeNet"):
    """A small SqueezeNet-style trainval for ``size`` x ``size`` images (28 grey or 32 colour) as a NetParameter.

    The Data layers subtract ``mean_value`` and multiply by ``scale`` (uint8 pixels -> about [-0.5, 0.5)) and
    crop ``size`` (a no-op on images of exactly that size; a random crop in TRAIN on larger ones).
    ``width`` multiplies every conv's width except the last. No batch norm; msra (Kaiming) fillers.
    """
    for v, what in ((num_classes, "num_classes"), (channels, "channels"), (train_batch, "train_batch"),
                    (test_batch, "test_batch"), (size, "size")):
        _positive_int(v, what)
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width <= 16:
        raise UserError(f"width must be a number in (0, 16], got {width!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise UserError(f"scale must be a positive number, got {scale!r}")
    if size < 8:
        raise UserError(f"size must be at least 8 pixels, got {size}")

    def w(n):
        return max(1, int(round(n * width)))

    names = _NAMES["han"]
    means = () if mean_value is None else (mean_value,) * channels  # one per channel (deploy reads it)
    b = _Builder(name)
    b.data("TRAIN", train_source, train_batch, size, means, bool(mirror), scale=float(scale))
    b.data("TEST", test_source, test_batch, size, means, False, scale=float(scale))
    top = b.conv("conv1", "data", w(16), 3, stride=2, pad=1, filler="msra")
    b.relu("relu_conv1", top)
    top = b.fire("fire2", top, w(8), w(16), names, filler="msra")
    top = b.max_pool("pool2", top)
    top = b.fire("fire3", top, w(8), w(16), names, filler="msra")
    top = b.fire("fire4", top, w(16), w(32), names, filler="msra")
    top = b.fire("fire5", top, w(16), w(32), names, filler="msra")
    b.dropout("drop5", top)
    final = b.conv(names["final"], top, num_classes, 1, filler="gaussian", std=0.01)
    out = b.global_ave_pool(names["pool_final"], final)
    b.loss_and_accuracy(out)
    return b.net


def param_count(net_param):
    """Learnable parameters (weights and biases) of the weighted layers, from the net's shapes."""
    net = _load(net_param)
    return sum(b.data.size for name in weighted_layers(net_param) for b in net.params[name])


def _load(net_param):
    """A TEST caffe.Net of ``net_param`` (Data layers replaced by Input layers so no LMDB is needed)."""
    return make_net(deploy(net_param) if any(l.type == "Data" for l in net_param.layer) else net_param, "TEST")


def _output_blob(net_param):
    """The blob the loss (or the last layer) reads: the net's prediction."""
    for l in net_param.layer:
        if l.type == "SoftmaxWithLoss":
            return l.bottom[0]
    for l in reversed(net_param.layer):
        if l.type not in ("Accuracy", "Softmax") and l.top:
            return l.top[0]
    raise UserError(f"net {net_param.name!r} has no layers")


def deploy(trainval_netparam, input_shape=None):
    """The deploy net of a trainval: an Input layer ``data``, the net without Data/loss/accuracy layers and
    without phase rules, and a Softmax ``prob`` on the net's prediction.

    ``input_shape`` defaults to (1, channels, crop, crop): channels is the number of mean values and crop the
    Data layers' crop_size; give it explicitly when the Data layers have neither.
    """
    pb2 = caffe_pb2()
    if not isinstance(trainval_netparam, pb2.NetParameter):
        raise TypeError(f"deploy() needs a caffe_pb2.NetParameter, got {type(trainval_netparam).__name__}")
    fed = caffefacts.DATA_TYPES + ("Input",)  # the layers the deploy net's Input layer replaces
    data_layers = [l for l in trainval_netparam.layer if l.type in fed]
    if input_shape is None:
        crop = next((l.transform_param.crop_size for l in data_layers if l.transform_param.crop_size), 0)
        if not crop:
            raise UserError(f"net {trainval_netparam.name!r}: no crop_size in its Data layers; give input_shape")
        channels = next((len(l.transform_param.mean_value) for l in data_layers), 0)
        if not channels:
            raise UserError(f"net {trainval_netparam.name!r}: no mean_value per channel in its Data layers; "
                             "give input_shape")
        input_shape = (1, channels, crop, crop)
    input_shape = tuple(int(x) for x in input_shape)
    if len(input_shape) != 4 or min(input_shape) < 1:
        raise UserError(f"input_shape must be 4 positive ints (N, C, H, W), got {input_shape}")
    out = pb2.NetParameter(name=trainval_netparam.name)
    inp = out.layer.add(name="data", type="Input")
    inp.top.append("data")
    inp.input_param.shape.add().dim.extend(input_shape)
    prediction = _output_blob(trainval_netparam)
    for l in trainval_netparam.layer:
        if l.type in fed + ("SoftmaxWithLoss", "Accuracy") or "label" in l.bottom:
            continue
        if any(r.HasField("phase") and r.phase == pb2.TRAIN for r in l.include):
            continue
        new = out.layer.add()
        new.CopyFrom(l)
        del new.include[:]
        del new.exclude[:]
    prob = out.layer.add(name="prob", type="Softmax")
    prob.bottom.append(prediction)
    prob.top.append("prob")
    return out


def weighted_layers(net_param):
    """Names of the layers whose weights DSD prunes (``caffefacts.WEIGHTED``, V1 enums too), in net order."""
    layers = list(net_param.layer) or list(net_param.layers)
    return [l.name for l in layers if caffefacts.is_weighted(l.type)]


@functools.lru_cache(maxsize=None)
def _squeezenet_names(naming):
    """All layer and blob names of SqueezeNet v1.0 under ``naming``, in net order."""
    net = squeezenet_v1_0(naming)
    names = []
    for l in net.layer:
        for n in [l.name, *l.top, *l.bottom]:
            if n not in names:
                names.append(n)
    return tuple(names)


def rename_map(src, dst):
    """``{src_name: dst_name}`` for every SqueezeNet v1.0 layer/blob name that differs between namings."""
    _check_naming(src)
    _check_naming(dst)
    a, b = _squeezenet_names(src), _squeezenet_names(dst)
    if len(a) != len(b):
        raise UserError(f"namings {src} and {dst} do not line up")  # pragma: no cover - both are generated
    return {x: y for x, y in zip(a, b) if x != y}


def detect_naming(layer_names):
    """"han" or "deepscale" from a net's layer names (a NetParameter or an iterable of names); None if neither."""
    if hasattr(layer_names, "layer"):
        layer_names = [l.name for l in (list(layer_names.layer) or list(layer_names.layers))]
    names = set(layer_names)
    han = set(rename_map("han", "deepscale"))
    ds = set(rename_map("deepscale", "han"))
    if names & han and not names & ds:
        return "han"
    if names & ds and not names & han:
        return "deepscale"
    return None


def rename_weights(caffemodel_netparam, src, dst):
    """A copy of a caffemodel NetParameter with its layer names (and tops/bottoms) moved from naming ``src`` to
    ``dst``, so its weights load by name into the ``dst`` nets. Names outside the map are kept."""
    mapping = rename_map(src, dst)
    out = copy.deepcopy(caffemodel_netparam)
    found = False
    for l in list(out.layer) + list(out.layers):
        if l.name in mapping:
            found = True
        l.name = mapping.get(l.name, l.name)
        for field in (l.bottom, l.top):
            renamed = [mapping.get(n, n) for n in field]
            del field[:]
            field.extend(renamed)
    if not found and weighted_layers(out):
        raise UserError(f"caffemodel {caffemodel_netparam.name!r} has no {src}-named SqueezeNet layers "
                         f"(detected naming: {detect_naming(out)})")
    return out


def set_data_sources(net_param, train=None, test=None):
    """Set the LMDB ``source`` of the TRAIN and/or TEST Data layers of ``net_param`` in place; returns it."""
    pb2 = caffe_pb2()
    done = set()
    for l in net_param.layer:
        if l.type != "Data":
            continue
        phases = {r.phase for r in l.include if r.HasField("phase")}
        if train is not None and pb2.TRAIN in phases:
            l.data_param.source = str(train)
            done.add("train")
        if test is not None and pb2.TEST in phases:
            l.data_param.source = str(test)
            done.add("test")
    for which, value in (("train", train), ("test", test)):
        if value is not None and which not in done:
            raise UserError(f"net {net_param.name!r} has no {which.upper()} Data layer to set to {value}")
    return net_param


def sparse_form(net_param):
    """The sparse trainval of a dense one: the mask layer over every weighted layer (see dsd_caffe.masks)."""
    net = _load(net_param)
    return masks.sparse_net(net_param, {n: net.params[n][0].data.shape for n in weighted_layers(net_param)})
