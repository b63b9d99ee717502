"""
The weight products of one decode step on the CPU, two ways: as the reference runs them
(F.linear on nn.Linear's (out, in) weights; q, k and v apart) and as our model does
(`gpt.decode_matmul`: cached transposed copies for 1-2 rows, oneDNN-prepacked copies for
3-64 rows in fp32, q/k/v in one product). Each chain is timed from a cold cache: a sweep
through a buffer larger than the last-level cache runs before it, as the rest of a decode
step evicts the weights between two steps. The two ways alternate, medians are printed.

    .venv/bin/python benchmarks/decode_matmuls.py                      # the CPU demo's shape
    .venv/bin/python benchmarks/decode_matmuls.py --depth 6 --rows 1 16 --repeats 31

Prints one line per row count and a JSON last line. Name the CPU next to any figure
(grep 'model name' /proc/cpuinfo).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from nanochat import gpt
from nanochat.scaling import model_dims


def step_products(model: gpt.GPT) -> list[tuple[torch.nn.Module, list[torch.Tensor]]]:
    """(owner, weights) for each product of a decode step, in the order the step runs them."""
    products = []
    for block in model.transformer.h:
        attn, mlp = block.attn, block.mlp
        products.append((attn, [attn.c_q.weight, attn.c_k.weight, attn.c_v.weight]))
        products += [(attn.c_proj, [attn.c_proj.weight]), (mlp.c_fc, [mlp.c_fc.weight]),
                     (mlp.c_proj, [mlp.c_proj.weight])]
    products.append((model.lm_head, [model.lm_head.weight]))
    return products


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 16], help="rows (batch size) per product")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sweep-mb", type=int, default=64, help="buffer swept before each chain (> the L3 cache)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n_embd, n_head = model_dims(args.depth, head_dim=args.head_dim)
    config = gpt.GPTConfig(sequence_len=512, vocab_size=args.vocab_size, n_layer=args.depth, n_head=n_head,
                           n_kv_head=n_head, n_embd=n_embd, window_pattern="L")
    model = gpt.build_model(config, "cpu").eval()
    products = step_products(model)
    weight_mb = sum(w.numel() * w.element_size() for _, ws in products for w in ws) / 2**20
    sweep = torch.ones(args.sweep_mb << 18)  # float32: 4 bytes each

    def reference(x_by_width: dict[int, torch.Tensor]) -> None:
        for _, weights in products:
            for w in weights:
                F.linear(x_by_width[w.size(1)], w)

    def ours(x_by_width: dict[int, torch.Tensor]) -> None:
        for owner, weights in products:
            gpt.decode_matmul(owner, x_by_width[weights[0].size(1)], *weights)

    results = []
    with torch.inference_mode():
        for rows in args.rows:
            xs = {width: torch.randn(rows, width) for width in {w.size(1) for _, ws in products for w in ws}}
            for owner, weights in products:  # same products both ways (this also makes the cached copies)
                x = xs[weights[0].size(1)]
                expected = torch.cat([F.linear(x, w) for w in weights], dim=-1)
                torch.testing.assert_close(gpt.decode_matmul(owner, x, *weights), expected, rtol=1e-4, atol=1e-5)
            times: dict[str, list[float]] = {"reference": [], "ours": []}
            for _ in range(args.repeats):
                for name, chain in (("reference", reference), ("ours", ours)):
                    sweep.add_(1.0)  # evict the weights
                    start = time.perf_counter()
                    chain(xs)
                    times[name].append(time.perf_counter() - start)
            ref_ms, our_ms = (statistics.median(times[k]) * 1e3 for k in ("reference", "ours"))
            results.append({"rows": rows, "reference_ms": round(ref_ms, 3), "ours_ms": round(our_ms, 3),
                            "speedup": round(ref_ms / our_ms, 2)})
            print(f"rows {rows:3d}: F.linear {ref_ms:6.2f} ms   decode_matmul {our_ms:6.2f} ms   "
                  f"{ref_ms / our_ms:.2f}x  ({len(products)} products, {weight_mb:.1f} MiB of weights)")
    print(json.dumps({"depth": args.depth, "n_embd": n_embd, "vocab_size": args.vocab_size,
                      "threads": args.threads, "repeats": args.repeats, "results": results}))


if __name__ == "__main__":
    main()
