"""
Byte-level BPE tokenizer in the GPT-4 style, and the chat format built on it.

Training uses `rustbpe` (fast, parallel, regex-split byte-level BPE); encoding and
decoding use OpenAI's `tiktoken`, fed with the merges rustbpe learned. On disk the
tokenizer is the pickled `tiktoken.Encoding` (`tokenizer/tokenizer.pkl`), the same file
the reference nanochat writes and reads, plus `tokenizer/token_bytes.pt`, the byte length
of every token (for bits-per-byte).

Chat conversations are rendered into one token sequence with a parallel loss mask
(`render_conversation`): only what the assistant says, including its tool calls, is
supervised. Text that comes from people or tools is always encoded as ordinary text,
so a message containing the literal string "<|assistant_end|>" cannot forge a special
token.
"""
from __future__ import annotations

import copy
import logging
import os
import pickle
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import tiktoken

from nanochat.errors import MissingInputError, UserError

log = logging.getLogger("nanochat.tokenizer")

# Special tokens get the ids right after the learned merges, in this order.
SPECIAL_TOKENS: list[str] = [
    "<|bos|>",              # starts every document; also the document separator in packing
    "<|user_start|>",       # chat: a user turn
    "<|user_end|>",
    "<|assistant_start|>",  # chat: an assistant turn
    "<|assistant_end|>",
    "<|python_start|>",     # the assistant calls its python tool
    "<|python_end|>",
    "<|output_start|>",     # the tool's output, fed back to the assistant
    "<|output_end|>",
]

# GPT-4's (cl100k) pre-tokenization regex with one change, as in the reference: numbers
# are split into groups of at most 2 digits instead of 3, which spends fewer vocabulary
# slots on numbers at small vocab sizes. The pattern is stored inside the saved encoding,
# so tokenizers trained with another pattern still load and encode correctly.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

ENCODING_NAME = "rustbpe"  # the tiktoken.Encoding name the reference uses for trained tokenizers
TOKENIZER_SUBDIR = "tokenizer"
PICKLE_NAME = "tokenizer.pkl"
TOKEN_BYTES_NAME = "token_bytes.pt"

# Assistant content may be a list of parts; these are the part types we know.
PART_TYPES = ("text", "python", "python_output")


class Tokenizer:
    """A `tiktoken.Encoding` plus the chat format. Build one with `train_from_iterator`,
    `from_directory` or `from_pretrained`."""

    def __init__(self, enc: tiktoken.Encoding, bos_token: str):
        self.enc = enc
        self._special_ids: dict[str, int] = {s: enc.encode_single_token(s) for s in enc.special_tokens_set}
        if bos_token not in self._special_ids:
            raise ValueError(f"the encoding {enc.name!r} has no special token {bos_token!r} to use as BOS")
        self.bos_token_id = self._special_ids[bos_token]
        self._token_bytes = None  # computed on first use

    # ------------------------------------------------------------------ construction

    @classmethod
    def train_from_iterator(cls, text_iterator: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Learn `vocab_size - len(SPECIAL_TOKENS)` byte-level BPE tokens from the texts;
        the special tokens take the last ids."""
        import rustbpe

        n_learned = vocab_size - len(SPECIAL_TOKENS)
        if n_learned < 256:
            raise UserError(f"vocab_size={vocab_size} is too small: it must be at least "
                            f"{256 + len(SPECIAL_TOKENS)} (256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(text_iterator), n_learned, pattern=SPLIT_PATTERN)
        # rank == token id; the first 256 ranks are the raw bytes
        mergeable_ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        if len(mergeable_ranks) < n_learned:
            # the text ran out of pairs to merge before reaching the requested size
            log.warning("training text only supported %d learned tokens (asked for %d); vocab_size will be %d",
                        len(mergeable_ranks), n_learned, len(mergeable_ranks) + len(SPECIAL_TOKENS))
        offset = len(mergeable_ranks)
        enc = tiktoken.Encoding(
            name=ENCODING_NAME,
            pat_str=trainer.get_pattern(),
            mergeable_ranks=mergeable_ranks,
            special_tokens={name: offset + i for i, name in enumerate(SPECIAL_TOKENS)},
        )
        return cls(enc, "<|bos|>")

    @classmethod
    def from_directory(cls, tokenizer_dir: str | os.PathLike) -> "Tokenizer":
        path = Path(tokenizer_dir) / PICKLE_NAME
        if not path.is_file():
            raise MissingInputError(f"no tokenizer at {path}; train one with `nanochat tok-train`")
        with open(path, "rb") as f:
            enc = pickle.load(f)
        if not isinstance(enc, tiktoken.Encoding):
            raise UserError(f"{path} holds a {type(enc).__name__}, not a pickled tiktoken.Encoding; "
                            "re-train it with `nanochat tok-train`")
        bos = "<|bos|>" if "<|bos|>" in enc.special_tokens_set else "<|endoftext|>"
        return cls(enc, bos)

    @classmethod
    def from_pretrained(cls, tiktoken_name: str) -> "Tokenizer":
        """A tiktoken encoding by name, e.g. "gpt2" or "cl100k_base" (GPT-4).

        Their document delimiter is called <|endoftext|>; we use it as BOS."""
        if tiktoken_name not in tiktoken.list_encoding_names():
            raise UserError(f"unknown tiktoken encoding {tiktoken_name!r}; known: {tiktoken.list_encoding_names()}")
        try:
            enc = tiktoken.get_encoding(tiktoken_name)
        except (OSError, ValueError) as e:  # requests' ConnectionError is an OSError
            where = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
            raise MissingInputError(
                f"could not load the tiktoken encoding {tiktoken_name!r} ({type(e).__name__}: {str(e)[:200]}). "
                f"Offline, set TIKTOKEN_CACHE_DIR to a directory holding tiktoken's cached files "
                f"(currently {where or 'unset'})") from e
        return cls(enc, "<|endoftext|>")

    def save(self, tokenizer_dir: str | os.PathLike) -> None:
        """Write tokenizer.pkl (the pickled Encoding, as the reference does) and
        token_bytes.pt. Both are fully written before either replaces an old file."""
        import torch

        from nanochat.common import atomic_path

        tokenizer_dir = Path(tokenizer_dir)
        with atomic_path(tokenizer_dir / PICKLE_NAME) as tmp_pkl, \
                atomic_path(tokenizer_dir / TOKEN_BYTES_NAME) as tmp_tb:
            with open(tmp_pkl, "wb") as f:
                pickle.dump(self.enc, f)
            with open(tmp_tb, "wb") as f:
                torch.save(self.token_bytes(), f)
        log.info("saved tokenizer (vocab %d) to %s", self.get_vocab_size(), tokenizer_dir)

    # ------------------------------------------------------------------ vocabulary

    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_special_tokens(self) -> set[str]:
        return set(self._special_ids)

    def id_to_token(self, id: int) -> str:
        return self.enc.decode([id])

    def encode_special(self, text: str) -> int:
        """The id of one special token, e.g. "<|assistant_end|>"."""
        try:
            return self._special_ids[text]
        except KeyError:
            raise ValueError(f"{text!r} is not a special token of this tokenizer "
                             f"(it has {sorted(self._special_ids)})") from None

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def token_bytes(self):
        """int32 tensor (vocab,): how many bytes of text each token stands for; 0 for
        special tokens (and unused ids), so they drop out of bits-per-byte.

        Lengths come from each token's raw bytes. Decoding a token to str first would
        turn a partial UTF-8 sequence (e.g. a lone 0xE4 byte) into U+FFFD, 3 bytes long."""
        if self._token_bytes is None:
            import torch

            specials = set(self._special_ids.values())
            lengths = []
            for token_id in range(self.enc.n_vocab):
                if token_id in specials:
                    lengths.append(0)
                    continue
                try:
                    lengths.append(len(self.enc.decode_single_token_bytes(token_id)))
                except KeyError:  # a gap in the id space (cl100k_base has a few)
                    lengths.append(0)
            self._token_bytes = torch.tensor(lengths, dtype=torch.int32)
        return self._token_bytes

    # ------------------------------------------------------------------ encode / decode

    def _special_or_id(self, token: str | int) -> int:
        return token if isinstance(token, int) else self.encode_special(token)

    def encode(self, text: str | list[str], prepend: str | int | None = None,
               append: str | int | None = None, num_threads: int = 8) -> list[int] | list[list[int]]:
        """Encode ordinary text (special-token strings in it are encoded as plain text).

        A str gives list[int]; a list of str gives list[list[int]], encoded in parallel by
        tiktoken's thread pool. `prepend`/`append` add one token to each sequence, given
        as a special-token string or an id."""
        head = [self._special_or_id(prepend)] if prepend is not None else []
        tail = [self._special_or_id(append)] if append is not None else []
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            return head + ids + tail if (head or tail) else ids
        if isinstance(text, list):
            rows = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
            return [head + r + tail for r in rows] if (head or tail) else rows
        raise ValueError(f"encode takes a str or a list of str, not {type(text).__name__}")

    __call__ = encode

    def decode(self, ids: Iterable[int]) -> str:
        if hasattr(ids, "tolist"):  # a tensor or numpy array
            ids = ids.tolist()
        return self.enc.decode(list(ids))

    # ------------------------------------------------------------------ chat format

    def render_conversation(self, conversation: dict, max_tokens: int | None = 2048) -> tuple[list[int], list[int]]:
        """Token ids of a whole conversation and a same-length mask: 1 where the
        assistant's output is trained on, 0 elsewhere.

        Layout: <|bos|>, then per user turn <|user_start|> text <|user_end|> (mask 0),
        per assistant turn <|assistant_start|> (0) content (1) <|assistant_end|> (1).
        Assistant content may be a list of parts: "text" (1), "python" wrapped in
        <|python_start|>/<|python_end|> (1), "python_output" wrapped in
        <|output_start|>/<|output_end|> (0; at inference the tool writes it, not the model).
        A leading system message is prepended to the first user message. The result is
        cut to `max_tokens` (None: no cut)."""
        messages = _merged_messages(conversation)
        sp = self.encode_special
        ids: list[int] = []
        mask: list[int] = []

        def emit(tokens: list[int], supervised: int) -> None:
            ids.extend(tokens)
            mask.extend([supervised] * len(tokens))

        emit([self.bos_token_id], 0)
        for message in messages:
            content = message["content"]
            if message["role"] == "user":
                emit([sp("<|user_start|>")] + self.encode(content) + [sp("<|user_end|>")], 0)
                continue
            emit([sp("<|assistant_start|>")], 0)
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                body = self.encode(part["text"])
                if part["type"] == "text":
                    emit(body, 1)
                elif part["type"] == "python":
                    emit([sp("<|python_start|>")] + body + [sp("<|python_end|>")], 1)
                else:  # python_output (validated above)
                    emit([sp("<|output_start|>")] + body + [sp("<|output_end|>")], 0)
            emit([sp("<|assistant_end|>")], 1)
        if max_tokens is not None:
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        return ids, mask

    def render_for_completion(self, conversation: dict) -> list[int]:
        """Prompt ids for sampling the assistant's answer (RL, evaluation): the
        conversation without its last (assistant) message, then <|assistant_start|>.
        Not truncated: a cut prompt would ask the model to answer a question it cannot see."""
        validate_conversation(conversation)
        messages = conversation["messages"]
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"render_for_completion: the last message (index {len(messages) - 1}) must be the "
                             f"assistant's answer to drop, but its role is {messages[-1]['role']!r}")
        prompt = {**conversation, "messages": messages[:-1]}
        ids, _ = self.render_conversation(prompt, max_tokens=None)
        return ids + [self.encode_special("<|assistant_start|>")]

    def visualize_tokenization(self, ids: list[int], mask: list[int], with_token_id: bool = False) -> str:
        """Tokens joined by '|', supervised ones green and the rest red (ANSI), for debugging."""
        green, red, gray, reset = "\033[92m", "\033[91m", "\033[90m", "\033[0m"
        pieces = []
        for token_id, m in zip(ids, mask):
            piece = f"{green if m else red}{self.decode([token_id])}{reset}"
            if with_token_id:
                piece += f"{gray}({token_id}){reset}"
            pieces.append(piece)
        return "|".join(pieces)


# ---------------------------------------------------------------------- conversations

def validate_conversation(conversation: Any) -> None:
    """Raise ValueError, naming the message, if `conversation` is not
    {"messages": [optional system, user, assistant, user, ...]} with str contents
    (assistant content may also be a list of {"type": text|python|python_output, "text": str})."""
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        raise UserError(f"a conversation must be a dict with a 'messages' list, got {_short(conversation)}")
    messages = conversation["messages"]
    if not messages:
        raise UserError("conversation has no messages")
    first_turn = 1 if isinstance(messages[0], dict) and messages[0].get("role") == "system" else 0
    if first_turn and len(messages) == 1:
        raise UserError("conversation message 0: a system message must be followed by a user message")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise UserError(f"conversation message {i}: expected a dict with 'role' and 'content', got {_short(message)}")
        role, content = message["role"], message["content"]
        expected = "system" if i < first_turn else ("user" if (i - first_turn) % 2 == 0 else "assistant")
        if role != expected:
            raise UserError(f"conversation message {i}: role {role!r} where {expected!r} was expected "
                            "(roles alternate user/assistant, after an optional leading system message)")
        if isinstance(content, str):
            continue
        if role != "assistant" or not isinstance(content, list):
            allowed = "a str or a list of parts" if role == "assistant" else "a str"
            raise UserError(f"conversation message {i} ({role}): content must be {allowed}, "
                            f"got {type(content).__name__}")
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in PART_TYPES or not isinstance(part.get("text"), str):
                raise UserError(f"conversation message {i} (assistant), part {j}: expected "
                                f"{{'type': one of {list(PART_TYPES)}, 'text': str}}, got {_short(part)}")


def _merged_messages(conversation: dict) -> list[dict]:
    """Validated messages with a leading system message folded into the first user turn."""
    validate_conversation(conversation)
    messages = conversation["messages"]
    if messages[0]["role"] != "system":
        return messages
    merged = copy.copy(messages[1])  # never mutate the caller's conversation
    merged["content"] = messages[0]["content"] + "\n\n" + messages[1]["content"]
    return [merged] + messages[2:]


def _short(obj: Any, limit: int = 80) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------- base-dir helpers

def _tokenizer_dir(base_dir: str | os.PathLike | None) -> Path:
    from nanochat.common import get_base_dir
    return get_base_dir(base_dir) / TOKENIZER_SUBDIR


def get_tokenizer(base_dir: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer saved under `<base_dir>/tokenizer/` by `nanochat tok-train`."""
    return Tokenizer.from_directory(_tokenizer_dir(base_dir))


def get_token_bytes(base_dir: str | os.PathLike | None = None, device: Any = "cpu"):
    """The saved int32 tensor (vocab,) of token byte lengths, on `device`."""
    import torch

    path = _tokenizer_dir(base_dir) / TOKEN_BYTES_NAME
    if not path.is_file():
        raise MissingInputError(f"no token byte lengths at {path}; train a tokenizer with `nanochat tok-train`")
    with open(path, "rb") as f:
        return torch.load(f, map_location=device)


def iter_capped(texts: Iterable[str], max_chars: int, doc_cap: int) -> Iterator[str]:
    """Yield texts cropped to `doc_cap` characters each, stopping once `max_chars`
    characters have been yielded (the last text is cut to fit exactly)."""
    total = 0
    for text in texts:
        if total >= max_chars:
            return
        text = text[:min(doc_cap, max_chars - total)]
        total += len(text)
        yield text
