"""Magnitude-pruning math in pure numpy: ratios, masks, per-layer density profiles.

This module never imports Caffe, not even lazily (a test checks it), so it can be used and tested anywhere. It is
one module past 400 lines on purpose: the pruning core (ratios, exact-k masks, the four profiles and re-pruning)
is one rule set whose conventions below hold for all of it, and the SqueezeNet profile table is data.
The caller (``phases.py``) reads a net, picks the weight blobs to prune (Convolution and InnerProduct weights;
biases never) and hands them here as ``{layer_name: ndarray}``.

Conventions
-----------
* A *density* is the fraction of weights kept, in (0, 1). ``--ratio 3x`` keeps 1/3 (density 1/3), ``--sparsity
  0.67`` keeps 0.33. Per-layer densities may also be exactly 1.0 (layer kept dense, e.g. a skipped layer).
* A layer of ``size`` weights at density ``d`` keeps exactly ``k = floor(d * size + 0.5)`` weights (round half up,
  computed in float64), but at least 1 and at most ``size``. See :func:`kept_count`.
* The kept weights are the ``k`` largest ``|w|``. Ties at the threshold are broken by flat (C-order) index: the
  lower index is kept. So a mask is a pure function of the weights and the density.
* The *threshold* of a layer is the smallest ``|w|`` kept: every kept weight has ``|w| >= threshold`` and every
  dropped weight has ``|w| <= threshold``.
* Pruned weights are exactly ``0.0``.
* Re-pruning: a weight that is already exactly 0 counts as pruned. So pruning a pruned model keeps only non-zero
  weights, a layer kept at density 1.0 keeps its non-zero weights (its zeros stay pruned), and a density above a
  layer's current one is refused, naming both (pruning only removes weights). Tables report what the pruned
  weights really hold: ``kept`` is their non-zero count.

Profiles (:func:`layer_densities`)
----------------------------------
* ``uniform``: every layer at the same density.
* ``global``: one magnitude threshold across all layers; exactly ``k = round(density * total)`` weights kept in
  all (ties broken by position in the given layer order, then flat index). A layer that would lose every weight
  is refused.
* ``squeezenet-3x``: the per-layer densities of the released sparse SqueezeNet (see :data:`SQUEEZENET_3X`).
  Works with Han's and with DeepScale's layer names. Used verbatim when no density is given or the density is
  within 0.005 of 1/3; for another density the profile is scaled by one factor ``s`` (``min(1, s * d_layer)``)
  chosen so the overall density over the given layers equals the requested one, which keeps the relative
  sensitivity of the layers.
* a path to a JSON file: ``{"*": 0.33, "conv1": 1.0, "fire*/conv3x3_2": "4x"}``. Values are densities in (0, 1]
  or ratio strings. Exact names win over patterns, patterns apply in file order, ``*`` is the default (without
  ``*`` the ``density`` argument is the default). Keys that name no layer are refused. A JSON object with a
  ``"densities"`` member (such as the provenance JSON written beside a pruned model) is read from that member.
"""
import fnmatch
import json
import logging
import math
import os
import re

import numpy as np
from .caffefacts import deepscale_name, han_name  # noqa: F401 (pruning.han_name is API)
from .errors import InputMissing, UserError

log = logging.getLogger(__name__)

PROFILES = ("uniform", "global", "squeezenet-3x")

#: Per-layer (nonzero, total) weight counts of the released sparse SqueezeNet v1.0, keyed by Han's layer names,
#: in net order. Derived once by decoding ``shared/reference/squeezenet-deep-compression/compressed_SqueezeNet.net``
#: (the layout described in shared/README.md: header of per-layer entry counts, then per layer an 8-bit codebook,
#: the biases, the code stream and the 4-bit gap stream) into blobs of the shapes in ``SqueezeNet_deploy.prototxt``
#: and counting the non-zero weights of each blob. Filler entries (code 0) are not counted. The file was consumed
#: exactly; the sums are 415,921 non-zero of 1,244,448 weights, overall density 0.33422.
#: tests/test_pruning.py re-derives it through ``deepcompression.decode`` when that module is present.
SQUEEZENET_3X = {
    "conv1": (13902, 14112),
    "fire2/conv1x1_1": (1528, 1536),
    "fire2/conv1x1_2": (1020, 1024),
    "fire2/conv3x3_2": (3039, 9216),
    "fire3/conv1x1_1": (2038, 2048),
    "fire3/conv1x1_2": (1023, 1024),
    "fire3/conv3x3_2": (3039, 9216),
    "fire4/conv1x1_1": (4085, 4096),
    "fire4/conv1x1_2": (4071, 4096),
    "fire4/conv3x3_2": (12156, 36864),
    "fire5/conv1x1_1": (8160, 8192),
    "fire5/conv1x1_2": (4067, 4096),
    "fire5/conv3x3_2": (12147, 36864),
    "fire6/conv1x1_1": (12161, 12288),
    "fire6/conv1x1_2": (4602, 9216),
    "fire6/conv3x3_2": (27325, 82944),
    "fire7/conv1x1_1": (9205, 18432),
    "fire7/conv1x1_2": (9129, 9216),
    "fire7/conv3x3_2": (27336, 82944),
    "fire8/conv1x1_1": (24388, 24576),
    "fire8/conv1x1_2": (8187, 16384),
    "fire8/conv3x3_2": (44144, 147456),
    "fire9/conv1x1_1": (16370, 32768),
    "fire9/conv1x1_2": (16303, 16384),
    "fire9/conv3x3_2": (44173, 147456),
    "conv_final": (102323, 512000),
}

#: The same profile as densities (nonzero / total), Han names.
SQUEEZENET_3X_DENSITIES = {name: nz / total for name, (nz, total) in SQUEEZENET_3X.items()}

#: Overall density of the released sparse SqueezeNet (415921 / 1244448).
SQUEEZENET_3X_OVERALL = (sum(nz for nz, _ in SQUEEZENET_3X.values())
                         / sum(total for _, total in SQUEEZENET_3X.values()))

# ---------------------------------------------------------------------------------------------------------------
# SqueezeNet naming (the rule is caffefacts', which imports no Caffe)

def _other_naming(name):
    other = han_name(name)
    return deepscale_name(name) if other == name else other


# ---------------------------------------------------------------------------------------------------------------
# Ratios

ACCEPTED_FORMS = ('accepted forms (give exactly one): --ratio Nx with N > 1, e.g. "3x" keeps 1/3, "2.5x" keeps 0.4; '
                  '--density D with 0 < D < 1, e.g. 0.33; --sparsity S with 0 < S < 1, e.g. 0.67')

_RATIO_RE = re.compile(r"^\s*((?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*[xX]\s*$", re.ASCII)


def _refuse(what, *fields):
    return UserError(f"{what}; {ACCEPTED_FORMS}", fields=fields)


def _as_fraction(value, flag):
    """A float in (0, 1) from a number or a numeric string, else UserError naming ``flag`` (the argument: density
    or sparsity) and the value."""
    if isinstance(value, (bool, np.bool_)):
        raise _refuse(f"invalid {flag} {value!r}", flag)
    if isinstance(value, str):
        text = value.strip()
        if _RATIO_RE.match(text):
            raise _refuse(f"invalid {flag} {value!r} (a ratio such as {text!r} goes with ratio)", flag, "ratio")
        try:
            number = float(text)
        except ValueError:
            raise _refuse(f"invalid {flag} {value!r}", flag) from None  # the float() error says no more
    else:
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise _refuse(f"invalid {flag} {value!r}", flag) from None  # the float() error says no more
    if not math.isfinite(number) or not 0.0 < number < 1.0:
        raise _refuse(f"invalid {flag} {value!r} (must be strictly between 0 and 1)", flag)
    if flag == "density" and not math.isfinite(1.0 / number):
        raise _refuse(f"invalid {flag} {value!r} (too small)", flag)
    return number


def parse_ratio(ratio=None, density=None, sparsity=None):
    """The density (fraction of weights kept, in (0, 1)) from exactly one of the three forms.

    ``ratio``: a string ``"Nx"`` (or ``"NX"``) with a finite N > 1: keep 1/N (``"3x"`` -> 1/3). ``density``: a
    number (or numeric string) in (0, 1). ``sparsity``: the fraction removed, in (0, 1); density = 1 - sparsity.
    Anything else (``"1x"``, ``"0x"``, ``"-3x"``, ``"nanx"``, a bare ``"3"``, 1.0, two forms at once, none) raises
    ValueError whose message lists the accepted forms.
    """
    given = [name for name, v in (("ratio", ratio), ("density", density), ("sparsity", sparsity)) if v is not None]
    if len(given) != 1:
        raise _refuse("no pruning amount given" if not given else f"{' and '.join(given)} given together", *given)
    if density is not None:
        return _as_fraction(density, "density")
    if sparsity is not None:
        value = 1.0 - _as_fraction(sparsity, "sparsity")
        if not 0.0 < value < 1.0:  # sparsity within 1e-17 of 0 rounds to density 1.0
            raise _refuse(f"invalid sparsity {sparsity!r} (nothing would be pruned)", "sparsity")
        return value
    if not isinstance(ratio, str):
        raise _refuse(f"invalid ratio {ratio!r} (a ratio is a string such as \"3x\")", "ratio")
    m = _RATIO_RE.match(ratio)
    if not m:
        hint = ""
        if re.match(r"^\s*[-+]?[\d.]+(?:[eE][+-]?\d+)?\s*$", ratio, re.ASCII):
            hint = f" (a bare number is ambiguous: write \"{ratio.strip()}x\" to keep 1/{ratio.strip()})"
        raise _refuse(f"invalid ratio {ratio!r}{hint}", "ratio")
    n = float(m.group(1))
    if not math.isfinite(n) or n <= 1.0:
        why = "nothing would be pruned" if n == 1.0 else "N must be finite and greater than 1"
        raise _refuse(f"invalid ratio {ratio!r} ({why})", "ratio")
    value = 1.0 / n
    if not 0.0 < value < 1.0 or not math.isfinite(1.0 / value):
        raise _refuse(f"invalid ratio {ratio!r} (too large)", "ratio")
    return value


def format_ratio(density):
    """The shortest ratio string ``"Nx"`` with ``parse_ratio(ratio=format_ratio(d))`` equal to ``d`` within
    float rounding: ``format_ratio(1/3) == "3x"``, ``format_ratio(0.4) == "2.5x"``."""
    d = _check_density(density, "density", allow_one=False)
    n = 1.0 / d
    if not math.isfinite(n):
        raise UserError(f"density {density!r} is too small to write as a ratio")
    text = repr(n)  # the shortest text that reads back as n
    if text.endswith(".0"):
        text = text[:-2]
    return f"{text}x"


def _check_density(value, what, allow_one=True):
    if isinstance(value, (bool, np.bool_)):
        raise UserError(f"{what}: invalid density {value!r} (a number in (0, 1])")
    try:
        d = float(value)
    except (TypeError, ValueError):
        # from None: the float() error says no more
        raise UserError(f"{what}: invalid density {value!r} (a number in (0, 1])") from None
    if not math.isfinite(d) or not (0.0 < d < 1.0 or (allow_one and d == 1.0)):
        bounds = "(0, 1]" if allow_one else "(0, 1)"
        raise UserError(f"{what}: invalid density {value!r} (must be in {bounds})")
    return d


# ---------------------------------------------------------------------------------------------------------------
# Masks

def kept_count(size, density):
    """How many weights a layer of ``size`` weights keeps at ``density``: ``floor(density * size + 0.5)``,
    clamped to [1, size]."""
    size = int(size)
    if size < 1:
        raise UserError(f"cannot prune an empty layer (size {size})")
    d = _check_density(density, "kept_count")
    return min(size, max(1, int(math.floor(d * size + 0.5))))


def _magnitudes(weights, name):
    what = name or "weights"
    w = np.asarray(weights)
    if w.dtype.kind not in "fiu":
        raise TypeError(f"{what}: weights must be a real numeric array, not dtype {w.dtype}")
    if w.size == 0:
        raise UserError(f"{what}: empty weight array of shape {w.shape}")
    a = np.abs(w if w.dtype.kind == "f" else w.astype(np.float64)).ravel()  # abs(int8 -128) overflows
    if w.dtype.kind == "f" and not np.all(np.isfinite(a)):
        bad = int(np.count_nonzero(~np.isfinite(a)))
        raise UserError(f"{what}: {bad} weight(s) are NaN or infinite; refusing to prune a diverged model")
    return w, a


def _top_k(a, k):
    """Bool mask (flat) of the k largest of ``a`` (lower index wins ties) and the threshold (k-th largest)."""
    n = a.size
    if k >= n:
        return np.ones(n, dtype=bool), a.min().item()
    t = np.partition(a, n - k)[n - k]
    mask = a > t
    need = k - int(np.count_nonzero(mask))
    mask[np.flatnonzero(a == t)[:need]] = True
    return mask, t.item()


def mask_and_threshold(weights, density, name=None):
    """``(mask, threshold)``: the bool mask of :func:`magnitude_mask` and the smallest ``|w|`` it keeps."""
    w, a = _magnitudes(weights, name)
    k = kept_count(a.size, _check_density(density, name or "magnitude_mask"))
    mask, threshold = _top_k(a, k)
    return mask.reshape(w.shape), float(threshold)


def magnitude_mask(weights, density, name=None):
    """Bool array shaped like ``weights``, True on exactly :func:`kept_count` weights: the largest ``|w|``, lower
    flat index first among equal magnitudes. ``density`` in (0, 1]; ``name`` only labels error messages."""
    return mask_and_threshold(weights, density, name)[0]


def shrink_mask(weights, mask, density, name=None):
    """The bool mask that keeps exactly ``kept_count(size, density)`` weights among those ``mask`` keeps: the
    largest ``|w|``, lower flat index first among equal magnitudes (the rule of :func:`magnitude_mask`, which it
    equals for an all-True ``mask``). A mask never grows: when the count exceeds what ``mask`` keeps, a copy of
    ``mask`` is returned. Gradual pruning's step (:mod:`dsd_caffe.gradual`)."""
    w, a = _magnitudes(weights, name)
    m = as_bool_mask(mask, w.shape, name).ravel()
    k = kept_count(a.size, _check_density(density, name or "shrink_mask"))
    if k >= int(np.count_nonzero(m)):
        return m.reshape(w.shape).copy()
    kept, _ = _top_k(np.where(m, a, -1.0), k)  # a dropped weight ranks below every kept one
    return kept.reshape(w.shape)


def density(array):
    """Fraction of non-zero entries of ``array``."""
    a = np.asarray(array)
    if a.size == 0:
        raise UserError(f"density of an empty array of shape {a.shape} is undefined")
    return np.count_nonzero(a) / a.size


def as_bool_mask(mask, shape=None, name=None):
    """A mask as a bool array: bool masks as they are, numeric masks only if every entry is 0 or 1 (as stored in a
    float blob). ``shape``, when given, must match."""
    what = name or "mask"
    m = np.asarray(mask)
    if shape is not None and m.shape != tuple(shape):
        raise UserError(f"{what}: mask shape {m.shape} does not fit weights of shape {tuple(shape)}")
    if m.dtype == bool:
        return m
    if m.dtype.kind not in "fiu":
        raise TypeError(f"{what}: mask must be bool or 0/1 numbers, not dtype {m.dtype}")
    ones = m == 1
    if not np.all(ones | (m == 0)):
        raise UserError(f"{what}: mask has values other than 0 and 1")
    return ones


def make_masks(weights, densities):
    """``{name: bool mask}`` for every layer of ``weights`` at ``densities[name]`` (in (0, 1]; 1.0 keeps every
    non-zero weight). Re-pruning (see the module docstring): a weight that is already 0 counts as pruned, and a
    layer asked to keep more weights than it has non-zero is refused, naming both densities."""
    missing = [n for n in weights if n not in densities]
    if missing:
        raise UserError(f"no density given for layer(s) {', '.join(missing)}")
    masks = {}
    for name, w in weights.items():
        w = np.asarray(w)
        d = _check_density(densities[name], name)
        nonzero = int(np.count_nonzero(w))
        if d == 1.0:
            masks[name] = w != 0
            continue
        k = kept_count(w.size, d)
        if k > nonzero:
            raise UserError(f"layer {name!r} holds {nonzero} non-zero weights (density {nonzero / w.size:.4f}), "
                            f"fewer than the {k} that density {d:.4f} keeps: the model is already pruned, and a "
                            "weight that is already 0 counts as pruned, so it can only be pruned further; ask "
                            f"for a density <= {nonzero / w.size:.4f} or prune the dense model")
        masks[name] = magnitude_mask(w, d, name=name)
    return masks


def apply_masks(weights, masks):
    """New arrays: every weight of ``weights`` where its mask is False set to exactly 0.0; layers without a mask
    are copied unchanged. A mask for an unknown layer, or of the wrong shape, is refused."""
    unknown = [n for n in masks if n not in weights]
    if unknown:
        raise UserError(f"mask(s) for unknown layer(s) {', '.join(unknown)}; known layers: {', '.join(weights)}")
    out = {}
    for name, w in weights.items():
        w = np.asarray(w)
        if name in masks:
            m = as_bool_mask(masks[name], w.shape, name)
            out[name] = np.where(m, w, np.zeros((), dtype=w.dtype))
        else:
            out[name] = w.copy()
    return out


def prune_weights(weights, densities):
    """``(pruned_weights, masks, rows)``: :func:`make_masks`, :func:`apply_masks` and :func:`summary_rows`."""
    masks = make_masks(weights, densities)
    return apply_masks(weights, masks), masks, summary_rows(weights, masks)


def summary_rows(weights, masks):
    """One dict per masked layer for the per-layer table: name, shape, size, kept, density (kept / size) and
    threshold (smallest |w| kept, 0.0 if nothing kept)."""
    rows = []
    for name, m in masks.items():
        w = np.asarray(weights[name])
        m = as_bool_mask(m, w.shape, name)
        kept = int(np.count_nonzero(m))
        threshold = float(np.abs(w[m]).min()) if kept else 0.0
        rows.append({"name": name, "shape": tuple(int(s) for s in w.shape), "size": int(w.size), "kept": kept,
                     "density": kept / w.size, "threshold": threshold})
    return rows


def format_table(rows):
    """The per-layer table as text, with a total line. A layer not pruned (every weight kept) has no threshold; a
    row with ``shares`` (a layer using another's weight blob) is marked, and its blob counted once in the total."""
    lines = [f"{'layer':<24} {'shape':<20} {'kept':>10} {'size':>10} {'density':>8} {'threshold':>11}"]
    for r in rows:
        shape = "x".join(str(s) for s in r["shape"])
        threshold = f"{r['threshold']:>11.4g}" if r["kept"] < r["size"] else f"{'':>11}"
        lines.append(f"{r['name']:<24} {shape:<20} {r['kept']:>10} {r['size']:>10} {r['density']:>8.4f} "
                     + (f"{threshold}" + (f"  (the weights of {r['shares']})" if r.get("shares") else "")).rstrip())
    kept = sum(r["kept"] for r in rows if not r.get("shares"))
    size = sum(r["size"] for r in rows if not r.get("shares"))
    if size:
        lines.append(f"{'total':<24} {'':<20} {kept:>10} {size:>10} {kept / size:>8.4f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Layer selection and profiles

def _matches(name, pattern):
    return (name == pattern or fnmatch.fnmatchcase(name, pattern)
            or fnmatch.fnmatchcase(_other_naming(name), pattern))


def select_layers(names, skip=()):
    """``(selected, skipped)`` lists (in the given order) from layer ``names`` and ``skip`` entries (exact names or
    fnmatch patterns such as ``"fire*/squeeze1x1"``; a SqueezeNet name in either naming matches both). A skip
    entry that matches no layer is refused, so a typo never prunes a layer meant to stay dense."""
    names = list(names)
    if isinstance(skip, str):
        skip = [skip]
    skip = list(skip)
    unused = [p for p in skip if not any(_matches(n, p) for n in names)]
    if unused:
        raise UserError(f"skip {', '.join(unused)}: matches no prunable layer; known layers: {', '.join(names)}",
                        fields=["skip"])
    skipped = [n for n in names if any(_matches(n, p) for p in skip)]
    selected = [n for n in names if n not in skipped]
    if not selected:
        raise UserError(f"every layer is skipped ({', '.join(names)}); nothing to prune")
    return selected, skipped


def layer_densities(weights, density=None, profile="uniform", skip=()):
    """``{name: density}`` for every layer of ``weights`` (an ordered ``{name: ndarray}``), in its order.

    ``profile`` is ``"uniform"``, ``"global"``, ``"squeezenet-3x"`` or a path to a JSON profile (see the module
    docstring). Skipped layers (:func:`select_layers`) get 1.0. ``density`` (in (0, 1)) is required for uniform
    and global, optional for the others.
    """
    if not weights:
        raise UserError("no layers to prune")
    selected, skipped = select_layers(weights, skip)
    if density is not None:
        density = _check_density(density, "target", allow_one=False)
    sizes = {n: int(np.asarray(weights[n]).size) for n in selected}
    prof = os.fspath(profile) if isinstance(profile, os.PathLike) else profile
    if not isinstance(prof, str):
        raise TypeError(f"profile must be a name or a path, not {type(profile).__name__}")
    if prof in ("uniform", "global") and density is None:
        raise UserError(f"profile {prof!r} needs a density; {ACCEPTED_FORMS}")
    if prof == "uniform":
        chosen = {n: density for n in selected}
    elif prof == "global":
        chosen = _global_densities({n: weights[n] for n in selected}, density)
    elif prof == "squeezenet-3x":
        chosen = _squeezenet_densities(sizes, density)
    elif _is_profile_file(prof):
        chosen = _file_densities(prof, selected, list(weights), density)
    else:
        raise UserError(f"unknown profile {prof!r}: use {', '.join(PROFILES)} or the path of a JSON file")
    out = {}
    for n in weights:
        out[n] = 1.0 if n in skipped else chosen[n]
    return out


def _global_densities(weights, density):
    names = list(weights)
    parts = [_magnitudes(weights[n], n)[1] for n in names]
    sizes = [p.size for p in parts]
    total = sum(sizes)
    k = kept_count(total, density)
    mask, threshold = _top_k(np.concatenate(parts), k)
    kept = [int(c) for c in np.add.reduceat(mask, np.cumsum([0] + sizes[:-1]))] if total else []
    empty = [n for n, c in zip(names, kept) if c == 0]
    if empty:
        raise UserError(f"the global threshold {threshold:.4g} removes every weight of layer(s) {', '.join(empty)}; "
                         "skip them, use a higher density, or another profile")
    log.info("global threshold %.6g keeps %d of %d weights", threshold, k, total)
    return {n: c / s for n, c, s in zip(names, kept, sizes)}


def _squeezenet_densities(sizes, density):
    base = {}
    unknown = []
    for n in sizes:
        han = han_name(n)
        if han in SQUEEZENET_3X_DENSITIES:
            base[n] = SQUEEZENET_3X_DENSITIES[han]
            if sizes[n] != SQUEEZENET_3X[han][1]:
                log.warning("layer %s has %d weights, the SqueezeNet v1.0 layer %s has %d; using its density anyway",
                            n, sizes[n], han, SQUEEZENET_3X[han][1])
        else:
            unknown.append(n)
    if unknown:
        raise UserError(f"profile squeezenet-3x has no density for layer(s) {', '.join(unknown)} (it knows "
                         f"SqueezeNet v1.0 in Han's or DeepScale's naming: {', '.join(SQUEEZENET_3X)}); "
                         "skip them or use a JSON profile")
    if density is None or abs(density - 1.0 / 3.0) <= 0.005:
        return base
    return _scale_to(base, sizes, density)


def _scale_to(base, sizes, density):
    """``min(1, s * base)`` with ``s`` chosen (by bisection) so the size-weighted mean is ``density``."""
    total = sum(sizes.values())

    def overall(s):
        return sum(min(1.0, s * base[n]) * sizes[n] for n in base) / total

    lo, hi = 0.0, 1.0 / min(base.values())
    for _ in range(100):
        mid = (lo + hi) / 2
        if overall(mid) < density:
            lo = mid
        else:
            hi = mid
    s = (lo + hi) / 2
    log.info("squeezenet-3x profile scaled by %.4f to overall density %.4f", s, density)
    return {n: min(1.0, s * base[n]) for n in base}


def _profile_value(value, path, key):
    if isinstance(value, str):
        try:
            return parse_ratio(ratio=value)
        except UserError as e:
            raise UserError(f"{path}: {key!r}: invalid value {value!r} (a density in (0, 1] or a ratio such as "
                            "\"3x\")") from e
    return _check_density(value, f"{path}: {key!r}")


def check_profile(profile):
    """``profile`` as a string when it is a built-in profile's name or a JSON profile file that reads
    (:func:`read_profile`), else UserError: what can be checked before the net's layers are known."""
    prof = os.fspath(profile)
    if prof in PROFILES:
        return prof
    if not _is_profile_file(prof):
        raise UserError(f"unknown profile {prof!r}: use {', '.join(PROFILES)} or the path of a JSON file")
    read_profile(prof)
    return prof


def _is_profile_file(prof):
    return os.path.exists(prof) or prof.endswith(".json") or os.sep in prof


def read_profile(path):
    """The ``{key: density}`` mapping of a JSON profile file (keys are layer names or patterns, ``*`` default)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise UserError(f"profile {path} is a folder; a profile is a JSON file (or one of {', '.join(PROFILES)})")
    if not os.path.exists(path):
        raise InputMissing(f"profile {path} does not exist; a profile is a JSON file (or one of "
                           f"{', '.join(PROFILES)})")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        # from None: the message holds all the JSONDecodeError says
        raise UserError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("densities"), dict):
        data = data["densities"]
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path}: a profile is a JSON object of layer name -> density, e.g. "
                         '{"*": 0.33, "conv1": 1.0}')
    return {str(k): _profile_value(v, path, k) for k, v in data.items()}


def _file_densities(path, names, all_names, density):
    """Densities for ``names`` from the profile file; its keys may name any of ``all_names`` (skipped ones too)."""
    table = read_profile(path)
    default = table.pop("*", density)
    known = set(all_names)
    exact = {}
    patterns = []
    unknown = []
    for key, value in table.items():
        if key in known:
            exact[key] = value
        elif _other_naming(key) in known:
            exact[_other_naming(key)] = value
        elif any(c in key for c in "*?[") and any(_matches(n, key) for n in all_names):
            patterns.append((key, value))
        else:
            unknown.append(key)
    if unknown:
        raise UserError(f"{path}: unknown layer(s) {', '.join(unknown)}; known layers: {', '.join(all_names)}")
    out = {}
    missing = []
    for n in names:
        if n in exact:
            out[n] = exact[n]
            continue
        for key, value in patterns:
            if _matches(n, key):
                out[n] = value
                break
        else:
            if default is None:
                missing.append(n)
            else:
                out[n] = default
    if missing:
        raise UserError(f"{path}: no density for layer(s) {', '.join(missing)}; add them or a \"*\" default")
    return out
