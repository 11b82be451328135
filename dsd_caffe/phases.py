"""DSD's phases around real Caffe: prune -> sparse training under the mask layer -> re-dense training, the whole
pipeline with crash-safe resume, and per-layer sensitivity scans.

Folders. Every phase writes into its own folder: its trainval and solver prototxts (Data sources written
relative to that folder), Caffe's snapshots (``snapshots/<phase>_iter_N.*``), the training log, and the final
model with its provenance JSON beside it. Caffe runs with that folder as its working folder (``caffe train``
binary), or from pycaffe with the paths made absolute in memory. A phase is finished when its final model and
provenance JSON exist; re-running resumes from the newest complete snapshot.

Input trainvals: a Data layer's relative ``source`` is looked up beside the prototxt first, then (as the caffe
binary does) in the current folder.
"""
import glob
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from . import fileio, masklayer, netgen, pruning
from .caffe_env import caffe_pb2
from .errors import UserError

log = logging.getLogger(__name__)

PRUNED = "pruned.caffemodel"
SPARSE = "sparse.caffemodel"
DENSE = "dense.caffemodel"
MASKS = "masks.npz"
SPARSE_NET, SPARSE_SOLVER = "sparse_trainval.prototxt", "sparse_solver.prototxt"
DENSE_NET, DENSE_SOLVER = "dense_trainval.prototxt", "dense_solver.prototxt"
STATE = "dsd_state.json"
ENGINES = ("binary", "pycaffe")


def _copy(msg):
    out = type(msg)()
    out.CopyFrom(msg)
    return out


# ------------------------------------------------------------------------------------------------ data sources
def _phase_of(layer):
    pb2 = caffe_pb2()
    phases = {r.phase for r in layer.include if r.HasField("phase")}
    return "TRAIN" if phases == {pb2.TRAIN} else "TEST" if phases == {pb2.TEST} else "BOTH"


def _source_fields(net):
    """[(layer, its *_data_param)] for every layer of the net that reads a source."""
    out = []
    for l in net.layer:
        if l.type == "Data":
            out.append((l, l.data_param))
        elif l.type == "ImageData":
            out.append((l, l.image_data_param))
        elif l.type == "HDF5Data":
            out.append((l, l.hdf5_data_param))
    return out


def absolute_sources(net_param, base, train=None, test=None):
    """Copy of ``net_param`` with every data source absolute: ``train``/``test`` when given, else the source
    resolved beside ``base`` (the prototxt's folder) or, failing that, in the current folder."""
    net = _copy(net_param)
    for layer, p in _source_fields(net):
        phase = _phase_of(layer)
        given = train if phase == "TRAIN" else test if phase == "TEST" else None
        src = os.fspath(given) if given is not None else p.source
        if not src:
            raise UserError(f"{layer.type} layer {layer.name!r} has no source")
        if not os.path.isabs(src):
            near = os.path.abspath(os.path.join(base, src)) if base is not None else None
            if given is None and near is not None and os.path.exists(near):
                src = near
            else:
                src = os.path.abspath(src)
        if not os.path.exists(src):
            raise FileNotFoundError(f"{layer.type} layer {layer.name!r}: data source "
                                    f"{given if given is not None else p.source} not found "
                                    f"(looked beside the prototxt{' in ' + base if base else ''} and in the "
                                    f"current folder)")
        p.source = src
    return net


def relative_sources(net_param, folder):
    """Copy of ``net_param`` (absolute sources) with sources relative to ``folder``."""
    net = _copy(net_param)
    for _, p in _source_fields(net):
        p.source = os.path.relpath(p.source, folder)
    return net


def data_sources(net):
    """((train source, batch size), (test source, test batch size)) of the LMDB Data layers of ``net``."""
    train = test = None
    for l in net.layer:
        if l.type == "Data":
            ph = _phase_of(l)
            if ph in ("TRAIN", "BOTH") and train is None:
                train = (l.data_param.source, l.data_param.batch_size)
            if ph in ("TEST", "BOTH") and test is None:
                test = (l.data_param.source, l.data_param.batch_size)
    if train is None:
        raise UserError(f"net {net.name!r} has no TRAIN Data (LMDB) layer")
    return train, test or train


def _lmdb_count(path):
    from .lmdbio import lmdb_info

    return lmdb_info(path)["count"]


def num_classes(net):
    """The class count the loss sees: num_output of the Convolution/InnerProduct that feeds SoftmaxWithLoss (through
    pooling, ReLU, dropout...), or None when the net has no such loss."""
    layers = list(net.layer)
    for i, l in enumerate(layers):
        if l.type != "SoftmaxWithLoss" or not l.bottom:
            continue
        blob = l.bottom[0]
        for producer in reversed(layers[:i]):
            if blob not in producer.top:
                continue
            if producer.type in ("Convolution", "InnerProduct"):
                param = producer.convolution_param if producer.type == "Convolution" else producer.inner_product_param
                return param.num_output
            if not producer.bottom:
                return None
            blob = producer.bottom[0]
    return None


def check_data(net):
    """Check every LMDB Data layer's source before Caffe opens it: missing, empty, images smaller than the crop,
    and labels outside the net's classes (Caffe checks those only in debug builds: an out-of-range label makes
    SoftmaxWithLoss write outside its blob)."""
    from .lmdbio import check_lmdb, label_range

    classes = num_classes(net)
    for l in net.layer:
        if l.type == "Data":
            try:
                check_lmdb(l.data_param.source, crop_size=l.transform_param.crop_size)
                low, high = label_range(l.data_param.source) if classes else (0, 0)
                if low < 0 or high >= classes:
                    bad = low if low < 0 else high
                    raise UserError(f"LMDB {l.data_param.source} holds label {bad}, outside the net's {classes} "
                                     f"classes (0..{classes - 1}); does the LMDB belong to this net?")
            except ValueError as e:
                raise UserError(f"Data layer {l.name!r} ({_phase_of(l)}): {e}") from None


# ------------------------------------------------------------------------------------------------ nets + weights
def _input_shape(net):
    for l in net.layer:
        if l.type == "Data":
            from .lmdbio import lmdb_info

            info = lmdb_info(l.data_param.source)
            crop = l.transform_param.crop_size
            return (1, info["channels"], crop or info["height"], crop or info["width"])
    raise UserError(f"net {net.name!r} has no Data layer to take the input shape from")


def net_weight_shapes(net_param):
    """{layer: [blob shapes]} of ``net_param`` (absolute sources), from a real caffe.Net of its deploy form."""
    from . import netcheck
    from .caffe_env import import_caffe

    caffe = import_caffe()
    d = netgen.deploy(masklayer.remove_mask_layer(net_param), input_shape=_input_shape(net_param))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "deploy.prototxt")
        fileio.write_prototxt(path, d)
        return netcheck.param_shapes(caffe.Net(path, caffe.TEST))


def check_fits(net_param, model_param, weights_name, net_name):
    from . import netcheck

    return netcheck.check_weights_fit(net_weight_shapes(net_param), model_param, weights_name=weights_name,
                                      net_name=net_name)


def _set_blob(blob, array):
    array = np.asarray(array, dtype=np.float32)
    blob.ClearField("num"), blob.ClearField("channels"), blob.ClearField("height"), blob.ClearField("width")
    del blob.shape.dim[:]
    blob.shape.dim.extend(array.shape)
    del blob.data[:]
    blob.data.extend(array.ravel().tolist())


def _checked_inputs(model, net_param, weights, train_source, test_source):
    """The dense form of the net (absolute sources, no mask layer) and its caffemodel, both checked: the LMDBs
    exist and fit the crop, and the caffemodel fits the net."""
    if net_param is None:
        model = os.fspath(model)
        net_param = absolute_sources(fileio.read_net_prototxt(model), os.path.dirname(os.path.abspath(model)),
                                     train_source, test_source)
    else:
        net_param = absolute_sources(net_param, None, train_source, test_source)
    dense = masklayer.remove_mask_layer(net_param)
    check_data(dense)
    model_param = fileio.read_caffemodel(weights)
    check_fits(dense, model_param, os.fspath(weights), os.fspath(model or dense.name))
    return dense, model_param


def save_masks(path, masks, force=False):
    with fileio.atomic_path(path, force=force) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **{k: np.asarray(v, bool) for k, v in masks.items()})
    return path


def load_masks(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"masks file {path} does not exist")
    try:
        with np.load(path) as z:
            return {k: z[k].astype(bool) for k in z.files}
    except (OSError, ValueError) as e:
        raise UserError(f"masks file {path} is unreadable ({e})") from None


def _histogram_png(path, before, after, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = np.concatenate([w.ravel() for w in before.values()])
    b = np.concatenate([w.ravel() for w in after.values()])
    b = b[b != 0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharex=True)
    lim = float(np.abs(a).max()) or 1.0
    bins = np.linspace(-lim, lim, 201)
    axes[0].stairs(np.histogram(a, bins)[0], bins, fill=True, color="tab:blue")
    axes[0].set_title(f"before: {a.size} weights")
    axes[1].stairs(np.histogram(b, bins)[0], bins, fill=True, color="tab:orange")
    axes[1].set_title(f"after: {b.size} non-zero ({b.size / a.size:.3f})")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("weight")
    fig.suptitle(title)
    fileio.save_figure(fig, path, dpi=80)


# ------------------------------------------------------------------------------------------------ prune
def _check_target(target, profile):
    if target is None and profile in ("uniform", "global"):
        raise UserError(f"profile {profile!r} needs --ratio, --density or --sparsity; {pruning.ACCEPTED_FORMS}")


def prune(model, weights, output_dir, ratio=None, density=None, sparsity=None, profile="uniform", skip=(),
          force=False, seed=0, train_source=None, test_source=None, base_lr=None, epochs=None, max_iter=None,
          snapshot=None, solver_args=None, net_param=None):
    """Prune a dense model into ``output_dir``: pruned caffemodel (with the mask layer's blobs) + provenance JSON,
    masks.npz, sparse trainval + solver, weight histograms PNG. Returns a dict with "table" (the per-layer table),
    "rows", "densities" and the written paths.

    ``net_param`` (a NetParameter with absolute sources) replaces reading ``model`` (used by :func:`run_dsd`).
    """
    from . import solvers

    target = pruning.parse_ratio(ratio, density, sparsity) if (ratio, density, sparsity) != (None,) * 3 else None
    out = os.path.abspath(os.fspath(output_dir))
    pruned_path = os.path.join(out, PRUNED)
    if os.path.exists(pruned_path) and not force:
        raise FileExistsError(f"{out} already holds a pruned model ({PRUNED}); pass --force to overwrite it")
    fileio.check_output(os.path.join(out, SPARSE_NET), force=True)
    _check_target(target, profile)
    net_param, model_param = _checked_inputs(model, net_param, weights, train_source, test_source)
    names = netgen.weighted_layers(net_param)
    if not names:
        raise UserError(f"net {net_param.name!r} has no Convolution/InnerProduct layer to prune")
    all_w = masklayer.weight_arrays(model_param)
    dense_w = {n: all_w[n] for n in names}
    densities = pruning.layer_densities(dense_w, target, profile=profile, skip=skip)
    masks = pruning.make_masks(dense_w, densities)
    pruned_w = pruning.apply_masks(dense_w, masks)
    rows = pruning.summary_rows(dense_w, masks)
    table = pruning.format_table(rows)
    masked = {n: m for n, m in masks.items() if not m.all()}
    if not masked:
        raise UserError("every layer is kept at density 1.0; nothing to prune")

    os.makedirs(out, exist_ok=True)
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(f"output folder {out} is not writable")
    sparse_net = masklayer.add_mask_layer(net_param, {n: dense_w[n].shape for n in masked})
    new_model = masklayer.add_masks_to_caffemodel(model_param, masked, sparse_net)
    fileio.write_prototxt(os.path.join(out, SPARSE_NET), relative_sources(sparse_net, out), force=True)
    (train_src, batch), (test_src, test_batch) = data_sources(sparse_net)
    args = dict(solver_args or {})
    args.setdefault("batch_size", batch)
    args.setdefault("test_batch", test_batch)
    args.setdefault("iter_size", 1)
    args.setdefault("random_seed", seed)
    if base_lr is not None:
        args["base_lr"] = base_lr
    s = solvers.sparse_solver(SPARSE_NET, train_size=_lmdb_count(train_src), test_size=_lmdb_count(test_src),
                              snapshot_prefix="snapshots/sparse", epochs=epochs, max_iter=max_iter, **args)
    s.snapshot = snapshot or max(1, s.max_iter // 10)
    fileio.write_prototxt(os.path.join(out, SPARSE_SOLVER), s, force=True)
    save_masks(os.path.join(out, MASKS), masked, force=True)
    _histogram_png(os.path.join(out, "weights_histogram.png"), dense_w, pruned_w,
                   f"{os.path.basename(os.fspath(weights))}: pruned to {sum(r['kept'] for r in rows) / sum(r['size'] for r in rows):.3f}")
    fileio.write_caffemodel(pruned_path, new_model, force=True)
    achieved = {r["name"]: r["density"] for r in rows}
    fileio.write_provenance(pruned_path, source=os.path.abspath(os.fspath(weights)), densities=achieved,
                            phase="prune", iteration=0, seed=seed, force=True, target_density=target,
                            profile=os.fspath(profile), skip=list(skip), masked_layers=list(masked),
                            thresholds={r["name"]: r["threshold"] for r in rows}, net=SPARSE_NET,
                            solver=SPARSE_SOLVER, masks=MASKS)
    log.info("pruned %s -> %s", weights, pruned_path)
    return {"table": table, "rows": rows, "densities": achieved, "model": pruned_path, "output_dir": out}


# ------------------------------------------------------------------------------------------------ training
_SNAP_RE = re.compile(r"_iter_(\d+)\.solverstate$")


def snapshots(folder, prefix, clean=False):
    """[(iteration, solverstate, caffemodel)] of complete snapshots ``<folder>/<prefix>_iter_N.*``, newest first.
    A snapshot whose files are missing, empty or unreadable (a kill while Caffe wrote it: Caffe does not write
    snapshots atomically) is skipped, and with ``clean`` deleted (training passes that iteration again)."""
    out = []
    pattern = os.path.join(folder, glob.escape(prefix) + "_iter_*.")
    stems = {f.rsplit(".", 1)[0] for f in glob.glob(pattern + "solverstate") + glob.glob(pattern + "caffemodel")}
    for stem in stems:
        state, model = stem + ".solverstate", stem + ".caffemodel"
        m = _SNAP_RE.search(state)
        if not m or not os.path.exists(model) or not os.path.exists(state):
            if clean:
                _drop_snapshot(stem, "incomplete")
            continue
        try:
            st = caffe_pb2().SolverState()
            with open(state, "rb") as f:
                st.ParseFromString(f.read())
            if st.iter != int(m.group(1)):
                raise UserError("iteration mismatch")
            expected = _learnable_count(fileio.read_caffemodel(model))
            if len(st.history) != expected:
                raise UserError(f"{len(st.history)} history blobs for {expected} learnable blobs")
        except Exception as e:  # noqa: BLE001 - any unreadable snapshot is skipped, and said so
            if clean:
                _drop_snapshot(stem, e)
            else:
                log.warning("skipping incomplete snapshot %s (%s)", state, e)
            continue
        out.append((int(m.group(1)), state, model))
    return sorted(out, reverse=True)


def _drop_snapshot(stem, why):
    log.warning("removing incomplete snapshot %s.* (%s), left by an interrupted run", stem, why)
    for ext in (".solverstate", ".caffemodel"):
        if os.path.exists(stem + ext):
            os.unlink(stem + ext)


def _learnable_count(model_param):
    """Number of learnable blobs Caffe keeps solver history for: shared (named) params count once."""
    seen, count = set(), 0
    for layer in model_param.layer:
        for j in range(len(layer.blobs)):
            name = layer.param[j].name if j < len(layer.param) else ""
            if name:
                if name in seen:
                    continue
                seen.add(name)
            count += 1
    return count


def _die_with_parent():  # pragma: no cover - runs in the child between fork and exec
    """Linux: the caffe child gets SIGKILL when the Python parent dies, so a killed run leaves no orphan writing
    snapshots while the re-run starts."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _FolderLock:
    """An exclusive lock on ``folder/.dsd-lock`` (released when the process dies)."""

    def __init__(self, folder):
        self.path = os.path.join(folder, ".dsd-lock")

    def __enter__(self):
        import fcntl

        self.f = open(self.path, "a")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.f.close()
            raise FileExistsError(f"another process is running in {os.path.dirname(self.path)}") from None
        return self

    def __exit__(self, *exc):
        self.f.close()


def _portable_state(state, folder):
    """A solverstate whose learned_net resolves from ``folder``: the file itself, or a hidden rewritten copy."""
    st = caffe_pb2().SolverState()
    with open(state, "rb") as f:
        st.ParseFromString(f.read())
    learned = st.learned_net
    target = os.path.join(os.path.dirname(state), os.path.basename(learned))
    if learned and os.path.isabs(learned) and os.path.exists(learned):
        return state
    st.learned_net = os.path.abspath(target)
    fd, tmp = tempfile.mkstemp(prefix=".resume-", suffix=".solverstate", dir=folder)
    with os.fdopen(fd, "wb") as f:
        f.write(st.SerializeToString())
    return tmp


def _progress(total, initial, desc):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="iter", disable=None)


def train(solver_path, weights=None, engine="binary", desc="train", gpu=None):
    """Run the solver at ``solver_path`` (paths relative to its folder) from ``weights``, or resume from its newest
    complete snapshot. Ends with a snapshot at max_iter; returns its caffemodel path."""
    from .caffe_env import set_device

    if engine not in ENGINES:
        raise UserError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    solver_path = os.path.abspath(os.fspath(solver_path))
    folder = os.path.dirname(solver_path)
    sp = fileio.read_solver_prototxt(solver_path)
    prefix = os.path.join(folder, sp.snapshot_prefix)
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    set_device(gpu)
    with _FolderLock(folder):
        return _train_locked(solver_path, folder, sp, prefix, weights, engine, desc, gpu)


def _train_locked(solver_path, folder, sp, prefix, weights, engine, desc, gpu=None):
    snaps = snapshots(os.path.dirname(prefix), os.path.basename(prefix), clean=True)
    if snaps and snaps[0][0] >= sp.max_iter:
        log.info("%s: already trained to iteration %d", desc, snaps[0][0])
        return snaps[0][2]
    resume = snaps[0] if snaps else None
    if resume is None and weights is None:
        raise UserError(f"{solver_path}: no weights given and no snapshot to resume from")
    if resume:
        log.info("%s: resuming from %s", desc, resume[1])
    state = _portable_state(resume[1], folder) if resume else None
    try:
        if engine == "binary":
            _train_binary(solver_path, folder, sp, weights, state, resume[0] if resume else 0, desc, gpu)
        else:
            _train_pycaffe(solver_path, folder, sp, weights, state, resume[0] if resume else 0, desc)
    finally:
        if state and state != resume[1] and os.path.exists(state):
            os.unlink(state)
    snaps = snapshots(os.path.dirname(prefix), os.path.basename(prefix))
    if not snaps or snaps[0][0] < sp.max_iter:
        raise UserError(f"{desc}: training ended without a snapshot at iteration {sp.max_iter} in {folder}")
    return snaps[0][2]


def _train_binary(solver_path, folder, sp, weights, state, start, desc, gpu=None):
    from .caffe_env import caffe_binary

    cmd = [caffe_binary(), "train", "-solver", os.path.basename(solver_path)]
    cmd += ["-snapshot", os.path.abspath(state)] if state else ["-weights", os.path.abspath(os.fspath(weights))]
    if gpu is not None:
        cmd += ["-gpu", str(gpu)]
    env = dict(os.environ, GLOG_minloglevel="0", GLOG_logtostderr="1")
    logpath = os.path.join(folder, "train.log")
    it_re = re.compile(r"Iteration (\d+)")
    last = []
    with open(logpath, "a") as logf, _progress(sp.max_iter, start, desc) as bar:
        logf.write(f"# {' '.join(cmd)}\n")
        proc = subprocess.Popen(cmd, cwd=folder, stdout=logf, stderr=subprocess.PIPE, text=True, env=env,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        for line in proc.stderr:
            logf.write(line)
            if line.startswith(("F", "E")) or "Check failed" in line or "Error" in line or "corrupted" in line:
                last.append(line.rstrip())
            m = it_re.search(line)
            if m and int(m.group(1)) > bar.n:
                bar.update(int(m.group(1)) - bar.n)
        rc = proc.wait()
    if rc != 0:
        tail = last[0] if last else "no error line in the log"
        raise UserError(f"{desc}: `caffe train` failed with status {rc} in {folder}: {tail.strip()} "
                         f"(full log: {logpath})")


def _train_pycaffe(solver_path, folder, sp, weights, state, start, desc):
    from . import solvers
    from .caffe_env import import_caffe

    caffe = import_caffe()
    s = solvers.resolve_paths(sp, folder)
    net = absolute_sources(fileio.read_net_prototxt(s.net), folder)
    s.ClearField("net")
    s.net_param.CopyFrom(net)
    fd, tmp = tempfile.mkstemp(prefix=".pycaffe-", suffix=".prototxt", dir=folder)
    os.close(fd)
    try:
        fileio.write_prototxt(tmp, s)
        solver = caffe.get_solver(tmp)
    finally:
        os.unlink(tmp)
    if state:
        solver.restore(state)
    else:
        solver.net.copy_from(os.path.abspath(os.fspath(weights)))
    step = max(1, min(sp.display or 10, 50))
    with _progress(sp.max_iter, solver.iter, desc) as bar:
        while solver.iter < sp.max_iter:
            solver.step(min(step, sp.max_iter - solver.iter))
            bar.update(solver.iter - bar.n)
    if not (sp.snapshot and solver.iter % sp.snapshot == 0):
        solver.snapshot()


def finish_model(snapshot_model, path, provenance, force=True):
    """Copy the final snapshot to ``path`` atomically, with its provenance JSON."""
    with fileio.atomic_path(path, force=force) as tmp:
        shutil.copyfile(snapshot_model, tmp)
    fileio.write_provenance(path, force=True, **provenance)
    return path


def check_masked(model_path, masks):
    """Raise ValueError unless every pruned weight of the caffemodel is exactly 0.0; returns densities."""
    w = masklayer.weight_arrays(model_path)
    out = {}
    for name, m in masks.items():
        if name not in w or w[name].shape != m.shape:
            raise UserError(f"{model_path}: mask of layer {name!r} {m.shape} does not fit its weights "
                             f"{w.get(name, np.empty(0)).shape}")
        bad = int(np.count_nonzero(w[name][~m]))
        if bad:
            raise UserError(f"{model_path}: {bad} pruned weights of layer {name!r} are not 0.0")
        out[name] = float(np.count_nonzero(w[name]) / w[name].size)
    return out


def train_sparse(output_dir, engine="binary", gpu=None, force=False):
    """Sparse phase in a folder written by :func:`prune`: train from pruned.caffemodel (or resume), check every
    pruned weight is 0.0, write sparse.caffemodel + provenance. Returns its path."""
    out = os.path.abspath(os.fspath(output_dir))
    final = os.path.join(out, SPARSE)
    if os.path.exists(final) and os.path.exists(fileio.sidecar_path(final)) and not force:
        raise FileExistsError(f"{out} already holds a finished sparse phase ({SPARSE}); pass --force to redo it")
    for f in (PRUNED, SPARSE_SOLVER, SPARSE_NET, MASKS):
        if not os.path.exists(os.path.join(out, f)):
            raise FileNotFoundError(f"{out} is not a folder written by tools/prune.py (no {f})")
    masks = load_masks(os.path.join(out, MASKS))
    net_spec = masklayer.mask_layer_spec(fileio.read_net_prototxt(os.path.join(out, SPARSE_NET)))
    model_spec = masklayer.mask_layer_spec(fileio.read_caffemodel(os.path.join(out, PRUNED)))
    if net_spec is None or model_spec is None:
        raise UserError(f"{out}: {SPARSE_NET if net_spec is None else PRUNED} holds no mask layer")
    for (ln, ls), (mn, ms) in zip(net_spec[1], model_spec[1]):
        if (ln, ls) != (mn, ms):
            raise UserError(f"{out}: the mask of layer {mn!r} in {PRUNED} is {ms}, but {SPARSE_NET} masks {ln!r} "
                             f"{ls}; the mask does not fit the net")
    if len(net_spec[1]) != len(model_spec[1]) or net_spec[0] != model_spec[0]:
        raise UserError(f"{out}: the mask layers of {SPARSE_NET} and {PRUNED} differ")
    stored = masklayer.read_masks(os.path.join(out, PRUNED))
    if set(stored) != set(masks) or any(not np.array_equal(stored[k], masks[k]) for k in masks):
        k = (sorted(set(stored) ^ set(masks)) or [k for k in masks if not np.array_equal(stored[k], masks[k])])[0]
        raise UserError(f"{out}: {MASKS} and the masks inside {PRUNED} differ, first at layer {k!r} (shape "
                         f"{np.shape(masks.get(k))} in {MASKS}, {np.shape(stored.get(k))} in {PRUNED})")
    snap = train(os.path.join(out, SPARSE_SOLVER), os.path.join(out, PRUNED), engine=engine, desc="sparse",
                 gpu=gpu)
    dens = check_masked(snap, masks)
    back = masklayer.read_masks(snap)
    if set(back) != set(masks) or any(not np.array_equal(back[k], masks[k]) for k in masks):
        raise UserError(f"{snap}: the masks in the snapshot differ from {MASKS}")
    it = int(_SNAP_RE.search(snap[: -len(".caffemodel")] + ".solverstate").group(1))
    prov = fileio.read_json(fileio.sidecar_path(os.path.join(out, PRUNED)))
    finish_model(snap, final, dict(source=os.path.join(out, PRUNED), densities=dens, phase="sparse", iteration=it,
                                   seed=prov.get("seed"), net=SPARSE_NET, engine=engine))
    return final


def retrain_dense(model, weights, output_dir, base_lr=1e-4, epochs=20, max_iter=None, engine="binary", gpu=None,
                  force=False, seed=0, snapshot=None, solver_args=None, train_source=None, test_source=None,
                  net_param=None):
    """Re-dense phase: release the masks (a plain trainval without the mask layer), start from ``weights`` (pruned
    weights exactly 0.0, survivors as they are) with fresh solver history, train; writes dense_trainval, solver,
    dense.caffemodel + provenance into ``output_dir``. Returns the final model's path."""
    from . import solvers

    out = os.path.abspath(os.fspath(output_dir))
    final = os.path.join(out, DENSE)
    if os.path.exists(final) and os.path.exists(fileio.sidecar_path(final)) and not force:
        raise FileExistsError(f"{out} already holds a finished re-dense phase ({DENSE}); pass --force to redo it")
    dense, model_param = _checked_inputs(model, net_param, weights, train_source, test_source)
    solver_path = os.path.join(out, DENSE_SOLVER)
    if not snapshots(os.path.join(out, "snapshots"), "redense") or force:
        fileio.check_output(os.path.join(out, DENSE_NET), force=True)  # makes the folder; a real write probe
        if not os.access(out, os.W_OK | os.X_OK):
            raise PermissionError(f"output folder {out} is not writable")
        fileio.write_prototxt(os.path.join(out, DENSE_NET), relative_sources(dense, out), force=True)
        (train_src, batch), (test_src, test_batch) = data_sources(dense)
        args = dict(solver_args or {})
        args.setdefault("batch_size", batch)
        args.setdefault("test_batch", test_batch)
        args.setdefault("random_seed", seed)
        if max_iter is not None:
            epochs = None
        s = solvers.redense_solver(DENSE_NET, train_size=_lmdb_count(train_src), test_size=_lmdb_count(test_src),
                                   base_lr=base_lr, epochs=epochs, max_iter=max_iter,
                                   snapshot_prefix="snapshots/redense", **args)
        s.snapshot = snapshot or max(1, s.max_iter // 10)
        fileio.write_prototxt(solver_path, s, force=True)
    snap = train(solver_path, os.path.abspath(os.fspath(weights)), engine=engine, desc="re-dense", gpu=gpu)
    it = int(_SNAP_RE.search(snap[: -len(".caffemodel")] + ".solverstate").group(1))
    dens = {n: float(np.count_nonzero(w) / w.size) for n, w in masklayer.weight_arrays(snap).items()}
    finish_model(snap, final, dict(source=os.path.abspath(os.fspath(weights)), densities=dens, phase="re-dense",
                                   iteration=it, seed=seed, net=DENSE_NET, engine=engine))
    return final


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate_model(net_param, weights, iterations=None, gpu=None):
    """Test-phase outputs {name: float} of ``weights`` on ``net_param`` (absolute sources); ``iterations`` defaults
    to covering the TEST LMDB once."""
    from . import evaluate, solvers

    net = masklayer.remove_mask_layer(net_param)
    if iterations is None:
        _, (test_src, test_batch) = data_sources(net)
        iterations = solvers.test_iters(_lmdb_count(test_src), test_batch)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "test.prototxt")
        fileio.write_prototxt(path, net)
        res = evaluate.evaluate(path, os.fspath(weights), iterations=iterations, gpu=gpu)
    return {k: float(np.asarray(v).ravel()[0]) for k, v in res.items() if np.asarray(v).size == 1}


def accuracy_of(results):
    """The top-1 accuracy among evaluation outputs (``accuracy``, ``accuracy_top1``, ``top-1``...), or None."""
    keys = [k for k in results if "acc" in k.lower() or "top" in k.lower()]
    keys.sort(key=lambda k: (not ("1" in k or k.lower() == "accuracy"), k))
    return results[keys[0]] if keys else None


# ------------------------------------------------------------------------------------------------ the pipeline
def _accuracy_png(path, phases_done):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [p["name"] for p in phases_done]
    acc = [p.get("accuracy") for p in phases_done]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names)), 3.5))
    ax.plot(range(len(names)), [a if a is not None else np.nan for a in acc], "o-")
    for i, a in enumerate(acc):
        if a is not None:
            ax.annotate(f"{a:.4f}", (i, a), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylabel("test accuracy")
    ax.set_title("accuracy across DSD phases")
    fileio.save_figure(fig, path, dpi=80)


def _finished(model_path):
    """A phase's model is final once its provenance JSON (written after it) exists too."""
    return os.path.exists(model_path) and os.path.exists(fileio.sidecar_path(model_path))


_COUNTS = ("sparse_iters", "dense_iters", "snapshot", "test_iterations", "iter_size")


def _check_numbers(**values):
    """Refuse a non-positive or non-finite phase setting before a run starts (flag names as on the command line)."""
    from .solvers import _count

    for name, v in values.items():
        flag = "--" + name.replace("_", "-")
        if v is None:
            continue
        if name == "seed" or name in _COUNTS:
            _count(v, flag, 0 if name == "seed" else 1)
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
            raise UserError(f"{flag} must be a positive finite number, got {v!r}")


def run_dsd(model, weights, output_dir, ratio=None, density=None, sparsity=None, profile="uniform", skip=(),
            cycles=1, sparse_epochs=None, sparse_iters=None, sparse_lr=None, dense_epochs=20, dense_iters=None,
            dense_lr=1e-4, snapshot=None, solver_args=None, engine="binary", test_iterations=None, seed=0,
            force=False, gpu=None, train_source=None, test_source=None):
    """Dense caffemodel -> (prune -> sparse -> re-dense) x ``cycles`` in ``output_dir``.

    State lives in ``output_dir/dsd_state.json`` (written atomically after every step). Running the same call
    again after an interruption resumes: finished phases are kept, the current phase resumes from its newest
    complete snapshot. A finished run is refused unless ``force`` (which starts over). Returns the state dict.
    """
    if isinstance(cycles, bool) or not isinstance(cycles, int) or cycles < 1:
        raise UserError(f"--cycles must be a whole number >= 1, got {cycles!r}")
    if engine not in ENGINES:
        raise UserError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    out = os.path.abspath(os.fspath(output_dir))
    state_path = os.path.join(out, STATE)
    model = os.path.abspath(os.fspath(model))
    weights = os.path.abspath(os.fspath(weights))
    target = pruning.parse_ratio(ratio, density, sparsity) if (ratio, density, sparsity) != (None,) * 3 else None
    config = dict(model=model, weights=weights, density=target, profile=os.fspath(profile), skip=list(skip),
                  cycles=cycles, sparse_epochs=sparse_epochs, sparse_iters=sparse_iters, sparse_lr=sparse_lr,
                  dense_epochs=dense_epochs, dense_iters=dense_iters, dense_lr=dense_lr, snapshot=snapshot,
                  solver_args=solver_args or {}, seed=seed, train_source=train_source, test_source=test_source)
    config = json.loads(json.dumps(config))
    if os.path.exists(state_path):
        state = fileio.read_json(state_path)
        if force:
            for name in os.listdir(out):
                if name == STATE or re.match(r"^cycle\d+-(sparse|dense)$", name) or name == "accuracy.png":
                    p = os.path.join(out, name)
                    shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p)
            state = None
        elif state.get("finished"):
            raise FileExistsError(f"{out} already holds a finished DSD run ({STATE}); pass --force to start over")
        elif state.get("config") != config:
            diff = sorted(k for k in set(config) | set(state.get("config", {}))
                          if config.get(k) != state.get("config", {}).get(k))
            raise UserError(f"{out} holds an unfinished DSD run with other settings ({', '.join(diff)}); use "
                             "the same command to resume it, another folder, or --force to start over")
    else:
        state = None
        if os.path.isdir(out) and os.listdir(out) and not force:
            raise FileExistsError(f"output folder {out} is not empty and holds no DSD run; use an empty folder "
                                  "or --force")
    if state is None:  # check the inputs before the folder holds a run state naming them
        from .caffe_env import set_device

        set_device(gpu)
        first = absolute_sources(fileio.read_net_prototxt(model), os.path.dirname(model), train_source, test_source)
        first = masklayer.remove_mask_layer(first)
        check_data(first)
        dense_param = fileio.read_caffemodel(weights)
        check_fits(first, dense_param, weights, model)
        _check_numbers(sparse_epochs=sparse_epochs, sparse_iters=sparse_iters, sparse_lr=sparse_lr,
                       dense_epochs=dense_epochs, dense_iters=dense_iters, dense_lr=dense_lr, snapshot=snapshot,
                       test_iterations=test_iterations, seed=seed,
                       iter_size=(solver_args or {}).get("iter_size"))
        _check_target(target, profile)
        all_w = masklayer.weight_arrays(dense_param)
        pruning.layer_densities({n: all_w[n] for n in netgen.weighted_layers(first)}, target, profile=profile,
                                skip=skip)
    fileio.check_output(state_path, force=True)  # makes the folder; a real write probe (root ignores modes)
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(f"output folder {out} is not writable")
    if state is None:
        state = {"config": config, "phases": [], "finished": False, "engine": engine}
        fileio.write_json(state_path, state)

    def done(name):
        return next((p for p in state["phases"] if p["name"] == name), None)

    def record(name, path, kind):
        res = evaluate_model(net, path, test_iterations, gpu)
        rep = masklayer.sparsity_report(path)["total"]
        entry = {"name": name, "phase": kind, "model": os.path.relpath(path, out), "results": res,
                 "accuracy": accuracy_of(res), "density": rep["density"]}
        state["phases"].append(entry)
        fileio.write_json(state_path, state)
        log.info("%s: accuracy %s, density %.4f", name, entry["accuracy"], rep["density"])

    net = absolute_sources(fileio.read_net_prototxt(model), os.path.dirname(model), train_source, test_source)
    net = masklayer.remove_mask_layer(net)
    if not done("dense"):
        record("dense", weights, "dense")
    current = weights
    for c in range(1, cycles + 1):
        sdir, ddir = os.path.join(out, f"cycle{c}-sparse"), os.path.join(out, f"cycle{c}-dense")
        if not done(f"cycle{c}-sparse"):
            if not _finished(os.path.join(sdir, SPARSE)):
                if not _finished(os.path.join(sdir, PRUNED)):
                    res = prune(None, current, sdir, density=target, profile=profile, skip=skip, force=True,
                                seed=seed, base_lr=sparse_lr, epochs=sparse_epochs, max_iter=sparse_iters,
                                snapshot=snapshot, solver_args=solver_args, net_param=net)
                    log.info("cycle %d pruning:\n%s", c, res["table"])
                train_sparse(sdir, engine=engine, gpu=gpu, force=True)
            record(f"cycle{c}-sparse", os.path.join(sdir, SPARSE), "sparse")
        if not done(f"cycle{c}-dense"):
            if not _finished(os.path.join(ddir, DENSE)):
                retrain_dense(None, os.path.join(sdir, SPARSE), ddir, base_lr=dense_lr, epochs=dense_epochs,
                              max_iter=dense_iters, engine=engine, gpu=gpu, force=False, seed=seed,
                              snapshot=snapshot, solver_args=solver_args, net_param=net)
            record(f"cycle{c}-dense", os.path.join(ddir, DENSE), "re-dense")
        current = os.path.join(ddir, DENSE)
    _accuracy_png(os.path.join(out, "accuracy.png"), state["phases"])
    state["finished"] = True
    state["final_model"] = os.path.relpath(current, out)
    fileio.write_json(state_path, state)
    return state


# ------------------------------------------------------------------------------------------------ sensitivity
DEFAULT_SENSITIVITY_DENSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9)


def sensitivity(model, weights, output_dir, densities=DEFAULT_SENSITIVITY_DENSITIES, layers=None, iterations=10,
                test_source=None, force=False, gpu=None):
    """Prune one layer at a time at each density, evaluate on the TEST LMDB, write sensitivity.csv + .png.

    Every evaluation sees the same ``iterations`` batches: they are read once from the Data layer and fed to the
    net again for each (layer, density). Returns the list of rows (dicts)."""
    import csv
    import io

    from tqdm import tqdm

    from .caffe_env import set_device
    from .evaluate import _check_iterations

    iterations = _check_iterations(iterations)
    dens = [float(d) for d in densities]
    if not dens or any(not 0 < d <= 1 for d in dens):
        raise UserError(f"densities must be numbers in (0, 1], got {list(densities)}")
    out = os.path.abspath(os.fspath(output_dir))
    csv_path, png_path = os.path.join(out, "sensitivity.csv"), os.path.join(out, "sensitivity.png")
    fileio.check_output(csv_path, force=force)
    model = os.fspath(model)
    net_param = absolute_sources(fileio.read_net_prototxt(model), os.path.dirname(os.path.abspath(model)),
                                 None, test_source)
    net_param = masklayer.remove_mask_layer(net_param)
    check_data(net_param)
    model_param = fileio.read_caffemodel(weights)
    check_fits(net_param, model_param, os.fspath(weights), model)
    names = netgen.weighted_layers(net_param)
    if layers:
        unknown = [n for n in layers if n not in names]
        if unknown:
            raise UserError(f"unknown layer(s) {', '.join(unknown)}; weighted layers: {', '.join(names)}")
        names = [n for n in names if n in layers]
    caffe = set_device(gpu)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "test.prototxt")
        fileio.write_prototxt(path, net_param)
        net = caffe.Net(path, caffe.TEST)
    net.copy_from(os.fspath(weights))
    data_layers = [i for i, l in enumerate(net.layers) if not net.bottom_names[net._layer_names[i]]]
    first = max(data_layers) + 1
    fed = [b for i in data_layers for b in net.top_names[net._layer_names[i]]]
    batches = []
    for _ in range(iterations):
        net._forward(0, max(data_layers))
        batches.append({b: net.blobs[b].data.copy() for b in fed})
    outputs = list(net.outputs)

    def run():
        sums = {k: 0.0 for k in outputs}
        for batch in batches:
            for b, v in batch.items():
                net.blobs[b].data[...] = v
            net._forward(first, len(net.layers) - 1)
            for k in outputs:
                sums[k] += float(np.asarray(net.blobs[k].data).ravel()[0])
        return {k: v / iterations for k, v in sums.items()}

    base = run()
    rows = [{"layer": "(none)", "density": 1.0, **base, "accuracy": accuracy_of(base)}]
    for name in tqdm(names, desc="sensitivity", unit="layer", disable=None):
        w = net.params[name][0].data
        orig = w.copy()
        for d in dens:
            w[...] = np.where(pruning.magnitude_mask(orig, d, name=name), orig, np.float32(0))
            res = run()
            rows.append({"layer": name, "density": d, **res, "accuracy": accuracy_of(res)})
        w[...] = orig
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["layer", "density", "accuracy"] + outputs, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    os.makedirs(out, exist_ok=True)
    fileio.atomic_write(csv_path, buf.getvalue(), force=force)
    _sensitivity_png(png_path, rows, names, base)
    return rows


def _sensitivity_png(path, rows, names, base):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name in names:
        pts = [(r["density"], r["accuracy"]) for r in rows if r["layer"] == name]
        if pts and pts[0][1] is not None:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, label=name)
    if accuracy_of(base) is not None:
        ax.axhline(accuracy_of(base), color="k", ls="--", lw=1, label="dense")
    ax.set_xlabel("density kept in the one pruned layer")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=6, ncol=2)
    fileio.save_figure(fig, path, dpi=80)
