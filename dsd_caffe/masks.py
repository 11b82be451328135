"""Masks around the mask layer: net and caffemodel surgery, the masks file, the release, and sparsity reports.

The layer itself (what Caffe runs) is in :mod:`dsd_caffe.masklayer`; everything here works on NetParameters,
caffemodel files and numpy arrays, and imports no Caffe layer code: the mask codec (how a mask is stored in a
blob: :func:`pack_mask`, :func:`unpack_mask`) and the layer's param_str are here, so that reading masks does not
import Caffe.

- :func:`add_mask_layer` / :func:`remove_mask_layer`: the sparse trainval is the net plus one mask layer after the
  data layers, over **every** weighted layer (a layer kept dense gets an all-ones mask). So a net has exactly one
  sparse form, and a generated ``sparse_trainval.prototxt`` fits every pruned caffemodel of that net.
- :func:`add_masks_to_caffemodel`: the pruned caffemodel: weights zeroed where the mask is False, plus the mask
  layer's blobs (shared weights, packed masks).
- Gradual pruning (:mod:`dsd_caffe.gradual`): the layer's param_str also holds the schedule and each layer's final
  density, and the layer gets one more blob, its state (:func:`pack_state`: the iterations it has run and the steps
  it has taken), saved in every snapshot like the masks.
- :func:`release_masks`: DSD's release step, explicit: from a sparse-phase caffemodel, check that every pruned
  weight is exactly 0.0, and return the caffemodel without the mask layer. Redense training starts from it:
  pruned weights restart at exactly 0.0, survivors keep their values.

Past 400 lines: everything that reads or writes the mask layer's blobs and param_str (one-shot and gradual) is
here, so that the layout has one owner.
"""
import json
import os

import numpy as np

from . import caffefacts, fileio
from .caffeproto import caffe_pb2
from .errors import InputMissing, UserError
from .gradual import Plan

#: where Caffe finds the mask layer (python_param module and layer)
MODULE = "dsd_caffe.masklayer"
LAYER = "MaskLayer"
#: default name of the mask layer in generated trainvals, and of its zero-loss top
NAME = "dsd_masks"
TOP = "dsd_mask_loss"
HEADER = 1.0
BITS = 16
WEIGHTED = caffefacts.WEIGHTED


# ---------------------------------------------------------------------------------------------- the mask codec
def packed_length(count):
    """Length of the float32 blob that stores a mask of ``count`` weights."""
    return 1 + (int(count) + BITS - 1) // BITS


def pack_mask(mask):
    """bool array -> float32 vector: header 1.0, then 16 mask bits per float (exact integers 0..65535)."""
    bits = np.packbits(np.asarray(mask, dtype=bool).ravel(), bitorder="little")
    if bits.size % 2:
        bits = np.append(bits, np.uint8(0))
    words = bits.view("<u2").astype(np.float32)
    return np.concatenate([np.array([HEADER], np.float32), words])


def unpack_mask(packed, shape, what="mask"):
    """Inverse of :func:`pack_mask`; ValueError when the blob is unset, of the wrong size or not a packed mask."""
    packed = np.asarray(packed, dtype=np.float32).ravel()
    count = int(np.prod(shape))
    if packed.size != packed_length(count):
        raise UserError(f"{what}: stored mask has {packed.size} values, but a weight blob of shape "
                         f"{tuple(shape)} needs {packed_length(count)}; the mask does not fit the net")
    if packed[0] != HEADER:
        raise UserError(f"{what}: mask blob is not set (header {packed[0]!r}); load the pruned caffemodel "
                         "written by tools/prune.py (or a sparse-phase snapshot) as weights")
    words = packed[1:]
    if not np.all((words >= 0) & (words <= 65535) & (words == np.round(words))):
        raise UserError(f"{what}: mask blob holds values that are not packed mask bits; corrupted caffemodel?")
    bits = np.unpackbits(words.astype("<u2").view(np.uint8), bitorder="little", count=count)
    return bits.astype(bool).reshape(shape)


#: the state blob of a gradual mask layer: header, iterations run (high and low 16 bits, exact in float32), steps
#: taken
STATE_LENGTH = 4


def pack_state(iterations, steps_done):
    """The gradual mask layer's state blob: [1.0, iterations // 65536, iterations % 65536, steps taken]."""
    hi, lo = divmod(int(iterations), 65536)
    return np.array([HEADER, hi, lo, steps_done], np.float32)


def unpack_state(blob, what="mask layer state"):
    """(iterations run, steps taken) from :func:`pack_state`'s blob; UserError when unset or not a state."""
    b = np.asarray(blob, dtype=np.float32).ravel()
    if b.size != STATE_LENGTH or b[0] != HEADER:
        raise UserError(f"{what} is not set ({b.tolist()!r}); load the pruned caffemodel written by tools/prune.py "
                        "--schedule gradual (or a sparse-phase snapshot) as weights")
    if not np.all((b[1:] >= 0) & (b[1:] == np.round(b[1:])) & (b[1:] <= 65535)):
        raise UserError(f"{what} holds {b.tolist()!r}, not iteration and step counts; corrupted caffemodel?")
    return int(b[1]) * 65536 + int(b[2]), int(b[3])


def _spec(text):
    try:
        spec = json.loads(text or "")
    except json.JSONDecodeError as e:
        raise UserError(f"MaskLayer param_str is not valid JSON ({e.msg}): {text!r}") from None  # e.msg is all
    return spec


def parse_gradual(text):
    """(gradual.Plan, {layer: final density}) of a gradual mask layer's param_str, checked; None for one-shot."""
    spec = _spec(text)
    if not isinstance(spec, dict) or "gradual" not in spec:
        return None
    plan = Plan.from_json(spec["gradual"], "MaskLayer param_str: gradual")
    finals = {}
    for entry in spec.get("layers") or []:
        final = entry.get("final") if isinstance(entry, dict) else None
        if isinstance(final, bool) or not isinstance(final, (int, float)):
            raise UserError(f"MaskLayer param_str: layer entry {entry!r} has no final density")
        finals[entry.get("name")] = float(final)
    return plan.check(finals), finals


def parse_param_str(text):
    """The mask layer's param_str: [(masked layer name, weight shape)], checked."""
    spec = _spec(text)
    layers = spec.get("layers") if isinstance(spec, dict) else None
    if not isinstance(layers, list) or not layers:
        raise UserError(f'MaskLayer param_str must be {{"layers": [{{"name": ..., "shape": [...]}}, ...]}}, '
                         f"got {text!r}")
    out = []
    for entry in layers:
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("shape"), list)
                and all(isinstance(d, int) and d > 0 for d in entry["shape"])):
            raise UserError(f"MaskLayer param_str: bad layer entry {entry!r}")
        out.append((entry["name"], tuple(entry["shape"])))
    return out


# ---------------------------------------------------------------------------------------------- net surgery
def param_name(layer):
    """The name under which ``layer``'s weight blob is shared: its own param name, else ``<layer>_w``."""
    if len(layer.param) and layer.param[0].name:
        return layer.param[0].name
    return f"{layer.name}_w"


def shared_weights(net_param):
    """[[layer, layer, ...], ...]: the weighted layers that share one weight blob (the same ``param { name }``),
    each group in net order; a blob used by one layer only is in none."""
    groups = {}
    for layer in net_param.layer:
        if layer.type in WEIGHTED and len(layer.param) and layer.param[0].name and not is_mask_layer(layer):
            groups.setdefault(layer.param[0].name, []).append(layer.name)
    return [names for names in groups.values() if len(names) > 1]


def is_mask_layer(layer):
    return layer.type == "Python" and layer.python_param.layer == LAYER and layer.python_param.module == MODULE


def _is_mask_layer_object(layer):
    """True for the mask layer's Python object in a ``caffe.Net`` (its class is where Caffe found it: MODULE, LAYER;
    checked by name, so that this module never imports the layer's, which imports Caffe)."""
    return type(layer).__module__ == MODULE and type(layer).__name__ == LAYER


def _data_end(net):
    """Index after the last leading data/input layer (layers with no bottom)."""
    i = 0
    while i < len(net.layer) and len(net.layer[i].bottom) == 0:
        i += 1
    return i


def add_mask_layer(net_param, shapes, name=NAME, gradual=None):
    """Return a copy of ``net_param`` with the mask layer for ``shapes`` ({layer: weight shape}, in net order)
    inserted after the data layers, and each masked layer's weight param named for sharing. ``gradual``: (Plan,
    {layer: final density}) for gradual pruning (the schedule goes into param_str, and a state blob is added)."""
    pb2 = caffe_pb2()
    net = pb2.NetParameter()
    net.CopyFrom(net_param)
    if net.layers:
        raise UserError("net uses the old V1 'layers' format; upgrade it with Caffe's upgrade_net_proto_text")
    if any(is_mask_layer(l) for l in net.layer):
        raise UserError(f"net {net.name!r} already holds a mask layer")
    by_name = {l.name: l for l in net.layer}
    entries, params = [], []
    for lname, shape in shapes.items():
        layer = by_name.get(lname)
        if layer is None:
            raise UserError(f"layer {lname!r} is not in net {net.name!r}")
        if layer.type not in WEIGHTED:
            raise UserError(f"layer {lname!r} is a {layer.type} layer; only weighted layers can be masked")
        if not len(layer.param):
            layer.param.add()
        spec = layer.param[0]
        spec.name = param_name(layer)
        params.append(pb2.ParamSpec(name=spec.name, lr_mult=spec.lr_mult if spec.HasField("lr_mult") else 1.0,
                                    decay_mult=spec.decay_mult if spec.HasField("decay_mult") else 1.0))
        entries.append({"name": lname, "shape": [int(d) for d in shape]})
        if gradual is not None:
            entries[-1]["final"] = gradual[1][lname]
    mask = pb2.LayerParameter(name=name, type="Python", top=[TOP], loss_weight=[1.0])
    mask.include.add(phase=pb2.TRAIN)
    mask.python_param.module = MODULE
    mask.python_param.layer = LAYER
    spec = {"layers": entries}
    if gradual is not None:
        spec["gradual"] = gradual[0].to_json()
    mask.python_param.param_str = json.dumps(spec)
    mask.param.extend(params)
    for _ in range(len(entries) + (gradual is not None)):  # the masks, and a gradual layer's state
        mask.param.add(lr_mult=0.0, decay_mult=0.0)
    layers = list(net.layer)
    at = _data_end(net)
    _keep_layers(net, layers[:at] + [mask] + layers[at:])
    return net


def remove_mask_layer(net_param):
    """Return a copy of ``net_param`` without the mask layer (the weights' param names stay; they are harmless)."""
    net = caffe_pb2().NetParameter()
    net.CopyFrom(net_param)
    _keep_layers(net, [l for l in net.layer if not is_mask_layer(l)])
    return net


def _keep_layers(net, layers):
    keep = [type(l)() for l in layers]
    for new, old in zip(keep, layers):
        new.CopyFrom(old)
    del net.layer[:]
    net.layer.extend(keep)


def mask_layer_spec(net_param):
    """(mask layer name, [(layer, shape), ...]) of the mask layer in a net or caffemodel NetParameter, or None."""
    for l in net_param.layer:
        if is_mask_layer(l):
            return l.name, parse_param_str(l.python_param.param_str)
    return None


def gradual_spec(net_param):
    """(gradual.Plan, {layer: final density}) of the gradual mask layer in a net or caffemodel NetParameter, or
    None (no mask layer, or a one-shot one)."""
    layer = next((l for l in net_param.layer if is_mask_layer(l)), None)
    return parse_gradual(layer.python_param.param_str) if layer is not None else None


def sparse_net(net_param, shapes, gradual=None):
    """The sparse form of a dense net: the mask layer over every weighted layer (``shapes``: {layer: shape});
    ``gradual`` as :func:`add_mask_layer`."""
    return add_mask_layer(remove_mask_layer(net_param), shapes, gradual=gradual)


# ---------------------------------------------------------------------------------------------- caffemodels
_LEGACY_DIMS = ("num", "channels", "height", "width")


def blob_array(blob):
    """A BlobProto's data as a float32 array of its shape, read as Caffe's ``Blob::FromProto`` reads it: the
    legacy 4-d (num, channels, height, width) when any of them is set, else ``shape.dim`` (none: a scalar)."""
    legacy = any(blob.HasField(d) for d in _LEGACY_DIMS)
    shape = tuple(getattr(blob, d) for d in _LEGACY_DIMS) if legacy else tuple(blob.shape.dim)
    return np.asarray(blob.data, dtype=np.float32).reshape(shape)


def _as_param(source):
    if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
        return fileio.read_caffemodel(source)
    return source


def weight_arrays(source, layer_types=WEIGHTED):
    """{layer: weight ndarray} of the weighted layers of a caffemodel (path or NetParameter) or a ``caffe.Net``."""
    source = _as_param(source)
    if hasattr(source, "layer"):
        return {l.name: blob_array(l.blobs[0]) for l in source.layer
                if l.type in layer_types and len(l.blobs)}
    return {name: np.array(source.params[name][0].data) for name, layer in zip(source._layer_names, source.layers)
            if layer.type in layer_types and name in source.params}


def flat(weights):
    """All arrays of a {layer: weights} dict in one flat array (for histograms)."""
    return np.concatenate([np.ravel(w) for w in weights.values()])


def add_masks_to_caffemodel(model_param, masks, net_with_mask_layer):
    """Return a copy of caffemodel ``model_param`` with the mask layer's blobs (shared weights, packed masks) so
    that it loads into ``net_with_mask_layer``. The weights are zeroed where the masks are False."""
    spec = mask_layer_spec(net_with_mask_layer)
    if spec is None:
        raise UserError("the net has no mask layer")
    name, entries = spec
    pb2 = caffe_pb2()
    out = pb2.NetParameter()
    out.CopyFrom(model_param)
    by_name = {l.name: l for l in out.layer}
    layer = pb2.LayerParameter()
    layer.CopyFrom(next(l for l in net_with_mask_layer.layer if l.name == name))
    del layer.blobs[:]
    packed = []
    for lname, shape in entries:
        if lname not in masks:
            raise UserError(f"no mask given for layer {lname!r}")
        m = np.asarray(masks[lname], dtype=bool)
        src = by_name.get(lname)
        if src is None or not len(src.blobs):
            raise UserError(f"caffemodel has no weights for layer {lname!r}")
        w = blob_array(src.blobs[0])
        if w.shape != tuple(shape) or m.shape != tuple(shape):
            raise UserError(f"layer {lname!r}: weights {w.shape}, mask {m.shape}, net expects {tuple(shape)}; "
                            "the mask does not fit the net")
        w = np.where(m, w, np.float32(0.0)).astype(np.float32)
        del src.blobs[0].data[:]
        src.blobs[0].data.extend(w.ravel().tolist())
        b = layer.blobs.add()
        b.shape.dim.extend(shape)
        b.data.extend(w.ravel().tolist())
        packed.append(pack_mask(m))
    if parse_gradual(layer.python_param.param_str) is not None:
        packed.append(pack_state(0, 0))
    for p in packed:
        b = layer.blobs.add()
        b.shape.dim.append(p.size)
        b.data.extend(p.tolist())
    _keep_layers(out, [l for l in out.layer if not is_mask_layer(l)] + [layer])
    return out


def read_masks(source):
    """{layer: bool mask} from a caffemodel (path or NetParameter) of the sparse phase, or a ``caffe.Net`` built
    in the TRAIN phase of a sparse trainval. UserError when there is none, saying what to load instead."""
    if not hasattr(source, "_layer_names"):
        param = _as_param(source)
        spec = mask_layer_spec(param)
        if spec is None:
            raise UserError("the caffemodel holds no mask layer (is it a sparse-phase model? a pruned model or a "
                            "sparse.caffemodel has one; a redense model has none)")
        name, entries = spec
        layer = next(l for l in param.layer if l.name == name)
        blobs = [l.data for l in layer.blobs]
        extra = parse_gradual(layer.python_param.param_str) is not None
    else:
        layer = next((l for l in source.layers if _is_mask_layer_object(l)), None)
        if layer is None:
            hint = getattr(source, "_dsd_weights", None)
            raise UserError("this caffe.Net holds no mask layer: the mask layer is in the TRAIN phase only, and "
                            + (f"this net was built in TEST; read_masks({hint!r}) reads them from its caffemodel"
                               if hint else "a TEST net has none; pass the caffemodel path to read_masks instead"))
        entries = layer.layers
        blobs = [b.data for b in layer.blobs]
        extra = layer.plan is not None
    n = len(entries)
    if len(blobs) != 2 * n + extra:
        raise UserError(f"mask layer holds {len(blobs)} blobs, expected {2 * n + extra}")
    return {lname: unpack_mask(blobs[n + i], shape, what=f"mask of layer {lname}")
            for i, (lname, shape) in enumerate(entries)}


def zero_pruned(param):
    """A copy of caffemodel NetParameter ``param`` (of the sparse phase) with every weight its own masks prune set
    to exactly 0.0 (in the masked layers and in the mask layer's shared copies); returns (copy, the largest
    ``|w|`` so zeroed). Gradual pruning's final model: Caffe's solver keeps a momentum history for a weight pruned
    during the phase, which the mask layer cannot reach, so until it decays a snapshot holds that residual where
    the mask is 0 (every forward pass zeroes it again)."""
    out = caffe_pb2().NetParameter()
    out.CopyFrom(param)
    kept = read_masks(out)
    name, entries = mask_layer_spec(out)
    mask_layer = next(l for l in out.layer if l.name == name)
    blobs = {lname: mask_layer.blobs[i] for i, (lname, _) in enumerate(entries)}
    residual = 0.0
    for layer in out.layer:
        if layer.name in kept and len(layer.blobs):
            for blob in (layer.blobs[0], blobs[layer.name]):
                w = blob_array(blob)
                residual = max(residual, float(np.abs(w[~kept[layer.name]]).max(initial=0.0)))
                del blob.data[:]
                blob.data.extend(np.where(kept[layer.name], w, np.float32(0.0)).ravel().tolist())
    return out, residual


def check_masked(model, masks, name=None):
    """Raise UserError unless every pruned weight of the caffemodel ``model`` (path or NetParameter; ``name``
    names it in messages, default its path) is exactly 0.0; returns {layer: density}."""
    w = weight_arrays(model)
    name = name or _name(model)
    out = {}
    for layer, m in masks.items():
        if layer not in w or w[layer].shape != m.shape:
            raise UserError(f"{name}: mask of layer {layer!r} {m.shape} does not fit its weights "
                            f"{w.get(layer, np.empty(0)).shape}")
        bad = int(np.count_nonzero(w[layer][~m]))
        if bad:
            raise UserError(f"{name}: {bad} pruned weights of layer {layer!r} are not 0.0")
        out[layer] = float(np.count_nonzero(w[layer]) / w[layer].size)
    return out


def _name(model):
    """How messages name a caffemodel given as a path or a NetParameter."""
    return os.fspath(model) if isinstance(model, (str, os.PathLike)) else "the caffemodel"


def release_masks(sparse_model, name=None):
    """DSD's release: the caffemodel of a sparse-phase model (path or NetParameter; ``name`` names it in
    messages) without its mask layer, after checking that every pruned weight is exactly 0.0. Returns
    (NetParameter, {layer: density})."""
    param = _as_param(sparse_model)
    densities = check_masked(param, read_masks(param), name or _name(sparse_model))
    return remove_mask_layer(param), densities


# ---------------------------------------------------------------------------------------------- masks file
def save_masks(path, masks, force=False):
    with fileio.atomic_path(path, force=force) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **{k: np.asarray(v, bool) for k, v in masks.items()})
    return path


def load_masks(path):
    if not os.path.exists(path):
        raise InputMissing(f"masks file {path} does not exist")
    try:
        with np.load(path) as z:
            return {k: z[k].astype(bool) for k in z.files}
    except (OSError, ValueError) as e:
        raise UserError(f"masks file {path} is unreadable ({e})") from e


def same_masks(a, b):
    """The first layer where two {layer: mask} dicts differ (by name or content), or None."""
    diff = sorted(set(a) ^ set(b)) or [k for k in a if not np.array_equal(a[k], b[k])]
    return diff[0] if diff else None


# ---------------------------------------------------------------------------------------------- reports
class SparsityReport(dict):
    """{layer: {"shape", "count", "nonzero", "density"}, ..., "total": {...}}; ``str()`` is a table."""

    def format_table(self):
        rows = [(k, v) for k, v in self.items() if k != "total"] + [("total", self["total"])]
        width = max(len(k) for k, _ in rows)
        lines = [f"{'layer':<{width}} {'nonzero':>10} {'weights':>10} {'density':>8}"]
        for k, v in rows:
            lines.append(f"{k:<{width}} {v['nonzero']:>10,} {v['count']:>10,} {v['density']:>8.4f}")
        return "\n".join(lines)

    def __str__(self):
        return self.format_table()


def sparsity_report(source):
    """Per-layer and total non-zero weights of a caffemodel (path or NetParameter) or a ``caffe.Net``, as a
    :class:`SparsityReport` (a dict; ``print()`` it for a table)."""
    report, total, nonzero = SparsityReport(), 0, 0
    for name, w in weight_arrays(source).items():
        nz = int(np.count_nonzero(w))
        report[name] = {"shape": list(w.shape), "count": int(w.size), "nonzero": nz, "density": nz / w.size}
        total += w.size
        nonzero += nz
    report["total"] = {"count": int(total), "nonzero": int(nonzero), "density": nonzero / total if total else 0.0}
    return report


def layer_densities_of(model):
    """{layer: fraction of non-zero weights} of a caffemodel (path or NetParameter)."""
    return {n: float(np.count_nonzero(w) / w.size) for n, w in weight_arrays(model).items()}
