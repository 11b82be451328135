"""The fastest correct BLAS set-up for Caffe's OpenBLAS, chosen once at set-up and applied wherever Caffe runs.

OpenBLAS reads ``OPENBLAS_CORETYPE`` (which kernel set to use) and ``OPENBLAS_NUM_THREADS`` when the library loads,
so every candidate is tried in a child process with the variable set. A candidate is kept only after a correctness
self-check of SGEMM (odd sizes, both transposes, alpha/beta) and SGEMV against a float64 numpy reference, through
the very ``libopenblas.so.0`` that pycaffe's ``_caffe.so`` resolves; the passing candidates are then timed on
SqueezeNet's convolution GEMM shapes and the fastest wins. The decision and its numbers are written to
``<caffe prefix>/dsd-caffe-blas.json``; :func:`runtime_env` turns it into the environment variables that the
``caffe`` wrapper and :func:`dsd_caffe.caffe_env.import_caffe` set before Caffe loads. A value the user already set
(``OPENBLAS_CORETYPE``, ``OPENBLAS_NUM_THREADS``) is always kept; ``OPENBLAS_L2_SIZE`` is never touched.

Command line: ``python -m dsd_caffe.blas [--output PATH] [--threads N ...] [--candidates A,B]`` chooses and prints.
"""
import argparse
import ctypes
import ctypes.util
import importlib.util
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

from . import checks, cli, fileio
from .errors import InputMissing

log = logging.getLogger(__name__)

DECISION_FILE = "dsd-caffe-blas.json"
TOLERANCE = 1e-5  # max |C - C_ref| / (|alpha| |A||B| + |beta||C0|), elementwise; float32 SGEMM gives ~1e-7
DEFAULT = "default"  # the candidate that leaves OPENBLAS_CORETYPE unset (OpenBLAS's own CPU detection)
PREFER_DEFAULT_WITHIN = 0.05  # keep the library's own detection unless a forced core type is >5% faster
PREFER_FEWER_THREADS_WITHIN = 0.25  # more threads must be >25% faster: busy-waiting OpenBLAS threads collapse
#                                      when the cores are shared (seen here: 2 threads at 1-7 GFLOPS under load)
FAULTS = ("perturb", "crash")
# Caffe's OpenMP layers (patches/*-perf-*): idle OpenMP threads sleep at once instead of spinning (GCC's default
# spins ~16 ms here after every parallel loop, taking the core from OpenBLAS's threads: a small-net training step
# took 0.23 s instead of 0.013 s). Read when libgomp loads, so it is set with the BLAS variables.
OPENMP_WAIT = {"OMP_WAIT_POLICY": "passive"}

# (m, n, k, transA, transB, alpha, beta): odd and tiny sizes, both transposes, beta != 0, a GEMV-like shape.
CHECK_SHAPES = [
    (1, 1, 1, False, False, 1.0, 0.0),
    (7, 13, 5, False, False, 1.0, 0.0),
    (33, 17, 65, True, False, 1.0, 0.0),
    (31, 67, 129, False, True, 0.5, 0.0),
    (63, 129, 255, True, True, 1.0, 1.0),
    (96, 1201, 147, False, False, 1.0, 0.0),
    (257, 49, 577, False, True, -1.5, 0.25),
    (1000, 1, 512, False, False, 1.0, 0.0),
    (3, 2049, 4608, True, False, 1.0, 0.0),
]
# Caffe's per-image convolution GEMMs in SqueezeNet v1.0 (M=num_output, N=out H*W, K=in_channels*kh*kw):
# forward W @ col, backward-weights dY @ col^T, backward-data W^T @ dY.
TIME_SHAPES = [
    (96, 12321, 147, False, False),  # conv1 forward
    (64, 3025, 144, False, False),  # fire2 expand3x3 forward
    (16, 3025, 128, False, False),  # fire3 squeeze
    (256, 169, 576, False, False),  # fire9 expand3x3
    (1000, 225, 512, False, False),  # conv_final (pad 1)
    (64, 144, 3025, False, True),  # fire2 expand3x3 backward (weights)
    (144, 3025, 64, True, False),  # fire2 expand3x3 backward (data)
]


# ---------------------------------------------------------------------------------------------- the CPU
def cpu_info(path="/proc/cpuinfo"):
    """``{"vendor", "model_name", "flags"}`` of the first processor in ``path`` (flags as a sorted list)."""
    info = {"vendor": "", "model_name": "", "flags": []}
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return info
    for key, field in (("vendor_id", "vendor"), ("model name", "model_name"), ("flags", "flags")):
        m = re.search(rf"^{key}\s*:\s*(.*)$", text, re.M)
        if m:
            info[field] = sorted(m.group(1).split()) if field == "flags" else m.group(1).strip()
    return info


def coretype_candidates(flags, vendor=""):
    """OpenBLAS core types worth trying on a CPU with these ``/proc/cpuinfo`` flags, best first; the library's
    own detection (:data:`DEFAULT`) always comes first."""
    flags = set(flags)
    amd = "AMD" in vendor.upper()
    out = [DEFAULT]
    if {"avx512f", "avx512bw", "avx512vl"} <= flags:
        out += ["Cooperlake"] if "avx512_bf16" in flags else []
        out += ["SkylakeX"]
    if {"avx2", "fma"} <= flags:
        out += ["Zen", "Haswell"] if amd else ["Haswell"]
    if "avx" in flags:
        out.append("Sandybridge")
    elif "sse4_2" in flags:
        out.append("Nehalem")
    return out


# ---------------------------------------------------------------------------------------------- the library
def _caffe_extension():
    spec = importlib.util.find_spec("caffe")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, "_caffe.so")
        if os.path.exists(path):
            return path
    return None


def _ldd(path):
    try:
        out = subprocess.run(["ldd", path], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    libs = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\S+)\s+=>\s+(/\S+)", line)
        if m:
            libs[m.group(1)] = m.group(2)
    return libs


def caffe_blas_library():
    """Absolute path of the BLAS library (``libopenblas.so.0`` or ``libblas.so.3``) that pycaffe's ``_caffe.so``
    resolves, found with ``ldd`` without importing Caffe; else the system's OpenBLAS. FileNotFoundError if none."""
    ext = _caffe_extension()
    if ext:
        libs = _ldd(ext)
        for prefix in ("libopenblas", "libmkl_rt", "libblas.so"):
            for name, path in libs.items():
                if name.startswith(prefix):
                    return os.path.realpath(path)
    found = ctypes.util.find_library("openblas")
    if found:
        return found
    raise InputMissing("no BLAS library found: pycaffe's _caffe.so is not importable and no libopenblas")


def corename(library):
    """The kernel set OpenBLAS picked in THIS process (``openblas_get_corename``), or None if not OpenBLAS."""
    lib = ctypes.CDLL(library)
    if not hasattr(lib, "openblas_get_corename"):
        return None
    lib.openblas_get_corename.restype = ctypes.c_char_p
    return lib.openblas_get_corename().decode()


def library_config(library):
    """``{"corename", "config", "threads"}`` of an OpenBLAS library as loaded in this process ({} otherwise)."""
    lib = ctypes.CDLL(library)
    if not hasattr(lib, "openblas_get_config"):
        return {}
    lib.openblas_get_config.restype = ctypes.c_char_p
    lib.openblas_get_corename.restype = ctypes.c_char_p
    return {"corename": lib.openblas_get_corename().decode(), "config": lib.openblas_get_config().decode(),
            "threads": lib.openblas_get_num_threads()}


# ---------------------------------------------------------------------------------------------- the child
def _symbol_prefix(lib):
    """"" for a plain CBLAS; "scipy_" for PyPI's scipy-openblas32 (a newer OpenBLAS with prefixed symbols)."""
    for pre in ("", "scipy_"):
        if hasattr(lib, pre + "cblas_sgemm"):
            return pre
    raise OSError("the library exports no cblas_sgemm")


def _child(args):
    """Runs in a subprocess whose environment holds the candidate's OPENBLAS_* variables: load, check, time."""
    import numpy as np  # deferred: only the self-check child needs it, after its OPENBLAS_* are set

    lib = ctypes.CDLL(args["library"])
    fp = ctypes.POINTER(ctypes.c_float)
    pre = _symbol_prefix(lib)
    cblas_sgemm, cblas_sgemv = getattr(lib, pre + "cblas_sgemm"), getattr(lib, pre + "cblas_sgemv")
    name = None
    if hasattr(lib, pre + "openblas_get_corename"):
        getattr(lib, pre + "openblas_get_corename").restype = ctypes.c_char_p
        name = getattr(lib, pre + "openblas_get_corename")().decode()
    fault = args.get("fault")
    if fault == "crash":
        os.abort()

    def sgemm(a, b, ta, tb, alpha, beta, c):
        m, k = (a.shape[1], a.shape[0]) if ta else a.shape
        n = b.shape[0] if tb else b.shape[1]
        cblas_sgemm(101, 112 if ta else 111, 112 if tb else 111, m, n, k, ctypes.c_float(alpha),
                        a.ctypes.data_as(fp), a.shape[1], b.ctypes.data_as(fp), b.shape[1], ctypes.c_float(beta),
                        c.ctypes.data_as(fp), n)
        if fault == "perturb":  # a subtly wrong kernel: one element off by 1e-4 relative
            c.flat[c.size // 2] *= 1 + 1e-4
        return c

    def sgemv(a, x, y, alpha, beta):
        cblas_sgemv(101, 111, a.shape[0], a.shape[1], ctypes.c_float(alpha), a.ctypes.data_as(fp), a.shape[1],
                        x.ctypes.data_as(fp), 1, ctypes.c_float(beta), y.ctypes.data_as(fp), 1)
        return y

    rng = np.random.default_rng(0)
    worst, worst_case = _check_kernels(sgemm, sgemv, rng)
    out = {"corename": name, "max_rel_error": worst, "worst_case": worst_case, "ok": worst <= args["tolerance"]}
    if out["ok"] and args.get("time"):
        out["seconds"], out["gflops_per_shape"] = _time_kernel(sgemm, rng, args.get("seconds_per_shape", 0.25))
    print(json.dumps(out))


def _check_kernels(sgemm, sgemv, rng):
    """(largest relative error against float64, the case it came from) over CHECK_SHAPES and a few SGEMVs."""
    import numpy as np  # deferred: only the self-check child needs it, after its OPENBLAS_* are set

    worst, worst_case = 0.0, None
    for m, n, k, ta, tb, alpha, beta in CHECK_SHAPES:
        a = rng.standard_normal((k, m) if ta else (m, k), dtype=np.float32)
        b = rng.standard_normal((n, k) if tb else (k, n), dtype=np.float32)
        c0 = rng.standard_normal((m, n), dtype=np.float32)
        a64, b64 = (a.T if ta else a).astype(np.float64), (b.T if tb else b).astype(np.float64)
        ref = alpha * (a64 @ b64) + beta * c0
        scale = abs(alpha) * (np.abs(a64) @ np.abs(b64)) + abs(beta) * np.abs(c0) + 1e-30
        c = sgemm(a, b, ta, tb, alpha, beta, c0.copy())
        err = float(np.max(np.abs(c - ref) / scale)) if np.all(np.isfinite(c)) else float("inf")
        if err > worst:
            worst, worst_case = err, f"sgemm m={m} n={n} k={k} transA={ta} transB={tb} alpha={alpha} beta={beta}"
    for m, n in ((1, 1), (33, 65), (1000, 512)):
        a = rng.standard_normal((m, n), dtype=np.float32)
        x = rng.standard_normal(n, dtype=np.float32)
        y0 = rng.standard_normal(m, dtype=np.float32)
        ref = 2.0 * (a.astype(np.float64) @ x) + 0.5 * y0
        scale = 2.0 * (np.abs(a.astype(np.float64)) @ np.abs(x)) + 0.5 * np.abs(y0) + 1e-30
        y = sgemv(a, x, y0.copy(), 2.0, 0.5)
        err = float(np.max(np.abs(y - ref) / scale)) if np.all(np.isfinite(y)) else float("inf")
        if err > worst:
            worst, worst_case = err, f"sgemv m={m} n={n}"
    return worst, worst_case


def _time_kernel(sgemm, rng, seconds_per_shape):
    """(total of the best SGEMM time per TIME_SHAPES shape, GFLOPS per shape)."""
    import numpy as np  # deferred: only the self-check child needs it, after its OPENBLAS_* are set

    total, per = 0.0, []
    for m, n, k, ta, tb in TIME_SHAPES:
        a = rng.standard_normal((k, m) if ta else (m, k), dtype=np.float32)
        b = rng.standard_normal((n, k) if tb else (k, n), dtype=np.float32)
        c = np.zeros((m, n), np.float32)
        sgemm(a, b, ta, tb, 1.0, 0.0, c)
        best, start = float("inf"), time.perf_counter()
        while time.perf_counter() - start < seconds_per_shape:
            t = time.perf_counter()
            sgemm(a, b, ta, tb, 1.0, 0.0, c)
            best = min(best, time.perf_counter() - t)
        per.append(round(2 * m * n * k / best / 1e9, 2))
        total += best
    return total, per


# ---------------------------------------------------------------------------------------------- the parent
def _child_env(coretype, threads, environ=None):
    env = dict(os.environ if environ is None else environ)
    if coretype == DEFAULT:
        env.pop("OPENBLAS_CORETYPE", None)
    elif coretype is not None:
        env["OPENBLAS_CORETYPE"] = coretype
    env["OPENBLAS_NUM_THREADS"] = str(threads)
    env.pop("OPENBLAS_VERBOSE", None)
    return env


def self_check(library, coretype=DEFAULT, threads=1, fault=None, time_it=True, tolerance=TOLERANCE,
               seconds_per_shape=0.25, timeout=300):
    """Check (and time) ``library`` with ``OPENBLAS_CORETYPE=coretype`` (:data:`DEFAULT`: unset) in a subprocess.

    ``fault`` injects a deliberately wrong kernel ("perturb": SGEMM results off by 1e-4 relative; "crash": the
    process dies) to show that such a candidate is rejected. Returns a dict with ``ok``, ``reason`` (when not ok),
    ``corename``, ``max_rel_error`` and, when timed, ``seconds`` (sum of best times over :data:`TIME_SHAPES`).
    """
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"fault must be one of {FAULTS} or None, got {fault!r}")
    checks.count(threads, "threads")
    args = {"library": library, "fault": fault, "time": time_it, "tolerance": tolerance,
            "seconds_per_shape": seconds_per_shape}
    result = {"coretype": coretype, "threads": threads, "ok": False}
    try:
        proc = subprocess.run([sys.executable, "-m", "dsd_caffe.blas", "--child", json.dumps(args)],
                              env=_child_env(coretype, threads), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        result["reason"] = f"timed out after {timeout} s"
        return result
    if proc.returncode != 0:
        if proc.returncode < 0:
            try:
                sig = signal.Signals(-proc.returncode).name
            except ValueError:
                sig = str(-proc.returncode)
            result["reason"] = f"crashed with {sig}"
        else:
            result["reason"] = f"exited with status {proc.returncode}: {proc.stderr.strip()[-300:]}"
        return result
    try:
        result.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        result["reason"] = f"unreadable self-check output: {proc.stdout[-300:]!r}"
        return result
    if not result["ok"]:
        result["reason"] = (f"wrong results: max relative error {result['max_rel_error']:.2e} > {tolerance:.0e} "
                            f"({result['worst_case']})")
    return result


def pick(passed, preset=None):
    """The winner among passed self-check results (dicts with coretype, threads, seconds): the fastest, except
    that the library's own detection (:data:`DEFAULT`) is kept when within 5% (then no variable is set and numpy's
    newer OpenBLAS, which reads the same variable, keeps its own choice), and fewer threads are kept unless more
    are >25% faster. With a ``preset`` core type, only the thread count is chosen."""
    if not passed:
        raise ValueError("no passed candidates to pick from")
    overall = min(r["seconds"] for r in passed)
    counts = sorted({r["threads"] for r in passed})
    threads = next(n for n in counts if min(r["seconds"] for r in passed if r["threads"] == n)
                   <= overall * (1 + PREFER_FEWER_THREADS_WITHIN))
    at_n = [r for r in passed if r["threads"] == threads]
    best = min(at_n, key=lambda r: r["seconds"])
    default = [r for r in at_n if r["coretype"] == DEFAULT]
    if not preset and default and default[0]["seconds"] <= best["seconds"] * (1 + PREFER_DEFAULT_WITHIN):
        best = default[0]
    return best


def cpu_count():
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def choose(library=None, candidates=None, threads=None, faults=None, output=None, environ=None,
           seconds_per_shape=0.15, rounds=2):
    """Self-check and time each candidate core type (x thread count); return the decision dict (and write it as
    JSON to ``output`` when given).

    ``candidates`` defaults to :func:`coretype_candidates` for this CPU, or to the preset ``OPENBLAS_CORETYPE``
    alone when the environment sets one (it is kept even if its check fails, with a warning). ``threads`` is a list
    of thread counts to try (default: 1 and all CPUs). ``faults`` maps a candidate to an injected fault (tests).
    Each candidate is timed ``rounds`` times, interleaved, and its best time counts.
    """
    for n in threads or ():
        checks.count(n, "threads")
    environ = os.environ if environ is None else environ
    library = library or caffe_blas_library()
    preset = environ.get("OPENBLAS_CORETYPE")
    cpu = cpu_info()
    if candidates is None:
        candidates = [preset] if preset else coretype_candidates(cpu["flags"], cpu["vendor"])
    if not candidates:
        raise ValueError("no BLAS candidates to try")
    if threads is None:
        threads = sorted({1, cpu_count()})
    faults = faults or {}
    unknown = set(faults) - set(candidates)
    if unknown:
        raise ValueError(f"faults name candidates that are not tried: {sorted(unknown)}")
    results = _rounds(library, candidates, threads, faults, seconds_per_shape, rounds)
    decision = _decide(library, cpu, preset, results)
    if output:
        fileio.write_json(output, decision)
    return decision


def _rounds(library, candidates, threads, faults, seconds_per_shape, rounds):
    """Every (core, threads) candidate's self-check result, its best time over ``rounds`` interleaved rounds (so
    that other load hits all alike)."""
    results = {}
    for _ in range(rounds):
        for core in candidates:
            for n in threads:
                if any(not r["ok"] for (c, _n), r in results.items() if c == core):
                    break  # a wrong kernel is wrong at any thread count
                if core != DEFAULT and results.get((DEFAULT, n), {}).get("corename") == core:
                    break  # forcing the kernel the library picks by itself changes nothing
                r = self_check(library, core, n, fault=faults.get(core), seconds_per_shape=seconds_per_shape)
                log.info("BLAS candidate %s x %d thread(s): %s", core, n,
                         f"{r['seconds']:.4f} s" if r["ok"] else f"rejected ({r['reason']})")
                prev = results.get((core, n))
                if prev is None or not r["ok"]:
                    results[(core, n)] = r
                else:
                    prev["seconds"] = min(prev["seconds"], r["seconds"])
                    prev["max_rel_error"] = max(prev["max_rel_error"], r["max_rel_error"])
    return list(results.values())


def _decide(library, cpu, preset, results):
    """The decision dict from the candidates' results: the fastest that passed (the preset core type if any)."""
    passed = [r for r in results if r["ok"]]
    decision = {"library": library, "cpu": {"vendor": cpu["vendor"], "model_name": cpu["model_name"]},
                "preset_coretype": preset, "tolerance": TOLERANCE, "candidates": results, "time_shapes": TIME_SHAPES}
    if preset:
        if not any(r["ok"] for r in results if r["coretype"] == preset):
            log.warning("OPENBLAS_CORETYPE=%s is set in the environment but FAILS the BLAS self-check (%s); "
                        "keeping it as asked", preset, results[0].get("reason"))
        pool = [r for r in passed if r["coretype"] == preset]
        decision.update(coretype=preset, ok=bool(pool))
    else:
        if not passed:
            raise RuntimeError(f"no BLAS candidate passed the self-check on {library}: " +
                               "; ".join(f"{r['coretype']}: {r['reason']}" for r in results))
        decision["ok"] = True
        pool = passed
    if pool:
        best = pick(pool, preset)
        if not preset:
            decision["coretype"] = None if best["coretype"] == DEFAULT else best["coretype"]
        decision.update(threads=best["threads"], corename=best.get("corename"), seconds=best["seconds"])
    else:
        decision["threads"] = None
    return decision


def decision_path():
    """``<caffe prefix>/dsd-caffe-blas.json`` (next to dsd-caffe-build.json), without importing Caffe (which reads
    this file as it imports: asking Caffe for its prefix here would recurse). ImportError without pycaffe."""
    ext = _caffe_extension()
    if ext is None:
        raise ImportError("pycaffe (caffe/_caffe.so) is not on this Python's path")
    pkg = os.path.dirname(os.path.realpath(ext))
    return os.path.abspath(os.path.join(pkg, "..", "..", "..", "..", DECISION_FILE))


def load_decision(path=None):
    """The recorded decision, or {} when none was made (or it is unreadable)."""
    try:
        path = path or decision_path()
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError, ImportError):
        return {}


def runtime_env(threads=None, decision=None, environ=None):
    """Environment variables to set before Caffe's BLAS loads: ``OPENBLAS_CORETYPE`` (only when the decision forces
    one and the environment does not already set it), ``OPENBLAS_NUM_THREADS`` (``threads`` if given, else the
    decision's, unless OPENBLAS_NUM_THREADS or OMP_NUM_THREADS is already set) and :data:`OPENMP_WAIT` (unless
    OMP_WAIT_POLICY or GOMP_SPINCOUNT is set). Existing values are never overridden (this returns only what to add).
    A decision made on another CPU (a cache moved between machines) is ignored."""
    environ = os.environ if environ is None else environ
    decision = load_decision() if decision is None else decision
    here = cpu_info()
    made_on = decision.get("cpu")
    if made_on and (made_on.get("vendor"), made_on.get("model_name")) != (here["vendor"], here["model_name"]):
        log.warning("the BLAS choice in %s was made on another CPU (%s, this is %s); ignoring it: run "
                    "`python -m dsd_caffe.blas` to choose again", decision_path(), made_on.get("model_name"),
                    here["model_name"])
        decision = {}
    env = {}
    core = decision.get("coretype")
    if core and "OPENBLAS_CORETYPE" not in environ:
        env["OPENBLAS_CORETYPE"] = core
    if threads is not None:
        checks.count(threads, "threads")
        env["OPENBLAS_NUM_THREADS"] = str(threads)
    elif decision.get("threads") and not ({"OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"} & set(environ)):
        env["OPENBLAS_NUM_THREADS"] = str(decision["threads"])
    if not ({"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(environ)):
        env.update(OPENMP_WAIT)
    return env


def apply(environ=None):
    """Add :func:`runtime_env` to ``environ`` (default os.environ); call before ``import caffe``. Returns what was
    added."""
    environ = os.environ if environ is None else environ
    env = runtime_env(environ=environ)
    environ.update(env)
    return env


def _run_choice(a):
    """The command's one call: choose (or, with the hidden ``--child``, check one candidate) and print."""
    if a.child:
        _child(json.loads(a.child))
        return
    cands = a.candidates.split(",") if a.candidates else None
    out = None if a.dry_run else (a.output or decision_path())
    d = choose(library=a.library, candidates=cands, threads=a.threads, output=out)
    print(f"{'candidate':14}{'threads':>8}{'kernel':>12}{'max rel err':>13}{'GEMM s':>9}  result")
    for r in d["candidates"]:
        t = f"{r['seconds']:9.4f}" if "seconds" in r else f"{'-':>9}"
        e = f"{r['max_rel_error']:13.1e}" if "max_rel_error" in r else f"{'-':>13}"
        print(f"{r['coretype']:14}{r['threads']:8}{str(r.get('corename')):>12}{e}{t}  "
              f"{'ok' if r['ok'] else r['reason']}")
    print(f"chosen: OPENBLAS_CORETYPE={d.get('coretype') or '(unset: ' + str(d.get('corename')) + ')'}, "
          f"threads={d.get('threads')}" + (f"; written to {out}" if out else ""))


def main(argv=None):
    p = cli.parser(__doc__.split("\n\n")[0], prog="python -m dsd_caffe.blas")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--library", help="BLAS library to check (default: the one pycaffe's _caffe.so resolves)")
    p.add_argument("--candidates", help="comma-separated OPENBLAS_CORETYPE values to try ('default' = unset)")
    p.add_argument("--threads", type=int, nargs="+", help="thread counts to try (default: 1 and all CPUs)")
    p.add_argument("--output", help=f"decision JSON (default: <caffe prefix>/{DECISION_FILE})")
    p.add_argument("--dry-run", action="store_true", help="print the decision, write nothing")
    cli.main(p, _run_choice, argv, log_format="%(message)s")


if __name__ == "__main__":
    main()
