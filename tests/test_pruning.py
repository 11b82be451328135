"""Pruning math (pure numpy): ratios, exact-k masks, ties, profiles, and hypothesis property tests."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from helpers import DC_DEPLOY, DC_NET, shared_file
from dsd_caffe import pruning
from dsd_caffe.errors import InputMissing, UserError
from dsd_caffe.pruning import (SQUEEZENET_3X, apply_masks, density, format_ratio, kept_count, layer_densities,
                               magnitude_mask, make_masks, mask_and_threshold, parse_ratio, select_layers)

PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def squeezenet_shapes(naming="han"):
    """SqueezeNet v1.0 conv weight shapes in net order (from SqueezeNet_deploy.prototxt: num_output, kernel, and
    the input channels, which are the previous fire's expand1x1 + expand3x3 outputs)."""
    fires = [(2, 96, 16, 64), (3, 128, 16, 64), (4, 128, 32, 128), (5, 256, 32, 128),
             (6, 256, 48, 192), (7, 384, 48, 192), (8, 384, 64, 256), (9, 512, 64, 256)]
    shapes = {"conv1": (96, 3, 7, 7)}
    for f, cin, s, e in fires:
        shapes[f"fire{f}/conv1x1_1"] = (s, cin, 1, 1)
        shapes[f"fire{f}/conv1x1_2"] = (e, s, 1, 1)
        shapes[f"fire{f}/conv3x3_2"] = (e, s, 3, 3)
    shapes["conv_final"] = (1000, 512, 1, 1)
    if naming == "deepscale":
        shapes = {pruning.deepscale_name(n): s for n, s in shapes.items()}
    return shapes


def random_weights(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


# --- no Caffe ---------------------------------------------------------------------------------------------------

def test_pruning_never_imports_caffe():
    code = ("import sys, numpy as np; import dsd_caffe.pruning as p; "
            "w = {'a': np.arange(12.0).reshape(3, 4)}; "
            "p.prune_weights(w, p.layer_densities(w, p.parse_ratio('3x'))); "
            "p.layer_densities({'conv1': np.ones(3)}, profile='squeezenet-3x'); "
            "bad = [m for m in sys.modules if m == 'caffe' or m.startswith('caffe.')]; "
            "assert not bad, bad; print('clean')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "clean"


def test_source_has_no_caffe_import():
    with open(pruning.__file__) as f:
        src = f.read()
    for bad in ("import caffe", "from caffe", "caffe_env", "fileio", "netgen", "importlib"):
        assert bad not in src


# --- ratios -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, expected", [
    ({"ratio": "3x"}, 1 / 3), ({"ratio": "3X"}, 1 / 3), ({"ratio": " 3x "}, 1 / 3), ({"ratio": "2.5x"}, 0.4),
    ({"ratio": "10x"}, 0.1), ({"ratio": "1.5x"}, 2 / 3), ({"ratio": "4.0x"}, 0.25),
    ({"density": 0.33}, 0.33), ({"density": "0.25"}, 0.25), ({"sparsity": 0.67}, 1 - 0.67),
    ({"sparsity": "0.75"}, 0.25), ({"density": np.float32(0.5)}, 0.5),
])
def test_parse_ratio_accepts(kwargs, expected):
    assert parse_ratio(**kwargs) == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize("kwargs", [
    {"ratio": "1x"}, {"ratio": "0x"}, {"ratio": "-3x"}, {"ratio": "nanx"}, {"ratio": "NaN"}, {"ratio": "infx"},
    {"ratio": "3"}, {"ratio": "0.5x"}, {"ratio": "x"}, {"ratio": ""}, {"ratio": "3xx"}, {"ratio": "1e400x"},
    {"ratio": 3}, {"ratio": 3.0}, {"ratio": "1/3"}, {"ratio": "1.7976931348623153e+308x"}, {"density": 5e-324},
    {"density": 0}, {"density": 1}, {"density": 1.5}, {"density": -0.3}, {"density": float("nan")},
    {"density": float("inf")}, {"density": "3x"}, {"density": "abc"}, {"density": True}, {"density": [0.3]},
    {"sparsity": 0}, {"sparsity": 1.0}, {"sparsity": -0.1}, {"sparsity": float("nan")},
    {"ratio": "3x", "density": 0.33}, {"density": 0.3, "sparsity": 0.7}, {"ratio": "3x", "sparsity": 0.67}, {},
])
def test_parse_ratio_refuses_with_accepted_forms(kwargs):
    with pytest.raises(UserError) as e:
        parse_ratio(**kwargs)
    msg = str(e.value)
    assert '"3x"' in msg and "0.33" in msg and "0.67" in msg and "exactly one" in msg


def test_parse_ratio_messages_name_the_problem():
    with pytest.raises(UserError, match="nothing would be pruned"):
        parse_ratio(ratio="1x")
    with pytest.raises(UserError, match='bare number.*"3x"'):
        parse_ratio(ratio="3")
    with pytest.raises(UserError, match="^ratio and density given together"):
        parse_ratio(ratio="3x", density=0.3)


@pytest.mark.parametrize("d, text", [(1 / 3, "3x"), (0.4, "2.5x"), (0.25, "4x"), (0.1, "10x"), (2 / 3, "1.5x")])
def test_format_ratio(d, text):
    assert format_ratio(d) == text
    assert parse_ratio(ratio=text) == pytest.approx(d, rel=1e-15)


# --- masks ----------------------------------------------------------------------------------------------------------

def test_kept_count_rounding():
    assert kept_count(10, 0.35) == 4  # 3.5 rounds half up
    assert kept_count(10, 0.34) == 3
    assert kept_count(9, 1 / 3) == 3
    assert kept_count(3, 0.01) == 1  # never zero
    assert kept_count(7, 1.0) == 7
    assert kept_count(1, 0.3) == 1
    with pytest.raises(UserError):
        kept_count(0, 0.5)
    with pytest.raises(UserError):
        kept_count(5, 0.0)


@pytest.mark.parametrize("shape", [(1,), (2,), (7,), (10,), (3, 4), (5, 1, 3, 3), (96, 3, 7, 7), (1000, 512, 1, 1),
                                   (64, 16, 3, 3), (13, 17), (2, 3, 5, 7)])
@pytest.mark.parametrize("d", [0.01, 0.1, 1 / 3, 0.5, 0.9, 0.999, 1.0])
def test_exact_k_many_shapes(shape, d):
    w = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    mask = magnitude_mask(w, d)
    assert mask.dtype == bool and mask.shape == w.shape
    size = w.size
    expected = min(size, max(1, math.floor(d * size + 0.5)))
    assert int(mask.sum()) == expected
    if 0 < mask.sum() < size:
        assert np.abs(w[mask]).min() >= np.abs(w[~mask]).max()


def test_known_answer_small():
    w = np.array([[0.5, -3.0, 1.0], [-2.0, 0.1, 4.0]], dtype=np.float32)
    mask, t = mask_and_threshold(w, 0.5)
    assert mask.tolist() == [[False, True, False], [True, False, True]]
    assert t == 2.0
    mask, t = mask_and_threshold(w, 1 / 3)
    assert mask.tolist() == [[False, True, False], [False, False, True]]
    assert t == 3.0


def test_ties_lower_flat_index_wins():
    w = np.array([1.0, -1.0, 1.0, 1.0, -1.0, 0.5])
    assert magnitude_mask(w, 0.5).tolist() == [True, True, True, False, False, False]
    assert magnitude_mask(w, 1 / 3).tolist() == [True, True, False, False, False, False]
    # ties across a 2-D array follow C order
    w2 = np.array([[0.2, 0.9], [0.9, 0.9]])
    assert magnitude_mask(w2, 0.5).tolist() == [[False, True], [True, False]]
    # all equal, including -0.0 and 0.0
    z = np.array([0.0, -0.0, 0.0, -0.0])
    assert magnitude_mask(z, 0.5).tolist() == [True, True, False, False]


def test_integer_weights_no_abs_overflow():
    w = np.array([-128, 1, 127, -2], dtype=np.int8)
    assert magnitude_mask(w, 0.5).tolist() == [True, False, True, False]


def test_ties_deterministic_and_match_stable_argsort():
    rng = np.random.default_rng(3)
    w = rng.integers(-3, 4, size=(40, 25)).astype(np.float32)  # lots of ties
    for d in (0.1, 0.3, 0.5, 0.77):
        mask = magnitude_mask(w, d)
        k = kept_count(w.size, d)
        order = np.argsort(-np.abs(w).ravel(), kind="stable")
        expected = np.zeros(w.size, bool)
        expected[order[:k]] = True
        assert np.array_equal(mask.ravel(), expected)
        assert np.array_equal(mask, magnitude_mask(w.copy(), d))


def test_idempotence():
    w = np.random.default_rng(4).standard_normal((32, 16, 3, 3))
    for d in (0.1, 1 / 3, 0.6):
        mask = magnitude_mask(w, d)
        pruned = apply_masks({"w": w}, {"w": mask})["w"]
        again = magnitude_mask(pruned, d)
        assert np.array_equal(again, mask)
        assert np.array_equal(apply_masks({"w": pruned}, {"w": again})["w"], pruned)


def test_apply_masks_exact_zero_and_new_arrays():
    w = {"a": np.array([1.5, -2.0, 0.25, -0.125], dtype=np.float32), "b": np.ones(3)}
    masks = {"a": np.array([True, False, True, False])}
    out = apply_masks(w, masks)
    assert out["a"].dtype == np.float32
    assert out["a"].tolist() == [1.5, 0.0, 0.25, 0.0]
    assert not np.signbit(out["a"][[1, 3]]).any()  # +0.0, not -0.0
    assert out["a"] is not w["a"] and out["b"] is not w["b"]
    assert w["a"][1] == -2.0  # input untouched
    assert np.array_equal(out["b"], w["b"])
    # float 0/1 masks (as stored in a blob) work too
    assert apply_masks(w, {"a": np.array([1.0, 0.0, 1.0, 0.0])})["a"].tolist() == [1.5, 0.0, 0.25, 0.0]


def test_apply_masks_refuses_bad_masks():
    w = {"conv1": np.ones((2, 3))}
    with pytest.raises(UserError, match=r"conv1.*\(3, 2\).*\(2, 3\)"):
        apply_masks(w, {"conv1": np.ones((3, 2), bool)})
    with pytest.raises(UserError, match="unknown layer.*conv9.*known layers: conv1"):
        apply_masks(w, {"conv9": np.ones((2, 3), bool)})
    with pytest.raises(UserError, match="other than 0 and 1"):
        apply_masks(w, {"conv1": np.full((2, 3), 0.5)})


def test_magnitude_mask_refuses_bad_weights():
    with pytest.raises(UserError, match="conv1.*NaN"):
        magnitude_mask(np.array([1.0, np.nan]), 0.5, name="conv1")
    with pytest.raises(UserError, match="empty"):
        magnitude_mask(np.zeros((0, 3)), 0.5)
    with pytest.raises(TypeError):
        magnitude_mask(np.array(["a", "b"]), 0.5)
    for bad in (0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(UserError, match="density"):
            magnitude_mask(np.ones(4), bad)


def test_density_and_summary():
    assert density(np.array([0.0, 1.0, 0.0, 2.0])) == 0.5
    with pytest.raises(UserError):
        density(np.zeros(0))
    w = {"c1": np.arange(1.0, 13.0).reshape(3, 4), "fc": -np.arange(1.0, 11.0)}
    pruned, masks, rows = pruning.prune_weights(w, {"c1": 0.25, "fc": 0.5})
    assert rows == [
        {"name": "c1", "shape": (3, 4), "size": 12, "kept": 3, "density": 0.25, "threshold": 10.0},
        {"name": "fc", "shape": (10,), "size": 10, "kept": 5, "density": 0.5, "threshold": 6.0},
    ]
    assert density(pruned["c1"]) == 0.25 and density(pruned["fc"]) == 0.5
    table = pruning.format_table(rows)
    assert "c1" in table and "3x4" in table and "total" in table and "0.3636" in table
    # a layer kept whole (skipped, or at density 1) has no threshold: nothing was cut at one
    whole = pruning.format_table([{"name": "conv1", "shape": (2,), "size": 2, "kept": 2, "density": 1.0,
                                   "threshold": 0.5}] + rows).splitlines()
    assert whole[1].split() == ["conv1", "2", "2", "2", "1.0000"]
    assert whole[2].split() == ["c1", "3x4", "3", "12", "0.2500", "10"]


def test_make_masks_needs_every_density():
    with pytest.raises(UserError, match="no density.*fc"):
        make_masks({"c": np.ones(3), "fc": np.ones(3)}, {"c": 0.5})


# --- layer selection and profiles -------------------------------------------------------------------------------

def test_select_layers_patterns_and_both_namings():
    names = list(squeezenet_shapes("deepscale"))
    sel, skipped = select_layers(names, ["conv1", "fire*/squeeze1x1"])
    assert skipped == ["conv1"] + [f"fire{i}/squeeze1x1" for i in range(2, 10)]
    assert len(sel) == 26 - 9
    # Han names and patterns match the DeepScale net too
    _, skipped = select_layers(names, ["conv_final", "fire2/conv3x3_2"])
    assert skipped == ["fire2/expand3x3", "conv10"]
    with pytest.raises(UserError, match="conv99.*matches no prunable layer.*known layers: conv1"):
        select_layers(names, ["conv99"])
    with pytest.raises(UserError, match="every layer is skipped"):
        select_layers(["a", "b"], ["*"])


def test_name_mapping_round_trip():
    for han in SQUEEZENET_3X:
        ds = pruning.deepscale_name(han)
        assert pruning.han_name(ds) == han
    assert pruning.deepscale_name("fire5/conv3x3_2") == "fire5/expand3x3"
    assert pruning.deepscale_name("conv_final") == "conv10"
    assert pruning.han_name("fire9/squeeze1x1") == "fire9/conv1x1_1"
    assert pruning.han_name("ip1") == "ip1"


def test_name_mapping_agrees_with_netgen():
    netgen = pytest.importorskip("dsd_caffe.netgen")  # imports Caffe; fine in a test, never in pruning.py
    layers = set(SQUEEZENET_3X)
    han_to_ds = {k: v for k, v in netgen.rename_map("han", "deepscale").items() if k in layers}
    assert han_to_ds == {n: pruning.deepscale_name(n) for n in layers if pruning.deepscale_name(n) != n}
    assert netgen.weighted_layers(netgen.squeezenet_v1_0("han")) == list(SQUEEZENET_3X)


def test_uniform_with_skip():
    w = random_weights({"conv1": (8, 1, 3, 3), "conv2": (16, 8, 3, 3), "fc": (10, 64)})
    d = layer_densities(w, 0.25, "uniform", skip=["conv1"])
    assert list(d) == ["conv1", "conv2", "fc"]
    assert d == {"conv1": 1.0, "conv2": 0.25, "fc": 0.25}
    masks = make_masks(w, d)
    assert masks["conv1"].all()
    with pytest.raises(UserError, match="needs a density"):
        layer_densities(w, None, "uniform")
    with pytest.raises(UserError, match="unknown profile 'bogus'.*uniform, global, squeezenet-3x"):
        layer_densities(w, 0.3, "bogus")


def test_global_threshold_exact():
    rng = np.random.default_rng(5)
    w = {"a": rng.standard_normal((20, 30)), "b": 3 * rng.standard_normal((7, 11)), "c": 0.8 * rng.standard_normal(50)}
    for d in (0.2, 1 / 3, 0.6):
        dens = layer_densities(w, d, "global")
        masks = make_masks(w, dens)
        total = sum(v.size for v in w.values())
        assert sum(int(m.sum()) for m in masks.values()) == kept_count(total, d)
        kept = np.concatenate([np.abs(w[n])[masks[n]] for n in w])
        dropped = np.concatenate([np.abs(w[n])[~masks[n]] for n in w])
        assert kept.min() >= dropped.max()  # one threshold across layers
        # the per-layer masks equal the top-k of all weights taken together
        flat = np.concatenate([np.abs(w[n]).ravel() for n in w])
        expected = np.zeros(total, bool)
        expected[np.argsort(-flat, kind="stable")[:kept_count(total, d)]] = True
        assert np.array_equal(np.concatenate([masks[n].ravel() for n in w]), expected)
    assert layer_densities(w, 1 / 3, "global")["b"] > layer_densities(w, 1 / 3, "global")["c"]


def test_global_refuses_emptied_layer():
    w = {"big": np.full(100, 10.0), "tiny": np.full(10, 0.001)}
    with pytest.raises(UserError, match="removes every weight of layer.*tiny"):
        layer_densities(w, 0.5, "global")


def test_global_with_skip_counts_only_selected():
    w = random_weights({"a": (10, 10), "b": (20, 10), "c": (5, 5)})
    dens = layer_densities(w, 0.2, "global", skip=["c"])
    assert dens["c"] == 1.0
    masks = make_masks(w, dens)
    assert int(masks["a"].sum() + masks["b"].sum()) == kept_count(300, 0.2)


def test_profile_file_with_default_and_patterns(tmp_path):
    w = random_weights(squeezenet_shapes("han"))
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"*": 0.3, "conv1": 1.0, "fire*/conv3x3_2": "4x", "fire9/conv3x3_2": 0.2,
                                "conv10": 0.15}))
    d = layer_densities(w, None, str(path))
    assert d["conv1"] == 1.0
    assert d["fire2/conv3x3_2"] == 0.25 and d["fire8/conv3x3_2"] == 0.25
    assert d["fire9/conv3x3_2"] == 0.2  # exact name wins over the pattern
    assert d["conv_final"] == 0.15  # DeepScale name in the file, Han names in the net
    assert d["fire2/conv1x1_1"] == 0.3
    # skip overrides the file
    assert layer_densities(w, None, path, skip=["conv_final"])["conv_final"] == 1.0
    # without "*" the density argument is the default; without either, refused
    path.write_text(json.dumps({"conv1": 0.9}))
    assert layer_densities(w, 0.4, path)["fire5/conv1x1_2"] == 0.4
    with pytest.raises(UserError, match="no density for layer.*fire2/conv1x1_1"):
        layer_densities(w, None, path)
    # a provenance-style JSON with a "densities" member
    path.write_text(json.dumps({"phase": "sparse", "densities": {"*": 0.5}}))
    assert set(layer_densities(w, None, path).values()) == {0.5}


def test_profile_file_unknown_layers_refused(tmp_path):
    w = random_weights({"conv1": (4, 1, 3, 3), "ip1": (10, 4)})
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"*": 0.3, "conv2": 0.5, "fc*": 0.5}))
    with pytest.raises(UserError) as e:
        layer_densities(w, None, path)
    assert str(path) in str(e.value) and "conv2" in str(e.value) and "fc*" in str(e.value)
    assert "known layers: conv1, ip1" in str(e.value)


@pytest.mark.parametrize("content, match", [
    ("{", "not valid JSON"), ("[0.3]", "JSON object"), ("{}", "JSON object"),
    ('{"*": 1.5}', "invalid density"), ('{"*": 0}', "invalid density"), ('{"*": "1x"}', "invalid value"),
    ('{"*": null}', "invalid density"),
])
def test_profile_file_bad_content(tmp_path, content, match):
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(UserError, match=match):
        layer_densities({"conv1": np.ones(4)}, None, path)


def test_profile_file_missing():
    with pytest.raises(InputMissing, match="profile no/such/profile.json does not exist"):
        layer_densities({"conv1": np.ones(4)}, None, "no/such/profile.json")


def test_squeezenet_3x_table_consistent():
    shapes = squeezenet_shapes("han")
    assert list(SQUEEZENET_3X) == list(shapes)
    for name, (nz, total) in SQUEEZENET_3X.items():
        assert total == int(np.prod(shapes[name])) and 0 < nz <= total
    assert sum(nz for nz, _ in SQUEEZENET_3X.values()) == 415921
    assert sum(t for _, t in SQUEEZENET_3X.values()) == 1244448
    assert pruning.SQUEEZENET_3X_OVERALL == pytest.approx(0.334, abs=0.0005)


@pytest.mark.parametrize("naming", ["han", "deepscale"])
def test_squeezenet_3x_on_squeezenet_shapes(naming):
    w = random_weights(squeezenet_shapes(naming), seed=7)
    dens = layer_densities(w, parse_ratio(ratio="3x"), "squeezenet-3x")
    pruned, masks, rows = pruning.prune_weights(w, dens)
    kept = total = 0
    for name, arr in pruned.items():
        ref_nz, ref_total = SQUEEZENET_3X[pruning.han_name(name)]
        assert abs(density(arr) - ref_nz / ref_total) <= 0.01, name
        assert abs(int(masks[name].sum()) - ref_nz) <= 1, name
        kept += np.count_nonzero(arr)
        total += arr.size
    assert kept / total == pytest.approx(0.334, abs=0.005)
    assert [r["name"] for r in rows] == list(w)


def test_squeezenet_3x_scaled_for_other_densities():
    shapes = squeezenet_shapes("han")
    w = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
    sizes = {n: int(np.prod(s)) for n, s in shapes.items()}
    total = sum(sizes.values())
    same = layer_densities(w, 0.33, "squeezenet-3x")
    assert same == layer_densities(w, None, "squeezenet-3x") == pruning.SQUEEZENET_3X_DENSITIES
    for target in (0.2, 0.5):
        d = layer_densities(w, target, "squeezenet-3x")
        assert sum(d[n] * sizes[n] for n in d) / total == pytest.approx(target, abs=1e-6)
        assert all(0 < v <= 1 for v in d.values())
        # the layers keep their order of sensitivity
        ref = pruning.SQUEEZENET_3X_DENSITIES
        assert d["conv_final"] < d["fire9/conv3x3_2"] < d["fire9/conv1x1_1"] <= d["conv1"]
        assert (d["conv_final"] / ref["conv_final"]) == pytest.approx(d["fire8/conv3x3_2"] / ref["fire8/conv3x3_2"])


def test_squeezenet_3x_refuses_other_nets():
    with pytest.raises(UserError, match="squeezenet-3x has no density for layer.*ip1"):
        layer_densities({"conv1": np.ones(9), "ip1": np.ones(9)}, None, "squeezenet-3x")
    # skipped unknown layers are fine
    assert layer_densities({"conv1": np.ones(9), "ip1": np.ones(9)}, None, "squeezenet-3x", skip=["ip1"])["ip1"] == 1.0


def test_squeezenet_3x_matches_deepcompression_decode():
    from dsd_caffe import deepcompression

    decoded = deepcompression.decode(shared_file(DC_NET), shared_file(DC_DEPLOY))
    derived = {}
    for name, value in decoded.items():
        weights = value[0] if isinstance(value, tuple) else value
        derived[name] = (int(np.count_nonzero(weights)), int(np.asarray(weights).size))
    assert derived == SQUEEZENET_3X


# --- property tests (hypothesis) ------------------------------------------------------------------------------

densities = st.floats(min_value=1e-6, max_value=1.0, allow_nan=False, exclude_min=False)
shapes = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=9)


@PROPS
@given(shape=shapes, d=densities, seed=st.integers(0, 2**32 - 1), ties=st.booleans())
def test_prop_kept_count_exact(shape, d, seed, ties):
    rng = np.random.default_rng(seed)
    w = rng.integers(-2, 3, size=shape).astype(np.float32) if ties else rng.standard_normal(shape)
    mask = magnitude_mask(w, d)
    k = int(mask.sum())
    assert k == kept_count(w.size, d)
    assert 1 <= k <= w.size
    assert k == 1 or abs(k - d * w.size) <= 0.5 + 1e-9


@PROPS
@given(w=hnp.arrays(np.float64, shapes, elements=st.floats(-1e6, 1e6, allow_nan=False, width=32)),
       d=densities)
def test_prop_never_keeps_smaller_while_dropping_larger(w, d):
    mask, threshold = mask_and_threshold(w, d)
    a = np.abs(w)
    if (~mask).any():
        assert a[mask].min() >= a[~mask].max()
        assert a[~mask].max() <= threshold
    assert a[mask].min() == threshold
    # among equal magnitudes at the threshold, the kept ones come first in C order
    flat_mask, flat_a = mask.ravel(), a.ravel()
    at = np.flatnonzero(flat_a == threshold)
    kept_at = flat_mask[at]
    assert not np.any(~kept_at[:-1] & kept_at[1:])
    # idempotent on the pruned array (masks equal when no kept weight is exactly zero)
    pruned = np.where(mask, w, 0.0)
    again = magnitude_mask(pruned, d)
    if threshold > 0:
        assert np.array_equal(again, mask)
    assert np.array_equal(np.where(again, pruned, 0.0), pruned)


@PROPS
@given(layers=st.lists(shapes, min_size=1, max_size=4), d=st.floats(0.05, 0.95), seed=st.integers(0, 2**16))
def test_prop_global_total_exact(layers, d, seed):
    w = random_weights({f"l{i}": s for i, s in enumerate(layers)}, seed)
    total = sum(v.size for v in w.values())
    try:
        dens = layer_densities(w, d, "global")
    except ValueError as e:
        assert "removes every weight" in str(e)
        return
    assert sum(int(m.sum()) for m in make_masks(w, dens).values()) == kept_count(total, d)


ratio_texts = st.one_of(
    st.text(max_size=8),
    st.builds(lambda n, x: f"{n}{x}", st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["x", "X", ""])),
    st.builds(lambda n: f"{n}x", st.integers(-5, 10**6)),
    st.from_regex(r"\A ?[-+]?[0-9]{0,3}\.?[0-9]{0,3}(e[-+]?[0-9]{1,3})?[xX]? ?\Z"),
)
anything = st.one_of(st.none(), st.booleans(), st.integers(-10, 10), st.floats(), st.text(max_size=6), ratio_texts,
                     st.lists(st.floats(), max_size=2))


@PROPS
@given(ratio=ratio_texts)
def test_prop_ratio_round_trips_or_value_error(ratio):
    try:
        d = parse_ratio(ratio=ratio)
    except ValueError:
        return
    assert 0 < d < 1
    text = format_ratio(d)
    assert text.endswith("x")
    assert parse_ratio(ratio=text) == pytest.approx(d, rel=1e-15)
    assert format_ratio(parse_ratio(ratio=text)) == text


@PROPS
@given(ratio=anything, dens=anything, sparsity=anything)
def test_prop_any_input_accepts_or_value_error(ratio, dens, sparsity):
    try:
        d = parse_ratio(ratio=ratio, density=dens, sparsity=sparsity)
    except ValueError:
        return
    assert 0 < d < 1 and math.isfinite(d)
    if d >= 1e-300:
        assert parse_ratio(ratio=format_ratio(d)) == pytest.approx(d, rel=1e-15)
        assert parse_ratio(density=repr(d)) == d


def test_repruning_counts_zeros_as_pruned():
    w = np.random.default_rng(7).standard_normal((12, 12)).astype(np.float32)
    third = pruning.apply_masks({"c": w}, pruning.make_masks({"c": w}, {"c": 1 / 3}))["c"]
    assert np.count_nonzero(third) == 48
    again = pruning.make_masks({"c": third}, {"c": 1 / 3})["c"]  # 3x on a 3x model: the same 48, nothing more
    np.testing.assert_array_equal(again, third != 0)
    rows = pruning.summary_rows({"c": third}, {"c": again})
    assert (rows[0]["kept"], rows[0]["density"]) == (48, 48 / 144)
    with pytest.raises(UserError, match=r"48 non-zero weights \(density 0.3333\), fewer than the 72 that "
                                          r"density 0.5000 keeps"):
        pruning.make_masks({"c": third}, {"c": 0.5})  # 2x on a 3x model would mark zeros as kept
    quarter = pruning.make_masks({"c": third}, {"c": 0.25})["c"]
    assert quarter.sum() == 36 and not np.any(quarter & (third == 0))
    kept_dense = pruning.make_masks({"c": third}, {"c": 1.0})["c"]  # a skipped layer keeps its non-zeros only
    np.testing.assert_array_equal(kept_dense, third != 0)


@PROPS
@given(shape=shapes, d=densities, zeros=st.floats(0, 0.9), seed=st.integers(0, 2**32 - 1))
def test_prop_repruning_never_keeps_a_zero(shape, d, zeros, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape)
    w[rng.random(shape) < zeros] = 0.0
    nonzero = int(np.count_nonzero(w))
    k = kept_count(w.size, d) if d < 1 else nonzero
    if d < 1 and k > nonzero:
        with pytest.raises(UserError, match="already pruned"):
            pruning.make_masks({"w": w}, {"w": d})
        return
    mask = pruning.make_masks({"w": w}, {"w": d})["w"]
    assert int(mask.sum()) == k and not np.any(mask & (w == 0))
