"""Per-layer pruning sensitivity, as Han et al. choose per-layer densities: prune one layer at a time by magnitude
at several densities and evaluate the net on a TEST (validation) LMDB.

Only the TEST phase is read: no TRAIN LMDB is needed (``test_source`` replaces the trainval's). Every evaluation
sees the same batches: they are read once from the data layer and fed to the net again for each (layer, density).
Outputs, staged in a temporary folder and renamed into place: ``sensitivity.csv`` (layer, density, accuracy and
every net output, 4 decimals, and ``above_current``; the first row is the unpruned net), ``sensitivity.json`` (the
same, full precision, each layer's current density, and its inputs: model, weights with their SHA-256, the TEST
LMDB, iterations, images) and
``sensitivity.png`` (a heat map, readable with SqueezeNet's 26 layers; the cells that keep the unpruned accuracy
outlined, the ``above_current`` ones hatched: ``plots.sensitivity_marks``). An LMDB holding fewer images than the
batches read is read around again (Caffe wraps around): a warning says how often each image counts. A row whose
density keeps more weights than the layer has non-zero (an already pruned model's layer at 0.33 scanned at 0.5) is
flagged ``above_current`` (:data:`ABOVE_CURRENT`).
"""
import dataclasses
import logging
import os

import numpy as np
from tqdm import tqdm

from . import caffelog, fileio, masks, netcheck, netgen, plots, pruning, sources
from .caffe_env import make_net
from .devices import set_device
from .checks import count
from .errors import UserError
from .training import file_record

log = logging.getLogger(__name__)

DEFAULT_DENSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9)
#: TEST batches per evaluation: the scan evaluates the net once per (layer, density), on the same batches each time
DEFAULT_ITERATIONS = 10
FILES = ("sensitivity.csv", "sensitivity.json", "sensitivity.png")
#: what a row's ``above_current`` flag means (the printed table's ``*``, the CSV's column, the JSON's key)
ABOVE_CURRENT = ("the density is above the layer's current one (the model is already pruned there): nothing is "
                 "pruned, the row is the layer as it is")


@dataclasses.dataclass(frozen=True)
class ScanConfig:
    """What to scan: ``densities`` kept (each in (0, 1]), ``layers`` (None: every Convolution/InnerProduct) and
    ``iterations`` TEST batches per evaluation."""
    densities: tuple = DEFAULT_DENSITIES
    layers: tuple = None
    iterations: int = DEFAULT_ITERATIONS

    def __post_init__(self):
        try:
            dens = tuple(float(d) for d in self.densities)
        except (TypeError, ValueError):
            raise UserError(f"densities must be numbers in (0, 1], got {self.densities!r}",
                            fields=["densities"]) from None  # the float() error says no more
        if not dens or any(not 0 < d <= 1 for d in dens):
            raise UserError(f"densities must be numbers in (0, 1], got {list(self.densities)}", fields=["densities"])
        count(self.iterations, "iterations")
        object.__setattr__(self, "densities", dens)
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))


def sensitivity_scan(model, weights, output_dir, config=ScanConfig(), test_source=None, force=False, gpu=None):
    """Run the scan and write its files into ``output_dir``; returns the rows (dicts)."""
    out = os.path.abspath(os.fspath(output_dir))
    fileio.check_apart(out, (model, weights, test_source))  # the folder is replaced whole
    with fileio.output_lock(out):
        fileio.check_replaceable(out, FILES, force, "sensitivity.py")
        net_param = masks.remove_mask_layer(sources.read_net(model, test=test_source, require=("TEST", "BOTH")))
        netcheck.check_net(net_param, phases=("TEST",), name=os.fspath(model))
        netcheck.require_data(net_param, "TEST", name=os.fspath(model))
        netcheck.check_data_layers(net_param, "TEST")
        model_param = fileio.read_caffemodel(weights)
        netcheck.check_fits(net_param, model_param, os.fspath(weights), os.fspath(model))
        names = _layers(netgen.weighted_layers(net_param), config.layers)
        net = _test_net(net_param, weights, gpu)
        inputs = _inputs(net_param, model, weights, config)
        current = current_densities(net, names)
        rows = _scan(net, names, config)
        with fileio.atomic_path(out, force=True, directory=True) as tmp:
            _write(tmp, rows, list(net.outputs), names, config.densities, inputs, current)
    return rows


def _inputs(net_param, model, weights, config):
    """What the scan reads, for sensitivity.json; warns when the TEST LMDB holds fewer images than it reads."""
    (_, _), (source, batch) = sources.data_sources(net_param)
    images, count = config.iterations * batch, sources.lmdb_count(source)
    if count < images:
        log.warning("the TEST LMDB %s holds %d images, fewer than the %d the scan reads (%d batches of %d): Caffe "
                    "reads it around again, so images count more than once", source, count, images,
                    config.iterations, batch)
    return {"model": os.path.abspath(os.fspath(model)), "weights": file_record(weights), "test_source": source,
            "iterations": config.iterations, "batch": batch, "images": images, "lmdb_images": count,
            "densities": list(config.densities), "layers": list(config.layers) if config.layers else None}


def _layers(names, wanted):
    if not wanted:
        return names
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise UserError(f"unknown layer(s) {', '.join(unknown)}; weighted layers: {', '.join(names)}")
    return [n for n in names if n in wanted]


def _test_net(net_param, weights, gpu):
    set_device(gpu)
    return make_net(net_param, "TEST", weights=weights)


def _scan(net, names, config):
    """Rows {"layer", "density", "accuracy", <outputs>...}: the unpruned net, then each (layer, density)."""
    data = [i for i, _ in enumerate(net.layers) if not net.bottom_names[net._layer_names[i]]]
    first, fed = max(data) + 1, [b for i in data for b in net.top_names[net._layer_names[i]]]
    batches = []
    for _ in range(config.iterations):
        net._forward(0, max(data))
        batches.append({b: net.blobs[b].data.copy() for b in fed})

    def run():
        sums = dict.fromkeys(net.outputs, 0.0)
        for batch in batches:
            for b, v in batch.items():
                net.blobs[b].data[...] = v
            net._forward(first, len(net.layers) - 1)
            for k in net.outputs:
                sums[k] += float(np.asarray(net.blobs[k].data).ravel()[0])
        res = {k: v / len(batches) for k, v in sums.items()}
        top = caffelog.top1(res)
        return dict(res, accuracy=top[1] if top else None)

    rows = [{"layer": "(none)", "density": 1.0, **run(), "above_current": False}]
    for name in tqdm(names, desc="sensitivity", unit="layer", disable=None):
        w = net.params[name][0].data
        orig = w.copy()
        nonzero = int(np.count_nonzero(orig))
        for d in config.densities:
            w[...] = np.where(pruning.magnitude_mask(orig, d, name=name), orig, np.float32(0))
            above = pruning.kept_count(orig.size, d) > nonzero
            rows.append({"layer": name, "density": d, **run(), "above_current": above})
        w[...] = orig
        worst = min((r for r in rows if r["layer"] == name), key=lambda r: r["accuracy"] or 0)
        log.info("%s: accuracy %.4f at density %g", name, worst["accuracy"] or 0, worst["density"])
    return rows


def current_densities(net, names):
    """{layer: fraction of its weights that are non-zero} in ``net`` as loaded (1.0 for a dense layer)."""
    return {n: pruning.density(net.params[n][0].data) for n in names}


def _write(folder, rows, outputs, names, densities, inputs, current):
    header = ["layer", "density", "accuracy"] + outputs + ["above_current"]
    fmt = (lambda v: f"{v:.4f}" if isinstance(v, float) else v)
    fileio.atomic_write(os.path.join(folder, FILES[0]),
                        fileio.csv_text([header] + [[fmt(r.get(k)) for k in header] for r in rows]))
    fileio.write_json(os.path.join(folder, FILES[1]), {"inputs": inputs, "current_density": current,
                                                       "notes": {"above_current": ABOVE_CURRENT}, "rows": rows})
    base = rows[0]["accuracy"]
    if base is None:
        log.warning("the net has no accuracy output: no %s", FILES[2])
        return
    cell = {(r["layer"], r["density"]): r for r in rows[1:]}
    grid = (lambda key: [[cell[n, d][key] for d in densities] for n in names])
    plots.sensitivity_heatmap(os.path.join(folder, FILES[2]), names, densities, grid("accuracy"), base,
                              grid("above_current"))
