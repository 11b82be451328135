"""The mask layer: a Caffe Python layer that keeps pruned weights at exactly 0.0 while Caffe trains.

This module holds only the layer; its mask codec (how masks are stored in blobs) and putting it into nets and
caffemodels are :mod:`dsd_caffe.masks`, which imports no Caffe layer code (this module builds its class on
``caffe.Layer``, so importing it imports Caffe).

How it works (under the ``caffe train`` binary and under pycaffe's Solver alike):

- The generated sparse trainval holds one ``MaskLayer`` right after the data layer(s). Its ``param { name: ... }``
  entries share each masked layer's weight blob by name (the conv/fc gets the same param name). Its own mask blobs
  follow, with ``lr_mult: 0`` and ``decay_mult: 0``, so the masks are saved in every snapshot caffemodel and a resume
  restores them with no extra file.
- Forward multiplies the shared weights by the 0/1 masks (before any conv runs); backward multiplies their diffs.
  Backward runs last, after every conv has accumulated its weight diff (also with ``iter_size`` > 1). Caffe's
  SGD update then adds ``decay * w = 0`` (weight decay), keeps the momentum history at 0 for pruned positions (it
  starts at 0), and subtracts 0: pruned weights stay exactly 0.0 in every forward pass and every snapshot.
- The mask layer covers every weighted layer of the net (a layer kept dense gets an all-ones mask), so a net has
  one sparse form and a generated ``sparse_trainval.prototxt`` fits any pruned caffemodel of that net.
- The layer has no bottom and one top, a constant 0 with ``loss_weight: 1``. A Python layer with no top is never
  backpropagated (Caffe decides it does not contribute to the loss), and an in-place layer on the data blob would
  make the first conv compute a gradient for the images (~10% extra time on SqueezeNet). The zero loss costs
  nothing and shows as ``dsd_mask_loss = 0`` in Caffe's training log. The layer is in the TRAIN phase only; the
  TEST net shares the (already zero) weights.
- The masks are stored compactly: 16 mask bits per float32 (exact integers), after one header float (1.0 once
  masks are set). So a mask adds 1/16 of its weights' size. Caffe also writes a shared blob under every layer that
  uses it, so the masked weights appear twice in a sparse-phase caffemodel (measured: see ``mask_overhead``).
- Gradual pruning (:mod:`dsd_caffe.gradual`, when the param_str holds a schedule): at the scheduled iterations the
  layer recomputes its masks from the current weights with ``pruning.shrink_mask`` (the exact-k rule and tie-break
  of one-shot pruning, among the weights still kept: masks only shrink), writes them into its mask blobs, zeroes
  the newly pruned weights and prints one line (``dsd_masks: pruning step j/n at iteration t: target density
  ...``) that the progress bar and the log show. Its position in the schedule is one more blob (``lr_mult: 0``),
  saved in every snapshot with the masks, so a resume from a ``.solverstate`` continues where it was.
- Which iteration? A Python layer sees forward and backward calls, not the solver's iteration, and a solver
  iteration runs ``iter_size`` forward/backward passes (test nets never hold this TRAIN-only layer, but pycaffe
  code or Caffe's final display pass may run an extra forward). The rule: Caffe's ``Solver::Step`` calls
  ``Net::ClearParamDiffs`` at the start of every iteration, which zeroes the diff of every learnable blob, the
  state blob's included. So a forward that finds the state's diff at 0 is the first pass of an iteration; it sets
  the diff to a marker (1e-30: ``lr_mult: 0`` makes its update zero, and its square, 1e-60, is nothing in a
  clipped gradient's norm) so the iteration's other passes see it. The iteration's number is the count stored in
  the state blob, and the first backward after that forward adds 1 to the count. A forward with no backward (a
  display or test pass) therefore never advances the count, and a step already taken is never taken again (the
  state stores the steps taken). A snapshot after iteration N (Caffe snapshots after the update) holds count N,
  which is the solver's own ``iter`` in the ``.solverstate`` beside it.
- Momentum: Caffe's solver keeps a momentum history for a weight pruned during the phase, which no layer can
  reach. Every forward zeroes the weight again, so the net computes with exact zeros; a snapshot, taken after the
  update, holds the residual ``-history`` until it decays, and so does the TEST net in the tests Caffe runs during
  the phase (at the start of an iteration, before this layer's forward: the validation curve of a gradual sparse
  phase is measured with that small residual under the masks). ``masks.zero_pruned`` writes the phase's final model
  with exact zeros (see ``phases.train_sparse``). One-shot pruning has no such residual: its pruned weights' history
  starts and stays at 0.
- Multi-GPU: Caffe's CLI refuses Python layers with several GPUs, so a phase given several devices trains in
  :mod:`dsd_caffe.multigpu` (pycaffe with NCCL as in Caffe's ``python/train.py``, one process per GPU). Every rank's
  net holds its own mask layer with the same masks (the same caffemodel; gradual pruning computes them from the same
  weights), and ``multigpu.sync_diffs`` brings the diffs this layer masked on the host to the GPU before NCCL's
  allreduce (the module's docstring gives the whole argument). Tested: without a GPU, tests/test_multigpu.py (a
  stand-in for pycaffe: the calls each rank makes and their order, the chunk protocol, stop and failure); this layer
  on one real GPU, ``bench/gpu_check.sh`` (step 6). Not tested: a run on several real GPUs (NCCL's allreduce of
  the masked diffs), for want of a machine with two.
"""
import logging
import os

import numpy as np

from .caffe_env import import_caffe
from .errors import UserError
from .masks import (STATE_LENGTH, pack_mask, pack_state, packed_length, parse_gradual, parse_param_str, unpack_mask,
                    unpack_state)
from .pruning import kept_count, shrink_mask

#: what the first forward pass of an iteration writes into the state blob's diff (see the module docstring)
MARK = 1e-30

log = logging.getLogger(__name__)


class MaskLayer(import_caffe().Layer):
    """Blobs: the shared weights of each masked layer (in param_str order), then one packed mask per layer, then
    (gradual pruning only) the state."""

    def setup(self, bottom, top):
        self.layers = parse_param_str(self.param_str)
        if len(bottom) != 0 or len(top) != 1:
            raise UserError(f"MaskLayer takes no bottom and one top (a zero loss), got {len(bottom)} bottoms "
                             f"and {len(top)} tops")
        for _, shape in self.layers:
            self.blobs.add_blob(*shape)
        for _, shape in self.layers:
            self.blobs.add_blob(packed_length(np.prod(shape)))
        gradual = parse_gradual(self.param_str)
        self.plan, self.finals = gradual if gradual is not None else (None, None)
        if self.plan is not None:
            self.blobs.add_blob(STATE_LENGTH)
        self._packed = None
        self._keep = None
        self._pending = None  # the iteration whose first forward ran and whose first backward has not

    def reshape(self, bottom, top):
        top[0].reshape(1)

    def _check(self):
        """Decode the masks when their blobs change (after loading weights or restoring a solverstate)."""
        n = len(self.layers)
        if len(self.blobs) != 2 * n + (self.plan is not None):
            raise UserError(f"MaskLayer has {len(self.blobs)} blobs, expected {2 * n + (self.plan is not None)}")
        if self._packed is not None and all(np.array_equal(p, self.blobs[n + i].data)
                                            for i, p in enumerate(self._packed)):
            return
        packed, keep = [], []
        for i, (name, shape) in enumerate(self.layers):
            if tuple(self.blobs[i].data.shape) != shape:
                raise UserError(f"MaskLayer: weights of {name} have shape {self.blobs[i].data.shape}, "
                                 f"param_str says {shape}")
            data = np.array(self.blobs[n + i].data, copy=True)
            keep.append(unpack_mask(data, shape, what=f"mask of layer {name}").astype(np.float32))
            packed.append(data)
        self._packed, self._keep = packed, keep
        log.debug("MaskLayer: masks decoded for %s", [name for name, _ in self.layers])

    def forward(self, bottom, top):
        self._check()
        if self.plan is not None:
            self._schedule()
        for i, keep in enumerate(self._keep):
            np.multiply(self.blobs[i].data, keep, out=self.blobs[i].data)  # 10x faster than copyto(where=)
        top[0].data[...] = 0.0

    def backward(self, top, propagate_down, bottom):
        self._check()
        for i, keep in enumerate(self._keep):
            np.multiply(self.blobs[i].diff, keep, out=self.blobs[i].diff)
        if self._pending is not None:  # the iteration's first backward: it is under way, count it
            state = self.blobs[2 * len(self.layers)]
            state.data[...] = pack_state(self._pending + 1, unpack_state(state.data)[1])
            self._pending = None

    def _schedule(self):
        """Gradual pruning: on an iteration's first forward pass, take the step due (see the module docstring)."""
        state = self.blobs[2 * len(self.layers)]
        if state.diff[0] != 0:
            return  # a later pass of the same iteration
        state.diff[0] = MARK
        iteration, done = unpack_state(state.data, "MaskLayer state")
        self._pending = iteration
        j = self.plan.due(iteration)
        if j is None or j < done:
            return
        self._prune(j, iteration)
        state.data[...] = pack_state(iteration, j + 1)

    def _prune(self, j, iteration):
        """Step ``j``: every pruned layer shrinks its mask to the schedule's density from the current weights."""
        n, kept, total, target = len(self.layers), 0, 0, 0
        for i, (name, shape) in enumerate(self.layers):
            size = int(np.prod(shape))
            density = self.plan.density(j, self.finals[name])
            keep = self._keep[i].astype(bool)
            if density < 1.0:
                keep = shrink_mask(self.blobs[i].data, keep, density, name=name)
                packed = pack_mask(keep)
                self.blobs[n + i].data[...] = packed
                self._packed[i], self._keep[i] = packed, keep.astype(np.float32)
            kept += int(np.count_nonzero(keep))
            target += kept_count(size, density)
            total += size
        line = (f"dsd_masks: pruning step {j}/{self.plan.steps} at iteration {iteration}: target density "
                f"{target / total:.6f} ({kept} of {total} weights kept)\n")
        os.write(2, line.encode())  # fd 2: Caffe's log under both engines (pycaffe's glog capture redirects it)
