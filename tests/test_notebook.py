"""The example notebook, examples/dsd_fashion_mnist.ipynb, executed headless start to end (nbclient, a kernel of
this interpreter) on real Caffe with a few iterations per phase, so it never rots.

One module-scoped run. A cell appended by the test prints the notebook's results as JSON; the tests check them and
the files in its working folder against known answers. Jupyter and IPython write only into the test's temporary
folder: the kernel spec, its runtime, data and config folders, IPython's and matplotlib's.
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from dsd_caffe import fashion_mnist, masks
from dsd_caffe.errors import UserError

from helpers import ROOT, copy_repo
from test_readme import blocks

NOTEBOOK = os.path.join(ROOT, "examples", "dsd_fashion_mnist.ipynb")
KERNEL = "dsd-caffe-test"

pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(fashion_mnist.FASHION_MNIST_DIR,
                                                                "t10k-images-idx3-ubyte.gz")),
                                reason="Fashion-MNIST (Debian's dataset-fashion-mnist) is not installed")

#: appended to the notebook: its results as one JSON line
PROBE = """
import json
print(json.dumps({
    "classes": classifier.classes,
    "predicted": [[p.name for p in top] for top in predictions],
    "true": [classifier.classes[label] for label in test_labels[:8]],
    "classifier_top1": classifier_top1,
    "caffe_test_top1": float(first_1000["accuracy_top1"]),
    "test_top1": {label: float(r["accuracy_top1"]) for label, r in test_results.items()},
    "rows": res["rows"], "models": MODELS, "run": RUN, "table": dsd_caffe.results_text(state),
}))
"""

#: where Jupyter and IPython would write in the user's home
HOME_PLACES = ("~/.jupyter", "~/.ipython", "~/.local/share/jupyter", "~/.config/matplotlib",
               "~/.cache/matplotlib")


def _jupyter_env(tmp):
    """Jupyter's and IPython's folders (kernel specs, runtime, data, config) and matplotlib's, all under ``tmp``."""
    return {"JUPYTER_PATH": tmp / "jupyter", "JUPYTER_DATA_DIR": tmp / "data", "JUPYTER_CONFIG_DIR": tmp / "config",
            "JUPYTER_RUNTIME_DIR": tmp / "runtime", "JUPYTER_PLATFORM_DIRS": "1", "IPYTHONDIR": tmp / "ipython",
            "MPLCONFIGDIR": tmp / "matplotlib"}


def _listing(paths):
    out = {}
    for top in paths:
        for folder, _, files in os.walk(os.path.expanduser(top)):
            for name in files:
                p = os.path.join(folder, name)
                out[p] = os.path.getmtime(p)
        out[top] = os.path.exists(os.path.expanduser(top))
    return out


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """(the executed notebook, its results, its working folder, the home listings before and after)."""
    import nbclient
    import nbformat

    tmp = tmp_path_factory.mktemp("notebook")
    spec = tmp / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "dsd-caffe test", "language": "python"}))
    work = tmp / "work"
    env = dict(_jupyter_env(tmp), DSD_NOTEBOOK_DIR=work, DSD_NOTEBOOK_SCALE="0.005", DSD_NOTEBOOK_VAL_SIZE="1000")
    before = _listing(HOME_PLACES)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, str(v))
        client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=600,
                                         resources={"metadata": {"path": str(tmp)}})
        client.execute()
    after = _listing(HOME_PLACES)
    probe = [o for o in nb.cells[-1].outputs if o.get("name") == "stdout"]
    return nb, json.loads(probe[-1]["text"].strip().splitlines()[-1]), work, (before, after)


def test_every_cell_ran_without_error(executed):
    nb, _, _, _ = executed
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4  # histograms, curves, the classified images, run_dsd's accuracy plot


def test_the_notebook_in_the_repository_has_no_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert all(not c.outputs and c.execution_count is None for c in nb.cells if c.cell_type == "code")


def test_pruned_model_holds_exactly_the_kept_counts(executed):
    _, out, _, _ = executed
    report = masks.sparsity_report(out["models"]["pruned"])
    assert report["total"]["count"] == 15504  # the small net's conv weights
    for name, r in report.items():
        if name == "total":
            continue
        # 3x: floor(size / 3 + 0.5) kept per layer; conv1 skipped (all of its trained weights are non-zero)
        assert r["nonzero"] == (r["count"] if name == "conv1" else math.floor(r["count"] / 3 + 0.5)), name
    rows = {r["name"]: r for r in out["rows"]}
    assert {n: r["kept"] for n, r in rows.items()} == {n: r["nonzero"] for n, r in report.items() if n != "total"}
    assert report["total"]["nonzero"] == sum(r["kept"] for r in rows.values())


def test_sparse_model_keeps_pruned_weights_at_exactly_zero(executed):
    _, out, work, _ = executed
    sparse = out["models"]["sparse"]
    inside = masks.read_masks(sparse)
    stored = masks.load_masks(os.path.join(work, "sparse", "masks.npz"))
    assert masks.same_masks(inside, stored) is None
    kept = {r["name"]: r["kept"] for r in out["rows"]}
    weights = masks.weight_arrays(sparse)
    for name, m in inside.items():
        assert int(m.sum()) == kept[name]
        assert np.all(weights[name][~m] == 0.0), name
        assert np.count_nonzero(weights[name]) <= kept[name]


def test_redense_model_is_released_and_regrown(executed):
    _, out, _, _ = executed
    redense = out["models"]["redense"]
    with pytest.raises(UserError, match="no mask layer"):
        masks.read_masks(redense)
    pruned = masks.sparsity_report(out["models"]["pruned"])["total"]["density"]
    assert pruned < masks.sparsity_report(redense)["total"]["density"] <= 1.0


def test_classified_images_are_named_from_the_lmdb_classes(executed):
    _, out, _, _ = executed
    assert out["classes"] == fashion_mnist.FASHION_MNIST_CLASSES
    assert len(out["predicted"]) == 8
    for top in out["predicted"]:
        assert len(set(top)) == 3 and set(top) <= set(out["classes"])
    # the first eight labels of Fashion-MNIST's t10k file
    assert out["true"] == ["Ankle boot", "Pullover", "Trouser", "Trouser", "Shirt", "Trouser", "Coat", "Shirt"]


def test_classifier_agrees_with_caffe_test(executed):
    """Same images, same preprocessing: the classifier's top-1 on the first 1,000 test images equals what
    `caffe test` (evaluate) scores on the first 10 batches of 100 of the test LMDB."""
    _, out, _, _ = executed
    assert out["classifier_top1"] == pytest.approx(out["caffe_test_top1"], abs=1e-6)
    assert set(out["test_top1"]) == {"dense", "sparse", "redense"}
    assert all(0.0 <= v <= 1.0 for v in out["test_top1"].values())


def test_run_dsd_cycle_is_the_run_by_hand(executed):
    """run_dsd's DSD arm runs the same phases with the same seeds and schedules: the same weights, bit for bit."""
    _, out, _, _ = executed
    for phase in ("sparse", "redense"):
        by_hand = masks.weight_arrays(out["models"][phase])
        in_run = masks.weight_arrays(os.path.join(out["run"], f"cycle1-{phase}", f"{phase}.caffemodel"))
        assert by_hand.keys() == in_run.keys()
        assert all(np.array_equal(by_hand[k], in_run[k]) for k in by_hand), phase
    assert [line.split()[0] for line in out["table"].splitlines()[:5]] == ["model", "dense", "sparse", "DSD",
                                                                          "control"]


def test_nothing_written_outside_the_temporary_folder(executed):
    _, _, work, (before, after) = executed
    assert before == after
    assert os.path.isdir(work / "data" / "test_lmdb")


def _files(top):
    return {os.path.relpath(os.path.join(d, f), top) for d, _, names in os.walk(top) for f in names}


def test_the_documented_headless_command_runs_as_written(tmp_path):
    """docs/usage.md's headless command, literally, in a copy of the repository (with this checkout's .venv), at a
    tiny scale: it needs only what `make setup` installs, and writes only into the notebook's folder, which git
    ignores (examples/runs/notebook: the kernel starts beside the notebook)."""
    script = blocks("Example notebook", path=os.path.join(ROOT, "docs", "usage.md"))
    assert len(script) == 1
    copy = copy_repo(tmp_path)
    before = _files(copy)
    env = dict(os.environ, **{k: str(v) for k, v in _jupyter_env(tmp_path).items()}, DSD_NOTEBOOK_SCALE="0.005",
               DSD_NOTEBOOK_VAL_SIZE="1000", TQDM_DISABLE="1")
    env.pop("DSD_NOTEBOOK_DIR", None)
    r = subprocess.run(["bash", "-ec", script[0]], cwd=copy, capture_output=True, text=True, timeout=1800, env=env)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    new = _files(copy) - before
    assert "examples/runs/notebook/redense/redense.caffemodel" in new
    assert all(p.startswith("examples/runs/notebook/") for p in new), sorted(new)[:20]
    ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", "examples/runs/notebook/x"], cwd=ROOT)
    assert ignored.returncode == 0
