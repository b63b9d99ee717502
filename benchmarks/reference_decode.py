"""Time the reference nanochat's Engine on a checkpoint, the way `nanochat bench-infer`
times ours, so the two decode speeds can be compared on one machine.

Run it with the reference's interpreter and tree (benchmarks/decode_vs_reference.sh does):

    cd <reference tree> && PYTHONPATH=. <reference venv>/bin/python <this file> \
        --source base --batch-sizes 1 16 --prompt-len 256 --decode-tokens 64 --top-k 50

It loads the newest checkpoint of --source under $NANOCHAT_BASE_DIR with the reference's
own loader, then for each batch size runs Engine.generate for prompt + decode-tokens + 1
steps `--repeats` times and reports the median time per decode step (the first yield,
which includes the prefill, is left out, as bench-infer does). The reference's engine stops
a row at <|assistant_end|> or <|bos|>; a timing run must run every step, so the tokenizer
it is given maps every special token to an id the model never samples (-1). Prints one
JSON line.
"""
import argparse
import json
import statistics
import time

import torch


class _NoStopTokenizer:
    """Only what the reference Engine asks of a tokenizer when no tool is called."""

    def encode_special(self, name):
        return -1

    def get_bos_token_id(self):
        return -1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default="base")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from nanochat.checkpoint_manager import load_model
    from nanochat.engine import Engine

    model, _, meta = load_model(args.source, torch.device("cpu"), phase="eval")
    engine = Engine(model, _NoStopTokenizer())
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist()

    def steps_of(batch, n):
        stamps = []
        for _ in engine.generate(prompt, num_samples=batch, max_tokens=n + 1, temperature=args.temperature,
                                 top_k=args.top_k, seed=args.seed):
            stamps.append(time.perf_counter())
        assert len(stamps) == n + 1, "a row ended early"
        return [b - a for a, b in zip(stamps, stamps[1:])]

    steps_of(max(args.batch_sizes), 4)  # warm-up
    rows = []
    for batch in args.batch_sizes:
        times = []
        for _ in range(args.repeats):
            times.extend(steps_of(batch, args.decode_tokens))
        step_s = statistics.median(times)
        rows.append({"batch": batch, "step_ms": 1e3 * step_s, "tokens_per_s": batch / step_s})
    print(json.dumps({"engine": "reference", "step": meta.get("step"), "threads": torch.get_num_threads(),
                      "prompt_len": args.prompt_len, "decode_tokens": args.decode_tokens,
                      "temperature": args.temperature, "top_k": args.top_k, "batches": rows}))


if __name__ == "__main__":
    main()
