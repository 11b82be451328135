"""Several GPUs for one phase: data-parallel training through Caffe's NCCL route in pycaffe, as Caffe's own
``python/train.py`` does it. The ``caffe`` binary refuses Python layers under several GPUs ("PythonLayer does not
support CLI Multi-GPU, use train.py"), and the sparse phase's mask layer is one, so every phase given several
devices (``--gpu 0,1,...``) trains here, whatever ``--engine`` says; :func:`run` is :func:`training.train`'s
runner for them, so the folder, record, resume and snapshot rules are the one-device rules.

**Process layout.** One process per device, started with ``spawn`` (Caffe's state is per process), rank *r* on the
*r*-th device of the list: ``caffe.set_device``, ``set_mode_gpu``, ``set_solver_count(n)``, ``set_solver_rank(r)``,
``set_multiprocess(True)``; then the solver (the same prototxt for all), restored from the snapshot being resumed
or given the start weights; ``caffe.NCCL(solver, uid)`` with one uid made by the parent, ``nccl.bcast()`` (rank 0's
weights to all), and the solver callbacks below. Caffe's data layer gives rank *r* every *n*-th batch from *r*, so
one iteration trains ``n`` batches (the effective batch is ``n`` times the net's, as with ``caffe train -gpu
0,1``). Only rank 0 tests and snapshots (Caffe's ``root_solver``); Caffe's log of every rank goes to the folder's
``train.log``, which the parent reads for the progress bar. A rank that dies ends the others (they would wait in
NCCL forever) and the phase fails with one line naming it.

**Steps, interruption.** The ranks step in chunks that rank 0 plans (``training.next_chunk``, the pycaffe
engine's rule: longer while steps are fast, at most ``training.MAX_CHUNK`` iterations) and hands to all through
shared memory between two barriers, so every rank runs the same iterations. On Ctrl-C or SIGTERM the parent sets
a stop flag (the ranks ignore SIGINT: a terminal's Ctrl-C reaches the whole process group); rank 0 reads it when the
current chunk ends, all stop, rank 0 snapshots, and the phase raises ``Interrupted``: the same command resumes from
that snapshot, on any devices. A second interrupt kills the ranks.

**Pruned weights stay exactly 0.0 on every device's copy.** Per iteration, on every rank: the mask layer's
forward zeroes its pruned weights (on the host; Caffe copies them to the GPU when a conv reads them); the net's
backward runs, the mask layer last (it sits right after the data layer), so it multiplies every masked weight's
accumulated diff by its mask, also with ``iter_size`` > 1. Then the solver's callbacks run in the order they were
added: first :func:`sync_diffs`, which brings every parameter's diff back to the GPU (the mask layer wrote it on
the host, and NCCL's allreduce reads the raw device buffer: without this it would sum the unmasked device copies,
and the update would then copy the host's unreduced diff over the sum); then NCCL's ``on_gradients_ready``, the
allreduce of the whole diff buffer and the scale by ``1/n``. Every rank contributes 0 at a pruned position, so the
mean is 0 (a sum of exact zeros is exactly zero). The SGD update is then the one-device case: weight decay adds
``decay * 0``, the momentum history stays 0 (it starts at 0; a resumed history is 0 there by the same argument),
the step subtracts 0. Rank 0 snapshots these weights; all ranks hold the same ones (bcast at the start, the same
mean diff after). Caffe's layer-wise reduce (``after_backward``) would start each conv's allreduce before the mask
layer's backward and refuses nets with shared weights (our mask layer shares each conv's weights), so the ranks'
solver is written with ``layer_wise_reduce: false``. A mask layer that recomputes its masks during the phase
(gradual pruning) computes the same masks on every rank, from the same weights.

Tested without a GPU (tests/test_multigpu.py): the layout, the calls each rank makes and their order, the
chunk protocol and the stop, a failing rank, and the argument checks; on a device, ``bench/gpu_check.sh``.
"""
import dataclasses
import logging
import multiprocessing
import os
import signal
import tempfile
import time

from . import fileio, training  # training imports this module only inside training.train (no import cycle)
from .caffe_env import glog_level_set, import_caffe
from .errors import UserError

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often the parent reads the log and looks at the ranks


@dataclasses.dataclass(frozen=True)
class Rank:
    """What one process trains: ``rank`` of ``count`` on GPU ``device``, the solver prototxt at ``solver``,
    resumed from ``state`` (a solverstate) or started from ``weights``; Caffe's log appended to ``log``."""
    rank: int
    count: int
    device: int
    uid: bytes
    solver: str
    state: str
    weights: str
    log: str


def layout(gpus, uid, solver, state, weights, logpath):
    """[Rank] of a run on ``gpus``: rank r on the r-th device."""
    return [Rank(r, len(gpus), g, uid, solver, state, weights, logpath) for r, g in enumerate(gpus)]


class Control:
    """What the ranks share: a barrier, the next chunk's length (0: stop) and the parent's stop flag."""

    def __init__(self, count, ctx):
        self.barrier, self.chunk, self.stop = ctx.Barrier(count), ctx.Value("i", 0), ctx.Event()


# ------------------------------------------------------------------------------------------------ one rank
def sync_diffs(net):
    """Bring every parameter's diff to the GPU (pycaffe's ``_gpu_diff_ptr`` is Caffe's ``mutable_gpu_diff``: a
    diff last written on the host, by the mask layer's backward, is copied to the device). See the module doc."""
    for blobs in net.params.values():
        for blob in blobs:
            blob._gpu_diff_ptr


def solve(spec, control, max_iter, snapshot_every, caffe):
    """One rank's training (the body of a rank's process; ``caffe`` is the module, injectable for tests)."""
    caffe.set_device(spec.device)
    caffe.set_mode_gpu()
    caffe.set_solver_count(spec.count)
    caffe.set_solver_rank(spec.rank)
    caffe.set_multiprocess(True)
    solver = caffe.get_solver(spec.solver)
    if spec.state:
        solver.restore(spec.state)
    else:
        solver.net.copy_from(spec.weights)
    nccl = caffe.NCCL(solver, spec.uid)
    nccl.bcast()
    solver.add_callback(lambda: None, lambda: sync_diffs(solver.net))  # before NCCL's: the order they run in
    solver.add_callback(nccl)
    stopped = steps(solver, spec.rank, control, max_iter)
    if spec.rank == 0 and (stopped or not (snapshot_every and solver.iter % snapshot_every == 0)):
        solver.snapshot()  # Caffe's Step snapshots only at its interval; Snapshot is the root solver's alone
    return solver.iter


def steps(solver, rank, control, max_iter):
    """Step the solver in the chunks rank 0 plans until ``max_iter`` or the stop flag; True when stopped."""
    chunk = 1
    while True:
        if rank == 0:
            control.chunk.value = 0 if control.stop.is_set() else min(chunk, max_iter - solver.iter)
        control.barrier.wait()
        n = control.chunk.value
        control.barrier.wait()  # every rank has read it before rank 0 plans the next one
        if n <= 0:
            return solver.iter < max_iter
        t0 = time.monotonic()
        solver.step(n)
        chunk = training.next_chunk(chunk, time.monotonic() - t0)


def _rank_main(spec, control, max_iter, snapshot_every):  # pragma: no cover - runs in a spawned process
    """A rank's process: dies with its parent, ignores Ctrl-C (the parent decides), logs to the folder's log."""
    training._die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fd = os.open(spec.log, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 2)
    os.close(fd)
    caffe = import_caffe()
    with glog_level_set("INFO", to_stderr=True):
        solve(spec, control, max_iter, snapshot_every, caffe)


def spawn(specs, control, max_iter, snapshot_every, target=_rank_main):
    """Start one process per rank running ``target`` (a module-level function; tests give a stand-in for Caffe);
    returns them (``is_alive``, ``exitcode``, ``kill``, ``join``)."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=(s, control, max_iter, snapshot_every), name=f"rank{s.rank}",
                         daemon=True) for s in specs]
    for p in procs:
        p.start()
    return procs


# ------------------------------------------------------------------------------------------------ the parent
def check_nccl(caffe, gpus):
    """Refuse several devices on a Caffe built without NCCL (its pycaffe's ``has_nccl``)."""
    has = getattr(caffe, "has_nccl", None)
    if has is None or not has():
        raise UserError(f"gpu {','.join(map(str, gpus))}: several devices need a Caffe built with NCCL, and this "
                        "one is not; build it with `python3 -m dsd_caffe.build --gpu`, or give one device",
                        fields=["gpu"])


def run(job, folder, state, progress, logpath, gpus, caffe=None, start=spawn):
    """:func:`training.train`'s runner for several devices (see the module doc): trains ``job`` in ``folder`` from
    ``state`` (a solverstate to resume) or the job's start weights. ``caffe`` and ``start`` (how the ranks are
    started, :func:`spawn`) are injectable for tests."""
    caffe = caffe or import_caffe()
    check_nccl(caffe, gpus)
    s = training.pycaffe_solver(job, folder)
    s.layer_wise_reduce = False  # see the module doc: the allreduce must follow the mask layer's backward
    fd, tmp = tempfile.mkstemp(prefix=".nccl-", suffix=".prototxt", dir=folder)
    os.close(fd)
    specs = layout(list(gpus), caffe.NCCL.new_uid(), tmp, state and os.path.abspath(state),
                   os.path.abspath(job.start), logpath)
    control = Control(len(specs), multiprocessing.get_context("spawn"))
    procs = []
    try:
        fileio.write_prototxt(tmp, s)
        log.info("%s: data-parallel on GPUs %s (one process each, NCCL)", job.desc, ", ".join(map(str, gpus)))
        with _Tail(logpath) as tail:
            procs = start(specs, control, job.solver.max_iter, job.solver.snapshot)
            try:
                watch(procs, tail, progress)
            except KeyboardInterrupt:
                control.stop.set()
                _wait_stopped(procs, tail, progress)
                # from None: the KeyboardInterrupt says no more
                raise training._interrupted(job, progress) from None
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        os.unlink(tmp)


class _Tail:
    """The lines appended to a log since it was opened, whole lines only (a rank may be writing one)."""

    def __init__(self, path):
        self.name, self.pending = path, ""

    def __enter__(self):
        self.f = open(self.name, errors="replace")
        self.f.seek(0, os.SEEK_END)
        return self

    def __exit__(self, *exc):
        self.f.close()

    def lines(self):
        *done, self.pending = (self.pending + self.f.read()).split("\n")
        return [line + "\n" for line in done]


def watch(procs, tail, progress):
    """Feed the log's new lines to the progress bar until every rank has ended; a rank that fails ends the others
    and is named in one UserError."""
    while True:
        alive = [p.is_alive() for p in procs]  # before reading: what an ended rank wrote is in the file then
        for line in tail.lines():
            progress.feed(line)
        failed = [(r, p.exitcode) for r, p in enumerate(procs) if not alive[r] and p.exitcode not in (0, None)]
        if failed:
            for p in procs:
                if p.is_alive():
                    p.kill()
            rank, code = failed[0]
            why = progress.caffe.failure[0] if progress.caffe.failure else "no error line in the log"
            raise UserError(f"rank {rank} of {len(procs)} (a process per GPU) ended with status {code}: {why} "
                            f"(full log: {tail.name})")
        if not any(alive):
            return
        time.sleep(POLL_S)


def _wait_stopped(procs, tail, progress):
    """After the stop flag: wait for the ranks to finish their chunk and snapshot; a second interrupt, a moment
    later, kills them (the same interrupt may arrive twice: from the terminal and forwarded by a parent)."""
    started = time.monotonic()
    while True:
        try:
            watch(procs, tail, progress)
            return
        except KeyboardInterrupt:
            if time.monotonic() - started > 2:
                for p in procs:
                    p.kill()
                return
