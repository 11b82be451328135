"""Running Caffe's solver in a folder: the ``caffe train`` binary or pycaffe's Solver, resumable, visible and
interruptible. Every phase (dense, sparse, redense, and the control arm) trains through :func:`train`. (Past 400
lines: the two engines, snapshots and records belong together; Caffe's log is read in :mod:`dsd_caffe.caffelog`.)

A training folder holds the net and solver prototxts (paths relative to the folder), Caffe's snapshots
(``snapshots/<phase>_iter_N.*``), ``train.log`` (Caffe's own log, appended across resumes) and ``training.json``,
the folder's record: what training started from (the solver's text, the net's text, the starting weights'
SHA-256).

- **Reuse.** A folder is reused only when the new command's record equals the one stored: then training resumes
  from the newest complete snapshot, or returns the final one. Otherwise :func:`train` refuses, naming the first
  setting that differs; ``force`` clears the folder's training outputs and starts from scratch. A folder holding
  another phase's training is refused, also with ``force`` (:func:`check_phase`).
- **Snapshots.** Caffe does not write snapshots atomically: a snapshot whose files are missing, empty or unreadable
  (a kill while Caffe wrote it, a full disk) is dropped, and training passes that iteration again; a failed run
  removes them before it reports. A resume uses a solverstate
  whose ``learned_net`` resolves from the folder (:func:`portable_state`).
- **One writer.** The folder is locked (``fileio.output_lock``) while training; the ``caffe`` child gets SIGKILL
  when its Python parent dies, so a killed run leaves no orphan writing snapshots.
- **Visible.** A tqdm bar shows the iteration, the smoothed loss Caffe prints, the last test accuracy and the ETA,
  parsed from Caffe's own log lines (:mod:`dsd_caffe.caffelog`) for both engines (under pycaffe, glog is captured from
  the process's stderr while the solver runs). Each test result is also logged, rounded to 4 digits.
- **Interruptible.** On Ctrl-C or SIGTERM, Caffe stops after the current iteration and snapshots (``caffe
  train``'s ``-sigint_effect stop``; under pycaffe the solver is snapshotted), and :class:`~dsd_caffe.errors.
  Interrupted` says at which iteration; the same command resumes.
"""
import ctypes
import dataclasses
import glob
import hashlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
from google.protobuf import text_format
from google.protobuf.message import DecodeError

from . import caffelog, devices, fileio, solvers, sources
from .caffe_env import caffe_binary, glog_level_set
from .caffeproto import caffe_pb2
from .errors import Interrupted, UserError

log = logging.getLogger(__name__)

ENGINES = ("binary", "pycaffe")
RECORD = "training.json"
LOG = "train.log"
SNAPSHOT_DIR = "snapshots"
MAX_CHUNK = 100  # iterations per solver.step call in pycaffe, at most: between two looks at Ctrl-C or a stop flag


# ------------------------------------------------------------------------------------------------ snapshots
@dataclasses.dataclass(frozen=True, order=True)
class Snapshot:
    """A complete snapshot: Caffe's solverstate and caffemodel at ``iteration``."""
    iteration: int
    solverstate: str
    caffemodel: str


_SNAP_RE = re.compile(r"_iter_(\d+)\.solverstate$")


def snapshots(folder, prefix, clean=False):
    """[Snapshot] of the complete snapshots ``<folder>/<prefix>_iter_N.*``, newest first. An incomplete one is
    skipped, and with ``clean`` deleted."""
    out = []
    pattern = os.path.join(folder, glob.escape(prefix) + "_iter_*.")
    stems = {f.rsplit(".", 1)[0] for f in glob.glob(pattern + "solverstate") + glob.glob(pattern + "caffemodel")}
    for stem in stems:
        state, model = stem + ".solverstate", stem + ".caffemodel"
        m = _SNAP_RE.search(state)
        why = None if m and os.path.exists(model) and os.path.exists(state) else "incomplete"
        why = why or _snapshot_problem(state, model, int(m.group(1)))
        if why:
            if clean:
                log.warning("removing incomplete snapshot %s.* (%s), left by an interrupted run", stem, why)
                for path in (state, model):
                    if os.path.exists(path):
                        os.unlink(path)
            else:
                log.warning("skipping incomplete snapshot %s (%s)", state, why)
            continue
        out.append(Snapshot(int(m.group(1)), state, model))
    return sorted(out, reverse=True)


def _snapshot_problem(state, model, iteration):
    """Why a snapshot cannot be resumed from, or None."""
    st = caffe_pb2().SolverState()
    try:
        with open(state, "rb") as f:
            st.ParseFromString(f.read())
        expected = _learnable_count(fileio.read_caffemodel(model))
    except (OSError, DecodeError, UserError) as e:
        return str(e)
    if st.iter != iteration:
        return f"its solverstate says iteration {st.iter}"
    if len(st.history) != expected:
        return f"{len(st.history)} history blobs for {expected} learnable blobs"
    return None


def _learnable_count(model_param):
    """Number of learnable blobs Caffe keeps solver history for: shared (named) params count once."""
    seen, n = set(), 0
    for layer in model_param.layer:
        for j in range(len(layer.blobs)):
            name = layer.param[j].name if j < len(layer.param) else ""
            if name:
                if name in seen:
                    continue
                seen.add(name)
            n += 1
    return n


def portable_state(state, folder):
    """A solverstate whose learned_net resolves from ``folder``: the file itself, or a hidden rewritten copy."""
    st = caffe_pb2().SolverState()
    with open(state, "rb") as f:
        st.ParseFromString(f.read())
    learned = st.learned_net
    if learned and os.path.isabs(learned) and os.path.exists(learned):
        return state
    st.learned_net = os.path.abspath(os.path.join(os.path.dirname(state), os.path.basename(learned)))
    fd, tmp = tempfile.mkstemp(prefix=".resume-", suffix=".solverstate", dir=folder)
    with os.fdopen(fd, "wb") as f:
        f.write(st.SerializeToString())
    return tmp


# ------------------------------------------------------------------------------------------------ the record
def file_record(path):
    """{"path", "sha256"} of a file, for records and provenance."""
    path = os.path.abspath(os.fspath(path))
    return {"path": path, "sha256": fileio.file_digest(path)}


def text_of(message):
    """A protobuf message as prototxt text (what records hold)."""
    return text_format.MessageToString(message)


def text_digest(message):
    """The SHA-256 of a protobuf message's prototxt text (what a record compares)."""
    return hashlib.sha256(text_of(message).encode()).hexdigest()


#: solver fields a person sets, compared first so a message names the cause (max_iter), not a consequence
_SOLVER_FIRST = ("base_lr", "max_iter", "lr_policy", "iter_size", "momentum", "weight_decay", "snapshot", "net")


def _first_difference(old, new, solver=False):
    """The first line where two prototxt texts differ, as (old line, new line); for solvers, the fields people set
    come first."""
    a, b = old.splitlines(), new.splitlines()
    if solver:
        first = [f"{k}:" for k in _SOLVER_FIRST]
        order = (lambda lines: sorted(lines, key=lambda l: next((i for i, k in enumerate(first)
                                                                 if l.startswith(k)), len(first))))
        a, b = order(a), order(b)
    for x, y in zip(a, b):
        if x != y:
            return x.strip(), y.strip()
    longer = a[len(b):] or b[len(a):]
    return (longer[0].strip(), "(nothing)") if len(a) > len(b) else ("(nothing)", longer[0].strip())


def check_phase(folder, record, what):
    """Refuse ``folder`` when its stored record is another phase's (its solver trains another net file), also
    with ``--force``: the two phases' snapshots, log and record would be mixed, or the other's removed."""
    old = record_of(folder)
    if old is None:
        return
    theirs, ours = recorded_solver(old, RECORD).net, recorded_solver(record, RECORD).net
    if theirs != ours:
        raise UserError(f"{folder} holds the training of another phase (its {RECORD} trains {theirs}, {what} "
                        f"trains {ours}); use another --output (--force replaces only the same phase's outputs)")


def check_record(folder, record, what):
    """Refuse to reuse ``folder`` when its stored record differs from ``record``; name the first difference."""
    old = record_of(folder)
    if old is None:
        return
    hint = (f"use the same settings to resume or reuse it, --force to redo {what} from scratch, or another "
            "--output")
    was, now = old.get("weights", {}), record["weights"]
    if was.get("sha256") != now["sha256"]:
        raise UserError(f"{folder} holds {what} started from other weights: {was.get('path')} with SHA-256 "
                        f"{was.get('sha256')} there, {now['path']} with SHA-256 {now['sha256']} now; {hint}")
    for key in ("solver", "net"):
        if old.get(key) != record[key]:
            was, now = _first_difference(old.get(key, ""), record[key], solver=key == "solver")
            raise UserError(f"{folder} holds {what} whose {key} differs from this command's: it has {was!r}, this "
                            f"command asks for {now!r}; {hint}")


def clear(folder, finals=()):
    """Remove a training folder's outputs (snapshots, log, record and the ``finals`` files with their JSON), for
    --force."""
    for name in (SNAPSHOT_DIR, LOG, RECORD, *finals, *[fileio.sidecar_path(n) for n in finals]):
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)


# ------------------------------------------------------------------------------------------------ train
@dataclasses.dataclass(frozen=True)
class Job:
    """One training run in ``folder``: the solver and net written there under their names (the solver's ``net``
    and ``snapshot_prefix`` relative to the folder, the net's sources relative to it), started from the caffemodel
    at ``start``; ``start_param`` (a NetParameter), when given, is written to ``start`` first (a released or an
    initial model). ``source`` names where the start came from (for messages and provenance); ``final`` is the
    phase's final model: present with its JSON, the phase is done."""
    folder: str
    desc: str
    solver_name: str
    solver: object
    net_name: str
    net: object
    start: str
    start_param: object = None
    source: str = None
    final: str = None

    def record(self):
        """What training starts from: the solver's and net's text and the start weights' SHA-256."""
        if self.start_param is not None:
            digest = hashlib.sha256(self.start_param.SerializeToString()).hexdigest()
        else:
            digest = fileio.file_digest(self.start)
        return {"solver": text_of(self.solver), "net": text_of(self.net),
                "weights": {"path": os.path.abspath(self.source or self.start), "sha256": digest}}


def check_engine(engine):
    """Refuse an engine other than those of :data:`ENGINES`."""
    if engine not in ENGINES:
        raise UserError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")


def _snapshots(job, clean=False):
    """The snapshots of ``job`` in its folder, newest first (see :func:`snapshots`)."""
    prefix = os.path.join(os.path.abspath(job.folder), job.solver.snapshot_prefix)
    return snapshots(os.path.dirname(prefix), os.path.basename(prefix), clean=clean)


def train(job, engine="binary", gpu=None, force=False, notes=()):
    """Train ``job``, or resume it, and return its final :class:`Snapshot`; None when the phase's final model
    already exists from the same record (nothing is written then). The caller holds the folder's lock
    (``fileio.output_lock``). ``force`` clears earlier training outputs first and starts from scratch. ``gpu``:
    None (the binary on the CPU, pycaffe in Caffe's current mode), a device, or several (data-parallel through
    :mod:`dsd_caffe.multigpu`); ``training.json`` records them. ``notes`` are warned once every check has passed,
    before training starts."""
    check_engine(engine)
    gpus = devices.check(gpu)  # before Caffe is asked: a missing device is one line, not a glog abort
    folder = os.path.abspath(job.folder)
    fileio.check_output(os.path.join(folder, RECORD), force=True)  # a file or a dangling link in the way: named
    record = job.record()
    check_phase(folder, record, f"a {job.desc} phase")
    if force:
        clear(folder, [job.final] if job.final else [])
    check_record(folder, record, f"a {job.desc} phase")
    if job.final and finished(job.final):
        log.info("%s: finished already, with the same settings: %s", job.desc, job.final)
        return None
    os.makedirs(os.path.dirname(os.path.join(folder, job.solver.snapshot_prefix)), exist_ok=True)
    if job.start_param is not None:
        fileio.write_caffemodel(job.start, job.start_param)
    fileio.write_prototxt(os.path.join(folder, job.net_name), job.net)
    fileio.write_prototxt(os.path.join(folder, job.solver_name), job.solver)
    fileio.write_json(os.path.join(folder, RECORD), dict(record, devices=devices.record(gpus)))
    snaps = _snapshots(job, clean=True)
    max_iter = job.solver.max_iter
    if snaps and snaps[0].iteration >= max_iter:
        log.info("%s: already trained to iteration %d in %s", job.desc, snaps[0].iteration, folder)
        return snaps[0]
    resume = snaps[0] if snaps else None
    for note in notes:
        log.warning("%s", note)
    logpath = os.path.join(folder, LOG)
    log.info("%s: %s %d iterations%s; Caffe's log: %s", job.desc, "resuming," if resume else "training",
             max_iter, f" from iteration {resume.iteration}" if resume else "", logpath)
    state = portable_state(resume.solverstate, folder) if resume else None
    progress = caffelog.Progress(job.desc, max_iter, resume.iteration if resume else 0)
    try:
        from . import multigpu  # deferred: breaks a cycle (multigpu's ranks run training's helpers)

        run = multigpu.run if gpus and len(gpus) > 1 else _run_binary if engine == "binary" else _run_pycaffe
        with fileio.write_errors(logpath):  # a full disk while we write Caffe's log: one line naming it
            run(job, folder, state, progress, logpath, gpus[0] if gpus and len(gpus) == 1 else gpus)
        progress.feed("")  # the end of the log: its last test is finished
    except BaseException:
        # Caffe does not check its snapshot writes: on a full disk it leaves truncated ones under their names
        _snapshots(job, clean=True)
        raise
    finally:
        progress.close()
        if state and state != resume.solverstate and os.path.exists(state):
            os.unlink(state)
    snaps = _snapshots(job)
    if not snaps or snaps[0].iteration < max_iter:
        raise UserError(f"{job.desc}: training ended without a snapshot at iteration {max_iter} in {folder} "
                        f"(full log: {logpath})")
    return snaps[0]


def _interrupted(job, progress):
    """The Interrupted error, naming the iteration the next run resumes from (the snapshot written on stopping)."""
    snaps = _snapshots(job)
    it = snaps[0].iteration if snaps else progress.caffe.iteration
    return Interrupted(f"{job.desc}: interrupted at iteration {it}; run the same command again to resume", it)


def _die_with_parent():  # pragma: no cover - runs in the child between fork and exec
    """Linux: the caffe child gets SIGKILL when the Python parent dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _run_binary(job, folder, state, progress, logpath, gpu):
    cmd = [caffe_binary(), "train", "-solver", job.solver_name, "-sigint_effect", "stop"]
    cmd += ["-snapshot", os.path.abspath(state)] if state else ["-weights", os.path.abspath(job.start)]
    if gpu is not None:
        cmd += ["-gpu", str(gpu)]
    env = dict(os.environ, GLOG_minloglevel="0", GLOG_logtostderr="1")
    with open(logpath, "a") as logf:
        logf.write(f"# {' '.join(cmd)}\n")
        logf.flush()
        proc = subprocess.Popen(cmd, cwd=folder, stdout=logf, stderr=subprocess.PIPE, text=True, env=env,
                                errors="replace",
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        try:
            _pump(proc.stderr, logf, progress)
            rc = proc.wait()
        except KeyboardInterrupt:
            _stop(proc, logf, progress)
            # from None: the KeyboardInterrupt says no more
            raise _interrupted(job, progress) from None
        except BaseException:  # our side failed (its log on a full disk): Caffe stops now, not at our exit
            proc.kill()
            proc.wait()
            raise
    if rc != 0:
        tail = progress.caffe.failure[0] if progress.caffe.failure else "no error line in the log"
        why = progress.caffe.diverged()
        if why:  # a NaN net can make Caffe itself crash (max pooling's backward writes out of bounds)
            tail = f"the training diverged: {why} (try a lower base_lr); Caffe then: {tail}"
        raise UserError(f"{job.desc}: `caffe train` failed with status {rc} in {folder}: {tail} (full log: "
                        f"{logpath})")


def _pump(stream, logf, progress):
    for line in stream:
        logf.write(line)
        progress.feed(line)
    progress.feed("")  # the end: a test block there is finished


def _stop(proc, logf, progress):
    """Ctrl-C or SIGTERM: Caffe stops after its current iteration and snapshots (-sigint_effect stop). Wait for
    it, still reading its log; a second interrupt, a moment later, kills it (the same interrupt may arrive twice:
    from the terminal and forwarded by a parent)."""
    started = time.monotonic()
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # a terminal's Ctrl-C reached it already; SIGTERM reached only us
    while True:
        try:
            _pump(proc.stderr, logf, progress)
            proc.wait()
            return
        except KeyboardInterrupt:
            if time.monotonic() - started > 2:
                proc.kill()
                proc.wait()
                return


def pycaffe_solver(job, folder):
    """The SolverParameter pycaffe runs for ``job``: its paths absolute, its net inline with absolute sources."""
    s = solvers.resolve_paths(job.solver, folder)
    s.ClearField("net")
    s.net_param.CopyFrom(sources.absolute_sources(job.net, folder))
    return s


def next_chunk(chunk, seconds):
    """Iterations for the next ``solver.step`` call after one of ``chunk`` took ``seconds``: twice as many while a
    call takes under half a second, up to :data:`MAX_CHUNK` (so an interrupt is seen soon), half as many when slower,
    at least 1. The pycaffe engine and every multi-GPU rank (``multigpu.steps``) step by it."""
    return max(1, min(chunk * 2, MAX_CHUNK)) if seconds < 0.5 else max(1, chunk // 2)


def _run_pycaffe(job, folder, state, progress, logpath, gpu):
    caffe = devices.set_device(gpu)
    s = pycaffe_solver(job, folder)
    fd, tmp = tempfile.mkstemp(prefix=".pycaffe-", suffix=".prototxt", dir=folder)
    os.close(fd)
    capture = _GlogCapture(logpath, progress)
    try:
        fileio.write_prototxt(tmp, s)
        with capture:
            solver = caffe.get_solver(tmp)
    finally:
        os.unlink(tmp)
    if state:
        solver.restore(state)
    else:
        solver.net.copy_from(os.path.abspath(job.start))
    max_iter, chunk, snap = job.solver.max_iter, 1, job.solver.snapshot
    try:
        while solver.iter < max_iter:
            t0 = time.monotonic()
            with capture:
                solver.step(min(chunk, max_iter - solver.iter))
            chunk = next_chunk(chunk, time.monotonic() - t0)
    except KeyboardInterrupt:
        with capture:
            solver.snapshot()
        # from None: the KeyboardInterrupt says no more
        raise _interrupted(job, progress) from None
    if not (snap and solver.iter % snap == 0):
        with capture:
            solver.snapshot()


class _GlogCapture:
    """While a ``with`` block runs, Caffe's glog (INFO and up) goes to the training log: stderr (fd 2) points at
    the log file and glog's level and stderr flag are set, then all are restored. After each block the new lines
    are fed to the progress bar. (A file, not a pipe: the solver holds the GIL while it writes its log, so a pipe
    read by a Python thread would fill up and deadlock.)"""

    def __init__(self, logpath, progress):
        self.logpath, self.progress = logpath, progress
        with open(logpath, "a"):
            pass
        self.offset = os.path.getsize(logpath)

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        log_fd = os.open(self.logpath, os.O_WRONLY | os.O_APPEND)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        self.level = glog_level_set("INFO", to_stderr=True)
        self.level.__enter__()
        return self

    def __exit__(self, *exc):
        self.level.__exit__(*exc)
        os.dup2(self.saved, 2)
        os.close(self.saved)
        with open(self.logpath, errors="replace") as f:
            f.seek(self.offset)
            for line in f:
                self.progress.feed(line)
            self.offset = f.tell()


def finish(snapshot, path, provenance):
    """Copy the final snapshot's caffemodel to ``path`` atomically, then its provenance JSON beside it (a phase is
    finished once both exist)."""
    with fileio.atomic_path(path, force=True) as tmp:
        shutil.copyfile(snapshot.caffemodel, tmp)
    fileio.write_provenance(path, force=True, **provenance)
    return path


def finished(path):
    """True when a phase's final model and its provenance JSON (written after it) both exist."""
    return os.path.exists(path) and os.path.exists(fileio.sidecar_path(path))


def solver_summary(solver):
    """The solver settings a provenance JSON records, float fields as written (0.004, not the float32 Caffe stores,
    0.004000000189989805)."""
    keys = ("base_lr", "lr_policy", "power", "gamma", "stepsize", "max_iter", "iter_size", "momentum",
            "weight_decay", "snapshot", "random_seed", "type")
    as_written = (lambda v: float(str(np.float32(v))) if isinstance(v, float) else v)
    return {k: as_written(getattr(solver, k)) for k in keys if solver.HasField(k)}


def record_of(folder):
    """The stored record of a training folder, or None."""
    path = os.path.join(folder, RECORD)
    return fileio.read_json(path) if os.path.exists(path) else None


def recorded_solver(record, name):
    """The SolverParameter a record (see :meth:`Job.record`) holds as text; ``name`` names it in a syntax error."""
    return fileio.parse_prototxt(record.get("solver", ""), caffe_pb2().SolverParameter(), name)

