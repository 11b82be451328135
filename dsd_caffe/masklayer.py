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
- Multi-GPU: Caffe's CLI refuses Python layers with several GPUs. Use pycaffe with NCCL as in Caffe's
  ``python/train.py`` (one process per GPU, ``caffe.NCCL``); every solver's net holds its own mask layer, and the
  masks are identical because they come from the same caffemodel. Not testable on this CPU-only machine.
"""
import logging

import numpy as np

from .errors import UserError
from .masks import packed_length, parse_param_str, unpack_mask

log = logging.getLogger(__name__)

def _caffe_layer_base():
    from .caffe_env import import_caffe

    return import_caffe().Layer


class MaskLayer(_caffe_layer_base()):
    """Blobs: the shared weights of each masked layer (in param_str order), then one packed mask per layer."""

    def setup(self, bottom, top):
        self.layers = parse_param_str(self.param_str)
        if len(bottom) != 0 or len(top) != 1:
            raise UserError(f"MaskLayer takes no bottom and one top (a zero loss), got {len(bottom)} bottoms "
                             f"and {len(top)} tops")
        for _, shape in self.layers:
            self.blobs.add_blob(*shape)
        for _, shape in self.layers:
            self.blobs.add_blob(packed_length(np.prod(shape)))
        self._packed = None
        self._keep = None

    def reshape(self, bottom, top):
        top[0].reshape(1)

    def _check(self):
        """Decode the masks when their blobs change (after loading weights or restoring a solverstate)."""
        n = len(self.layers)
        if len(self.blobs) != 2 * n:
            raise UserError(f"MaskLayer has {len(self.blobs)} blobs, expected {2 * n}")
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
        for i, keep in enumerate(self._keep):
            np.multiply(self.blobs[i].data, keep, out=self.blobs[i].data)  # 10x faster than copyto(where=)
        top[0].data[...] = 0.0

    def backward(self, top, propagate_down, bottom):
        self._check()
        for i, keep in enumerate(self._keep):
            np.multiply(self.blobs[i].diff, keep, out=self.blobs[i].diff)
