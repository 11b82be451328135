"""Solver builders (``caffe_pb2.SolverParameter``) for DSD's three phases: dense, sparse and re-dense training.

Epochs become ``max_iter`` = ceil(epochs * train_size / (batch_size * iter_size)); ``test_iter`` =
ceil(test_size / test_batch) covers the whole test set.

Paths. Caffe resolves a solver's ``net`` and ``snapshot_prefix`` (and a net's Data ``source``) against the
working folder of the ``caffe`` process, not against the solver file. The toolkit therefore writes them
relative to the solver file's own folder and runs ``caffe train`` *from that folder*
(``cd solvers/squeezenet_v1.0 && caffe train -solver dense_solver.prototxt``; from Python,
``subprocess.run([...], cwd=folder)``). The committed layout keeps solvers and nets at the same depth
(``solvers/<net>/`` and ``models/<net>/``) so a net's ``../../data/...`` sources mean the same folder from either.
``resolve_paths(solver, folder)`` gives a copy with absolute paths, for running from anywhere else.

Defaults:
- dense: DeepScale's published SqueezeNet v1.0 values: batch 32 x iter_size 16, base_lr 0.04, poly power 1,
  max_iter 170000 (about 68 ImageNet epochs), momentum 0.9, weight_decay 0.0002.
- sparse: the same schedule shape at base_lr 0.004 (a tenth of dense; the DSD release publishes no sparse solver),
  20 epochs when no max_iter/epochs is given.
- re-dense: base_lr 1e-4, 20 epochs.
- every phase: snapshots every tenth of the run (``snapshot_prefix`` "dense"/"sparse"/"redense", in the solver's
  folder: Caffe does not create missing folders), CPU mode, random_seed 42, test_initialization false.
"""
import math
import os

from .caffe_env import caffe_pb2
from .errors import UserError

#: DeepScale's published dense solver values for SqueezeNet v1.0.
DEEPSCALE_DENSE = dict(batch_size=32, iter_size=16, base_lr=0.04, lr_policy="poly", power=1.0, max_iter=170000,
                       momentum=0.9, weight_decay=0.0002)

#: ILSVRC-2012 sizes (train images, val images).
IMAGENET_TRAIN, IMAGENET_VAL = 1281167, 50000


def _count(value, what, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def epochs_to_iters(epochs, train_size, batch_size, iter_size=1):
    """Solver iterations for ``epochs`` passes over ``train_size`` images at ``batch_size * iter_size`` per
    iteration (rounded up, at least 1)."""
    if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not epochs > 0 or math.isinf(epochs):
        raise UserError(f"epochs must be a positive number, got {epochs!r}")
    _count(train_size, "train_size")
    _count(batch_size, "batch_size")
    _count(iter_size, "iter_size")
    # exact for integer epochs; a float epoch count is rounded to 1e-9 first so 0.1 * 10 is not 1.0000000001
    images = round(epochs * train_size, 9)
    return max(1, math.ceil(images / (batch_size * iter_size)))


def test_iters(test_size, batch):
    """``test_iter`` covering all ``test_size`` images at ``batch`` per iteration (rounded up)."""
    _count(test_size, "test_size")
    _count(batch, "batch")
    return math.ceil(test_size / batch)


def _solver(net, train_size, test_size, *, batch_size, iter_size, test_batch, base_lr, lr_policy, power, gamma,
            stepsize, momentum, weight_decay, max_iter, epochs, test_interval, display, snapshot, snapshot_prefix,
            random_seed, average_loss, test_initialization, solver_type):
    pb2 = caffe_pb2()
    if not isinstance(net, (str, os.PathLike)) or not os.fspath(net):
        raise TypeError(f"net must be a prototxt path, got {net!r}")
    _count(batch_size, "batch_size")
    _count(iter_size, "iter_size")
    if epochs is not None and max_iter is not None:
        raise UserError(f"give epochs ({epochs}) or max_iter ({max_iter}), not both")
    if epochs is not None:
        max_iter = epochs_to_iters(epochs, train_size, batch_size, iter_size)
    _count(max_iter, "max_iter")
    if not base_lr > 0:
        raise UserError(f"base_lr must be > 0, got {base_lr!r}")
    s = pb2.SolverParameter()
    s.net = os.fspath(net)
    s.test_iter.append(test_iters(test_size, test_batch))
    s.test_interval = _count(test_interval if test_interval is not None else max(1, min(1000, max_iter)),
                             "test_interval")
    s.test_initialization = bool(test_initialization)
    s.base_lr = float(base_lr)
    s.display = _count(display, "display", 0)
    s.average_loss = _count(average_loss, "average_loss")
    s.max_iter = max_iter
    s.iter_size = iter_size
    s.lr_policy = lr_policy
    if lr_policy == "poly":
        s.power = float(power)
    elif lr_policy in ("step", "exp", "inv", "multistep", "sigmoid"):
        s.gamma = float(gamma)
        if lr_policy in ("step", "sigmoid"):
            s.stepsize = _count(stepsize, "stepsize")
        if lr_policy == "inv":
            s.power = float(power)
    elif lr_policy != "fixed":
        raise UserError(f"lr_policy {lr_policy!r} is not one of fixed, step, exp, inv, poly, sigmoid")
    s.momentum = float(momentum)
    s.weight_decay = float(weight_decay)
    s.snapshot = _count(snapshot if snapshot is not None else math.ceil(max_iter / 10), "snapshot", 0)
    s.snapshot_prefix = os.fspath(snapshot_prefix)
    s.solver_mode = pb2.SolverParameter.CPU
    if random_seed is not None:
        s.random_seed = int(random_seed)
    s.type = solver_type
    return s


def _common(kw, **defaults):
    out = dict(batch_size=32, iter_size=1, test_batch=50, lr_policy="poly", power=1.0, gamma=0.1, stepsize=None,
               momentum=0.9, weight_decay=0.0002, max_iter=None, epochs=None, test_interval=None, display=40,
               snapshot=None, random_seed=42, average_loss=40, test_initialization=False, solver_type="SGD")
    out.update(defaults)
    unknown = set(kw) - set(out) - {"base_lr"}
    if unknown:
        raise TypeError(f"unknown solver argument(s): {', '.join(sorted(unknown))}")
    out.update(kw)
    return out


def dense_solver(net, train_size=IMAGENET_TRAIN, test_size=IMAGENET_VAL, base_lr=0.04,
                 snapshot_prefix="dense", **kw):
    """Dense training. Defaults: DeepScale's SqueezeNet v1.0 solver (max_iter 170000 unless epochs is given).

    Keyword arguments: batch_size, iter_size, test_batch, lr_policy, power, gamma, stepsize, momentum,
    weight_decay, max_iter, epochs, test_interval, display, snapshot, random_seed, average_loss,
    test_initialization, solver_type. ``batch_size`` must match the net's TRAIN batch (Caffe takes the batch
    from the net; here it only turns epochs into iterations).
    """
    args = _common(kw, batch_size=32, iter_size=16)
    if args["max_iter"] is None and args["epochs"] is None:
        args["max_iter"] = DEEPSCALE_DENSE["max_iter"]
    return _solver(net, train_size, test_size, base_lr=base_lr, snapshot_prefix=snapshot_prefix, **args)


def sparse_solver(net, train_size=IMAGENET_TRAIN, test_size=IMAGENET_VAL, base_lr=0.004,
                  snapshot_prefix="sparse", **kw):
    """Sparse retraining under the mask (same keywords as dense_solver; 20 epochs unless told)."""
    args = _common(kw, batch_size=32, iter_size=16)
    if args["max_iter"] is None and args["epochs"] is None:
        args["epochs"] = 20
    return _solver(net, train_size, test_size, base_lr=base_lr, snapshot_prefix=snapshot_prefix, **args)


def redense_solver(net, train_size=IMAGENET_TRAIN, test_size=IMAGENET_VAL, base_lr=1e-4, epochs=20,
                   snapshot_prefix="redense", **kw):
    """Dense retraining after the mask is released: base_lr 1e-4, 20 epochs by default (an explicit
    ``max_iter`` replaces the epochs)."""
    args = _common(kw, batch_size=32, iter_size=16)
    if args["max_iter"] is not None:
        epochs = None
    args["epochs"] = epochs
    return _solver(net, train_size, test_size, base_lr=base_lr, snapshot_prefix=snapshot_prefix, **args)


def relative_net(solver_path, net_path):
    """``net_path`` written relative to the folder of ``solver_path`` (what a solver file should hold)."""
    folder = os.path.dirname(os.path.abspath(os.fspath(solver_path)))
    return os.path.relpath(os.path.abspath(os.fspath(net_path)), folder)


def resolve_paths(solver_param, folder):
    """A copy of ``solver_param`` whose relative ``net`` and ``snapshot_prefix`` are made absolute against
    ``folder`` (the solver file's folder), so Caffe can run it from any working folder."""
    s = caffe_pb2().SolverParameter()
    s.CopyFrom(solver_param)
    folder = os.path.abspath(os.fspath(folder))
    if s.net and not os.path.isabs(s.net):
        s.net = os.path.normpath(os.path.join(folder, s.net))
    if s.snapshot_prefix and not os.path.isabs(s.snapshot_prefix):
        s.snapshot_prefix = os.path.normpath(os.path.join(folder, s.snapshot_prefix))
    return s


def load_solver(path):
    """Read a solver prototxt and return it with paths resolved against its folder (see resolve_paths)."""
    from .fileio import read_solver_prototxt

    return resolve_paths(read_solver_prototxt(path), os.path.dirname(os.path.abspath(os.fspath(path))))
