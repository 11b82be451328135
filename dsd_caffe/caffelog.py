"""Caffe's training log, read the way a person would: iteration, smoothed loss, learning rate, test outputs.

:class:`CaffeLog` parses ``caffe train``'s glog lines (the binary's stderr, or pycaffe's glog captured into the
log file) as they come; :class:`Progress` turns them into a tqdm bar (iteration, loss, last test accuracy, ETA)
and a log line per test, rounded to 4 digits; :func:`read_curve` reads a finished log back for the accuracy plots.
Gradual pruning's mask layer prints one line per pruning step (``dsd_masks: pruning step j/n at iteration t: target
density d ...``): the bar shows the current target density, each step is logged, and :func:`read_density_curve`
reads them back.
"""
import logging
import math
import os
import re

from tqdm import tqdm

log = logging.getLogger(__name__)


class CaffeLog:
    """What Caffe's training log says so far: iteration, smoothed loss, learning rate, last test outputs."""

    _ITER = re.compile(r"Iteration (\d+)")
    _LOSS = re.compile(r"Iteration (\d+)(?: \(.*\))?, loss = (\S+)")
    _TEST = re.compile(r"Iteration (\d+), Testing net")
    _OUT = re.compile(r"Test net output #\d+: (\S+) = (\S+)")
    _LR = re.compile(r"Iteration (\d+), lr = (\S+)")
    _PRUNE = re.compile(r"dsd_masks: pruning step (\d+)/(\d+) at iteration (\d+): target density (\S+)")

    def __init__(self):
        self.iteration, self.loss, self.loss_iteration, self.lr = 0, None, None, None
        self.tests = {}  # {output: value} of the last test
        self.curve = []  # [(iteration, {output: value})]
        self.failure = []  # Caffe's error lines, "Check failed" first
        self.density = None  # the last pruning step's (step, steps, iteration, target density), gradual pruning
        self._in_test, self._pending = False, None

    def feed(self, line):
        """Read one line (``""`` at the end of the log). Returns a finished test, (iteration, {output: value},
        training loss at that iteration or None), once its outputs are complete and the smoothed loss Caffe shows
        at that iteration (printed after the test) has been read; else None."""
        out = self._OUT.search(line)
        if self._in_test and not out:
            self._pending = self.curve[-1]
        self._in_test = bool(out)
        if "Check failed" in line or line.startswith("F") or " Error" in line or "error:" in line:
            text = line.split("] ", 1)[-1].strip()
            self.failure.insert(0, text) if "Check failed" in line else self.failure.append(text)
        m = self._LOSS.search(line)
        if m:
            self.loss, self.loss_iteration = _number(m.group(2)), int(m.group(1))
        m = self._LR.search(line)
        if m:
            self.lr = _number(m.group(2))
        m = self._PRUNE.search(line)
        if m:
            self.density = (int(m.group(1)), int(m.group(2)), int(m.group(3)), _number(m.group(4)))
        started = self._TEST.search(line)
        if started:
            self.curve.append((int(started.group(1)), {}))
        if out and self.curve:
            self.curve[-1][1][out.group(1)] = _number(out.group(2))
            self.tests = self.curve[-1][1]
        m = self._ITER.search(line)
        if m:
            self.iteration = max(self.iteration, int(m.group(1)))
        return self._finished(line, started)

    def _finished(self, line, started):
        if self._pending is None:
            return None
        it, outputs = self._pending
        later = self.loss_iteration is not None and self.loss_iteration >= it
        if later or started or not line:
            self._pending = None
            return it, outputs, self.loss if self.loss_iteration == it else None
        return None

    def accuracy(self):
        """(name, value) of the top-1 accuracy among the last test's outputs, or None."""
        return top1(self.tests)

    def diverged(self):
        """Why the training diverged so far (the last training loss or a last test output that is not finite),
        or None."""
        values = [("the training loss", self.loss)] + [(f"the test output {k}", v) for k, v in self.tests.items()]
        return next((f"{name} became {v}" for name, v in values if v is not None and not math.isfinite(v)), None)


def _number(text):
    try:
        return float(text)
    except ValueError:
        return None


def top1(outputs):
    """(name, value) of the top-1 accuracy among net outputs (``accuracy``, ``accuracy_top1``, ``top-1``...)."""
    keys = [k for k in outputs if "acc" in k.lower() or "top" in k.lower()]
    keys.sort(key=lambda k: (not ("1" in k or k.lower() == "accuracy"), k))
    return (keys[0], outputs[keys[0]]) if keys else None


def read_curve(log_path, key=None):
    """[(iteration, value)] of the tests in a Caffe training log (resumed runs appended: the last value per
    iteration wins); ``key`` is the output to read (default: the top-1 accuracy)."""
    if not os.path.exists(log_path):
        return []
    parsed = CaffeLog()
    with open(log_path, errors="replace") as f:
        for line in f:
            parsed.feed(line)
    points = {}
    for it, outputs in parsed.curve:
        pick = (key, outputs.get(key)) if key else top1(outputs)
        if pick and pick[1] is not None:
            points[it] = pick[1]
    return sorted(points.items())


def read_density_curve(log_path):
    """[[iteration, target density]] of the pruning steps in a training log (gradual pruning; resumed runs
    appended: the last line per iteration wins); [] when there are none."""
    if not os.path.exists(log_path):
        return []
    points = {}
    with open(log_path, errors="replace") as f:
        for line in f:
            m = CaffeLog._PRUNE.search(line)
            if m:
                points[int(m.group(3))] = _number(m.group(4))
    return [[it, d] for it, d in sorted(points.items())]


class Progress:
    """The tqdm bar of one training run, fed by CaffeLog; test results are logged too (bars are off without a
    terminal)."""

    def __init__(self, desc, total, start):
        self.desc, self.total = desc, total
        self.bar = tqdm(total=total, initial=start, desc=desc, unit="it", disable=None, dynamic_ncols=True)
        self.caffe = CaffeLog()

    def feed(self, line):
        """Read one line of Caffe's log (``""`` at its end): move the bar, and log each finished test."""
        step = self.caffe.density
        done = self.caffe.feed(line)
        c = self.caffe
        if c.density is not None and c.density is not step:
            j, n, it, d = c.density
            log.info("%s: iteration %d/%d: pruning step %d/%d, target density %.4f", self.desc, it, self.total, j, n,
                     d)
        if c.iteration > self.bar.n:
            self.bar.update(min(c.iteration, self.total) - self.bar.n)
        acc = c.accuracy()
        post = [f"loss {c.loss:.4g}" if c.loss is not None else "", f"lr {c.lr:.3g}" if c.lr is not None else "",
                f"{acc[0]} {acc[1]:.4f}" if acc else "",
                f"density {c.density[3]:.4f}" if c.density is not None else ""]
        self.bar.set_postfix_str(", ".join(p for p in post if p), refresh=False)
        if done is not None:
            it, outputs, loss = done
            outs = ", ".join(f"{k} {v:.4f}" for k, v in outputs.items() if v is not None)
            loss = f", training loss {loss:.4f}" if loss is not None else ""
            log.info("%s: iteration %d/%d%s; test: %s", self.desc, it, self.total, loss, outs)

    def close(self):
        self.bar.close()
