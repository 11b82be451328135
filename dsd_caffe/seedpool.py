"""Several seeds of a DSD run (:func:`run_seeds`): ``seed<k>/`` holds one run per seed and ``verdict.json`` the
paired comparison (:func:`dsd_caffe.runreport.seeds_verdict`).

Several seeds run in worker processes, ``jobs`` at a time, each in its own process (its log lines carry its seed).
Ctrl-C or SIGTERM (to the process group or to the parent alone) stops every worker at a snapshot, and the parent
exits with :class:`~dsd_caffe.errors.Interrupted`; a worker whose parent dies (even by SIGKILL) gets SIGTERM from
the kernel (``PR_SET_PDEATHSIG``) and stops the same way. A re-run resumes every unfinished seed and reuses the
finished ones.
"""
import ctypes
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import time

from . import devices, fileio, solvers
from .errors import Interrupted, UserError
from .pipeline import run_dsd
from .runreport import seeds_verdict

log = logging.getLogger(__name__)

STOP_WAIT = 60  # seconds the workers get to stop at a snapshot after an interrupt, before SIGKILL
MAX_SEEDS = 1000  # a verdict needs a few dozen seeds at most; each seed is a whole run


def run_seeds(config, output_dir, seeds=1, jobs=1, engine="binary", gpu=None, force=False):
    """``seeds`` paired runs (DSD and its control; seeds ``config.seed``, +1, ...) in ``output_dir/seed<k>``,
    ``jobs`` at a time, then the verdict. One seed runs in ``output_dir`` itself, on all of ``gpu``'s devices
    (data-parallel); several seeds spread over them, one device each (``devices.of_seed``). ``config.data_order``
    None: "shuffled" over several seeds, else "fixed". Returns {"runs": {seed: state}, "verdict": Verdict or None,
    "refused": why there is no verdict, or None}."""
    solvers.count(seeds, "seeds", maximum=MAX_SEEDS)
    solvers.count(jobs, "jobs")
    if seeds > 1 and not config.control:
        raise UserError("seeds needs control: several seeds compare DSD with its control",
                        fields=["seeds", "control"])
    config = dataclasses.replace(config, data_order=config.data_order or ("shuffled" if seeds > 1 else "fixed"))
    out = os.path.abspath(os.fspath(output_dir))
    if seeds == 1:
        state = run_dsd(config, out, engine, gpu, force)
        runs = {config.seed: state}
    else:
        with fileio.output_lock(out):
            configs = {config.seed + k: dataclasses.replace(config, seed=config.seed + k) for k in range(seeds)}
            runs = _parallel(configs, out, jobs, engine, gpu, force)
    result = {"runs": runs, "verdict": None}
    if config.control:
        result.update(seeds_verdict(runs, out, "holdout" if config.holdout_source else "val", config))
    return result


def seed_devices(seeds, gpu):
    """{seed: its device}: the seeds in order take ``gpu``'s devices round robin (:func:`devices.of_seed`; None
    without --gpu)."""
    return {seed: devices.of_seed(gpu, k) for k, seed in enumerate(sorted(seeds))}


def _parallel(configs, out, jobs, engine, gpu, force):
    """Run each seed's :func:`run_dsd` in its own worker process, ``jobs`` at a time (finished seeds are reused,
    unfinished ones resumed); {seed: state}. An interrupt stops every worker (:func:`_stop_workers`)."""
    ctx = multiprocessing.get_context("spawn")  # Caffe's state is per process; fork would copy a live one
    todo, running, runs, problems, alone = list(configs.items()), {}, {}, [], []
    device = seed_devices(configs, gpu)
    try:
        while todo or running:
            while todo and len(running) < jobs:
                seed, config = todo.pop(0)
                receive, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_seed_worker, name=f"seed{seed}", args=(
                    send, os.getpid(), config, os.path.join(out, f"seed{seed}"), engine,
                    device[seed], force, jobs > 1))
                proc.start()
                send.close()
                running[seed] = (proc, receive)
            multiprocessing.connection.wait([proc.sentinel for proc, _ in running.values()])
            for seed, (kind, value) in _reap(running).items():
                if kind == "ok":
                    runs[seed] = value
                    log.info("seed %d: finished", seed)
                elif kind == "interrupted":  # a worker stopped alone (a signal to it): the run stops
                    alone.append(value)
                    raise KeyboardInterrupt
                else:
                    problems.append(value)
                    log.error("%s", value)
    except KeyboardInterrupt:
        stopped = _stop_workers(running)
        where = alone + stopped
        # from None: the KeyboardInterrupt says no more
        raise Interrupted(f"interrupted{' at ' + ', '.join(where) if where else ''}; run the same command again "
                          "to resume") from None
    if problems:
        raise UserError(problems[0])
    return dict(sorted(runs.items()))


def _reap(running):
    """{seed: (kind, value)} of the workers of ``running`` ({seed: (process, pipe)}) that ended; removed from it."""
    ended = {}
    for seed, (proc, receive) in list(running.items()):
        if proc.is_alive():
            continue
        proc.join()
        ended[seed] = receive.recv() if receive.poll() else (
            "error", f"seed {seed}: its worker process ended with status {proc.exitcode} and no result")
        receive.close()
        del running[seed]
    return ended


def _stop_workers(running):
    """Stop every live worker: SIGINT (a worker ignores a repeat within 2 s, so the terminal's Ctrl-C and ours
    count once), wait up to STOP_WAIT seconds for them to snapshot, then SIGKILL (their Caffe children die with
    them). A second interrupt, more than 2 s after the first, kills them at once. Returns where each stopped."""
    for proc, _ in running.values():
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGINT)
    started = time.monotonic()
    while running and time.monotonic() - started < STOP_WAIT:
        try:
            multiprocessing.connection.wait([p.sentinel for p, _ in running.values()], timeout=1)
        except KeyboardInterrupt:
            if time.monotonic() - started > 2:
                break
        if all(not p.is_alive() for p, _ in running.values()):
            break
    for proc, _ in running.values():
        if proc.is_alive():
            proc.kill()
    where = []
    for seed, (kind, value) in sorted(_reap(running).items()):
        if kind == "interrupted":
            where.append(value)
        elif kind == "ok":
            where.append(f"seed {seed} (finished)")
    return where


def _seed_worker(conn, parent, config, out, engine, gpu, force, quiet):
    """One seed's run in its own process; sends ("ok", state), ("error", message) or ("interrupted", where) to
    ``conn``. It dies with its ``parent`` (SIGTERM when the parent ends, however it ends)."""
    _follow_parent(parent)
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"  # this child process is ours: parallel bars would interleave
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s seed {config.seed} %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        result = "ok", run_dsd(config, out, engine, gpu, force, reuse=True)
    except Interrupted as e:
        m = re.match(r"(.*): interrupted at iteration (\d+)", str(e))
        result = "interrupted", (f"seed {config.seed} {m.group(1)} iteration {m.group(2)}" if m else
                                 f"seed {config.seed}")
    except KeyboardInterrupt:
        result = "interrupted", f"seed {config.seed} (between phases)"
    except UserError as e:  # anything else is a bug: its traceback shows here, and the parent says "no result"
        result = "error", f"seed {config.seed}: {e}"
    conn.send(result)
    conn.close()


_first_interrupt = [-10.0]


def _interrupt_once(signum, frame):
    """SIGINT/SIGTERM in a worker: KeyboardInterrupt, but a repeat within 2 s is the same interrupt (the terminal's
    Ctrl-C and the parent's forwarded one)."""
    now = time.monotonic()
    if now - _first_interrupt[0] > 2:
        _first_interrupt[0] = now
        raise KeyboardInterrupt


def _follow_parent(parent):
    """This worker gets SIGTERM when its parent dies (Linux's PR_SET_PDEATHSIG; elsewhere it polls nothing and
    relies on the parent's stop), and ends now when the parent is gone already."""
    signal.signal(signal.SIGINT, _interrupt_once)
    signal.signal(signal.SIGTERM, _interrupt_once)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        raise SystemExit(130)
