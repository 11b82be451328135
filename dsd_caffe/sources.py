"""Where a net's data comes from: its data layers' sources, resolved by one rule.

The rule (every tool and :func:`dsd_caffe.load` use it): an absolute source is used as it is; a relative one is
looked up **beside the prototxt** that names it first (that is how the toolkit writes them: relative to the
file's own folder), then in the current folder (where the ``caffe`` binary looks). When both exist and differ,
the prototxt's folder wins and a warning says what ``caffe`` run from here would read instead.

``absolute_sources`` returns a copy of a net with every source absolute, ready for pycaffe from any folder;
``relative_sources`` writes them relative to an output folder again, for the prototxts the tools write.
"""
import logging
import os
import subprocess
import tempfile

from .caffeproto import caffe_pb2
from .caffefacts import SOURCE_PARAMS  # noqa: F401 (read here by other modules)
from . import fileio
from .caffe_env import caffe_tool
from .errors import InputMissing, UserError
from .lmdbio import lmdb_info

log = logging.getLogger(__name__)

def data_paths(net):
    """The sources ``net``'s data layers read (as written in it: absolute in a net from :func:`read_net`), for the
    overlap rule (``fileio.check_apart``)."""
    return [p.source for _, p in source_fields(net) if p.source]


def copy_message(message):
    out = type(message)()
    out.CopyFrom(message)
    return out


def phase_of(layer):
    """"TRAIN", "TEST" or "BOTH": the phase a layer's ``include`` rules put it in."""
    pb2 = caffe_pb2()
    phases = {r.phase for r in layer.include if r.HasField("phase")}
    return "TRAIN" if phases == {pb2.TRAIN} else "TEST" if phases == {pb2.TEST} else "BOTH"


def source_fields(net):
    """[(layer, its *_data_param)] for every layer of ``net`` that reads a source."""
    return [(l, getattr(l, SOURCE_PARAMS[l.type])) for l in net.layer if l.type in SOURCE_PARAMS]


def resolve(source, base):
    """The absolute path of ``source`` by the module's rule; ``base`` is the prototxt's folder (None: only the
    current folder). The path may not exist."""
    source = os.fspath(source)
    if os.path.isabs(source):
        return source
    here = os.path.abspath(source)
    if base is None:
        return here
    near = os.path.abspath(os.path.join(base, source))
    if os.path.exists(near):
        if os.path.exists(here) and os.path.realpath(here) != os.path.realpath(near):
            log.warning("source %s: using %s (beside the prototxt); `caffe` run from this folder would read %s",
                        source, near, here)
        return near
    return here if os.path.exists(here) else near


def absolute_sources(net_param, base, train=None, test=None, require=("TRAIN", "TEST", "BOTH")):
    """Copy of ``net_param`` with every data source absolute: ``train``/``test`` when given (for the TRAIN/TEST
    layers), else resolved by :func:`resolve` against ``base``. Sources of layers in the phases ``require``d
    must exist (FileNotFoundError naming the layer and where it looked); pass ``require=()`` to write a net for
    another machine."""
    net = copy_message(net_param)
    for layer, p in source_fields(net):
        phase = phase_of(layer)
        given = train if phase == "TRAIN" else test if phase == "TEST" else None
        src = os.fspath(given) if given is not None else p.source
        if not src:
            raise UserError(f"{layer.type} layer {layer.name!r} has no source")
        full = resolve(src, base if given is None else None)
        if phase in require and not os.path.exists(full):
            where = f"beside the prototxt in {base} and in the current folder" if base and given is None else \
                "in the current folder"
            raise InputMissing(f"{layer.type} layer {layer.name!r} ({phase}): data source {src} not found "
                               f"(looked {where})")
        p.source = full
    return net


def relative_sources(net_param, folder):
    """Copy of ``net_param`` (absolute sources) with sources relative to ``folder``."""
    net = copy_message(net_param)
    for _, p in source_fields(net):
        p.source = os.path.relpath(p.source, folder)
    return net


def data_sources(net):
    """((train source, batch size), (test source, test batch size)) of the LMDB Data layers of ``net``; the test
    pair is the train pair when the net has one Data layer for both phases."""
    train = test = None
    for l in net.layer:
        if l.type == "Data":
            ph = phase_of(l)
            if ph in ("TRAIN", "BOTH") and train is None:
                train = (l.data_param.source, l.data_param.batch_size)
            if ph in ("TEST", "BOTH") and test is None:
                test = (l.data_param.source, l.data_param.batch_size)
    if train is None:
        raise UserError(f"net {net.name!r} has no TRAIN Data (LMDB) layer")
    return train, test or train


def test_source(net):
    """The source of the net's TEST-phase Data layer, or None."""
    return next((l.data_param.source for l in net.layer if l.type == "Data" and phase_of(l) in ("TEST", "BOTH")),
                None)


def lmdb_count(path):
    """Records in the LMDB at ``path``."""
    return lmdb_info(path)["count"]


def known_count(path):
    """Records in the LMDB at ``path`` when it is on this machine, else from the JSON the toolkit writes beside an
    LMDB (``<lmdb>.json``), else None."""
    if os.path.isdir(path):
        return lmdb_count(path)
    sidecar = fileio.sidecar_path(path)
    if os.path.isfile(sidecar):
        count = fileio.read_json(sidecar).get("count")
        return count if isinstance(count, int) and count > 0 else None
    return None


def read_net(path, train=None, test=None, require=("TRAIN", "TEST", "BOTH")):
    """Read a trainval prototxt with its sources made absolute (see :func:`absolute_sources`); a net in Caffe's
    legacy V1 format (``layers { type: CONVOLUTION }``) is upgraded first, as ``caffe`` upgrades it."""
    path = os.fspath(path)
    net = fileio.read_net_prototxt(path)
    if len(net.layers) and not len(net.layer):
        net = upgrade_v1(path)
    return absolute_sources(net, os.path.dirname(os.path.abspath(path)), train, test, require)


def upgrade_v1(path):
    """The net of the V1-format prototxt ``path`` upgraded by Caffe's own rules (its ``upgrade_net_proto_text``
    tool, the code ``caffe`` runs on such a net), as a NetParameter."""
    with tempfile.TemporaryDirectory(prefix="dsd-upgrade-") as tmp:
        out = os.path.join(tmp, "net.prototxt")
        r = subprocess.run([caffe_tool("upgrade_net_proto_text"), os.fspath(path), out], capture_output=True,
                           text=True, errors="replace", env=dict(os.environ, GLOG_minloglevel="1"))
        if r.returncode != 0 or not os.path.isfile(out):
            last = (r.stderr.strip().splitlines() or ["no message"])[-1].split("] ", 1)[-1]
            raise UserError(f"{path} is in Caffe's legacy V1 format and Caffe's upgrade_net_proto_text cannot "
                            f"upgrade it: {last}")
        log.info("%s is in Caffe's legacy V1 format: read as Caffe upgrades it", path)
        return fileio.read_net_prototxt(out)
