"""Loading a net with its weights for use: ``load`` (a zoo model name, a prototxt or a NetParameter) and
``load_net`` (a prototxt and a caffemodel, after dsd_caffe's input checks), each giving a ready ``caffe.Net``.

A zoo model's net is generated in memory by :mod:`dsd_caffe.netgen` (the same NetParameter that
``tools/generate.py`` writes to the repository's models/), so ``load`` needs no prototxt file and works from an
installed package; its weights are verified (:mod:`dsd_caffe.zoo`) before they are copied.
"""
import logging
import os
import weakref

import numpy as np

from . import caffe_env, deepcompression, fileio, netcheck, sources, zoo
from .errors import UserError

log = logging.getLogger(__name__)


def load_net(model, weights=None, phase="TEST", gpu=None, iterations=None, allow_missing=False, net_param=None):
    """Validate ``model`` (prototxt), its data sources and ``weights`` (caffemodel) in Python, then build the
    ``caffe.Net`` and copy the weights. Data sources resolve beside the prototxt first, then in the current
    folder (``dsd_caffe.sources``), so this works from any folder. ``net_param`` (absolute sources) replaces
    reading ``model``. Every bad input is a UserError/OSError naming it."""
    caffe_env.set_device(gpu)
    model = os.fspath(model) if model is not None else "net"
    if net_param is None:
        net_param = sources.read_net(model, require=(phase.upper(), "BOTH") if isinstance(phase, str) else ())
    weights_param = None
    if weights is not None and _is_hdf5(weights):
        log.warning("%s is an HDF5 weights file: Caffe reads it, but its fit to the net is not checked first",
                    weights)
    elif weights is not None:
        weights_param = fileio.read_caffemodel(weights)
    netcheck.check_structure(net_param, phase, name=model)
    netcheck.check_data_layers(net_param, phase, iterations=iterations)
    net = caffe_env.make_net(net_param, "TEST" if netcheck.phase_value(phase) else "TRAIN")
    if weights_param is not None:
        netcheck.check_weights_fit(netcheck.param_shapes(net), weights_param, weights_name=os.fspath(weights),
                                   net_name=model, allow_missing=allow_missing)
    if weights is not None:
        net.copy_from(os.fspath(weights))
        try:
            net._dsd_weights = os.path.abspath(os.fspath(weights))  # masks.read_masks names it in its hint
        except AttributeError:
            pass
    return net


def _is_hdf5(path):
    try:
        with open(path, "rb") as f:
            return f.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:
        return False


def _copy_param(net, param):
    for layer in param.layer:
        if layer.name in net.params:
            for blob, bp in zip(net.params[layer.name], layer.blobs):
                blob.data[...] = np.asarray(bp.data or bp.double_data, np.float32).reshape(blob.data.shape)


def _param_net(net_param, phase, gpu):
    caffe_env.set_device(gpu)
    return caffe_env.make_net(net_param, phase)


def _bare_net(model, prototxt, phase, gpu):
    """(net without weights, its name for messages): from ``prototxt`` when given, else the generated deploy net."""
    if prototxt is not None:
        return load_net(prototxt, None, phase, gpu=gpu), os.fspath(prototxt)
    param = model.net_param("deploy")
    if param is None:
        raise UserError(f"{model.name}: the project generates no net for it; pass prototxt=")
    return _param_net(param, phase, gpu), f"the deploy net of {model.name}"


def _weights_param(model, weights, net):
    """The weights of ``model`` as a NetParameter: a caffemodel as it is, a Deep Compression ``.net`` decoded."""
    if model.format == "caffemodel":
        return fileio.read_caffemodel(weights)
    specs = deepcompression.net_specs(net)
    return deepcompression.to_net_parameter(deepcompression.decode(weights, specs), specs)


#: caffe.Net -> the ZooModel that load() built it for (see loaded_model)
_LOADED = weakref.WeakKeyDictionary()


def loaded_model(net):
    """The ZooModel that ``load(name)`` built ``net`` for, or None (a net made otherwise)."""
    return _LOADED.get(net)


def _copy_weights(net, weights_param, weights, net_name):
    """Copy ``weights_param`` into ``net`` once it is known to fit (netcheck's rules, as Caffe's copy_from)."""
    netcheck.check_weights_fit(netcheck.param_shapes(net), weights_param, weights_name=os.fspath(weights),
                               net_name=net_name)
    _copy_param(net, weights_param)


def _caffemodel_instead(weights, model):
    """True when ``weights`` is not the release of ``model`` but a caffemodel (warned); the release, or a file
    that is neither, gives False (verify names its mismatch)."""
    try:
        zoo.verify(weights, model.name)
        return False
    except UserError as e:
        mismatch = e
    if model.format == "caffemodel" or not os.path.isfile(weights):
        return False
    try:
        fileio.read_caffemodel(weights)
    except UserError:
        return False
    log.warning("%s is not the verified release of %s (%s), but a caffemodel: using it as the weights of that net, "
                "checked to fit it", weights, model.name, mismatch)
    return True


def load(name_or_prototxt, weights=None, prototxt=None, phase="TEST", gpu=None, url=None, cache=None):
    """A ready ``caffe.Net`` for a zoo model name, a prototxt (+ caffemodel) path or a NetParameter in memory.

    - Zoo name: ``weights`` is a local copy (verified), else the file is fetched into ``cache`` (default
      ``$DSD_CAFFE_ZOO`` or ``~/.cache/dsd-caffe/zoo``) from ``url`` or the release URL. The net is the
      model's deploy net generated in memory by netgen, or ``prototxt`` when given. A Deep Compression ``.net``
      is decoded on the fly. The weights are checked to fit the net before they are copied. ``weights`` that are
      not the release but a caffemodel (one decoded from it, or trained on from it) are taken when they fit the
      net, with a warning that they are not the verified release.
    - Prototxt path: built in ``phase`` with ``weights`` (a caffemodel), after dsd_caffe's input checks
      (:func:`load_net`).
    - NetParameter: built in ``phase`` (``caffe_env.make_net``), ``weights`` (a caffemodel) checked and copied.
    """
    if not isinstance(name_or_prototxt, (str, os.PathLike)):  # a NetParameter
        net = _param_net(name_or_prototxt, phase, gpu)
        if weights is not None:
            _copy_weights(net, fileio.read_caffemodel(weights), weights, f"net {name_or_prototxt.name!r}")
        return net
    if name_or_prototxt not in zoo.ZOO:
        if not str(name_or_prototxt).endswith((".prototxt", ".pt")) and not os.path.exists(name_or_prototxt):
            raise UserError(f"{name_or_prototxt!r} is neither a zoo model ({', '.join(zoo.ZOO)}) nor a prototxt "
                            "file")
        return load_net(name_or_prototxt, weights, phase, gpu=gpu)
    model = zoo.get(name_or_prototxt)
    if weights is not None and _caffemodel_instead(weights, model):
        net, net_name = _bare_net(model, prototxt, phase, gpu)
        _copy_weights(net, fileio.read_caffemodel(weights), weights, net_name)
        _LOADED[net] = model
        return net
    if weights is not None:
        zoo.verify(weights, model.name)
    else:
        folder = cache or os.environ.get("DSD_CAFFE_ZOO") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                         "dsd-caffe", "zoo")
        os.makedirs(folder, exist_ok=True)
        weights = zoo.fetch(model.name, folder, url=url)
    net, net_name = _bare_net(model, prototxt, phase, gpu)
    _copy_weights(net, _weights_param(model, weights, net), weights, net_name)
    _LOADED[net] = model
    return net
