"""Chat with a trained model in the terminal (or answer one prompt with -p).

  nanochat chat                      # newest chat model: rl if trained, else sft, else base
  nanochat chat -i sft -g d20 -t 0.8
  nanochat chat -p "Why is the sky blue?"
  printf 'hi\\n/clear\\nhello\\n/quit\\n' | nanochat chat

The reply streams token by token. The conversation is kept as the exact tokens the
model saw and produced (tool calls included) in the chat format the model was trained
on: <|bos|> then <|user_start|> ... <|user_end|> <|assistant_start|> ... <|assistant_end|>
per turn. Calculator calls show as "[python] expr → result". Commands: /clear starts
over, /quit (or Ctrl-D) leaves; Ctrl-C stops a reply half-way.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Literal, TextIO

from nanochat.common import Runtime
from nanochat.config import check, option
from nanochat.errors import MissingInputError

log = logging.getLogger("nanochat.chat_cli")

HELP = "commands: /clear (new conversation), /quit (or Ctrl-D) to leave, /help"


@dataclass
class Config:
    source: Literal["sft", "rl", "base"] | None = option(
        None, "which model, sft, rl or base; automatic: rl if trained, else sft, else base", short="-i")
    tag: str | None = option(None, "checkpoint tag, e.g. d20; automatic: the largest model", short="-g")
    step: int | None = option(None, "checkpoint step; automatic: the last", short="-s")
    prompt: str | None = option(None, "answer this one prompt and exit; without it the chat is interactive", short="-p")
    temperature: float = option(0.6, "sampling temperature (0 = greedy)", short="-t")
    top_k: int | None = option(50, "sample among the k most likely tokens", short="-k")
    max_tokens: int = option(256, "most tokens per reply")
    seed: int = option(42, "sampling seed (turn i uses seed + i, so a session is reproducible)")
    compile: bool = option(False, "decode through one torch.compile graph (faster tokens after ~40 s of compiling "
                                  "at the first reply on a small CPU; see nanochat/engine.py)")

    def validate(self) -> None:
        problems = []
        if self.temperature < 0:
            problems.append(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            problems.append(f"--top-k must be >= 1, got {self.top_k}")
        if self.max_tokens < 1:
            problems.append(f"--max-tokens must be >= 1, got {self.max_tokens}")
        if self.prompt is not None and not self.prompt.strip():
            problems.append("--prompt is empty; give a question or leave -p out for an interactive chat")
        check(problems)


# -----------------------------------------------------------------------------
# Streaming one reply to the terminal

class ReplyPrinter:
    """Writes generated tokens as readable text as they arrive.

    Ordinary tokens are decoded incrementally: a token may end inside a multi-byte UTF-8
    character, so text ending in U+FFFD is held back until the next token completes it.
    Tool tokens become "[python] expr → result" on a line of its own."""

    def __init__(self, tokenizer, out: TextIO):
        self.tokenizer, self.out = tokenizer, out
        sp = tokenizer.encode_special
        self.python_start, self.python_end = sp("<|python_start|>"), sp("<|python_end|>")
        self.output_start, self.output_end = sp("<|output_start|>"), sp("<|output_end|>")
        self.specials = {tokenizer.encode_special(s) for s in tokenizer.get_special_tokens()}
        self.pending: list[int] = []  # text tokens of the current segment
        self.shown = 0  # characters of decode(pending) already written
        self.at_line_start = True

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()
            self.at_line_start = text.endswith("\n")

    def _flush_text(self, final: bool) -> None:
        text = self.tokenizer.decode(self.pending)
        end = len(text) if final or not text.endswith("\ufffd") else len(text.rstrip("\ufffd"))
        self._write(text[self.shown:end])
        self.shown = max(self.shown, end)
        if final:
            self.pending, self.shown = [], 0

    def push(self, token: int) -> None:
        if token not in self.specials:
            self.pending.append(token)
            self._flush_text(final=False)
            return
        self._flush_text(final=True)
        if token == self.python_start:
            self._write(("" if self.at_line_start else "\n") + "[python] ")
        elif token == self.python_end:
            self._write(" → ")
        elif token == self.output_end:
            self._write("\n")
        elif token != self.output_start:
            self._write(self.tokenizer.decode([token]))  # an unexpected special token: show it as is

    def finish(self) -> None:
        self._flush_text(final=True)
        if not self.at_line_start:
            self._write("\n")


# -----------------------------------------------------------------------------
# The conversation

class ChatSession:
    """The conversation as tokens, and one engine call per user turn."""

    def __init__(self, engine, tokenizer, config: Config, context_len: int, out: TextIO):
        self.engine, self.tokenizer, self.config, self.out = engine, tokenizer, config, out
        self.context_len = context_len
        sp = tokenizer.encode_special
        self.bos = tokenizer.get_bos_token_id()
        self.user_start, self.user_end = sp("<|user_start|>"), sp("<|user_end|>")
        self.assistant_start, self.assistant_end = sp("<|assistant_start|>"), sp("<|assistant_end|>")
        self.tokens: list[int] = [self.bos]
        self.turns = 0
        self.generated = 0

    def clear(self) -> None:
        self.tokens = [self.bos]

    def _fit_context(self, prompt: list[int]) -> list[int]:
        """Drop the oldest turns while prompt + a full reply would overflow the model's context."""
        budget = self.context_len - self.config.max_tokens - 1  # the reply and its <|assistant_end|>
        dropped = False
        while len(prompt) > budget:
            starts = [i for i, t in enumerate(prompt) if t == self.user_start]
            if len(starts) < 2:
                break  # only the current turn is left; the engine copes with the rest
            prompt = [self.bos] + prompt[starts[1]:]
            dropped = True
        if dropped:
            self.out.write(f"(the oldest turns were dropped to fit the model's {self.context_len}-token context)\n")
        return prompt

    def reply(self, user_text: str) -> str:
        """Add the user's turn, stream the assistant's reply, keep both in the history."""
        prompt = self.tokens + [self.user_start, *self.tokenizer.encode(user_text), self.user_end,
                                self.assistant_start]
        prompt = self._fit_context(prompt)
        printer = ReplyPrinter(self.tokenizer, self.out)
        reply: list[int] = []
        stream = self.engine.generate(prompt, num_samples=1, max_tokens=self.config.max_tokens,
                                      temperature=self.config.temperature, top_k=self.config.top_k,
                                      seed=self.config.seed + self.turns)
        try:
            for column, _forced in stream:
                token = column[0]
                if token in (self.assistant_end, self.bos):
                    break
                reply.append(token)
                printer.push(token)
        except KeyboardInterrupt:
            printer.finish()
            self.out.write("[interrupted]\n")
        finally:
            stream.close()
        printer.finish()
        # the history always closes the turn, even when the reply was cut by max_tokens or Ctrl-C
        self.tokens = prompt + reply + [self.assistant_end]
        self.turns += 1
        self.generated += len(reply)
        return self.tokenizer.decode(reply)


def _read_line(stdin: TextIO, out: TextIO, prompt: str) -> str | None:
    """One line from the user; None at EOF (Ctrl-D) or Ctrl-C at the prompt."""
    out.write(prompt)
    out.flush()
    try:
        if stdin is sys.stdin and stdin.isatty():
            return input()  # line editing and history in a terminal
        line = stdin.readline()
    except (EOFError, KeyboardInterrupt):
        return None
    return line.rstrip("\r\n") if line else None


def interactive(session: ChatSession, stdin: TextIO, out: TextIO) -> None:
    out.write(f"nanochat: chatting with the model. {HELP}\n")
    while True:
        line = _read_line(stdin, out, "\nUser: ")
        if line is None:
            out.write("\n")
            break
        text = line.strip()
        if not text:
            continue
        command = text.lower()
        if command in ("/quit", "/exit"):
            break
        if command == "/clear":
            session.clear()
            out.write("(conversation cleared)\n")
            continue
        if command.startswith("/"):
            out.write(f"{HELP}\n")
            continue
        out.write("\nAssistant: ")
        out.flush()
        session.reply(text)
    out.write("Goodbye!\n")
    out.flush()


# -----------------------------------------------------------------------------
# The stage

def run(config: Config, runtime: Runtime, stdin: TextIO | None = None, out: TextIO | None = None) -> dict:
    from nanochat.checkpoint import latest_stage, load_model
    from nanochat.engine import Engine, cast_for_inference

    stdin = stdin if stdin is not None else sys.stdin
    out = out if out is not None else sys.stdout
    source = config.source or latest_stage(runtime.base_dir)
    if source is None:
        raise MissingInputError(f"no model to chat with under {runtime.base_dir}: train one first "
                                "(`nanochat base-train`, then `nanochat sft`), or pass --base-dir")
    model, tokenizer, meta = load_model(source, runtime.base_dir, runtime.device, runtime.dtype,
                                        tag=config.tag, step=config.step)
    cast_for_inference(model.eval())  # same numbers, about half the memory traffic per token
    if source == "base":
        log.warning("chatting with a base model: it was never trained on conversations, expect rambling")
    log.info("chatting with the %s model, step %s", source, meta.get("step"))
    session = ChatSession(Engine(model, tokenizer, compile=config.compile), tokenizer, config,
                          context_len=model.config.sequence_len, out=out)
    if config.prompt is not None:
        session.reply(config.prompt)
    else:
        interactive(session, stdin, out)
    return {"source": source, "step": meta.get("step"), "turns": session.turns, "tokens_generated": session.generated}
