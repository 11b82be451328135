"""Sizes of the published compressed SqueezeNet (Deep Compression's .net) against dsd-caffe's encoders, in one run.

Decodes ``compressed_SqueezeNet.net`` (shared reference) and prints, side by side:
  - the caffemodel it decodes to (float32 blobs: what a pruned caffemodel costs);
  - the published .net file, and our lossless re-encoding in the same format (goal: <= 675,763 bytes);
  - our Huffman variant, lossless (goal: <= 470,000 bytes), with its parts (codebooks, biases, code and gap streams);
  - the order-0 entropy bound of the codes and gaps (per layer), which no per-layer Huffman code can beat;
  - what adaptive context models (an arithmetic coder's cost, learning included) would reach: codes given the sign
    of the kernel neighbour, mask bits given three neighbouring mask bits;
  - lossy Huffman variants re-quantized to fewer bits (k-means, linear init), with their weight error.
Every size is deterministic; the timings are for information only.

    .venv/bin/python bench/compress_size.py [--net X.net --model deploy.prototxt]
"""
import argparse
import os
import time

import numpy as np

from dsd_caffe import deepcompression as dc

HERE = os.path.dirname(os.path.abspath(__file__))
REF = os.path.join(HERE, "..", "..", "shared", "reference", "squeezenet-deep-compression")
NET_GOAL, HUFFMAN_GOAL = 675_763, 470_000


def _entropy(symbols):
    n = np.bincount(symbols)
    n = n[n > 0]
    return float(-(n * np.log2(n / n.sum())).sum()) / 8 if n.size else 0.0


def entropy_bytes(layers, specs):
    """Order-0 entropy (bytes) of the per-layer code and gap symbols our Huffman variant codes."""
    codes = gaps = 0.0
    for s in specs:
        flat = dc.quantize_layer(layers[s.name][0], s.bits)[1].ravel()
        dense = 2 * np.count_nonzero(flat) > flat.size
        codes += _entropy(flat[flat != 0].astype(np.int64))
        gaps += _entropy(dc._gap_symbols(np.flatnonzero(flat == 0) if dense else np.flatnonzero(flat),
                                         dc.HUFFMAN_ESCAPE))
    return codes, gaps


def _seen_before(keys):
    """For each element, how many earlier elements share its key."""
    order = np.argsort(keys, kind="stable")
    k = keys[order]
    starts = np.r_[0, np.flatnonzero(np.diff(k)) + 1]
    first = np.repeat(starts, np.diff(np.r_[starts, len(k)]))
    out = np.empty(len(k), np.int64)
    out[order] = np.arange(len(k)) - first
    return out


def adaptive_bytes(symbols, contexts, alphabet, alpha=0.5):
    """Cost (bytes) of coding ``symbols`` with an adaptive per-context model (Krichevsky-Trofimov counts), as an
    arithmetic coder would pay it: the model's learning is included, no table is sent."""
    symbols, contexts = np.asarray(symbols, np.int64), np.asarray(contexts, np.int64)
    n_cs = _seen_before(contexts * alphabet + symbols)
    n_c = _seen_before(contexts)
    return float(-np.log2((n_cs + alpha) / (n_c + alpha * alphabet)).sum()) / 8


def context_model_bytes(layers, specs):
    """Adaptive context-model costs (bytes) of the codes and of the mask, per layer, summed.
    Codes: context = sign of the previous weight in the same kernel (or 0 for 1x1). Mask: context = the mask bits of
    the previous kernel position, the same position in the previous input channel and in the previous filter."""
    codes = mask = 0.0
    for s in specs:
        w = layers[s.name][0]
        f = w.reshape(w.shape[0], w.shape[1], -1)
        nz = f != 0
        values = np.unique(f[nz])
        prev = np.zeros_like(f)
        prev[:, :, 1:] = f[:, :, :-1]
        codes += adaptive_bytes(np.searchsorted(values, f[nz]), (np.sign(prev) + 1).astype(np.int64)[nz],
                                len(values))
        ctx = np.zeros(nz.shape, np.int64)
        ctx[:, :, 1:] += nz[:, :, :-1]
        ctx[:, 1:] += 2 * nz[:, :-1]
        ctx[1:] += 4 * nz[:-1]
        mask += adaptive_bytes(nz.ravel().astype(np.int64), ctx.ravel(), 2)
    return codes, mask


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--net", default=os.path.join(REF, "compressed_SqueezeNet.net"))
    p.add_argument("--model", default=os.path.join(REF, "SqueezeNet_deploy.prototxt"))
    p.add_argument("--bits", default="7,6,5", help="lossy Huffman widths to try (comma-separated)")
    a = p.parse_args()

    specs = dc.layer_specs(a.model)
    with open(a.net, "rb") as f:
        original = f.read()
    t = time.perf_counter()
    layers = dc.decode_bytes(original, specs, a.net)
    t_dec = time.perf_counter() - t
    caffemodel = len(dc.to_net_parameter(layers, specs).SerializeToString())
    nonzero = sum(int(np.count_nonzero(w)) for w, _ in layers.values())
    total = sum(w.size for w, _ in layers.values())
    print(f"{a.net}: {len(specs)} weighted layers, {total:,} weights, {nonzero:,} non-zero "
          f"(density {nonzero / total:.3f}); decoded in {t_dec:.2f} s")

    rows = [("decoded caffemodel (float32)", caffemodel, None, "")]
    rows.append(("published .net", len(original), None, ""))
    t = time.perf_counter()
    net_data, net_rows = dc.encode_net_bytes(layers, specs)
    t_net = time.perf_counter() - t
    same = all(np.array_equal(x[0].view(np.uint32), y[0].view(np.uint32))
               for x, y in zip(layers.values(), dc.decode_bytes(net_data, specs).values()))
    rows.append((".net re-encoded (ours)", len(net_data), NET_GOAL,
                 f"{'bit-identical' if same else 'DIFFERENT'} weights; {sum(r['fillers'] for r in net_rows):,} "
                 f"fillers; {t_net:.2f} s"))
    t = time.perf_counter()
    huf, huf_rows = dc.encode_huffman_bytes(layers, specs)
    t_huf = time.perf_counter() - t
    t = time.perf_counter()
    back = dc.decode_bytes(huf, specs)
    t_hdec = time.perf_counter() - t
    same = all(np.array_equal(x[0].view(np.uint32), y[0].view(np.uint32))
               for x, y in zip(layers.values(), back.values()))
    rows.append(("Huffman variant, lossless", len(huf), HUFFMAN_GOAL,
                 f"{'bit-identical' if same else 'DIFFERENT'} weights; encode {t_huf:.2f} s, decode {t_hdec:.2f} s"))
    bias = 4 * sum(b.size for _, b in layers.values())
    codebooks = sum(len(dc._codebook_bytes(dc.quantize_layer(layers[s.name][0], s.bits)[0])) for s in specs)
    h_codes, h_gaps = entropy_bytes(layers, specs)
    bound = h_codes + h_gaps
    rows.append(("  entropy bound: codes + gaps only", round(bound), None,
                 f"codes {h_codes:,.0f} + gaps {h_gaps:,.0f} B; + biases {bias:,} + codebooks {codebooks:,} "
                 f"= {bound + bias + codebooks:,.0f}"))
    c_codes, c_mask = context_model_bytes(layers, specs)
    rows.append(("  adaptive context models", round(c_codes + c_mask), None,
                 f"codes {c_codes:,.0f} + mask {c_mask:,.0f} B; + biases and codebooks "
                 f"= {c_codes + c_mask + bias + codebooks:,.0f}"))
    for bits in [int(b) for b in a.bits.split(",") if b.strip()]:
        data, _ = dc.encode_huffman_bytes(layers, specs, bits=bits)
        q = dc.decode_bytes(data, specs)
        err = np.sqrt(sum(float(((q[k][0] - w) ** 2).sum()) for k, (w, _) in layers.items())
                      / sum(float((w ** 2).sum()) for w, _ in layers.values()))
        nz = sum(int(np.count_nonzero(w)) for w, _ in q.values())
        rows.append((f"Huffman variant, {bits}-bit (lossy)", len(data), HUFFMAN_GOAL,
                     f"relative RMS weight error {err:.4f}; non-zero {nz:,}"))

    print(f"\n{'encoding':38s} {'bytes':>10s} {'vs caffemodel':>13s} {'vs .net':>8s} {'goal':>9s}  notes")
    for name, size, goal, notes in rows:
        verdict = "" if goal is None else ("met" if size <= goal else "MISSED")
        print(f"{name:38s} {size:10,d} {caffemodel / size:12.1f}x {size / len(original):8.3f} "
              f"{verdict:>9s}  {notes}")


if __name__ == "__main__":
    main()
