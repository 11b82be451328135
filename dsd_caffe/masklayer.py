"""The mask layer: a Caffe Python layer that keeps pruned weights at exactly 0.0 while Caffe trains.

How it works (under the ``caffe train`` binary and under pycaffe's Solver alike):

- The generated sparse trainval holds one ``MaskLayer`` right after the data layer(s). Its ``param { name: ... }``
  entries share each masked layer's weight blob by name (the conv/fc gets the same param name). Its own mask blobs
  follow, with ``lr_mult: 0`` and ``decay_mult: 0``, so the masks are saved in every snapshot caffemodel and a resume
  restores them with no extra file.
- Forward multiplies the shared weights by the 0/1 masks (before any conv runs); backward multiplies their diffs. Backward runs
  last, after every conv has accumulated its weight diff (also with ``iter_size`` > 1). Caffe's SGD update then
  adds ``decay * w = 0`` (weight decay), keeps the momentum history at 0 for pruned positions (it starts at 0), and
  subtracts 0: pruned weights stay exactly 0.0 in every forward pass and every snapshot.
- The layer has no bottom and one top, a constant 0 with ``loss_weight: 1``. A Python layer with no top is never
  backpropagated (Caffe decides it does not contribute to the loss), and an in-place layer on the data blob would
  make the first conv compute a gradient for the images (~10% extra time on SqueezeNet). The zero loss costs
  nothing and shows as ``dsd_mask_loss = 0`` in Caffe's training log. The layer is in the TRAIN phase only; the
  TEST net shares the (already zero) weights.
- The masks are stored compactly: 16 mask bits per float32 (exact integers), after one header float (1.0 once
  masks are set). So a mask adds 1/16 of its weights' size. Caffe also writes a shared blob under every layer that
  uses it, so the masked weights appear twice in a sparse-phase caffemodel (measured: see ``mask_overhead``).
- Multi-GPU: Caffe's CLI refuses Python layers with several GPUs. Use pycaffe with NCCL as in Caffe's
  ``python/train.py`` (one process per GPU, ``caffe.NCCL``); every solver's net holds its own mask layer, and the
  masks are identical because they come from the same caffemodel. Not testable on this CPU-only machine.
"""
import json
import logging

import numpy as np

from .caffe_env import caffe_pb2
from .errors import UserError

log = logging.getLogger(__name__)

MODULE = "dsd_caffe.masklayer"
LAYER = "MaskLayer"
#: default name of the mask layer in generated trainvals, and of its zero-loss top
NAME = "dsd_masks"
TOP = "dsd_mask_loss"
HEADER = 1.0
BITS = 16


# ---------------------------------------------------------------------------------------------- compact masks
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


# ---------------------------------------------------------------------------------------------- the layer
def _parse_param_str(text):
    try:
        spec = json.loads(text or "")
    except json.JSONDecodeError as e:
        raise UserError(f"MaskLayer param_str is not valid JSON ({e.msg}): {text!r}") from None
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


def _caffe_layer_base():
    from .caffe_env import import_caffe

    return import_caffe().Layer


class MaskLayer(_caffe_layer_base()):
    """Blobs: the shared weights of each masked layer (in param_str order), then one packed mask per layer."""

    def setup(self, bottom, top):
        self.layers = _parse_param_str(self.param_str)
        if len(bottom) != 0 or len(top) != 1:
            raise UserError(f"MaskLayer takes no bottom and one top (a zero loss), got {len(bottom)} bottoms "
                             f"and {len(top)} tops")
        for _, shape in self.layers:
            self.blobs.add_blob(*shape)
        for _, shape in self.layers:
            self.blobs.add_blob(packed_length(np.prod(shape)))
        self._packed = None
        self._keep = None

    def reshape(self, bottom, top):
        top[0].reshape(1)

    def _check(self):
        """Decode the masks when their blobs change (after loading weights or restoring a solverstate)."""
        n = len(self.layers)
        if len(self.blobs) != 2 * n:
            raise UserError(f"MaskLayer has {len(self.blobs)} blobs, expected {2 * n}")
        if self._packed is not None and all(np.array_equal(p, self.blobs[n + i].data)
                                            for i, p in enumerate(self._packed)):
            return
        packed, keep = [], []
        for i, (name, shape) in enumerate(self.layers):
            if tuple(self.blobs[i].data.shape) != shape:
                raise UserError(f"MaskLayer: weights of {name} have shape {self.blobs[i].data.shape}, "
                                 f"param_str says {shape}")
            data = np.array(self.blobs[n + i].data, copy=True)
            keep.append(unpack_mask(data, shape, what=f"mask of layer {name}").astype(np.float32))
            packed.append(data)
        self._packed, self._keep = packed, keep
        log.debug("MaskLayer: masks decoded for %s", [name for name, _ in self.layers])

    def forward(self, bottom, top):
        self._check()
        for i, keep in enumerate(self._keep):
            np.multiply(self.blobs[i].data, keep, out=self.blobs[i].data)  # 10x faster than copyto(where=)
        top[0].data[...] = 0.0

    def backward(self, top, propagate_down, bottom):
        self._check()
        for i, keep in enumerate(self._keep):
            np.multiply(self.blobs[i].diff, keep, out=self.blobs[i].diff)


# ---------------------------------------------------------------------------------------------- net surgery
def param_name(layer):
    """The name under which ``layer``'s weight blob is shared: its own param name, else ``<layer>_w``."""
    if len(layer.param) and layer.param[0].name:
        return layer.param[0].name
    return f"{layer.name}_w"


def is_mask_layer(layer):
    return layer.type == "Python" and layer.python_param.layer == LAYER and layer.python_param.module == MODULE


def _data_end(net):
    """Index after the last leading data/input layer (layers with no bottom)."""
    i = 0
    while i < len(net.layer) and len(net.layer[i].bottom) == 0:
        i += 1
    return i


def add_mask_layer(net_param, shapes, name=NAME):
    """Return a copy of ``net_param`` with the mask layer for ``shapes`` ({layer: weight shape}, in net order)
    inserted after the data layers, and each masked layer's weight param named for sharing."""
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
        if layer.type not in ("Convolution", "InnerProduct", "Deconvolution"):
            raise UserError(f"layer {lname!r} is a {layer.type} layer; only weighted layers can be masked")
        if not len(layer.param):
            layer.param.add()
        spec = layer.param[0]
        spec.name = param_name(layer)
        shared = pb2.ParamSpec(name=spec.name, lr_mult=spec.lr_mult if spec.HasField("lr_mult") else 1.0,
                               decay_mult=spec.decay_mult if spec.HasField("decay_mult") else 1.0)
        params.append(shared)
        entries.append({"name": lname, "shape": [int(d) for d in shape]})
    mask = pb2.LayerParameter(name=name, type="Python", top=[TOP], loss_weight=[1.0])
    mask.include.add(phase=pb2.TRAIN)
    mask.python_param.module = MODULE
    mask.python_param.layer = LAYER
    mask.python_param.param_str = json.dumps({"layers": entries})
    mask.param.extend(params)
    for e in entries:
        mask.param.add(lr_mult=0.0, decay_mult=0.0)
    layers = list(net.layer)
    at = _data_end(net)
    del net.layer[:]
    net.layer.extend(layers[:at] + [mask] + layers[at:])
    return net


def remove_mask_layer(net_param):
    """Return a copy of ``net_param`` without the mask layer (the weights' param names stay; they are harmless)."""
    pb2 = caffe_pb2()
    net = pb2.NetParameter()
    net.CopyFrom(net_param)
    keep = [l for l in net.layer if not is_mask_layer(l)]
    del net.layer[:]
    net.layer.extend(keep)
    return net


def mask_layer_spec(net_param):
    """(mask layer name, [(layer, shape), ...]) of the mask layer in a net or caffemodel NetParameter, or None."""
    for l in net_param.layer:
        if is_mask_layer(l):
            return l.name, _parse_param_str(l.python_param.param_str)
    return None


def blob_array(blob):
    shape = tuple(blob.shape.dim) if blob.HasField("shape") else tuple(
        d for d in (blob.num, blob.channels, blob.height, blob.width))
    return np.asarray(blob.data, dtype=np.float32).reshape(shape)


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
    for p in packed:
        b = layer.blobs.add()
        b.shape.dim.append(p.size)
        b.data.extend(p.tolist())
    keep = [l for l in out.layer if not is_mask_layer(l)]
    del out.layer[:]
    out.layer.extend(keep)
    out.layer.add().CopyFrom(layer)
    return out


# ---------------------------------------------------------------------------------------------- pycaffe API
def _mask_from_net(net):
    """(name, MaskLayer object) of a caffe.Net (pycaffe hands back the Python layer object itself)."""
    for lname, layer in zip(net._layer_names, net.layers):
        if isinstance(layer, MaskLayer):
            return lname, layer
    return None, None


def read_masks(source):
    """{layer: bool mask} from a ``caffe.Net`` (TRAIN phase of a sparse trainval), a caffemodel path or a
    caffemodel NetParameter. Raises ValueError when there is no mask layer."""
    from . import fileio

    if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
        source = fileio.read_caffemodel(source)
    if hasattr(source, "layer"):  # NetParameter
        spec = mask_layer_spec(source)
        if spec is None:
            raise UserError("the caffemodel holds no mask layer (is it a sparse-phase model?)")
        name, entries = spec
        layer = next(l for l in source.layer if l.name == name)
        n = len(entries)
        if len(layer.blobs) != 2 * n:
            raise UserError(f"mask layer {name!r} holds {len(layer.blobs)} blobs, expected {2 * n}")
        return {lname: unpack_mask(layer.blobs[n + i].data, shape, what=f"mask of layer {lname}")
                for i, (lname, shape) in enumerate(entries)}
    name, layer = _mask_from_net(source)
    if layer is None:
        raise UserError("the net holds no mask layer (load the TRAIN phase of a sparse trainval)")
    n = len(layer.layers)
    return {lname: unpack_mask(layer.blobs[n + i].data, shape, what=f"mask of layer {lname}")
            for i, (lname, shape) in enumerate(layer.layers)}


def weight_arrays(source, layer_types=("Convolution", "InnerProduct", "Deconvolution")):
    """{layer: weight ndarray} of the weighted layers of a caffemodel (path or NetParameter) or a ``caffe.Net``."""
    from . import fileio

    if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
        source = fileio.read_caffemodel(source)
    if hasattr(source, "layer"):
        return {l.name: blob_array(l.blobs[0]) for l in source.layer
                if l.type in layer_types and len(l.blobs)}
    return {name: np.array(source.params[name][0].data) for name, layer in zip(source._layer_names, source.layers)
            if layer.type in layer_types and name in source.params}


def sparsity_report(source):
    """{layer: {"shape", "count", "nonzero", "density"}} of the weighted layers, plus "total"."""
    report, total, nonzero = {}, 0, 0
    for name, w in weight_arrays(source).items():
        nz = int(np.count_nonzero(w))
        report[name] = {"shape": list(w.shape), "count": int(w.size), "nonzero": nz, "density": nz / w.size}
        total += w.size
        nonzero += nz
    report["total"] = {"count": int(total), "nonzero": int(nonzero), "density": nonzero / total if total else 0.0}
    return report
