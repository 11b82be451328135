"""A DSD run's read-outs: the curves of both arms (cumulative iterations, validation top-1, density), the table
(dense, sparse, DSD, control), and over several seeds the paired verdict (:mod:`dsd_caffe.verdict`), written to
``verdict.json``. The verdict names what the seeds varied, and gives no interval when they varied nothing
(:func:`varied`)."""
import hashlib
import json
import os

import numpy as np

from . import caffelog, fileio, sources, training, verdict
from .lmdbio import lmdb_info

VERDICT = "verdict.json"


def _offsets(out, state, arm):
    """[(step name, its folder, the cumulative iteration it starts at)] of an arm's training steps."""
    steps, at = [], 0
    for entry in state["phases"]:
        if entry["arm"] != arm or entry["name"].endswith("-pruned"):
            continue
        folder = os.path.join(out, os.path.dirname(entry["model"]))
        steps.append((entry["name"], folder, at))
        record = training.record_of(folder)
        if record:
            at += training.recorded_solver(record, os.path.join(folder, training.RECORD)).max_iter
    return steps


def boundaries(out, state):
    """Cumulative iterations where the DSD arm's phases start."""
    return [at for _, _, at in _offsets(out, state, "dsd")]


def curves(out, state):
    """({label: [(cumulative iteration, validation top-1)]} of both arms from their training logs, starting at the
    dense model's evaluation; [(iteration, top-1, "pruned")] marking each pruning dip)."""
    dense = [(0, state["phases"][0]["accuracy"])] if state["phases"] else []
    points, marks = {}, []
    for arm in ("dsd", "control"):
        for name, folder, at in _offsets(out, state, arm):
            label = "control" if arm == "control" else name.split("-")[-1]
            pts = [(at + i, v) for i, v in caffelog.read_curve(os.path.join(folder, training.LOG))]
            pruned = next((p for p in state["phases"] if p["name"] == name[:-len("sparse")] + "pruned"), None) \
                if name.endswith("-sparse") else None
            if pruned and arm == "dsd":
                pts = [(at, pruned["accuracy"])] + pts
                gradual = "density_curve" in next(p for p in state["phases"] if p["name"] == name)
                marks.append((at, pruned["accuracy"], "gradual pruning starts" if gradual else "pruned"))
            points.setdefault(label, dense if label in ("sparse", "control") else [])
            points[label] = points[label] + pts
    return points, marks


def density_curve(out, state):
    """[(cumulative iteration, density)] of the DSD arm: each phase's starting density, and gradual pruning's steps
    (from the phase records); [] when no phase pruned gradually (the density then changes only at the phase
    boundaries, as the table says)."""
    if not any("density_curve" in p for p in state["phases"]):
        return []
    points = []
    for name, folder, at in _offsets(out, state, "dsd"):
        entry = next(p for p in state["phases"] if p["name"] == name)
        start = next((p for p in state["phases"] if p["name"] == name[:-len("sparse")] + "pruned"), entry) \
            if name.endswith("-sparse") else entry
        points.append((at, start["density"]))
        points += [(at + i, d) for i, d in entry.get("density_curve", [])]
        record = training.record_of(folder)
        if record:  # the phase's end, so the step line runs to it
            end = at + training.recorded_solver(record, os.path.join(folder, training.RECORD)).max_iter
            points.append((end, points[-1][1]))
    return points


ROWS = (("dense", "dense"), ("sparse", "sparse"), ("DSD", "redense"), ("control", "control"))


def results_table(state, split=None):
    """{row: {"top1", "top5", "density"}} of the last model of each kind, on the holdout split when the run has
    one (else validation); rows: dense, sparse, DSD, control (when run)."""
    split = split or ("holdout" if any("holdout" in p for p in state["phases"]) else "val")
    table = {}
    for row, kind in ROWS:
        entries = [p for p in state["phases"] if not p["name"].endswith("-pruned") and
                   (p["arm"] == "control" if kind == "control" else p["phase"] == kind and p["arm"] != "control")]
        if entries:
            e = entries[-1]
            r = e[split]
            table[row] = {"top1": _pick(r, 1), "top5": _pick(r, 5), "density": e["density"], "model": e["model"],
                          "diverged": e.get("diverged")}
    return table


def _pick(results, k):
    keys = [n for n in results if ("acc" in n.lower() or "top" in n.lower()) and str(k) in n]
    if k == 1 and not keys:
        top = caffelog.top1(results)
        return top[1] if top else None
    return results[keys[0]] if keys else None


def results_text(state, labels=None):
    """The run's table as text: model, top-1, top-5, density (rounded for people; the state keeps all digits)."""
    table = results_table(state)
    labels = labels or {}
    lines = [f"{'model':<10} {'top-1':>8} {'top-5':>8} {'density':>8}"]
    for row, r in table.items():
        fmt = (lambda v: f"{'diverged':>8}" if r["diverged"] else f"{100 * v:7.2f}%" if v is not None else f"{'-':>8}")
        lines.append(f"{labels.get(row, row):<10} {fmt(r['top1'])} {fmt(r['top5'])} {r['density']:8.3f}")
    if "control" in table and table["DSD"]["top1"] is not None and table["control"]["top1"] is not None:
        gain = 100 * (table["DSD"]["top1"] - table["control"]["top1"])
        lines.append(f"DSD - {labels.get('control', 'control')}: {gain:+.2f} points of top-1")
    return "\n".join(lines)


def seeds_verdict(runs, out, split, config):
    """{"verdict": Verdict or None, "refused": why not or None} of finished runs ({seed: state}), written to
    ``out/verdict.json``. A seed with a diverged arm is refused: its accuracy means nothing. The verdict names
    what the seeds varied (:func:`varied`) and gives no interval when their models are bit-identical."""
    tables = {seed: results_table(s) for seed, s in runs.items()}
    refused = next((f"seed {seed}: the {row} arm's model {t[row]['diverged']}" for seed, t in tables.items()
                    for row in ("DSD", "control") if t[row]["diverged"]), None)
    if refused:
        refused = f"no verdict: {refused} (a diverged arm's accuracy means nothing)"
        fileio.write_json(os.path.join(out, VERDICT), {"verdict": None, "refused": refused, "split": split})
        return {"verdict": None, "refused": refused}
    several = len(runs) > 1
    v = verdict.paired_verdict([100 * (t["DSD"]["top1"] - t["control"]["top1"]) for t in tables.values()],
                               seeds=list(runs), varied=varied(config) if several else (),
                               identical=several and _identical_models(out, runs), split=split)
    fileio.write_json(os.path.join(out, VERDICT), v.as_json())
    return {"verdict": v, "refused": None}


def varied(config):
    """What the seeds of ``config``'s runs vary, in words, for the verdict: only what the net uses (a net with no
    dropout, crop or mirror gains nothing from a solver's random_seed)."""
    net = config.inputs().net()
    used = [f"dropout ({', '.join(l.name for l in net.layer if l.type == 'Dropout')})"] \
        if any(l.type == "Dropout" for l in net.layer) else []
    for layer, param in sources.source_fields(net):
        tp = layer.transform_param
        if sources.phase_of(layer) == "TEST":
            continue
        crop = tp.crop_size and (layer.type != "Data" or _larger_than(param.source, tp.crop_size))
        kinds = [w for w, on in (("crop", crop), ("mirror", tp.mirror)) if on]
        if kinds:
            used.append(f"the random {' and '.join(kinds)} of {layer.name}")
    out = [f"solver random_seed: {', '.join(used)}"] if used else []
    if config.data_order == "shuffled":
        out.append("the TRAIN data order (a copy of the TRAIN LMDB in each seed's order)")
    if config.dense_per_seed:
        out.append("the dense model (trained per seed from the net's fillers)")
    return tuple(out)


def _larger_than(source, crop):
    """True when the LMDB's images are larger than ``crop`` (a crop of the full size is no random choice)."""
    info = lmdb_info(source)
    return info["height"] > crop or info["width"] > crop


def _identical_models(out, runs):
    """True when every seed's DSD model, and every seed's control, hold bit-identical weights (the seeds varied
    nothing)."""
    digests = set()
    for seed, state in runs.items():
        table = results_table(state)
        digests.add(tuple(weights_digest(os.path.join(out, f"seed{seed}", table[row]["model"]))
                          for row in ("DSD", "control")))
    return len(digests) == 1


def weights_digest(path):
    """The SHA-256 of a caffemodel's blobs alone (its bytes also hold the net's text, sources included)."""
    h = hashlib.sha256()
    for layer in fileio.read_caffemodel(path).layer:
        for blob in layer.blobs:
            h.update(layer.name.encode() + b"\0" + json.dumps(list(blob.shape.dim)).encode())
            h.update(np.asarray(blob.data, np.float32).tobytes())
    return h.hexdigest()
