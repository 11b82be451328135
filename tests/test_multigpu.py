"""Several GPUs for one phase (dsd_caffe.multigpu), tested without a GPU: a stand-in for pycaffe records what each
rank asks of Caffe and in which order, the ranks run as threads through the injectable starter, and the parent's
layout, chunk protocol, stop, failure and records are checked. The GPU itself is bench/gpu_check.sh's."""
import dataclasses
import json
import re
import threading

import pytest

from dsd_caffe import multigpu, training
from dsd_caffe.errors import Interrupted, UserError


class FakeBlob:
    def __init__(self, calls, name):
        self.calls, self.name = calls, name

    @property
    def _gpu_diff_ptr(self):
        self.calls.append(("diff to GPU", self.name))
        return 1


class FakeSolver:
    """pycaffe's Solver as far as a rank uses it: callbacks run at each iteration's gradients, in order."""

    def __init__(self, calls, rank, path, on_step=None):
        self.calls, self.rank, self.iter, self.callbacks, self.on_step = calls, rank, 0, [], on_step
        self.calls.append(("get_solver", path))
        blobs = [FakeBlob(calls, "mask.w"), FakeBlob(calls, "conv.b")]
        self.net = type("Net", (), {"params": {"mask": blobs[:1], "conv": blobs[1:]},
                                    "copy_from": lambda _, p: calls.append(("copy_from", p))})()

    def restore(self, path):
        self.calls.append(("restore", path))

    def add_callback(self, *cb):
        self.calls.append(("add_callback", "nccl" if isinstance(cb[0], FakeNCCL) else "python"))
        self.callbacks.append(cb)

    def step(self, n):
        self.calls.append(("step", n))
        for _ in range(n):
            for cb in self.callbacks:
                cb[0].on_gradients_ready() if isinstance(cb[0], FakeNCCL) else cb[1]()
            self.iter += 1
            if self.on_step:
                self.on_step(self)

    def snapshot(self):
        self.calls.append(("snapshot", self.iter))


class FakeNCCL:
    def __init__(self, solver, uid):
        self.calls = solver.calls
        self.calls.append(("NCCL", uid))

    @staticmethod
    def new_uid():
        return b"uid"

    def bcast(self):
        self.calls.append(("bcast",))

    def on_gradients_ready(self):
        self.calls.append(("allreduce",))


class FakeCaffe:
    """One process's pycaffe: its calls, in order."""
    NCCL = FakeNCCL

    def __init__(self, rank=0, nccl=True, on_step=None, fail=False):
        self.calls, self.rank, self.nccl, self.on_step, self.fail = [], rank, nccl, on_step, fail
        for name in ("set_device", "set_mode_gpu", "set_solver_count", "set_solver_rank", "set_multiprocess"):
            setattr(self, name, lambda *a, _n=name: self.calls.append((_n, *a)))

    def has_nccl(self):
        return self.nccl

    def get_solver(self, path):
        if self.fail:
            raise RuntimeError("Check failed: a stand-in for a glog abort")
        return FakeSolver(self.calls, self.rank, path, self.on_step)


class ThreadRank:
    """A rank run as a thread, with a process's face (is_alive, exitcode, kill, join)."""

    def __init__(self, target):
        self.exitcode = None
        self.thread = threading.Thread(target=self._run, args=(target,), daemon=True)
        self.thread.start()

    def _run(self, target):
        try:
            target()
            self.exitcode = 0
        except Exception:  # noqa: BLE001 - a rank's failure is its exit status, as in a process
            self.exitcode = 1

    def is_alive(self):
        return self.thread.is_alive()

    def kill(self):
        pass

    def join(self):
        self.thread.join(30)


def thread_starter(fakes):
    """multigpu.run's ``start``: each rank a thread with its own FakeCaffe (``fakes``: one per rank)."""
    def start(specs, control, max_iter, snapshot_every):
        fakes["specs"] = specs
        return [ThreadRank(lambda s=s: multigpu.solve(s, control, max_iter, snapshot_every, fakes[s.rank]))
                for s in specs]
    return start


@pytest.fixture
def job(tmp_path, monkeypatch):
    """A training job whose pycaffe solver is a plain SolverParameter (no net is built: Caffe is a stand-in)."""
    from dsd_caffe.caffeproto import caffe_pb2

    solver = caffe_pb2().SolverParameter(max_iter=7, snapshot=5, snapshot_prefix="snapshots/dense", base_lr=0.1,
                                         layer_wise_reduce=True)
    def pycaffe_solver(job, folder):
        copy = type(solver)()
        copy.CopyFrom(solver)
        return copy

    monkeypatch.setattr(training, "pycaffe_solver", pycaffe_solver)
    (tmp_path / "train.log").write_text("")
    return training.Job(str(tmp_path), "dense", "solver.prototxt", solver, "net.prototxt", None,
                        str(tmp_path / "start.caffemodel"))


def progress():
    from dsd_caffe import caffelog

    return caffelog.Progress("dense", 7, 0)


def rank_calls(fake):
    """A rank's calls, with its chunked steps and per-iteration callbacks summarised."""
    return [c for c in fake.calls if c[0] not in ("step", "diff to GPU", "allreduce")]


# ------------------------------------------------------------------------------------------------ layout
def test_layout_one_rank_per_device():
    specs = multigpu.layout([2, 0, 1], b"u", "s.prototxt", None, "w.caffemodel", "train.log")
    assert [(s.rank, s.count, s.device) for s in specs] == [(0, 3, 2), (1, 3, 0), (2, 3, 1)]
    assert {(s.uid, s.solver, s.state, s.weights, s.log) for s in specs} == \
        {(b"u", "s.prototxt", None, "w.caffemodel", "train.log")}


def test_each_rank_asks_caffe_in_train_py_order_and_only_rank_0_snapshots(job, tmp_path):
    fakes = {0: FakeCaffe(0), 1: FakeCaffe(1)}
    multigpu.run(job, str(tmp_path), None, progress(), str(tmp_path / "train.log"), (1, 0), caffe=FakeCaffe(),
                 start=thread_starter(fakes))
    solver_path = fakes["specs"][0].solver
    for rank, device in ((0, 1), (1, 0)):
        expected = [("set_device", device), ("set_mode_gpu",), ("set_solver_count", 2), ("set_solver_rank", rank),
                    ("set_multiprocess", True), ("get_solver", solver_path),
                    ("copy_from", str(tmp_path / "start.caffemodel")), ("NCCL", b"uid"), ("bcast",),
                    ("add_callback", "python"), ("add_callback", "nccl")]
        # 7 iterations, snapshot every 5: Caffe's Step snapshots at 5 itself; the end (7) is snapshotted by rank 0
        assert rank_calls(fakes[rank]) == expected + ([("snapshot", 7)] if rank == 0 else [])
        steps = [c[1] for c in fakes[rank].calls if c[0] == "step"]
        assert sum(steps) == 7 and steps[0] == 1
    assert [c[1] for c in fakes[0].calls if c[0] == "step"] == [c[1] for c in fakes[1].calls if c[0] == "step"]
    assert not list(tmp_path.glob(".nccl-*"))  # the ranks' solver prototxt is removed


def test_the_ranks_and_the_pycaffe_engine_step_by_one_chunk_rule(job, tmp_path, monkeypatch):
    """training.next_chunk: double while a step call is fast (under 0.5 s, up to MAX_CHUNK), halve when slow; the
    ranks and the one-device pycaffe engine both step by it (a stand-in rule of 3 shows in both's calls)."""
    from dsd_caffe import devices

    assert training.MAX_CHUNK == 100
    assert [training.next_chunk(c, 0.1) for c in (1, 2, 64, 100)] == [2, 4, 100, 100]
    assert [training.next_chunk(c, 0.6) for c in (1, 2, 9, 100)] == [1, 1, 4, 50]
    monkeypatch.setattr(training, "next_chunk", lambda chunk, seconds: 3)
    fakes = {0: FakeCaffe(0), 1: FakeCaffe(1)}
    multigpu.run(job, str(tmp_path), None, progress(), str(tmp_path / "train.log"), (0, 1), caffe=FakeCaffe(),
                 start=thread_starter(fakes))
    one = FakeCaffe()
    monkeypatch.setattr(devices, "set_device", lambda gpu: one)
    training._run_pycaffe(job, str(tmp_path), None, progress(), str(tmp_path / "train.log"), None)
    for fake in (fakes[0], fakes[1], one):
        assert [c[1] for c in fake.calls if c[0] == "step"] == [1, 3, 3]


def test_diffs_reach_the_gpu_before_every_allreduce(job, tmp_path):
    """The masked diffs are on the device before NCCL sums them (see the module doc): per iteration, every
    parameter's diff is synced, then the allreduce runs."""
    fakes = {0: FakeCaffe(0), 1: FakeCaffe(1)}
    multigpu.run(job, str(tmp_path), None, progress(), str(tmp_path / "train.log"), (0, 1), caffe=FakeCaffe(),
                 start=thread_starter(fakes))
    for rank in (0, 1):
        per_iteration = [c for c in fakes[rank].calls if c[0] in ("diff to GPU", "allreduce")]
        assert per_iteration == [("diff to GPU", "mask.w"), ("diff to GPU", "conv.b"), ("allreduce",)] * 7


def test_the_ranks_solver_reduces_after_the_whole_backward(job, tmp_path):
    from dsd_caffe.caffeproto import caffe_pb2
    from dsd_caffe import fileio

    seen = {}

    def start(specs, control, max_iter, snapshot_every):
        seen["solver"] = fileio.parse_prototxt(open(specs[0].solver).read(), caffe_pb2().SolverParameter(), "s")
        seen["args"] = (max_iter, snapshot_every)
        return []

    multigpu.run(job, str(tmp_path), None, progress(), str(tmp_path / "train.log"), (0, 1), caffe=FakeCaffe(),
                 start=start)
    assert seen["solver"].layer_wise_reduce is False and seen["args"] == (7, 5)
    assert job.solver.layer_wise_reduce is True  # the job's own solver (the recorded one) is unchanged


def test_resume_restores_every_rank(job, tmp_path):
    fakes = {0: FakeCaffe(0), 1: FakeCaffe(1)}
    state = tmp_path / "snapshots" / "dense_iter_5.solverstate"
    multigpu.run(job, str(tmp_path), str(state), progress(), str(tmp_path / "train.log"), (0, 1),
                 caffe=FakeCaffe(), start=thread_starter(fakes))
    for rank in (0, 1):
        assert ("restore", str(state)) in fakes[rank].calls and not any(c[0] == "copy_from" for c in fakes[rank].calls)


def _spawned_rank(spec, control, max_iter, snapshot_every):
    """A rank in a real spawned process, with a stand-in for Caffe; its calls go to a JSON file beside the log."""
    fake = FakeCaffe(spec.rank)
    multigpu.solve(spec, control, max_iter, snapshot_every, fake)
    with open(f"{spec.log}.rank{spec.rank}.json", "w") as f:
        json.dump([[str(x) for x in c] for c in fake.calls], f)


def test_the_chunk_protocol_holds_across_real_processes(job, tmp_path):
    """The ranks as spawned processes (the barrier, the shared chunk and the stop flag are process-shared): the
    same steps on both, rank 0 alone snapshots."""
    logpath = str(tmp_path / "train.log")
    multigpu.run(job, str(tmp_path), None, progress(), logpath, (0, 1), caffe=FakeCaffe(),
                 start=lambda *a: multigpu.spawn(*a, target=_spawned_rank))
    calls = [json.load(open(f"{logpath}.rank{r}.json")) for r in (0, 1)]
    steps = [[c for c in rank if c[0] == "step"] for rank in calls]
    assert steps[0] == steps[1] and sum(int(c[1]) for c in steps[0]) == 7
    assert [c for c in calls[0] if c[0] == "snapshot"] == [["snapshot", "7"]]
    assert [c for c in calls[1] if c[0] == "snapshot"] == []
    assert ["set_solver_rank", "1"] in calls[1] and ["set_device", "1"] in calls[1]


# ------------------------------------------------------------------------------------------------ stop, failure
def test_a_stop_ends_every_rank_at_the_same_iteration_and_rank_0_snapshots(job, tmp_path):
    """Ctrl-C in the parent: the stop flag is read by rank 0 between chunks, handed to all, rank 0 snapshots,
    the phase raises Interrupted."""
    stopped = threading.Event()

    class Interrupting(ThreadRank):
        asked = 0

        def is_alive(self):  # the parent's first look at the ranks meets a Ctrl-C
            Interrupting.asked += 1
            if Interrupting.asked == 1:
                raise KeyboardInterrupt
            return super().is_alive()

    def wait_for_stop(solver):  # rank 0 holds its first chunk until the parent has set the flag
        if solver.rank == 0 and solver.iter == 1:
            assert stopped.wait(30)

    fakes = {0: FakeCaffe(0, on_step=wait_for_stop), 1: FakeCaffe(1)}

    def start(specs, control, max_iter, snapshot_every):
        original = control.stop.set
        control.stop.set = lambda: (original(), stopped.set())
        return [Interrupting(lambda s=s: multigpu.solve(s, control, max_iter, snapshot_every, fakes[s.rank]))
                for s in specs]

    with pytest.raises(Interrupted, match="interrupted at iteration"):
        multigpu.run(job, str(tmp_path), None, progress(), str(tmp_path / "train.log"), (0, 1), caffe=FakeCaffe(),
                     start=start)
    assert [c for c in fakes[0].calls if c[0] in ("step", "snapshot")] == [("step", 1), ("snapshot", 1)]
    assert [c for c in fakes[1].calls if c[0] in ("step", "snapshot")] == [("step", 1)]


def test_a_failing_rank_is_one_line_and_ends_the_phase(job, tmp_path):
    fakes = {0: FakeCaffe(0), 1: FakeCaffe(1, fail=True)}

    def start(specs, control, max_iter, snapshot_every):
        control.barrier.abort()  # rank 0 would wait for rank 1 at the first barrier: let it fail there too
        return thread_starter(fakes)(specs, control, max_iter, snapshot_every)

    with pytest.raises(UserError) as e:
        multigpu.run(job, str(tmp_path), None, progress(), str(tmp_path / "train.log"), (0, 1), caffe=FakeCaffe(),
                     start=start)
    assert "rank" in str(e.value) and "ended with status 1" in str(e.value) and "\n" not in str(e.value)


def test_the_ranks_log_feeds_the_progress_bar_and_names_a_failure(job, tmp_path):
    """Caffe's log lines (rank 0's, appended to train.log, a line possibly written in two pieces) move the bar; a
    rank's fatal line is the one line the phase fails with."""
    logpath = str(tmp_path / "train.log")

    def writes(solver):
        with open(logpath, "a") as f:
            f.write(f"I1203 solver.cpp:218] Iteration {solver.iter} (1 iter/s), loss = 0.")
            f.flush()
            f.write("5\n")

    fakes = {0: FakeCaffe(0, on_step=writes), 1: FakeCaffe(1)}
    prog = progress()
    multigpu.run(job, str(tmp_path), None, prog, logpath, (0, 1), caffe=FakeCaffe(), start=thread_starter(fakes))
    assert (prog.caffe.iteration, prog.caffe.loss) == (7, 0.5)

    def fails(solver):
        with open(logpath, "a") as f:
            f.write("F1203 blob.cpp:33] Check failed: a stand-in\n")
        raise RuntimeError("abort")

    fakes = {0: FakeCaffe(0), 1: FakeCaffe(1, on_step=fails)}

    def start(specs, control, max_iter, snapshot_every):
        handles = thread_starter(fakes)(specs, control, max_iter, snapshot_every)
        handles[1].thread.join(30)  # rank 1 failed: rank 0 waits at a barrier, as it would for a dead process
        control.barrier.abort()
        return handles

    with pytest.raises(UserError) as e:
        multigpu.run(job, str(tmp_path), None, progress(), logpath, (0, 1), caffe=FakeCaffe(), start=start)
    assert re.match(r"rank [01] of 2 \(a process per GPU\) ended with status 1: Check failed: a stand-in \(full log: ",
                    str(e.value))  # rank 0 failed too here, at the aborted barrier: either is named


def test_a_caffe_without_nccl_is_refused_before_any_rank_starts(job, tmp_path):
    with pytest.raises(UserError, match="^gpu 0,1: several devices need a Caffe built with NCCL"):
        multigpu.run(job, str(tmp_path), None, progress(), str(tmp_path / "train.log"), (0, 1),
                     caffe=FakeCaffe(nccl=False), start=lambda *a: pytest.fail("a rank started"))


# ------------------------------------------------------------------------------------------------ the route
def test_several_devices_train_through_multigpu_and_are_recorded(tmp_path, monkeypatch):
    """training.train hands several devices to multigpu.run (whatever the engine), after checking they exist, and
    training.json records them; one device goes to the engine as before."""
    from dsd_caffe import devices, phases
    from dsd_caffe.solvers import Schedule
    from helpers import small_setup

    pytest.importorskip("caffe")
    model, weights = small_setup(str(tmp_path))
    monkeypatch.setattr(devices, "probe", lambda: devices.Offer(False, 2, "a stand-in"))
    got = {}

    def fake_run(job, folder, state, prog, logpath, gpus):
        got["gpus"] = gpus
        raise KeyboardInterrupt  # nothing trains here: stop as a Ctrl-C would

    monkeypatch.setattr(multigpu, "run", fake_run)
    with pytest.raises(KeyboardInterrupt):
        phases.train_dense(phases.Inputs(model, weights), str(tmp_path / "dense"),
                           Schedule(max_iter=2, snapshot=2, base_lr=0.001), "fashion-mnist", engine="binary",
                           gpu="1,0")
    assert got["gpus"] == (1, 0)
    from dsd_caffe import fileio

    assert fileio.read_json(str(tmp_path / "dense" / "training.json"))["devices"] == [1, 0]
    with pytest.raises(UserError, match="no GPU device 2 here"):
        phases.train_dense(phases.Inputs(model, weights), str(tmp_path / "dense2"),
                           Schedule(max_iter=2, snapshot=2, base_lr=0.001), "fashion-mnist", gpu="0,2")


def test_seeds_spread_over_the_devices(monkeypatch, tmp_path):
    """dsd.py --seeds 4 --jobs 2 --gpu 0,1: seed k runs on device k % 2 (the seed workers are given one each)."""
    from dsd_caffe import seedpool

    assert seedpool.seed_devices(range(10, 14), "0,1") == {10: 0, 11: 1, 12: 0, 13: 1}
    assert seedpool.seed_devices([3, 1], None) == {1: None, 3: None}
    started = []

    class Context:  # the spawn context _parallel asks for: a worker is recorded, then the run stops
        def Pipe(self, duplex):
            return None, None

        def Process(self, target, name, args):
            started.append((args[2].seed, args[5]))
            raise RuntimeError("stand-in")

    monkeypatch.setattr(seedpool.multiprocessing, "get_context", lambda method: Context())
    with pytest.raises(RuntimeError, match="stand-in"):
        seedpool._parallel({s: Seeded(s) for s in (11, 10)}, str(tmp_path), 2, "binary", "0,1", False)
    assert started == [(11, 1)]  # the first worker started is seed 11's, on its device


@dataclasses.dataclass(frozen=True)
class Seeded:
    seed: int
