"""Kill a tool at a chosen rename, deterministically: a kill point inside a write, whatever the machine's speed.

As a script, ``python paused_tool.py MARKER K TOOL ARGS...`` runs ``TOOL`` (a script path) with ``ARGS``; just
before the run's K-th ``os.replace`` (every finished write ends in one: see ``fileio.atomic_path``) it creates
``MARKER`` and waits to be killed. :func:`kill_at` runs it, waits for the marker and SIGKILLs the process group.
"""
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")


def kill_at(k, name, *args, timeout=300):
    """Run ``tools/<name>.py args`` and SIGKILL it before its ``k``-th rename: True when killed there, False when
    the run finished first (it has fewer renames; it must then have succeeded)."""
    with tempfile.TemporaryDirectory() as tmp:
        marker = os.path.join(tmp, "paused")
        cmd = [sys.executable, os.path.abspath(__file__), marker, str(k), os.path.join(TOOLS, f"{name}.py"),
               *map(str, args)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            t0 = time.monotonic()
            while not os.path.exists(marker):
                if proc.poll() is not None:
                    assert proc.returncode == 0, proc.stderr.read()[-2000:]
                    return False
                assert time.monotonic() - t0 < timeout, f"{name} reached neither rename {k} nor its end"
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stderr.close()
        return True


def _main():
    marker, k, tool = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    real, calls = os.replace, [0]

    def replace(src, dst, *a, **kw):
        calls[0] += 1
        if calls[0] == k:
            open(marker, "w").close()
            while True:
                time.sleep(60)
        return real(src, dst, *a, **kw)

    os.replace = replace
    sys.argv = [tool, *sys.argv[4:]]
    sys.path[0] = os.path.dirname(tool)  # as when the tool runs itself
    runpy.run_path(tool, run_name="__main__")


if __name__ == "__main__":
    _main()
