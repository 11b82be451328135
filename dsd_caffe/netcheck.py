"""Check a net, its data and its weights in Python before Caffe sees them. (One module past 400 lines: every input
check lives here, so that every tool runs the same ones.)

Caffe answers a mismatched caffemodel, a missing LMDB or a too-small image with a glog ``Check failed`` and an
abort. These checks mirror Caffe's own rules (``Net::FilterNet``, ``Net::CopyTrainedLayersFrom``,
``Blob::ShapeEquals``, ``DataTransformer::Transform``) and raise one clear UserError instead:

- :func:`included_layers`: the layers Caffe keeps for a phase/level/stages (``include``/``exclude`` rules).
- :func:`check_structure`: every layer type is registered in this Caffe build (``LayerRegistry::CreateLayer``), a
  Python layer's module imports and has its class (``PythonLayer``'s ``bp::import``), every bottom is produced
  before it is read (``Net::AppendBottom``).
- :func:`require_data`: a net that must read data (evaluation, training) has a data layer in that phase, not only
  an Input layer (``caffe test`` on a deploy net runs on zeros and reports meaningless numbers).
- :func:`check_data_layers`: Data/ImageData/HDF5Data sources exist, LMDBs are readable and non-empty, images are
  at least the crop size (``DataTransformer::Transform``), mean values fit; :func:`check_labels`: labels lie in the
  net's classes (``SoftmaxWithLoss`` checks them only in debug builds).
- :func:`param_shapes` and :func:`check_weights_fit`: a caffemodel fits a net (first differing layer named, with
  the layer naming each side seems to use); :func:`check_fits` builds the net's weight shapes first, or, when its
  data is not on this machine, checks names and kernel shapes only (:func:`check_fits_by_name`).

Sources: a net given here has absolute data sources (``sources.absolute_sources``, the one resolver); a relative
one is resolved against the current folder, as the caffe binary does.
"""
import collections
import difflib
import importlib
import logging
import os

from google.protobuf.message import DecodeError

from .caffeproto import caffe_pb2
from .errors import InputMissing, UserError, own_module
from . import caffefacts, lmdbio, masks, netgen, sources
from .caffe_env import import_caffe, make_net
from .sources import phase_of

log = logging.getLogger(__name__)

PHASES = {"TRAIN": 0, "TEST": 1}


def phase_value(phase):
    """``"TEST"``/``"TRAIN"``/``caffe.TEST``/0/1 -> the NetState phase number."""
    if isinstance(phase, str):
        if phase.upper() not in PHASES:
            raise UserError(f"phase must be TRAIN or TEST, got {phase!r}")
        return PHASES[phase.upper()]
    if phase in (0, 1):
        return int(phase)
    raise UserError(f"phase must be TRAIN or TEST, got {phase!r}")


def _meets(rule, phase, level, stages):
    if rule.HasField("phase") and rule.phase != phase:
        return False
    if rule.HasField("min_level") and level < rule.min_level:
        return False
    if rule.HasField("max_level") and level > rule.max_level:
        return False
    if any(s not in stages for s in rule.stage):
        return False
    if any(s in stages for s in rule.not_stage):
        return False
    return True


def included_layers(net_param, phase="TEST", level=0, stages=()):
    """The LayerParameters Caffe keeps for this state (its ``Net::FilterNet`` rules), in net order."""
    phase = phase_value(phase)
    stages = set(net_param.state.stage) | set(stages)
    kept = []
    for layer in net_param.layer:
        if len(layer.include) and len(layer.exclude):
            raise UserError(f"layer {layer.name!r} has both include and exclude rules; Caffe allows only one kind")
        keep = len(layer.include) == 0
        if any(_meets(r, phase, level, stages) for r in layer.exclude):
            keep = False
        if any(_meets(r, phase, level, stages) for r in layer.include):
            keep = True
        if keep:
            kept.append(layer)
    return kept


def check_structure(net_param, phase="TEST", name="net"):
    """Layer types known to this Caffe, every bottom produced by an earlier top or an input."""
    if len(net_param.layers) and not len(net_param.layer):
        return  # V1 prototxt: Caffe upgrades it; leave it to Caffe
    known = set(import_caffe().layer_type_list())
    tops = set(net_param.input)
    layers = included_layers(net_param, phase)
    if not layers:
        raise UserError(f"{name}: no layer is included in the {phase} phase")
    for layer in layers:
        if layer.type not in known:
            close = difflib.get_close_matches(layer.type, sorted(known), n=1)
            raise UserError(f"{name}: layer {layer.name!r} has type {layer.type!r}, which this Caffe build does "
                            f"not have" + (f" (did you mean {close[0]!r}?)" if close else ""))
        if layer.type == "Python":
            _check_python_layer(layer, name)
        for b in layer.bottom:
            if b not in tops:
                raise UserError(f"{name}: layer {layer.name!r} reads bottom {b!r}, which no earlier layer "
                                 f"of the {phase} phase produces")
        tops.update(layer.top)


def _check_python_layer(layer, name):
    """Caffe's PythonLayer imports ``python_param.module`` and takes ``python_param.layer`` from it; a failure
    there is a 20-line Boost.Python traceback and a NULL-return SystemError."""
    module, cls = layer.python_param.module, layer.python_param.layer
    where = f"{name}: Python layer {layer.name!r} (class {cls!r})" if cls else f"{name}: Python layer {layer.name!r}"
    if not module or not cls:
        raise UserError(f"{where} needs python_param {{ module: ... layer: ... }}")
    try:
        mod = importlib.import_module(module)
    except (Exception, SystemExit) as e:  # its own code fails (a syntax error, an exception, sys.exit at import)
        missing = isinstance(e, ModuleNotFoundError) and e.name and (module + ".").startswith(e.name + ".")
        if own_module(module) and not missing:
            raise  # our own layer's code (masklayer) fails: a bug, with its traceback
        if isinstance(e, ImportError):
            raise UserError(f"{where}: module {module!r} cannot be imported ({e}); is it on PYTHONPATH?") from e
        raise UserError(f"{where}: module {module!r} fails to import ({type(e).__name__}: {e})") from e
    if not isinstance(getattr(mod, cls, None), type):
        raise UserError(f"{where}: module {module!r} has no class {cls!r}")
    if not issubclass(getattr(mod, cls), import_caffe().Layer):
        raise UserError(f"{where}: class {cls!r} of module {module!r} is not a caffe.Layer subclass, which Caffe's "
                        "Python layer needs")


#: layer types that read data (a net without any in a phase reads nothing in it)
DATA_TYPES = caffefacts.DATA_TYPES + caffefacts.GENERATED_DATA_TYPES


def require_data(net_param, phase="TEST", name="net"):
    """Refuse a net with no data layer in ``phase`` (a deploy net: Input layers only)."""
    layers = included_layers(net_param, phase)
    if not any(l.type in DATA_TYPES and not l.bottom and l.top for l in layers):
        inputs = [l.name for l in layers if l.type == "Input"] or list(net_param.input)
        what = f"only Input layers ({', '.join(inputs)}): a deploy net" if inputs else "no data layer"
        raise UserError(f"{name} has {what} in the {phase} phase, so there is no data to evaluate or train on "
                        "(caffe test would run it on all-zero inputs); give the trainval prototxt with its Data "
                        "layers")


# ----------------------------------------------------------------------------------------------------- data


def resolve_source(source):
    """A Data layer ``source`` as the caffe binary opens it: relative paths against the current folder
    (``sources.resolve`` without a prototxt folder)."""
    return sources.resolve(source, None)


def lmdb_summary(source, where="LMDB", force_color=False, force_gray=False):
    """``lmdbio.lmdb_info`` of a Data layer source (resolved against the current folder), errors prefixed with
    ``where``; channels follow ``force_color``/``force_gray`` like Caffe's decoder."""
    full = resolve_source(source)
    try:
        info = lmdbio.lmdb_info(full)
    except UserError as e:
        rel = "" if os.path.isabs(source) else f" (source {source!r} resolved against the current folder)"
        raise UserError(f"{where}: {e}{rel}") from e
    if info["encoded"] and (force_color or force_gray):
        info["channels"] = 3 if force_color else 1
    return info


def _read_mean(path, where):
    full = resolve_source(path)
    if not os.path.isfile(full):
        raise InputMissing(f"{where}: mean_file {path} does not exist")
    blob = caffe_pb2().BlobProto()
    with open(full, "rb") as f:
        data = f.read()
    try:
        blob.ParseFromString(data)
    except DecodeError:
        raise UserError(f"{where}: mean_file {path} is not a binaryproto mean") from None  # DecodeError: no more
    if blob.HasField("shape") and len(blob.shape.dim):
        dims = list(blob.shape.dim)[-3:]
    else:
        dims = [blob.channels, blob.height, blob.width]
    return tuple(int(d) for d in dims)


def _check_transform(tp, c, h, w, where):
    crop = tp.crop_size
    if crop and (h < crop or w < crop):
        raise UserError(f"{where}: images are {h}x{w}, smaller than crop_size {crop}")
    if len(tp.mean_value) not in (0, 1, c):
        raise UserError(f"{where}: {len(tp.mean_value)} mean_value entries for {c}-channel images "
                         "(give 1 or one per channel)")
    if tp.mean_file:
        mc, mh, mw = _read_mean(tp.mean_file, where)
        if (mc, mh, mw) != (c, h, w):
            raise UserError(f"{where}: mean_file {tp.mean_file} is {mc}x{mh}x{mw} but images are {c}x{h}x{w}")


def check_data_layers(net_param, phase="TEST", iterations=None, label_ranges=None):
    """Check the data sources of the layers included in ``phase``; returns {layer: summary dict}.

    Sources are resolved like the caffe binary resolves them: relative to the current working folder. A
    ``label_ranges`` dict receives {resolved LMDB source: (smallest, largest) label} of the records checked, for
    :func:`check_labels`.
    """
    pb2 = caffe_pb2()
    out = {}
    for layer in included_layers(net_param, phase):
        where = f"{layer.type} layer {layer.name!r} ({phase_of(layer)})"
        if layer.type == "Data":
            dp = layer.data_param
            if not dp.source:
                raise UserError(f"{where} has no data_param.source")
            if dp.batch_size <= 0:
                raise UserError(f"{where}: batch_size must be > 0")
            if dp.backend != pb2.DataParameter.LMDB:
                if not os.path.exists(resolve_source(dp.source)):
                    raise InputMissing(f"{where}: LevelDB {dp.source} does not exist (relative paths are "
                                       f"resolved against the current folder {os.getcwd()})")
                continue
            tp = layer.transform_param
            if tp.mirror and phase_value(phase) == PHASES["TEST"]:
                log.warning("%s mirrors images at random in the TEST phase (transform_param mirror: true); "
                            "scores then vary from run to run, in `caffe test` too", where)
            info = lmdb_summary(dp.source, where, tp.force_color, tp.force_gray)
            try:
                lmdbio.check_caffe_can_open(resolve_source(dp.source))
            except UserError as e:
                raise UserError(f"{where}: {e}") from e
            _check_transform(tp, info["channels"], info["height"], info["width"], f"{where} (LMDB {dp.source})")
            try:  # every record (a sample of a large LMDB): Caffe aborts on any image smaller than the crop
                checked = lmdbio.check_lmdb(resolve_source(dp.source), crop_size=tp.crop_size,
                                            force_color=tp.force_color, force_gray=tp.force_gray)
            except UserError as e:
                raise UserError(f"{where}: {e}") from e
            if label_ranges is not None:
                label_ranges[resolve_source(dp.source)] = checked["label_range"]
            if iterations and info["count"] < iterations * dp.batch_size:
                log.info("%s: %d iterations x batch %d = %d images but the LMDB holds %d; like `caffe test`, "
                         "the reader wraps around and counts some images more than once", where, iterations,
                         dp.batch_size, iterations * dp.batch_size, info["count"])
            out[layer.name] = info
        elif layer.type in ("ImageData", "HDF5Data", "WindowData"):
            src = {"ImageData": layer.image_data_param.source, "HDF5Data": layer.hdf5_data_param.source,
                   "WindowData": layer.window_data_param.source}[layer.type]
            if not src:
                raise UserError(f"{where} has no source")
            if not os.path.isfile(resolve_source(src)):
                raise InputMissing(f"{where}: source {src} does not exist (relative paths are resolved "
                                   f"against the current folder {os.getcwd()})")
            if os.path.getsize(resolve_source(src)) == 0:
                raise UserError(f"{where}: source {src} is empty")
    return out


# -------------------------------------------------------------------------------------------------- weights


def param_shapes(net):
    """{layer name: [param blob shape tuples]} for every layer of a ``caffe.Net`` (empty list: no params)."""
    out = collections.OrderedDict()
    for name, layer in zip(net._layer_names, net.layers):
        if name not in out:  # Caffe copies into the first layer of that name
            out[name] = [tuple(b.data.shape) for b in layer.blobs]
    return out


def blob_proto_shape(bp):
    """(shape tuple, legacy) of a BlobProto; legacy 4-D num/channels/height/width when those fields are set."""
    if bp.HasField("num") or bp.HasField("channels") or bp.HasField("height") or bp.HasField("width"):
        return (bp.num, bp.channels, bp.height, bp.width), True
    return tuple(int(d) for d in bp.shape.dim), False


def _shape_equals(target, bp):
    shape, legacy = blob_proto_shape(bp)
    if legacy:
        if len(target) > 4:
            return False
        return tuple([1] * (4 - len(target)) + list(target)) == shape
    return tuple(target) == shape


def _fmt(shape):
    return "x".join(str(d) for d in shape) if shape else "scalar"


def guess_naming(layer_names):
    """"han", "deepscale" or None: which SqueezeNet naming the names follow (``netgen.detect_naming``)."""
    return netgen.detect_naming(list(layer_names))


def _naming_hint(src_names, dst_names):
    a, b = guess_naming(src_names), guess_naming(dst_names)
    if a is None and b is None:
        return ""
    return (f" (the caffemodel's layer names look like {a or 'neither'} naming, the net's like "
            f"{b or 'neither'} naming)")


def check_weights_fit(net_shapes, caffemodel_param, weights_name="caffemodel", net_name="net",
                      allow_missing=False):
    """Refuse a caffemodel that does not fit a net, with the first differing layer named.

    ``net_shapes`` is :func:`param_shapes` of a ``caffe.Net`` (or a ``caffe.Net``); ``caffemodel_param`` a
    NetParameter from ``fileio.read_caffemodel``. Mirrors ``Net::CopyTrainedLayersFrom`` (layers matched by name,
    same blob count, ``Blob::ShapeEquals`` incl. legacy 4-D shapes, data count). Unlike Caffe, which silently keeps
    filler values, it also refuses a caffemodel that leaves learnable layers of the net unset unless
    ``allow_missing``. Returns the list of layer names that will be copied.
    """
    if not isinstance(net_shapes, dict):
        net_shapes = param_shapes(net_shapes)
    src_layers = list(caffemodel_param.layer) or list(caffemodel_param.layers)
    src_names = [l.name for l in src_layers]
    hint = _naming_hint(src_names, list(net_shapes))
    copied = []
    for layer in src_layers:
        if layer.name not in net_shapes:
            continue
        target = net_shapes[layer.name]
        if len(layer.blobs) != len(target):
            raise UserError(f"{weights_name} does not fit {net_name}: layer {layer.name!r} has {len(layer.blobs)} "
                             f"parameter blobs in the caffemodel but {len(target)} in the net{hint}")
        for j, (shape, bp) in enumerate(zip(target, layer.blobs)):
            src_shape = blob_proto_shape(bp)[0]
            what = "weights" if j == 0 else "bias" if j == 1 else f"param {j}"
            if not _shape_equals(shape, bp):
                raise UserError(f"{weights_name} does not fit {net_name}: layer {layer.name!r} {what} are "
                                 f"{_fmt(src_shape)} in the caffemodel but {_fmt(shape)} in the net{hint}")
            count = 1
            for d in shape:
                count *= d
            n = len(bp.double_data) or len(bp.data)
            if n != count:
                raise UserError(f"{weights_name} is corrupted: layer {layer.name!r} {what} hold {n} values for "
                                 f"shape {_fmt(shape)} ({count} values)")
        if target:
            copied.append(layer.name)
    learnable = [n for n, shapes in net_shapes.items() if shapes]
    missing = [n for n in learnable if n not in copied]
    if learnable and not copied:
        raise UserError(f"{weights_name} does not fit {net_name}: none of the net's learnable layers "
                         f"({', '.join(learnable[:3])}, ...) is in the caffemodel{hint}")
    if missing and not allow_missing:
        raise UserError(f"{weights_name} does not fit {net_name}: it has no weights for layer {missing[0]!r}"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                         + f" (Caffe would silently leave them at their initial values){hint}")
    for n in missing:
        log.warning("layer %s keeps its initial values: %s has no weights for it", n, weights_name)
    return copied


def num_classes(net):
    """The class count the loss sees: num_output of the Convolution/InnerProduct that feeds SoftmaxWithLoss (through
    pooling, ReLU, dropout...), or None when the net has no such loss."""
    layers = list(net.layer)
    for i, l in enumerate(layers):
        if l.type != "SoftmaxWithLoss" or not l.bottom:
            continue
        blob = l.bottom[0]
        for producer in reversed(layers[:i]):
            if blob not in producer.top:
                continue
            if producer.type in ("Convolution", "InnerProduct"):
                param = producer.convolution_param if producer.type == "Convolution" else producer.inner_product_param
                return param.num_output
            if not producer.bottom:
                return None
            blob = producer.bottom[0]
    return None


def check_labels(net, label_ranges=None):
    """Refuse LMDB Data layers whose labels lie outside the net's classes (Caffe checks them only in debug
    builds: an out-of-range label makes SoftmaxWithLoss write outside its blob). ``label_ranges`` are those
    :func:`check_data_layers` found; other sources are read here."""
    classes = num_classes(net)
    if not classes:
        return
    label_ranges = label_ranges or {}
    for l in net.layer:
        if l.type == "Data":
            path = resolve_source(l.data_param.source)
            low, high = label_ranges.get(path) or lmdbio.label_range(path)
            if low < 0 or high >= classes:
                bad = low if low < 0 else high
                raise UserError(f"Data layer {l.name!r} ({phase_of(l)}): LMDB {l.data_param.source} holds label "
                                f"{bad}, outside the net's {classes} classes (0..{classes - 1}); does the LMDB "
                                "belong to this net?")


def check_data(net, phases=("TRAIN", "TEST"), name="net"):
    """Everything a training run reads: a data layer in each phase (not a deploy net), its data, and the
    labels."""
    label_ranges = {}
    for phase in phases:
        require_data(net, phase, name)
        check_data_layers(net, phase, label_ranges=label_ranges)
    check_labels(net, label_ranges)


def check_net(net_param, phases=("TRAIN", "TEST"), name="net"):
    """Structure checks for every phase (types registered, Python layers importable, bottoms produced)."""
    for phase in phases:
        check_structure(net_param, phase, name)


def input_shape(net_param):
    """(1, C, H, W) of the net's first Data layer (its LMDB's first record and crop), or None when the LMDB is not
    on this machine."""
    for l in net_param.layer:
        if l.type == "Data":
            path = resolve_source(l.data_param.source)
            if not os.path.isdir(path):
                return None
            info = lmdbio.lmdb_info(path)
            crop = l.transform_param.crop_size
            return (1, info["channels"], crop or info["height"], crop or info["width"])
    return None


def weight_shapes(net_param):
    """{layer: [blob shapes]} of a net from a real caffe.Net of its deploy form, or None when the input shape is
    unknown (a trainval whose data is not on this machine)."""
    net_param = masks.remove_mask_layer(net_param)
    has_input = any(l.type == "Input" for l in net_param.layer) or len(net_param.input)
    shape = None if has_input else input_shape(net_param)
    if not has_input and shape is None:
        return None
    deploy = net_param if has_input else netgen.deploy(net_param, input_shape=shape)
    return param_shapes(make_net(deploy, "TEST"))


def check_fits(net_param, model_param, weights_name="caffemodel", net_name="net"):
    """:func:`check_weights_fit` against the net's real weight shapes when they can be built, else
    :func:`check_fits_by_name` (logged). Returns the layer names the caffemodel sets."""
    shapes = weight_shapes(net_param)
    if shapes is None:
        kinds = [l.type for l in net_param.layer if l.type in DATA_TYPES]
        why = ("the net's data is not on this machine" if not kinds or "Data" in kinds else
               f"the net's input shape comes from its {kinds[0]} layer, which only Caffe reads")
        log.info("%s: %s is checked against %s by layer names and kernel shapes only (Caffe checks the rest when "
                 "it loads it)", why, weights_name, net_name)
        return check_fits_by_name(net_param, model_param, weights_name, net_name)
    return check_weights_fit(shapes, model_param, weights_name=weights_name, net_name=net_name)


def check_fits_by_name(net_param, model_param, weights_name="caffemodel", net_name="net"):
    """Every Convolution/InnerProduct layer of the net has weights in the caffemodel with its num_output and
    kernel size (what can be checked without running the net)."""
    src = {l.name: l for l in list(model_param.layer) or list(model_param.layers)}
    hint = _naming_hint(list(src), [l.name for l in net_param.layer])
    names = []
    for layer in net_param.layer:
        if layer.type not in ("Convolution", "InnerProduct"):
            continue
        got = src.get(layer.name)
        if got is None or not len(got.blobs):
            raise UserError(f"{weights_name} does not fit {net_name}: it has no weights for layer "
                            f"{layer.name!r}{hint}")
        shape = blob_proto_shape(got.blobs[0])[0]
        if layer.type == "Convolution":
            cp = layer.convolution_param
            k = tuple(cp.kernel_size) if len(cp.kernel_size) else (cp.kernel_h, cp.kernel_w)
            k = k * 2 if len(k) == 1 else k
            want = (cp.num_output,) + k
            have = (shape[0],) + tuple(shape[2:]) if len(shape) == 4 else shape
        else:
            want, have = (layer.inner_product_param.num_output,), shape[:1]
        if tuple(have) != tuple(want):
            raise UserError(f"{weights_name} does not fit {net_name}: layer {layer.name!r} weights are "
                            f"{_fmt(shape)} in the caffemodel, but the net asks for {want[0]} outputs"
                            + (f" of kernel {_fmt(want[1:])}" if len(want) > 1 else "") + hint)
        names.append(layer.name)
    return names
