"""The BLAS self-check rejects wrong kernels, the choice is recorded, and runtime_env never overrides a preset.

The self-checks run real SGEMM/SGEMV through the libopenblas that pycaffe's _caffe.so resolves, in subprocesses.
"""
import json
import logging
import os

import pytest

from dsd_caffe import blas

# Respect a core type the machine presets (older OpenBLAS builds misbehave on some processors without it).
HERE_CORE = os.environ.get("OPENBLAS_CORETYPE", blas.DEFAULT)


@pytest.fixture(scope="module")
def library():
    return blas.caffe_blas_library()


def test_library_is_the_one_caffe_links(library):
    ext = blas._caffe_extension()
    assert ext is not None
    assert library in {os.path.realpath(p) for p in blas._ldd(ext).values()}
    assert blas.corename(library)  # it is an OpenBLAS and reports its kernel


def test_real_kernel_passes(library):
    r = blas.self_check(library, HERE_CORE, threads=1, time_it=False)
    assert r["ok"], r
    assert r["max_rel_error"] < 1e-6
    assert r["corename"]


def test_perturbed_kernel_is_rejected(library):
    r = blas.self_check(library, HERE_CORE, threads=1, fault="perturb", time_it=False)
    assert not r["ok"]
    assert r["max_rel_error"] > blas.TOLERANCE
    assert "wrong results" in r["reason"] and "sgemm" in r["reason"]


def test_crashing_kernel_is_rejected(library):
    r = blas.self_check(library, HERE_CORE, threads=1, fault="crash", time_it=False)
    assert not r["ok"]
    assert r["reason"] == "crashed with SIGABRT"


def test_bad_fault_and_threads_refused(library):
    with pytest.raises(ValueError, match="fault"):
        blas.self_check(library, fault="slow")
    with pytest.raises(ValueError, match="threads"):
        blas.self_check(library, threads=0)


def test_choose_never_picks_a_wrong_kernel(library, tmp_path):
    out = tmp_path / "blas.json"
    # "Prescott" (any x86-64 runs it) given a deliberately wrong kernel: it must lose even if it were fastest.
    d = blas.choose(library, candidates=[HERE_CORE, "Prescott"], threads=[1], faults={"Prescott": "perturb"},
                    output=str(out), environ={}, seconds_per_shape=0.01, rounds=1)
    assert d["ok"]
    assert d["coretype"] != "Prescott"
    rejected = [r for r in d["candidates"] if r["coretype"] == "Prescott"]
    assert len(rejected) == 1 and not rejected[0]["ok"]
    passed = [r for r in d["candidates"] if r["ok"]]
    assert [r["coretype"] for r in passed] == [HERE_CORE] and passed[0]["seconds"] > 0
    assert json.loads(out.read_text())["coretype"] == d["coretype"]
    assert d["threads"] == 1


def test_choose_fails_loudly_when_nothing_passes(library):
    with pytest.raises(RuntimeError, match="no BLAS candidate passed"):
        blas.choose(library, candidates=[HERE_CORE], threads=[1], faults={HERE_CORE: "crash"}, environ={}, rounds=1)


def test_preset_coretype_is_kept_but_warned_about(library, caplog):
    preset = {"OPENBLAS_CORETYPE": "Prescott"}
    with caplog.at_level(logging.WARNING, logger="dsd_caffe.blas"):
        d = blas.choose(library, threads=[1], faults={"Prescott": "perturb"}, environ=preset,
                        seconds_per_shape=0.01, rounds=1)
    assert d["coretype"] == "Prescott" and d["preset_coretype"] == "Prescott"
    assert not d["ok"]
    assert [r["coretype"] for r in d["candidates"]] == ["Prescott"]  # only the preset is tried
    assert "FAILS the BLAS self-check" in caplog.text


def test_runtime_env():
    decision = {"coretype": "Haswell", "threads": 2}
    assert blas.runtime_env(decision=decision, environ={}) == {"OPENBLAS_CORETYPE": "Haswell",
                                                                "OPENBLAS_NUM_THREADS": "2", **blas.OPENMP_WAIT}
    # the OpenMP wait policy is added unless one is set
    assert "OMP_WAIT_POLICY" not in blas.runtime_env(decision=decision, environ={"GOMP_SPINCOUNT": "0"})
    preset = {"OMP_WAIT_POLICY": "active"}
    # a preset core type or thread count is never overridden
    assert blas.runtime_env(decision=decision, environ={"OPENBLAS_CORETYPE": "Sandybridge", **preset}) == {
        "OPENBLAS_NUM_THREADS": "2"}
    assert blas.runtime_env(decision=decision, environ={"OMP_NUM_THREADS": "1", **preset}) == {
        "OPENBLAS_CORETYPE": "Haswell"}
    assert blas.runtime_env(decision=decision, environ={"OPENBLAS_NUM_THREADS": "1", **preset}) == {
        "OPENBLAS_CORETYPE": "Haswell"}
    # an explicit thread count is what the caller asks for; the library's own detection sets no core type
    assert blas.runtime_env(threads=3, decision={"coretype": None, "threads": 2}, environ=preset) == {
        "OPENBLAS_NUM_THREADS": "3"}
    assert blas.runtime_env(decision={}, environ=preset) == {}
    with pytest.raises(ValueError, match="threads"):
        blas.runtime_env(threads=0, decision={}, environ={})


def test_apply_adds_only_missing(monkeypatch, tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"coretype": "Haswell", "threads": 2}))
    monkeypatch.setattr(blas, "decision_path", lambda: str(path))
    env = {"OPENBLAS_CORETYPE": "Zen", "OPENBLAS_L2_SIZE": "1048576", "OMP_WAIT_POLICY": "active"}
    assert blas.apply(env) == {"OPENBLAS_NUM_THREADS": "2"}
    assert env == {"OPENBLAS_CORETYPE": "Zen", "OPENBLAS_L2_SIZE": "1048576", "OMP_WAIT_POLICY": "active",
                   "OPENBLAS_NUM_THREADS": "2"}


def test_coretype_candidates():
    assert blas.coretype_candidates([]) == [blas.DEFAULT]
    skx = ["avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl"]
    assert blas.coretype_candidates(skx, "GenuineIntel") == [blas.DEFAULT, "SkylakeX", "Haswell", "Sandybridge"]
    assert blas.coretype_candidates(skx + ["avx512_bf16"], "GenuineIntel")[1] == "Cooperlake"
    assert blas.coretype_candidates(["avx", "avx2", "fma"], "AuthenticAMD") == [blas.DEFAULT, "Zen", "Haswell",
                                                                              "Sandybridge"]
    assert blas.coretype_candidates(["sse4_2"]) == [blas.DEFAULT, "Nehalem"]


def test_cpu_info_reads_flags(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Xeon\nflags\t\t: sse avx2 fma\n\n"
                 "processor\t: 1\nflags\t\t: other\n")
    assert blas.cpu_info(str(f)) == {"vendor": "GenuineIntel", "model_name": "Xeon", "flags": ["avx2", "fma", "sse"]}
    assert blas.cpu_info(str(tmp_path / "missing"))["flags"] == []


def test_pick_prefers_default_and_fewer_threads_unless_clearly_faster():
    def r(core, threads, seconds):
        return {"coretype": core, "threads": threads, "seconds": seconds}

    D = blas.DEFAULT
    # a forced kernel must beat the library's own detection by more than 5%
    assert blas.pick([r(D, 1, 1.04), r("Haswell", 1, 1.0)])["coretype"] == D
    assert blas.pick([r(D, 1, 1.10), r("Haswell", 1, 1.0)])["coretype"] == "Haswell"
    # more threads must be more than 25% faster
    assert blas.pick([r(D, 1, 1.0), r(D, 2, 0.85)])["threads"] == 1
    assert blas.pick([r(D, 1, 1.0), r(D, 2, 0.55)])["threads"] == 2
    assert blas.pick([r("SkylakeX", 1, 2.0), r("SkylakeX", 2, 1.0), r(D, 2, 1.9)]) == r("SkylakeX", 2, 1.0)
    # threads first, then the kernel at that thread count (seen here: Haswell x2 fastest, yet 1 thread is chosen,
    # and at 1 thread Haswell is no faster than the library's own Zen)
    seen = [r(D, 1, 0.0121), r(D, 2, 0.0155), r("Haswell", 1, 0.0122), r("Haswell", 2, 0.0101)]
    assert blas.pick(seen) == r(D, 1, 0.0121)
    with pytest.raises(ValueError):
        blas.pick([])


def test_runtime_env_ignores_a_choice_made_on_another_cpu():
    here = blas.cpu_info()
    same = {"coretype": "Haswell", "threads": 2, "cpu": {"vendor": here["vendor"], "model_name": here["model_name"]}}
    preset = {"OMP_WAIT_POLICY": "active"}
    assert blas.runtime_env(decision=same, environ=preset) == {"OPENBLAS_CORETYPE": "Haswell",
                                                               "OPENBLAS_NUM_THREADS": "2"}
    other = dict(same, cpu={"vendor": "GenuineIntel", "model_name": "Some other CPU"})
    assert blas.runtime_env(decision=other, environ=preset) == {}
