"""``caffe test`` reproduced in pycaffe, to the last printed digit, plus a confusion matrix.

The caffe binary's ``test()`` (tools/caffe.cpp) builds the net in the TEST phase, copies the weights, runs N
forward passes and, in single precision (``float``):

- adds each pass's loss (``Net::Forward``'s sum over layers of dot(top, loss weights)) into ``float loss``;
- adds every element of every output blob into its own ``float`` accumulator, in pass order;
- divides both by N as floats, and prints ``Loss: <loss>`` then ``<output> = <mean>`` per element, with
  `` (* <w> = <w*mean> loss)`` for outputs with a loss weight, through an ostream at the default precision 6.

:func:`evaluate` does exactly that with numpy float32 arithmetic (the per-pass loss comes from Caffe's own
``ForwardFromTo``), and :func:`format_results` prints the same lines.
"""
import collections
import logging
import math
import os

import numpy as np
from tqdm import tqdm

from . import checks, fileio, loading, masks, netcheck, plots, solvers, sources
from .errors import UserError

log = logging.getLogger(__name__)

#: ``caffe test``'s default number of forward passes (tools/caffe.cpp: ``DEFINE_int32(iterations, 50, ...)``)
CAFFE_TEST_ITERATIONS = 50
#: evaluation batches of a trained model in a run (dsd, the demo): None, as many batches as cover the TEST LMDB
#: once (:func:`evaluate_param`, ``solvers.test_iters``)
WHOLE_TEST_LMDB = None


class Results(collections.OrderedDict):
    """{output name: mean} (a float32 scalar, or a float32 array for multi-element outputs) with
    ``loss``, ``loss_weights`` {output: weight}, ``iterations``, ``test_source`` (from :func:`evaluate`: the
    absolute source of the TEST Data layer, or None) and, when asked for, ``confusion`` (int64 [true class,
    predicted class]) attributes."""

    loss = np.float32(0)
    loss_weights = {}
    iterations = 0
    test_source = None
    confusion = None


def cfmt(x):
    """Format a float as C++ ``std::ostream << float`` does at the default precision (``%g``, 6 digits)."""
    x = float(x)
    if math.isnan(x):
        return "-nan" if math.copysign(1.0, x) < 0 else "nan"
    if math.isinf(x):
        return "-inf" if x < 0 else "inf"
    return format(x, ".6g")


def _check_iterations(iterations):
    return checks.count(iterations, "iterations")  # caffe test's --iterations is an int32 too


def _accuracy_blobs(net):
    """(score blob, label blob, ignore_label or None) of the net's first Accuracy layer, or None."""
    for name, layer in zip(net._layer_names, net.layers):
        if layer.type == "Accuracy":
            bottoms = net.bottom_names[name]
            if len(bottoms) >= 2:
                return bottoms[0], bottoms[1], name
    return None


def _predictions(net, score_blob, label_blob):
    scores = net.blobs[score_blob].data
    labels = net.blobs[label_blob].data.reshape(-1)
    n = labels.size
    if scores.ndim > 2 and scores.shape[0] * int(np.prod(scores.shape[2:])) == n and scores.shape[0] != n:
        scores = np.moveaxis(scores, 1, -1)  # per-pixel labels: classes along axis 1
    if scores.size % n:
        raise UserError(f"score blob {score_blob!r} ({scores.shape}) does not fit {n} labels")
    scores = scores.reshape(n, -1)
    return labels.astype(np.int64), scores.argmax(axis=1), scores.shape[1]


def run(net, iterations=CAFFE_TEST_ITERATIONS, confusion=False, ignore_label=None, progress=True):
    """Run ``iterations`` TEST passes of a ready ``net`` and accumulate like ``caffe test`` (see module doc).

    With ``confusion`` the first Accuracy layer's bottoms (scores, labels) also fill a confusion matrix; labels
    equal to ``ignore_label`` are left out, as the Accuracy layer leaves them out."""
    iterations = _check_iterations(iterations)
    outputs = list(net.outputs)
    last = len(net.layers) - 1
    loss = np.float32(0)
    sums = [None] * len(outputs)
    acc = _accuracy_blobs(net)  # its labels are checked on every pass (Caffe only DCHECKs them)
    if confusion and acc is None:
        raise UserError("a confusion matrix needs an Accuracy layer (its bottoms give the scores and labels), "
                         "and the net has none in the TEST phase")
    cm = None
    for i in tqdm(range(iterations), desc="evaluate", unit="batch", disable=None if progress else True):
        loss += np.float32(net._forward(0, last))
        for j, name in enumerate(outputs):
            data = net.blobs[name].data.reshape(-1)
            if i == 0:
                sums[j] = data.astype(np.float32, copy=True)
            else:
                sums[j] += data
            if log.isEnabledFor(logging.DEBUG):
                for v in data:
                    log.debug("Batch %d, %s = %s", i, name, cfmt(v))
        if acc is not None:
            lab, n_cls = net.blobs[acc[1]].data.reshape(-1), net.blobs[acc[0]].data.shape[1]
            out = lab[((lab < 0) | (lab >= n_cls)) & (lab != (ignore_label if ignore_label is not None else -1.5))]
            if out.size:
                raise UserError(f"label {out[0]:g} in TEST batch {i + 1} is outside the {n_cls} classes of Accuracy "
                                 f"layer {acc[2]!r} (0..{n_cls - 1}); Caffe would report a meaningless accuracy. "
                                 "Does the LMDB belong to this net?")
        if acc is not None and confusion:
            labels, pred, n_classes = _predictions(net, acc[0], acc[1])
            if cm is None:
                cm = np.zeros((n_classes, n_classes), np.int64)
            keep = (labels >= 0) & (labels < n_classes)
            if ignore_label is not None:
                keep &= labels != ignore_label
            np.add.at(cm, (labels[keep], pred[keep]), 1)
    n = np.float32(iterations)
    res = Results()
    for name, s in zip(outputs, sums):
        mean = s / n
        res[name] = mean[0] if mean.size == 1 else mean
    res.loss = loss / n
    weights = net.blob_loss_weights
    res.loss_weights = {name: np.float32(weights[name]) for name in outputs}
    res.iterations = iterations
    res.confusion = cm
    return res


def evaluate(model, weights, iterations=CAFFE_TEST_ITERATIONS, gpu=None, confusion=False, allow_missing=False,
             net_param=None, test_source=None):
    """``caffe test --model model --weights weights --iterations N`` in pycaffe: an ordered dict
    {output name: mean} (see :class:`Results`); :func:`format_results` gives the binary's lines. ``net_param``
    (absolute sources) replaces reading ``model``; ``test_source`` replaces the TEST data layer's source."""
    iterations = _check_iterations(iterations)
    if net_param is None:
        net_param = sources.read_net(model, test=test_source, require=("TEST", "BOTH"))
    elif test_source is not None:
        net_param = sources.absolute_sources(net_param, None, test=test_source)
    netcheck.require_data(net_param, "TEST", name=os.fspath(model) if model is not None else "net")
    net = loading.load_net(model, weights, "TEST", gpu=gpu, iterations=iterations, allow_missing=allow_missing,
                           net_param=net_param)
    ignore = None
    for layer in netcheck.included_layers(net_param, "TEST"):
        if layer.type == "Accuracy":
            if layer.accuracy_param.HasField("ignore_label"):
                ignore = layer.accuracy_param.ignore_label
            break
    log.info("Running for %d iterations: %s on %s.", iterations, weights, sources.test_source(net_param))
    res = run(net, iterations, confusion=confusion, ignore_label=ignore)
    res.test_source = sources.test_source(net_param)
    return res


def diverged(results):
    """Why ``results`` (:class:`Results`, or {name: value}) come from a diverged model, or None: a loss or an
    output that is not finite. Such a model's accuracy means nothing (Caffe's Accuracy layer counts a NaN score
    as a hit: a NaN model scores 100%)."""
    values = [("loss", getattr(results, "loss", 0))] + list(results.items())
    for name, value in values:
        v = np.asarray(value, dtype=np.float64)
        if v.size and not np.isfinite(v).all():
            return f"diverged: {name} is {cfmt(v.ravel()[~np.isfinite(v.ravel())][0])}"
    return None


class Scores(dict):
    """{output name: float} with ``diverged``: the reason (see :func:`diverged`), or None; a diverged model's
    values are all None (its accuracy would read 100%)."""

    diverged = None


def evaluate_param(net_param, weights, iterations=WHOLE_TEST_LMDB, gpu=None):
    """Test-phase outputs (:class:`Scores`) of ``weights`` on ``net_param`` (absolute sources, mask layer
    ignored); ``iterations`` defaults to covering the TEST LMDB once."""
    net = masks.remove_mask_layer(net_param)
    if iterations is WHOLE_TEST_LMDB:
        _, (test_src, test_batch) = sources.data_sources(net)
        iterations = solvers.test_iters(sources.lmdb_count(test_src), test_batch)
    res = evaluate(None, os.fspath(weights), iterations=iterations, gpu=gpu, net_param=net)
    values = {k: float(np.asarray(v).ravel()[0]) for k, v in res.items() if np.asarray(v).size == 1}
    why = diverged(res)
    scores = Scores({k: v if math.isfinite(v) and not why else None for k, v in values.items()})
    scores.diverged = why
    return scores


def lmdb_class_names(lmdb_path):
    """The class names an LMDB's JSON (written beside it by the toolkit) records, or None."""
    sidecar = fileio.sidecar_path(os.fspath(lmdb_path))
    if os.path.isfile(sidecar):
        names = fileio.read_json(sidecar).get("classes")
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            return names
    return None


def format_results(results, net=None):
    """The summary lines ``caffe test`` logs: ``Loss: x`` then ``name = mean[ (* w = w*mean loss)]`` per element.

    ``net`` is accepted for symmetry with the API; the loss weights travel with ``results``.
    """
    weights = dict(getattr(results, "loss_weights", {}) or {})
    if net is not None:
        weights.update({k: np.float32(v) for k, v in net.blob_loss_weights.items() if k in results})
    lines = [f"Loss: {cfmt(np.float32(getattr(results, 'loss', 0)))}"]
    for name, value in results.items():
        w = np.float32(weights.get(name, 0))
        for v in np.atleast_1d(np.asarray(value, dtype=np.float32)).reshape(-1):
            line = f"{name} = {cfmt(v)}"
            if w:
                line += f" (* {cfmt(w)} = {cfmt(np.float32(w * v))} loss)"
            lines.append(line)
    return lines


def per_class(confusion):
    """Rows (class, images, correct, accuracy) from a confusion matrix [true, predicted]."""
    cm = np.asarray(confusion)
    rows = []
    for c in range(cm.shape[0]):
        total = int(cm[c].sum())
        correct = int(cm[c, c])
        rows.append((c, total, correct, correct / total if total else float("nan")))
    return rows


CONFUSION_FILES = ("confusion.csv", "per_class.csv", "confusion.png")


def check_confusion_folder(folder, force=False):
    """Refuse a --output folder :func:`write_confusion` could not write, before an evaluation is spent on it."""
    return fileio.check_replaceable(folder, CONFUSION_FILES, force, "evaluate.py")


def write_confusion(confusion, folder, class_names=None, force=False):
    """Write ``confusion.csv``, ``per_class.csv`` and ``confusion.png`` into ``folder``, staged in a temporary
    folder renamed into place (a folder holding anything else is never replaced)."""
    cm = np.asarray(confusion)
    k = cm.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise UserError(f"{len(names)} class names for a {k}-class confusion matrix")
    folder = os.path.abspath(os.fspath(folder))
    with fileio.output_lock(folder):
        check_confusion_folder(folder, force)
        matrix_csv, per_class_csv, matrix_png = CONFUSION_FILES
        with fileio.atomic_path(folder, force=True, directory=True) as tmp:
            rows = [["true\\predicted"] + names] + [[names[i]] + [int(x) for x in cm[i]] for i in range(k)]
            fileio.atomic_write(os.path.join(tmp, matrix_csv), fileio.csv_text(rows))
            rows = [["class", "name", "images", "correct", "accuracy"]] + [
                [c, names[c], total, correct, f"{accuracy:.6f}"] for c, total, correct, accuracy in per_class(cm)]
            fileio.atomic_write(os.path.join(tmp, per_class_csv), fileio.csv_text(rows))
            plots.confusion(os.path.join(tmp, matrix_png), cm, names)
    return {n: os.path.join(folder, n) for n in CONFUSION_FILES}
