"""
Token-level generation: KV cache, batched sampling, and the python (calculator) tool.

The engine takes token ids and yields token ids; it knows nothing of text except the
ids of a few special tokens (it asks the tokenizer for them) and that a tool call's
expression has to be decoded for the calculator and its result encoded back.

How one `generate` call runs:

1. prefill: the prompt goes through the model once, at batch 1, into a KV cache. With
   `num_samples` > 1 a batch-N cache continues it (`make_kv_cache(..., prefix=)`): the
   rows share that one copy of the prompt's keys where SDPA runs in fp32 (the CPU) and
   get copies of it elsewhere, so the prompt is never recomputed per sample. Caches are
   allocated once, in the model's compute dtype, sized prompt + max_tokens - 1 (never
   more than the model's rotary tables allow). Every layer keeps all positions, because
   the last layer always attends over the full `sequence_len` window; the sliding-window
   layers only *read* their last `window + 1` keys (see attention.py), so per-step cost
   grows only in the full-window layers.
2. decode: each step samples one token per row from the last logits (temperature,
   top-k, one seeded torch.Generator), feeds the column back, and yields
   `(token_column, forced_mask)`.
3. per row, a small state machine: <|assistant_end|> or <|bos|> ends the row; tokens
   between <|python_start|> and <|python_end|> are collected, decoded and given to the
   calculator, and `<|output_start|> result <|output_end|>` is queued and *forced* into
   that row (forced_mask 1) before sampling resumes. Rows that ended keep being fed (the
   batch stays rectangular) but what they yield afterwards means nothing; the stream
   stops when every row ended or after `max_tokens` steps.

Compiled decoding (`Engine(compile=True)`, `--compile` on chat, serve, chat-eval and
bench-infer): the decode steps run as one torch.compile graph. The caches are static (see
attention.KVCache: fixed shapes, the new keys written at a tensor position, unwritten
positions masked): the prompt's is sized in whole multiples of the model's sequence_len,
and where several samples share it (fp32 SDPA) their own keys go to a static cache sized
in powers of two from 64, so one graph serves every step of every turn with the same number of
rows (and a turn of a new size compiles one more, logged). On a CPU the graph is compiled
with the model's weights frozen into it (inductor's `freezing`: prepacked matmul
weights) and a C++ wrapper, which removes the Python work around ~200 small operations
per step. Numbers differ from eager decoding by rounding (~1e-7 in the logits). The first
step compiles (~20-40 s on a small CPU; inductor's disk cache makes later runs faster).
Where the rows cannot share the prompt (bf16, FA3) several samples stay eager. Only for a
model whose weights no longer change: a later optimizer step would not be seen by the
frozen graph (RL never compiles).

Model protocol (nanochat.gpt.GPT satisfies it; tests use small fakes): `forward(idx,
kv_cache=...)` -> fp32 logits (B, T, V), `make_kv_cache(batch_size, seq_len, prefix=None)`,
`get_device()`, `config.sequence_len`; optional `hidden_states`/`logits` (prefill then
computes the head for the last position only), `decode_logits`/`decode_graph` and
`make_kv_cache(..., static=True)` (compiled decoding), and `rotary_seq_len` (the longest
position the model can encode).
"""
from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from nanochat.calculator import calculate
from nanochat.errors import UserError

log = logging.getLogger("nanochat.engine")


# -----------------------------------------------------------------------------
# Sampling

@torch.inference_mode()
def sample_next_token(logits: Tensor, generator: torch.Generator | None, temperature: float = 1.0,
                      top_k: int | None = None) -> Tensor:
    """One token per row from logits (B, V); returns (B, 1) int64.

    temperature 0 is greedy (argmax, no randomness used). top_k keeps the k largest
    logits of each row (None, or k >= V: no filtering); sampling then happens among
    those k only, which is cheaper than masking the whole vocabulary."""
    if temperature < 0:
        raise UserError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    if top_k is not None and top_k < logits.size(-1):
        if top_k < 1:
            raise UserError(f"top_k must be >= 1 (or None for no filtering), got {top_k}")
        values, indices = torch.topk(logits, top_k, dim=-1)  # (B, k)
        probs = F.softmax(values / temperature, dim=-1)
        choice = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1) into the k
        return indices.gather(1, choice)
    probs = F.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


# -----------------------------------------------------------------------------
# Per-row state

@dataclass
class _Row:
    forced: deque = field(default_factory=deque)  # tokens queued to be forced into this row
    in_python: bool = False
    expr_tokens: list[int] = field(default_factory=list)
    done: bool = False


@dataclass(frozen=True)
class _Specials:
    """Ids the state machine needs; None where the tokenizer lacks the token (e.g. a
    plain GPT-2 encoding: no tool use, and only BOS, if any, ends a row)."""
    bos: int | None
    assistant_end: int | None
    python_start: int | None
    python_end: int | None
    output_start: int | None
    output_end: int | None

    @classmethod
    def of(cls, tokenizer) -> "_Specials":
        if tokenizer is None:
            return cls(None, None, None, None, None, None)

        def get(name: str) -> int | None:
            try:
                return tokenizer.encode_special(name)
            except (ValueError, KeyError):
                return None

        return cls(bos=tokenizer.get_bos_token_id(), assistant_end=get("<|assistant_end|>"),
                   python_start=get("<|python_start|>"), python_end=get("<|python_end|>"),
                   output_start=get("<|output_start|>"), output_end=get("<|output_end|>"))

    @property
    def terminals(self) -> frozenset[int]:
        return frozenset(t for t in (self.assistant_end, self.bos) if t is not None)

    @property
    def tools(self) -> bool:
        return None not in (self.python_start, self.python_end, self.output_start, self.output_end)


# -----------------------------------------------------------------------------
# The engine

class Engine:
    """Batched, KV-cached sampling with tool use.

    model: see the module docstring. tokenizer: needs `encode_special`,
    `get_bos_token_id`, `encode`, `decode`; None gives raw sampling (no stop tokens, no
    tools), which benchmarks use. tool: expression text -> result text (default: the
    safe calculator); None disables tool use.
    """

    def __init__(self, model, tokenizer=None, tool: Callable[[str], str] | None = calculate,
                 compile: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.tool = tool
        self.specials = _Specials.of(tokenizer)
        self.compile = compile and hasattr(model, "decode_graph")
        if compile and not self.compile:
            log.warning("this model has no decode_graph to compile; decoding eagerly")
        self._step = None  # the compiled decode step, made on first use
        self._compile_failed = False
        self._graph_shapes: set[tuple[int, int, int]] = set()  # (rows, cache, own per row): one graph each

    # --- sizing ----------------------------------------------------------------

    def max_positions(self) -> int:
        """The longest sequence (prompt + generated) the model can take."""
        limit = getattr(self.model, "rotary_seq_len", None)
        return int(limit) if limit is not None else int(self.model.config.sequence_len)

    def _budget(self, prompt_len: int, max_tokens: int | None) -> int:
        """How many decode steps to run (each yields one token per row)."""
        limit = self.max_positions()
        if prompt_len >= limit:
            raise UserError(f"the prompt has {prompt_len} tokens but the model encodes at most {limit} positions; "
                            "shorten the prompt")
        if max_tokens is None:
            # no explicit budget: stop at the context length the model was trained on
            seq_len = int(self.model.config.sequence_len)
            if prompt_len >= seq_len:
                raise UserError(f"the prompt ({prompt_len} tokens) already fills the model's {seq_len}-token "
                                "context; pass max_tokens explicitly or shorten the prompt")
            return seq_len - prompt_len
        if prompt_len + max_tokens > limit:
            log.warning("max_tokens=%d after a %d-token prompt exceeds the model's %d positions; capping at %d",
                        max_tokens, prompt_len, limit, limit - prompt_len)
            return limit - prompt_len
        return max_tokens

    # --- generation ------------------------------------------------------------

    def _static_capacity(self, total: int) -> int:
        """A compiled step's cache size: whole multiples of sequence_len (one graph for
        every turn that fits), never past the rotary tables."""
        seq_len = int(self.model.config.sequence_len)
        return min(-(-total // seq_len) * seq_len, self.max_positions())

    @staticmethod
    def _own_capacity(steps: int) -> int:
        """Positions of each row's own keys in a compiled step where the rows share the
        prompt: the next power of two from 64 up, so replies of any length need at most
        log2(sequence_len / 32) graphs per row count (4 at 512, 6 at 2048), for at most
        twice the keys that the reply needs (the last sampled token is never cached)."""
        return max(64, 1 << (max(steps - 1, 1) - 1).bit_length())

    def _compiled_step(self):
        """torch.compile of the model's decode_graph, made once per engine; None once
        compiling has failed (decoding goes on eagerly on the same static cache)."""
        if self._step is None and not self._compile_failed:
            import torch._inductor.config as inductor_config

            cpu = self.model.get_device().type == "cpu"
            compiled = torch.compile(self.model.decode_graph, dynamic=False, options={"cpp_wrapper": cpu})

            def step(idx: Tensor, rotary: tuple[Tensor, Tensor], kv_cache) -> Tensor:
                # freezing (CPU): the weights become constants, prepacked for MKL once at
                # compile time. Inductor reads it from its global config when it compiles
                # (torch.compile's options do not reach it), and a call is when that happens.
                with inductor_config.patch(freezing=cpu):
                    return compiled(idx, rotary, kv_cache)

            log.info("compiling the decode step (the first step waits for it: ~40 s on a small CPU)")
            self._step = step
        return self._step

    def precompile(self) -> None:
        """Compile the decode step now (a two-step generation, whose cache has the
        capacity of any turn up to sequence_len) rather than at the first request; a
        no-op without compile."""
        if self.compile:
            bos = self.specials.bos if self.specials.bos is not None else 0
            for _ in self.generate([bos], max_tokens=2, temperature=0.0):
                pass

    def _decode_logits(self, ids: Tensor, kv_cache) -> Tensor:
        """One decode step on a static cache: compiled, or eager once compiling failed.
        A failed compile has written nothing that the eager step does not write again
        (the cache advances only after the step returns)."""
        step = self._compiled_step()
        if step is not None:
            try:
                return self.model.decode_logits(ids, kv_cache, step=step)
            except (ValueError, UserError):
                raise  # the request's fault (e.g. past the rotary tables), not the compiler's
            except Exception as e:  # no C++ compiler, an op inductor cannot lower: lose speed, not the reply
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                log.warning("compiling the decode step failed (%s: %s); decoding eagerly", type(e).__name__, first)
                self._step, self._compile_failed = None, True
        return self.model.decode_logits(ids, kv_cache)

    def _last_logits(self, ids: Tensor, kv_cache) -> Tensor:
        """fp32 logits (B, V) of the last position, advancing the cache."""
        if getattr(kv_cache, "static", False) and ids.size(1) == 1:
            return self._decode_logits(ids, kv_cache)
        if hasattr(self.model, "hidden_states") and hasattr(self.model, "logits"):
            # only the last position needs the (large) vocabulary projection
            return self.model.logits(self.model.hidden_states(ids, kv_cache=kv_cache)[:, -1, :])
        return self.model.forward(ids, kv_cache=kv_cache)[:, -1, :]

    @torch.inference_mode()
    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, seed: int = 42
                 ) -> Iterator[tuple[list[int], list[int]]]:
        """Sample `num_samples` continuations of the prompt `tokens` in one batch.

        Yields once per step `(token_column, forced_mask)`, both lists of length
        num_samples: the next token of each row, and 1 where that token was forced by
        the tool (calculator output) rather than sampled. max_tokens: steps to run
        (None: until the model's sequence_len is filled). temperature 0 is greedy.
        top_k None: no filtering. The same seed gives the same samples."""
        self._check_args(tokens, num_samples, max_tokens, temperature, top_k)
        steps = self._budget(len(tokens), max_tokens)
        if steps <= 0:
            return
        device = self.model.get_device()
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        # the last sampled token is never fed back, so the cache needs one slot less
        total = len(tokens) + steps - 1

        # 1) prefill once at batch 1, then spread the cache over the rows
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        static = self.compile and (num_samples == 1 or self.model.shares_prompt_cache())
        if static:  # static caches: every decode step one compiled graph (see the module docstring)
            capacity = self._static_capacity(len(tokens) if num_samples > 1 else total)
            own = self._own_capacity(steps) if num_samples > 1 else 0
            shape = (num_samples, capacity, own)
            if self._graph_shapes and shape not in self._graph_shapes and not self._compile_failed:
                log.info("%d row(s), a %d-position cache%s: compiling one more decode graph", num_samples, capacity,
                         f" + {own} per row" if own else "")
            self._graph_shapes.add(shape)
            cache = prompt_cache = self.model.make_kv_cache(batch_size=1, seq_len=capacity, static=True)
            logits = self._last_logits(ids, prompt_cache)  # (1, V); the prefill itself runs eagerly
            if num_samples > 1:  # rows share the prompt's static cache, their own keys in a static one
                logits = logits.expand(num_samples, -1)
                cache = self.model.make_kv_cache(batch_size=num_samples, seq_len=len(tokens) + own,
                                                 prefix=prompt_cache, static=True)
        elif num_samples == 1:
            cache = self.model.make_kv_cache(batch_size=1, seq_len=total)
            logits = self._last_logits(ids, cache)  # (1, V)
        else:
            prompt_cache = self.model.make_kv_cache(batch_size=1, seq_len=len(tokens))
            logits = self._last_logits(ids, prompt_cache).expand(num_samples, -1)  # (N, V), rows sample independently
            cache = self.model.make_kv_cache(batch_size=num_samples, seq_len=total, prefix=prompt_cache)
            del prompt_cache  # the cache keeps it where the rows share it

        # 2) decode
        rows = [_Row() for _ in range(num_samples)]
        for step in range(steps):
            sampled = sample_next_token(logits, generator, temperature, top_k)[:, 0].tolist()
            column, forced_mask = [], []
            for row, token in zip(rows, sampled):
                forced = bool(row.forced)
                if forced:
                    token = row.forced.popleft()
                column.append(token)
                forced_mask.append(int(forced))
                self._advance_row(row, token)
            yield column, forced_mask
            if step == steps - 1 or all(row.done for row in rows):
                return
            ids = torch.tensor(column, dtype=torch.long, device=device).unsqueeze(1)  # (N, 1)
            logits = self._last_logits(ids, cache)

    def _advance_row(self, row: _Row, token: int) -> None:
        """Update one row's state machine with its newest token."""
        if row.done:
            return  # what an ended row yields is filler; it must not trigger tools
        sp = self.specials
        if token in sp.terminals:
            row.done = True
        if not sp.tools or self.tool is None:
            return
        if token == sp.python_start:
            row.in_python, row.expr_tokens = True, []
        elif token == sp.python_end and row.in_python:
            row.in_python = False
            expr = self.tokenizer.decode(row.expr_tokens)
            result = self.tool(expr)
            row.forced.extend([sp.output_start, *self.tokenizer.encode(result), sp.output_end])
            row.expr_tokens = []
        elif row.in_python:
            row.expr_tokens.append(token)

    @staticmethod
    def _check_args(tokens, num_samples, max_tokens, temperature, top_k) -> None:
        problems = []
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) for t in tokens):
            problems.append("tokens must be a non-empty list of int token ids (start with BOS)")
        if not isinstance(num_samples, int) or num_samples < 1:
            problems.append(f"num_samples must be a positive int, got {num_samples!r}")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 0):
            problems.append(f"max_tokens must be a non-negative int or None, got {max_tokens!r}")
        if temperature < 0:
            problems.append(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            problems.append(f"top_k must be >= 1 or None, got {top_k}")
        if problems:
            raise UserError("generate: " + "; ".join(problems))

    def generate_batch(self, tokens: list[int], num_samples: int = 1, **kwargs
                       ) -> tuple[list[list[int]], list[list[int]]]:
        """Run `generate` to the end. Returns (sequences, masks), one per sample:
        sequences[i] is the prompt followed by the generated tokens, without the token
        that ended the row (<|assistant_end|>/<|bos|>); masks[i] has the same length
        and is 1 where the model sampled the token, 0 for the prompt and for forced
        tool output (the tokens a policy-gradient update should train on are the 1s)."""
        terminals = self.specials.terminals
        sequences = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for column, forced_mask in self.generate(tokens, num_samples, **kwargs):
            for i, (token, forced) in enumerate(zip(column, forced_mask)):
                if done[i]:
                    continue
                if token in terminals:
                    done[i] = True
                    continue
                sequences[i].append(token)
                masks[i].append(1 - forced)
        return sequences, masks


def cast_for_inference(model: torch.nn.Module) -> torch.nn.Module:
    """Store every floating-point parameter in the model's compute dtype, in place.

    The model keeps fp32 master weights for training and casts each matrix to the
    compute dtype in every forward pass; for decoding one token that cast is most of the
    work (each step reads 4 bytes per weight and writes 2 more, instead of reading 2).
    Casting once gives the same numbers (the same rounding, done once) at about half the
    memory traffic. Only for models that will not be trained again: the fp32 masters are
    gone. Returns the model."""
    dtype = getattr(model, "compute_dtype", None)
    if dtype is None or dtype == torch.float32:
        return model
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model
