"""
Decoding through the Engine, eager against compiled (`Engine(compile=True)`, what
`--compile` turns on in chat, serve and bench-infer), on one model in one process. The
two engines alternate round by round and each round's ratio is printed with the median,
because on a shared machine the speed drifts between minutes. Before timing, both greedy
continuations are checked equal.

    .venv/bin/python benchmarks/decode_compiled.py                  # the CPU demo's shape
    .venv/bin/python benchmarks/decode_compiled.py --depth 6 --batch-sizes 1 --rounds 15

Random weights (speed does not depend on them), prompt --prompt-len tokens, --decode-tokens
steps, top-k 50, temperature 1; each batch size compiles its own graph first, timed apart.
Prints one line per batch size and a JSON last line; name the CPU next to any figure (bench-infer prints it).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from nanochat import gpt
from nanochat.engine import Engine
from nanochat.scaling import model_dims


def step_times(engine: Engine, prompt: list[int], steps: int, batch: int) -> list[float]:
    stamps = []
    for _ in engine.generate(prompt, num_samples=batch, max_tokens=steps + 1, temperature=1.0, top_k=50, seed=0):
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--sequence-len", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16], help="samples per prompt")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n_embd, n_head = model_dims(args.depth, head_dim=args.head_dim)
    config = gpt.GPTConfig(sequence_len=args.sequence_len, vocab_size=args.vocab_size, n_layer=args.depth,
                           n_head=n_head, n_kv_head=n_head, n_embd=n_embd, window_pattern="L")
    torch.manual_seed(0)
    model = gpt.build_model(config, "cpu").eval()
    with torch.no_grad():  # the real init zeroes the output projections; give every matrix some signal
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.05)
    prompt = torch.randint(0, args.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    engines = {"eager": Engine(model, None), "compiled": Engine(model, None, compile=True)}

    results = []
    for batch in args.batch_sizes:
        start = time.perf_counter()
        step_times(engines["compiled"], prompt, 2, batch)  # compiles this batch size's graph
        compile_s = time.perf_counter() - start
        greedy = {name: e.generate_batch(prompt, num_samples=batch, max_tokens=16, temperature=0.0)[0]
                  for name, e in engines.items()}
        if greedy["eager"] != greedy["compiled"]:
            raise SystemExit(f"batch {batch}: compiled decoding diverged from eager: {greedy}")
        times: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(args.rounds):
            for name, engine in engines.items():
                times[name].append(statistics.median(step_times(engine, prompt, args.decode_tokens, batch)))
        ratios = [e / c for e, c in zip(times["eager"], times["compiled"])]
        eager_ms, compiled_ms = (statistics.median(times[k]) * 1e3 for k in ("eager", "compiled"))
        print(f"batch {batch:3d}: eager {eager_ms:.2f} ms/step ({1e3 * batch / eager_ms:.0f} tok/s), compiled "
              f"{compiled_ms:.2f} ms/step ({1e3 * batch / compiled_ms:.0f} tok/s); eager/compiled "
              f"{statistics.median(ratios):.2f}x median of {args.rounds} rounds ({min(ratios):.2f}-{max(ratios):.2f}); "
              f"first run with compiling {compile_s:.1f} s")
        results.append({"batch": batch, "compile_s": round(compile_s, 1), "eager_ms": round(eager_ms, 3),
                        "compiled_ms": round(compiled_ms, 3), "ratios": [round(r, 3) for r in ratios]})
    print(json.dumps({"depth": args.depth, "n_embd": n_embd, "vocab_size": args.vocab_size,
                      "threads": args.threads, "rounds": args.rounds, "results": results}))

if __name__ == "__main__":
    main()
