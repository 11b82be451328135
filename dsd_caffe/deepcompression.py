"""Deep Compression's ``.net`` format: decode it into a caffemodel, encode sparse models into it, and an
entropy-coded (Huffman) variant of our own. (One module past 400 lines: the two byte layouts share their codebook,
gap and layer code, and each is documented next to the code that reads and writes it.)

Weighted layers are chosen by layer *type* (``Convolution``: 8-bit codes, ``InnerProduct``: 4-bit codes), in net
order; their blob shapes come from the prototxt, built with pycaffe (a trainval is first turned into its deploy
form).

The ``.net`` format (Deep Compression, as read by the SqueezeNet-Deep-Compression decoder), little-endian:

* header: ``uint32 entries[L]``, the number of stored entries of each weighted layer;
* then per layer: ``float32 codebook[2**bits]`` (``codebook[0] == 0.0``), ``float32 bias[num_output]``, the code
  stream (one byte per entry at 8 bits; two 4-bit codes per byte, low nibble first, at 4 bits;
  ``(n-1)//(8//bits)+1`` bytes) and the index stream (4-bit gaps, low nibble first, ``(n-1)//2+1`` bytes).
* Entry ``k`` lands at flat position ``cumsum(gap+1)-1`` and takes ``codebook[code]``; a gap of 16 or more zeros is
  bridged by *filler* entries (code 0, gap 15). The file is consumed exactly.

The Huffman variant (ours; Deep Compression's third stage), version 1, little-endian::

    magic   b"DSDH"   version uint8 (=1)   layer count uint16
    per layer:
      name      uint8 length + UTF-8 bytes (checked against the prototxt)
      bits      uint8 (1..8: the codebook holds at most 2**bits - 1 non-zero values)
      mode      uint8: 0 = the gap symbols count zeros before each non-zero weight,
                       1 = they count non-zeros before each zero weight (for layers denser than 1/2)
      size      uint32 (weights in the blob), nonzero uint32, gap symbols uint32
      escape    uint8 E: gap symbol E means "E positions skipped, no entry" (like a filler, without a code)
      K         uint16, then the codebook: K non-zero float32 values, ascending, each mapped to the integer
                that orders like it (bits b -> b if the sign bit is clear, else -(b & 0x7fffffff)); the first
                integer and then the K-1 positive differences are written as LEB128 varints (the first
                zigzag-coded)
      nbias     uint32, then float32 bias[nbias]
      code lengths: Huffman code lengths (0 = unused, at most 15) of the K code symbols, 4 bits each, low
                    nibble first, ceil(K/2) bytes
      gap lengths:  the same for the E+1 gap symbols, ceil((E+1)/2) bytes
      code payload: uint32 bit count, then ceil(bits/8) bytes: one symbol per non-zero weight in flat (C) order,
                    symbol i meaning codebook[i]
      gap payload:  uint32 bit count, then ceil(bits/8) bytes: the gap symbols; a gap g is written as g // E
                    escapes followed by g % E (dsd-caffe writes E = 32)
    crc32   uint32 of every byte before it

The codes are canonical: codewords are assigned in order of (length, symbol), counting up from 0, and written
most significant bit first. Trailing positions after the last entry are zeros (mode 0) or non-zeros (mode 1).

Decoding either format gives ``{layer: (weights float32 shaped like the blob, bias float32)}``.
"""
import collections
import hashlib
import heapq
import logging
import os
import struct
import zlib

import numpy as np

from . import caffefacts, fileio, masks, netcheck, netgen
from .caffe_env import import_caffe, make_net
from .caffeproto import caffe_pb2
from .errors import UserError

log = logging.getLogger(__name__)

#: bits per code in the .net format, by layer type (the weighted types the format encodes: no Deconvolution)
NET_BITS = {"Convolution": 8, "InnerProduct": 4}
#: layer types that read data: such prototxts cannot be built for their shapes without the data
DATA_TYPES = {*caffefacts.DATA_TYPES, *caffefacts.V1_DATA_TYPES}
MAGIC = b"DSDH"
VERSION = 1
MAX_GAP = 16  # the .net format's 4-bit gap advances at most 16 positions per entry
HUFFMAN_ESCAPE = 32
MAX_CODE_LEN = 15

LayerSpec = collections.namedtuple("LayerSpec", "name type bits shape bias_size")


# ----------------------------------------------------------------------------------------------- net shapes
def layer_specs(prototxt):
    """The weighted layers (Convolution / InnerProduct) of ``prototxt``, in net order, with their blob shapes: a
    list of LayerSpec(name, type, bits, shape, bias_size). A deploy prototxt is built as it is; a trainval (with
    Data layers, and a DSD mask layer if any) is first turned into its deploy form (netgen.deploy: the input
    shape comes from its crop size and per-channel mean values)."""
    net_param = fileio.read_net_prototxt(prototxt)
    netcheck.check_structure(net_param, "TEST", name=os.fspath(prototxt))  # Caffe aborts on an unknown type
    data_layers = [l for l in list(net_param.layer) + list(net_param.layers) if l.type in DATA_TYPES]
    if data_layers:
        try:
            deploy = netgen.deploy(masks.remove_mask_layer(net_param))
        except UserError as e:  # the net's own shortcoming; anything else is a bug and keeps its traceback
            raise UserError(
                f"prototxt {prototxt} reads data (layer {data_layers[0].name!r} of type {data_layers[0].type}) "
                f"and its deploy form cannot be made ({e}); give the deploy prototxt (with an Input layer)"
            ) from e
        net = make_net(deploy, "TEST")
    else:
        caffe = import_caffe()
        net = caffe.Net(os.fspath(prototxt), caffe.TEST)
    return net_specs(net, name=f"prototxt {prototxt}")


def net_specs(net, name="the net"):
    """The LayerSpecs of the weighted layers of a built ``caffe.Net``, in net order (see :func:`layer_specs`)."""
    specs = []
    for layer_name, layer in zip(net._layer_names, net.layers):
        if layer.type in NET_BITS:
            blobs = net.params[layer_name]
            bias = int(blobs[1].data.size) if len(blobs) > 1 else 0
            specs.append(LayerSpec(layer_name, layer.type, NET_BITS[layer.type], tuple(blobs[0].data.shape), bias))
    if not specs:
        raise UserError(f"{name} has no Convolution or InnerProduct layer")
    return specs


def _specs(prototxt_or_specs):
    if isinstance(prototxt_or_specs, (str, os.PathLike)):
        return layer_specs(prototxt_or_specs)
    return list(prototxt_or_specs)


# ----------------------------------------------------------------------------------------------- .net decoding
def _unpack_nibbles(stream, n):
    out = np.empty(2 * len(stream), np.uint8)
    out[0::2] = stream & 15
    out[1::2] = stream >> 4
    return out[:n]


def _net_layer_bytes(n, bits, bias_size):
    """Bytes of one layer record in the .net format: codebook, bias, code stream, index stream."""
    per_byte = 8 // bits
    code = (n - 1) // per_byte + 1 if n else 0
    index = (n - 1) // 2 + 1 if n else 0
    return 4 * 2 ** bits, 4 * bias_size, code, index


def parse_net(data, specs, name="<bytes>"):
    """Parse .net bytes into per-layer records {name: dict(codebook, bias, codes, gaps, positions)}, checking
    that the file is consumed exactly and that every entry lands inside its blob."""
    specs = _specs(specs)
    nlayers = len(specs)
    if len(data) < 4 * nlayers:
        raise UserError(f"{name} is truncated: {len(data)} bytes cannot hold the header of {nlayers} layer counts "
                         f"({4 * nlayers} bytes)")
    counts = np.frombuffer(data, "<u4", nlayers)
    sizes = []
    for spec, n in zip(specs, counts):
        size = int(np.prod(spec.shape))
        if n > size:
            raise UserError(f"{name}: layer {spec.name!r} claims {int(n)} entries but its blob holds only {size} "
                             "weights (corrupted, or not the file for this prototxt)")
        sizes.append(_net_layer_bytes(int(n), spec.bits, spec.bias_size))
    expected = 4 * nlayers + sum(sum(s) for s in sizes)
    if len(data) < expected:
        offset = 4 * nlayers
        for spec, s in zip(specs, sizes):
            if offset + sum(s) > len(data):
                raise UserError(
                    f"{name} is truncated: layer {spec.name!r} needs {sum(s)} bytes from offset {offset} but only "
                    f"{max(0, len(data) - offset)} remain (file has {len(data)} bytes, its header and the prototxt "
                    f"need {expected})")
            offset += sum(s)
    if len(data) > expected:
        raise UserError(
            f"{name} is too long: {len(data) - expected} bytes left over after the last layer {specs[-1].name!r} "
            f"(file has {len(data)} bytes, its header and the prototxt account for {expected}); corrupted, or not "
            "the file for this prototxt")
    records = {}
    offset = 4 * nlayers
    for spec, n, (cb_bytes, bias_bytes, code_bytes, index_bytes) in zip(specs, counts, sizes):
        n = int(n)
        codebook = np.frombuffer(data, "<f4", cb_bytes // 4, offset).astype(np.float32)
        offset += cb_bytes
        bias = np.frombuffer(data, "<f4", bias_bytes // 4, offset).astype(np.float32)
        offset += bias_bytes
        stream = np.frombuffer(data, np.uint8, code_bytes, offset)
        offset += code_bytes
        codes = stream.copy() if spec.bits == 8 else _unpack_nibbles(stream, n)
        gaps = _unpack_nibbles(np.frombuffer(data, np.uint8, index_bytes, offset), n)
        offset += index_bytes
        if codebook[0] != 0:
            raise UserError(f"{name}: layer {spec.name!r} has codebook[0] = {codebook[0]!r}, not 0.0 (corrupted?)")
        for what, arr in (("codebook", codebook), ("bias", bias)):
            if not np.all(np.isfinite(arr)):
                raise UserError(f"{name}: layer {spec.name!r} has a non-finite {what} value (corrupted?)")
        positions = np.cumsum(gaps.astype(np.int64) + 1) - 1
        size = int(np.prod(spec.shape))
        if n and positions[-1] >= size:
            raise UserError(f"{name}: layer {spec.name!r}: its index stream points to position {int(positions[-1])} "
                             f"past the end of its {size}-weight blob (corrupted?)")
        records[spec.name] = dict(codebook=codebook, bias=bias, codes=codes, gaps=gaps, positions=positions)
    return records


def _read(net_file):
    path = fileio.require_file(net_file, "compressed file")
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise UserError(f"compressed file {path} is empty")
    return data


def decode_bytes(data, specs, name="<bytes>"):
    """Decode .net or Huffman-variant bytes (detected by the magic) into {layer: (weights, bias)}."""
    specs = _specs(specs)
    if data[:4] == MAGIC:
        return _decode_huffman(data, specs, name)
    out = {}
    records = parse_net(data, specs, name)
    for spec in specs:
        r = records[spec.name]
        flat = np.zeros(int(np.prod(spec.shape)), np.float32)
        flat[r["positions"]] = r["codebook"][r["codes"]]
        out[spec.name] = (flat.reshape(spec.shape), r["bias"])
    return out


def decode(net_file, prototxt):
    """Decode a Deep Compression ``.net`` file (or our Huffman variant) with its deploy ``prototxt`` (or the
    LayerSpecs of the net, :func:`net_specs`): {layer_name: (weights float32 ndarray shaped like the blob, bias
    float32 ndarray)} in net order."""
    data = _read(net_file)
    return decode_bytes(data, prototxt, os.fspath(net_file))


def net_file_stats(net_file, prototxt):
    """Per-layer statistics of a .net file: {layer: {"weights", "entries", "fillers", "nonzero", "bytes"}}."""
    specs = layer_specs(prototxt)
    records = parse_net(_read(net_file), specs, os.fspath(net_file))
    stats = {}
    for spec in specs:
        r = records[spec.name]
        n = len(r["codes"])
        values = r["codebook"][r["codes"]]
        stats[spec.name] = {
            "weights": int(np.prod(spec.shape)),
            "entries": n,
            "fillers": int(np.count_nonzero(values == 0)),
            "nonzero": int(np.count_nonzero(values)),
            "bytes": sum(_net_layer_bytes(n, spec.bits, spec.bias_size)),
        }
    return stats


def to_net_parameter(layers, specs):
    """A caffe NetParameter holding ``layers`` ({name: (weights, bias)}) as blobs, ready to save as caffemodel."""
    pb2 = caffe_pb2()
    net = pb2.NetParameter()
    for spec in specs:
        weights, bias = layers[spec.name]
        layer = net.layer.add(name=spec.name, type=spec.type)
        for arr in (weights, bias) if spec.bias_size else (weights,):
            blob = layer.blobs.add()
            blob.shape.dim.extend(int(d) for d in arr.shape)
            blob.data.extend(np.asarray(arr, np.float32).ravel().tolist())
    return net


def densities(layers):
    return {name: float(np.count_nonzero(w)) / w.size for name, (w, _) in layers.items()}


def decode_to_caffemodel(net_file, prototxt, output, force=False):
    """Decode ``net_file`` with ``prototxt`` and write ``output`` (a caffemodel, atomically) and its provenance
    JSON. Refuses an existing output unless ``force``. Returns the output path."""
    for path in (output, fileio.sidecar_path(output)):
        fileio.check_output(path, force)
        fileio.check_apart(path, (net_file, prototxt))
    specs = layer_specs(prototxt)
    data = _read(net_file)
    layers = decode_bytes(data, specs, os.fspath(net_file))
    fileio.write_caffemodel(output, to_net_parameter(layers, specs), force=force)
    folder = os.path.dirname(os.path.abspath(output))
    fileio.write_provenance(
        output, source=os.path.relpath(os.path.abspath(net_file), folder), densities=densities(layers),
        phase="sparse", made_by="decode_compressed", iteration=0, seed=None, force=force,
        prototxt=os.path.relpath(os.path.abspath(prototxt), folder),
        format="huffman" if data[:4] == MAGIC else "net", source_bytes=len(data),
        source_sha256=hashlib.sha256(data).hexdigest(),
        nonzero=int(sum(np.count_nonzero(w) for w, _ in layers.values())),
        weights=int(sum(w.size for w, _ in layers.values())))
    log.info("wrote %s (%d layers)", output, len(layers))
    return os.fspath(output)


# ----------------------------------------------------------------------------------------------- quantization
def kmeans_codebook(values, k, iterations=100):
    """1-D k-means of ``values`` into ``k`` centroids with linear initialisation (Deep Compression): returns
    (centroids float32 ascending, labels). Deterministic."""
    values = np.asarray(values, np.float64).ravel()
    if values.size == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    centroids = np.linspace(values.min(), values.max(), k)
    labels = None
    for _ in range(iterations):
        bounds = (centroids[1:] + centroids[:-1]) / 2
        new = np.searchsorted(bounds, values)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        sums = np.bincount(labels, weights=values, minlength=k)
        counts = np.bincount(labels, minlength=k)
        used = counts > 0
        centroids[used] = sums[used] / counts[used]
        centroids = np.sort(centroids)
    c32 = centroids.astype(np.float32)
    for i in np.flatnonzero(c32 == 0):  # a centroid at exactly 0 would prune its members: nudge it
        c32[i] = np.nextafter(np.float32(0), np.float32(1 if centroids[i] >= 0 else -1))
    return c32, labels


def quantize_layer(weights, bits):
    """Share the non-zero weights of one layer among at most 2**bits - 1 values. Returns (codebook, codes): the
    codebook holds the non-zero values ascending (codebook index i is code i + 1), ``codes`` is a uint8 array
    shaped like ``weights`` with 0 where the weight is 0. Lossless when the layer already has few enough values."""
    if not 1 <= bits <= 8:
        raise UserError(f"bits must be between 1 and 8, got {bits}")
    flat = np.asarray(weights, np.float32).ravel()
    nz = np.flatnonzero(flat)
    values = flat[nz]
    k = 2 ** bits - 1
    distinct, inverse = np.unique(values, return_inverse=True)
    if len(distinct) <= k:
        codebook, labels = distinct.astype(np.float32), inverse
    else:
        codebook, labels = kmeans_codebook(values, k)
    codes = np.zeros(flat.size, np.uint8)
    codes[nz] = labels + 1
    return codebook, codes.reshape(np.shape(weights))


def quantize(layers, bits):
    """Quantized copy of ``layers`` ({name: (weights, bias)}); ``bits`` is an int or {name: bits}."""
    out = {}
    for name, (w, b) in layers.items():
        codebook, codes = quantize_layer(w, _bits_for(bits, name))
        full = np.concatenate([[np.float32(0)], codebook]).astype(np.float32)
        out[name] = (full[codes], np.asarray(b, np.float32))
    return out


def _bits_for(bits, name):
    if isinstance(bits, dict):
        if name not in bits:
            raise UserError(f"no bit width given for layer {name!r}")
        return int(bits[name])
    return int(bits)


# ----------------------------------------------------------------------------------------------- .net encoding
def _pack_nibbles(values):
    values = np.asarray(values, np.uint8)
    if len(values) % 2:
        values = np.concatenate([values, [0]]).astype(np.uint8)
    return (values[0::2] | (values[1::2] << 4)).astype(np.uint8)


def _net_entries(codes_flat):
    """Codes and 4-bit gaps of the entries (non-zeros plus fillers) of one layer's flat code array."""
    nz = np.flatnonzero(codes_flat)
    gaps = np.diff(np.concatenate([[-1], nz])) - 1
    fillers = gaps // MAX_GAP
    total = len(nz) + int(fillers.sum())
    ends = np.cumsum(fillers + 1) - 1  # index of each real entry among all entries
    entry_codes = np.zeros(total, np.uint8)
    entry_gaps = np.full(total, MAX_GAP - 1, np.uint8)
    entry_codes[ends] = codes_flat[nz]
    entry_gaps[ends] = gaps % MAX_GAP
    return entry_codes, entry_gaps, int(fillers.sum())


def encode_net_bytes(layers, specs):
    """Encode {name: (weights, bias)} in the .net format; returns (bytes, per-layer report list)."""
    header, body, report = [], [], []
    for spec in specs:
        w, b = _layer_arrays(layers, spec)
        codebook, codes = quantize_layer(w, spec.bits)
        full = np.zeros(2 ** spec.bits, np.float32)
        full[1:1 + len(codebook)] = codebook
        entry_codes, entry_gaps, fillers = _net_entries(codes.ravel())
        n = len(entry_codes)
        if n == 0:
            raise UserError(f"layer {spec.name!r} is all zeros: the .net format cannot store an empty layer")
        stream = entry_codes if spec.bits == 8 else _pack_nibbles(entry_codes)
        parts = [full.astype("<f4").tobytes(), np.asarray(b, "<f4").tobytes(), stream.tobytes(),
                 _pack_nibbles(entry_gaps).tobytes()]
        header.append(n)
        body.extend(parts)
        report.append(_report_row(spec, w, codes, len(codebook), n, fillers, sum(map(len, parts))))
    data = np.asarray(header, "<u4").tobytes() + b"".join(body)
    return data, report


def _report_row(spec, w, codes, distinct, entries, fillers, nbytes):
    return {"layer": spec.name, "bits": spec.bits, "weights": int(w.size),
            "nonzero": int(np.count_nonzero(codes)), "codebook": int(distinct),
            "entries": int(entries), "fillers": int(fillers), "bytes": int(nbytes)}


def _layer_arrays(layers, spec):
    if spec.name not in layers:
        raise UserError(f"layer {spec.name!r} of the prototxt has no weights to encode")
    w, b = layers[spec.name]
    w = np.asarray(w, np.float32)
    b = np.zeros(0, np.float32) if b is None else np.asarray(b, np.float32).ravel()
    if w.size != int(np.prod(spec.shape)):
        raise UserError(f"layer {spec.name!r}: weights of shape {w.shape} do not fit the prototxt's {spec.shape}")
    if b.size != spec.bias_size:
        raise UserError(f"layer {spec.name!r}: {b.size} bias values, the prototxt wants {spec.bias_size}")
    if not np.all(np.isfinite(w)) or not np.all(np.isfinite(b)):
        raise UserError(f"layer {spec.name!r} has non-finite weights or bias")
    return w.reshape(spec.shape), b


# ----------------------------------------------------------------------------------------------- Huffman
def huffman_lengths(freqs, max_len=MAX_CODE_LEN):
    """Code lengths of a Huffman code for ``freqs`` (0 for absent symbols), limited to ``max_len`` bits.
    Deterministic (ties broken by symbol order)."""
    freqs = np.asarray(freqs, np.int64)
    present = np.flatnonzero(freqs)
    lengths = np.zeros(len(freqs), np.int64)
    if len(present) == 1:
        lengths[present] = 1
        return lengths
    f = freqs.copy()
    while len(present) > 1:
        heap = [(int(f[s]), i, (int(s),)) for i, s in enumerate(present)]
        heapq.heapify(heap)
        counter = len(heap)
        depth = {int(s): 0 for s in present}
        while len(heap) > 1:
            fa, _, a = heapq.heappop(heap)
            fb, _, b = heapq.heappop(heap)
            for s in a + b:
                depth[s] += 1
            heapq.heappush(heap, (fa + fb, counter, a + b))
            counter += 1
        if max(depth.values()) <= max_len:
            for s, d in depth.items():
                lengths[s] = d
            return lengths
        f[present] = np.maximum(1, f[present] >> 1)  # flatten the distribution and retry
    return lengths


def _canonical(lengths):
    """Canonical Huffman codewords for ``lengths`` (0 = absent)."""
    codes = np.zeros(len(lengths), np.int64)
    code, prev = 0, 0
    for s in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[s]) - prev
        prev = int(lengths[s])
        codes[s] = code
        code += 1
    return codes


def _huffman_encode(symbols, lengths):
    """Bit-pack ``symbols`` with the canonical code of ``lengths``: (bit count, bytes)."""
    symbols = np.asarray(symbols, np.int64)
    if symbols.size == 0:
        return 0, b""
    cw = _canonical(lengths)[symbols]
    ln = lengths[symbols]
    j = np.arange(MAX_CODE_LEN)
    shift = np.maximum(ln[:, None] - 1 - j[None, :], 0)
    bits = ((cw[:, None] >> shift) & 1).astype(np.uint8)
    flat = bits[j[None, :] < ln[:, None]]
    return int(flat.size), np.packbits(flat).tobytes()


def _huffman_decode(payload, nbits, count, lengths, what):
    """Decode ``count`` symbols from ``payload``; raise ValueError (naming ``what``) on an inconsistent stream."""
    if count == 0:
        if nbits:
            raise UserError(f"{what}: {nbits} payload bits for no symbols")
        return np.zeros(0, np.int64)
    present = np.flatnonzero(lengths)
    if len(present) == 0:
        raise UserError(f"{what}: empty Huffman table for {count} symbols")
    kraft = sum(2.0 ** -int(lengths[s]) for s in present)
    if kraft > 1:
        raise UserError(f"{what}: invalid Huffman table (Kraft sum {kraft:.3f} > 1)")
    width = int(lengths.max())
    cw = _canonical(lengths)
    sym_tab = np.zeros(1 << width, np.int64)
    len_tab = np.zeros(1 << width, np.int64)
    for s in present:
        lo = int(cw[s]) << (width - int(lengths[s]))
        hi = (int(cw[s]) + 1) << (width - int(lengths[s]))
        sym_tab[lo:hi] = s
        len_tab[lo:hi] = lengths[s]
    sym_tab, len_tab = sym_tab.tolist(), len_tab.tolist()
    buf = bytes(payload) + b"\0\0\0"
    mask = (1 << width) - 1
    base = 24 - width
    out = [0] * count
    pos = 0
    for i in range(count):
        byte = pos >> 3
        v = ((buf[byte] << 16 | buf[byte + 1] << 8 | buf[byte + 2]) >> (base - (pos & 7))) & mask
        out[i] = sym_tab[v]
        pos += len_tab[v]
        if pos > nbits:
            raise UserError(f"{what}: the Huffman stream ends after {i} of {count} symbols (corrupted?)")
    if pos != nbits:
        raise UserError(f"{what}: {nbits - pos} payload bits left over after {count} symbols (corrupted?)")
    return np.asarray(out, np.int64)


def _gap_symbols(positions, escape):
    gaps = np.diff(np.concatenate([[-1], positions])) - 1
    esc = gaps // escape
    ends = np.cumsum(esc + 1) - 1
    symbols = np.full(int(esc.sum()) + len(gaps), escape, np.int64)
    symbols[ends] = gaps % escape
    return symbols


def _gaps_to_positions(symbols, escape, size, what):
    is_entry = symbols != escape
    if len(symbols) and not is_entry[-1]:
        raise UserError(f"{what}: the gap stream ends with an escape (corrupted?)")
    esc_before = np.cumsum(~is_entry)[is_entry]
    skipped = np.diff(np.concatenate([[0], esc_before])) * escape
    gaps = symbols[is_entry] + skipped
    positions = np.cumsum(gaps + 1) - 1
    if len(positions) and positions[-1] >= size:
        raise UserError(f"{what}: the gap stream points to position {int(positions[-1])} past the end of the "
                         f"{size}-weight blob (corrupted?)")
    return positions


def _nibble_lengths(lengths):
    return _pack_nibbles(np.asarray(lengths, np.uint8)).tobytes()


def encode_huffman_bytes(layers, specs, bits=None, escape=HUFFMAN_ESCAPE):
    """Encode {name: (weights, bias)} in our Huffman variant; ``bits`` (int or {name: bits}) defaults to the
    .net widths (8 conv / 4 fc). Returns (bytes, per-layer report list)."""
    out = [MAGIC, struct.pack("<BH", VERSION, len(specs))]
    report = []
    for spec in specs:
        w, b = _layer_arrays(layers, spec)
        nbits_code = spec.bits if bits is None else _bits_for(bits, spec.name)
        codebook, codes = quantize_layer(w, nbits_code)
        flat = codes.ravel()
        mode = 1 if 2 * np.count_nonzero(flat) > flat.size else 0
        positions = np.flatnonzero(flat == 0) if mode else np.flatnonzero(flat)
        gap_syms = _gap_symbols(positions, escape)
        code_syms = flat[flat != 0].astype(np.int64) - 1
        code_len = huffman_lengths(np.bincount(code_syms, minlength=len(codebook)))
        gap_len = huffman_lengths(np.bincount(gap_syms, minlength=escape + 1))
        cbits, cpay = _huffman_encode(code_syms, code_len)
        gbits, gpay = _huffman_encode(gap_syms, gap_len)
        name = spec.name.encode()
        rec = b"".join([
            struct.pack("<B", len(name)), name,
            struct.pack("<BBIIIB", nbits_code, mode, flat.size, len(code_syms), len(gap_syms), escape),
            struct.pack("<H", len(codebook)), _codebook_bytes(codebook),
            struct.pack("<I", b.size), b.astype("<f4").tobytes(),
            _nibble_lengths(code_len), _nibble_lengths(gap_len),
            struct.pack("<I", cbits), cpay, struct.pack("<I", gbits), gpay])
        out.append(rec)
        report.append(_report_row(spec._replace(bits=nbits_code), w, codes, len(codebook), len(code_syms),
                                  0, len(rec)))
    data = b"".join(out)
    return data + struct.pack("<I", zlib.crc32(data)), report


def _float_order(values):
    bits = np.asarray(values, "<f4").view(np.uint32).astype(np.int64)
    return np.where(bits >> 31, -(bits & 0x7FFFFFFF), bits)


def _varint(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _codebook_bytes(codebook):
    """Ascending non-zero float32 values as varint deltas of their order-preserving integers."""
    ints = _float_order(codebook).tolist()
    if not ints:
        return b""
    first = ints[0]
    out = [_varint(2 * first if first >= 0 else -2 * first - 1)]
    out.extend(_varint(b - a) for a, b in zip(ints, ints[1:]))
    return b"".join(out)


def _read_codebook(reader, k):
    ints = []
    for i in range(k):
        value, shift = 0, 0
        while True:
            (byte,) = reader.take(1, "codebook")
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
            if shift > 35:
                raise UserError(f"{reader.name}: layer {reader.layer!r} has a malformed codebook (corrupted?)")
        if i == 0:
            ints.append(value >> 1 if not value & 1 else -((value + 1) >> 1))
        else:
            ints.append(ints[-1] + value)
    ints = np.asarray(ints, np.int64)
    if k and (ints.max() > 0x7F7FFFFF or ints.min() < -0x7F7FFFFF):
        raise UserError(f"{reader.name}: layer {reader.layer!r} has a non-finite codebook value (corrupted?)")
    bits = np.where(ints < 0, (-ints) | 0x80000000, ints).astype(np.uint32)
    return bits.view(np.float32)


class _Reader:
    def __init__(self, data, name):
        self.data, self.name, self.offset, self.layer = data, name, 0, None

    def take(self, count, what):
        if self.offset + count > len(self.data):
            where = f"layer {self.layer!r}" if self.layer else "the header"
            raise UserError(f"{self.name} is truncated: {where} needs {count} bytes for its {what} at offset "
                             f"{self.offset} but only {len(self.data) - self.offset} remain")
        chunk = self.data[self.offset:self.offset + count]
        self.offset += count
        return chunk

    def unpack(self, fmt, what):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))


def _decode_huffman(data, specs, name):
    if len(data) < 11:
        raise UserError(f"{name} is truncated: {len(data)} bytes cannot hold the Huffman-variant header")
    body, crc = data[:-4], struct.unpack("<I", data[-4:])[0]
    r = _Reader(body, name)
    r.take(4, "magic")
    version, nlayers = r.unpack("<BH", "version")
    if version != VERSION:
        raise UserError(f"{name}: Huffman-variant version {version} is not supported (this reader knows {VERSION})")
    if zlib.crc32(body) != crc:
        raise UserError(f"{name} is corrupted or truncated: its CRC32 does not match ({len(data)} bytes)")
    if nlayers != len(specs):
        raise UserError(f"{name} holds {nlayers} layers, the prototxt has {len(specs)} weighted layers")
    out = {}
    for spec in specs:
        r.layer = spec.name
        (nlen,) = r.unpack("<B", "name")
        lname = r.take(nlen, "name").decode("utf-8", "replace")
        if lname != spec.name:
            raise UserError(f"{name}: next layer is {lname!r}, the prototxt expects {spec.name!r}")
        bits, mode, size, n_codes, n_gaps, escape = r.unpack("<BBIIIB", "layer header")
        if size != int(np.prod(spec.shape)):
            raise UserError(f"{name}: layer {spec.name!r} holds {size} weights, the prototxt's blob "
                             f"{spec.shape} holds {int(np.prod(spec.shape))}")
        if not 1 <= bits <= 8 or mode not in (0, 1) or escape < 1 or n_codes > size or n_gaps > 2 * size + 1:
            raise UserError(f"{name}: layer {spec.name!r} has an invalid header (corrupted?)")
        (k,) = r.unpack("<H", "codebook size")
        codebook = _read_codebook(r, k)
        (nbias,) = r.unpack("<I", "bias count")
        if nbias != spec.bias_size:
            raise UserError(f"{name}: layer {spec.name!r} has {nbias} bias values, the prototxt wants "
                             f"{spec.bias_size}")
        bias = np.frombuffer(r.take(4 * nbias, "bias"), "<f4").astype(np.float32)
        code_len = _unpack_nibbles(np.frombuffer(r.take((k + 1) // 2, "code lengths"), np.uint8), k)
        gap_len = _unpack_nibbles(np.frombuffer(r.take((escape + 2) // 2, "gap lengths"), np.uint8), escape + 1)
        what = f"{name}: layer {spec.name!r}"
        (cbits,) = r.unpack("<I", "code payload size")
        codes = _huffman_decode(r.take((cbits + 7) // 8, "code payload"), cbits, n_codes,
                                code_len.astype(np.int64), what + " codes")
        (gbits,) = r.unpack("<I", "gap payload size")
        gaps = _huffman_decode(r.take((gbits + 7) // 8, "gap payload"), gbits, n_gaps,
                               gap_len.astype(np.int64), what + " gaps")
        positions = _gaps_to_positions(gaps, escape, size, what)
        if mode:
            mask = np.ones(size, bool)
            mask[positions] = False
            positions = np.flatnonzero(mask)
        if len(positions) != n_codes:
            raise UserError(f"{what}: {len(positions)} non-zero positions but {n_codes} codes (corrupted?)")
        if n_codes and codes.max() >= k:
            raise UserError(f"{what}: a code points past its {k}-entry codebook (corrupted?)")
        flat = np.zeros(size, np.float32)
        flat[positions] = codebook[codes]
        out[spec.name] = (flat.reshape(spec.shape), bias)
    if r.offset != len(body):
        raise UserError(f"{name} is too long: {len(body) - r.offset} bytes left over after the last layer "
                         f"{specs[-1].name!r}")
    return out


# ----------------------------------------------------------------------------------------------- the tool
FORMATS = ("net", "huffman")


def encode(layers, output, prototxt, format="net", bits=None, force=False):
    """Encode ``layers`` ({name: (weights, bias)}) for the deploy ``prototxt`` into ``output`` (atomically).
    ``format`` is "net" (Deep Compression's, 8-bit conv / 4-bit fc) or "huffman" (ours; ``bits`` may override
    the widths there). Returns {"layers": [per-layer rows], "bytes": total}."""
    if format not in FORMATS:
        raise UserError(f"format must be one of {FORMATS}, got {format!r}", fields=["format"])
    if format == "net" and bits is not None:
        raise UserError("bits needs format huffman: the .net format fixes the widths (8 bits conv, 4 bits fc)",
                        fields=["bits", "format"])
    fileio.check_output(output, force)
    specs = _specs(prototxt)
    if format == "net":
        data, rows = encode_net_bytes(layers, specs)
    else:
        data, rows = encode_huffman_bytes(layers, specs, bits)
    fileio.atomic_write(output, data, force=force)
    return {"layers": rows, "bytes": len(data), "format": format}


def read_weights(caffemodel, specs):
    """{name: (weights, bias)} of the weighted layers ``specs`` from a caffemodel, checking every shape."""
    net = fileio.read_caffemodel(caffemodel)
    blobs = {l.name: l.blobs for l in list(net.layer) + list(net.layers) if len(l.blobs)}
    layers = {}
    for spec in specs:
        if spec.name not in blobs:
            raise UserError(f"caffemodel {caffemodel} has no weights for layer {spec.name!r}")
        arrays = [np.asarray(bl.data, np.float32) for bl in blobs[spec.name]]
        if arrays[0].size != int(np.prod(spec.shape)):
            raise UserError(f"caffemodel {caffemodel}: layer {spec.name!r} holds {arrays[0].size} weights, the "
                             f"prototxt's blob {spec.shape} needs {int(np.prod(spec.shape))}")
        bias = arrays[1] if len(arrays) > 1 else np.zeros(0, np.float32)
        layers[spec.name] = (arrays[0].reshape(spec.shape), bias)
    return layers


def compress(model, weights, output, format="net", bits=None, force=False):
    """Encode the sparse caffemodel ``weights`` of the deploy net ``model``; returns the report with the
    caffemodel's size and the ratio."""
    fileio.check_output(output, force)
    fileio.check_apart(output, (model, weights))
    specs = layer_specs(model)
    result = encode(read_weights(weights, specs), output, specs, format=format, bits=bits, force=force)
    result["caffemodel_bytes"] = os.path.getsize(weights)
    result["ratio"] = result["caffemodel_bytes"] / result["bytes"]
    return result


def format_report(result):
    """The per-layer table and total line of a compress() result."""
    lines = [f"{'layer':24s} {'bits':>4s} {'weights':>9s} {'nonzero':>9s} {'values':>6s} {'entries':>9s} "
             f"{'fillers':>7s} {'bytes':>9s}"]
    for r in result["layers"]:
        lines.append(f"{r['layer']:24s} {r['bits']:4d} {r['weights']:9d} {r['nonzero']:9d} {r['codebook']:6d} "
                     f"{r['entries']:9d} {r['fillers']:7d} {r['bytes']:9d}")
    total = f"total: {result['bytes']} bytes ({result['format']})"
    if "caffemodel_bytes" in result:
        total += f"; caffemodel {result['caffemodel_bytes']} bytes; ratio {result['ratio']:.1f}x"
    lines.append(total)
    return "\n".join(lines)
