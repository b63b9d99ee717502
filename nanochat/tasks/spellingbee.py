"""
Synthetic spelling tasks that teach a small model what its tokens are made of.

- SpellingBee: "how many r are in strawberry?" The assistant spells the word, walks
  through it letter by letter keeping a running count, then checks the count with a
  Python tool call (`'strawberry'.count('r')`) and answers after "####". Mixing manual
  work and a tool gives the model both habits; RL can later sharpen which to trust.
- SimpleSpelling: "spell strawberry" -> "strawberry:s,t,r,a,w,b,e,r,r,y". The hard part
  of counting letters is knowing how a token spells out (a token is a chunk of several
  characters); this drills exactly that, which small models do not pick up on their own.

Examples are generated on the fly from an English word list. Example i of a split is
always the same: its random generator is seeded with (task, split, i), so train and
test draw independently and nothing needs storing. The word list (dwyl/english-words,
370K words, CRLF line endings) is downloaded once into <base_dir>/words_alpha.txt, or
read from `words_path`.
"""
from __future__ import annotations

import functools
import os
import random
from pathlib import Path

from nanochat.common import get_base_dir
from nanochat.downloads import DownloadError, download_file
from nanochat.errors import MissingInputError, UserError
from nanochat.tasks.common import Conversation, Task
from nanochat.tasks.gsm8k import answers_match, extract_answer, reference_answer
from nanochat.tasks.hub import is_missing

WORDS_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
WORDS_URL_ENV = "NANOCHAT_WORDS_URL"
WORDS_FILE = "words_alpha.txt"
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
SPLITS = ("train", "test")

# Ways people ask for a letter count; {letter} and {word} may get quoted below.
COUNT_TEMPLATES = (
    "How many {letter} are in {word}",
    "How many {letter}'s does the word {word} have",
    "How many times does the letter {letter} occur in {word}",
    "Count the {letter} in {word}",
    "Count how often {letter} shows up in the word {word}",
    "Please count the letter {letter} in {word}",
    "What is the number of {letter} in {word}",
    "Number of times {letter} appears in {word}",
    "In {word}, how many {letter} are there",
    "In the word {word}, count the letter {letter}",
    "Can you tell me how many {letter} {word} contains",
    "Could you count the {letter}s in {word} for me",
    "I need the count of letter {letter} in {word}",
    "{word}: how many {letter}",
    "How often is {letter} used in {word}",
    "Tell me how many {letter} the word {word} has",
    "Letter count: {letter} in {word}",
    "quick one: number of {letter} in {word}",
    "Does {word} have many {letter}? How many exactly",
    "How many occurrences of the letter {letter} does {word} contain",
    # Spanish, French, German, Italian, Portuguese
    "¿Cuántas veces está la letra {letter} en {word}?",
    "Cuenta cuántas {letter} tiene {word}",
    "Combien y a-t-il de {letter} dans le mot {word} ?",
    "Compte le nombre de {letter} dans {word}",
    "Wie viele {letter} hat das Wort {word}",
    "Zähl bitte die {letter} in {word}",
    "Quante {letter} ci sono in {word}",
    "Quantas letras {letter} tem a palavra {word}",
    # Chinese, Japanese, Korean
    "{word}这个单词里有几个{letter}",
    "请数一数{word}中字母{letter}出现了几次",
    "{word}という単語に{letter}はいくつありますか",
    "{word}에는 {letter}가 몇 개 있어요",
)

SPELL_TEMPLATES = (
    "Spell the word: {word}",
    "Spell {word}",
    "How do you spell {word}?",
    "Spell out {word} letter by letter",
    "spell {word} for me",
    "What are the letters of {word}?",
)

QUOTES = ("", "'", '"')


def spelled(word: str) -> str:
    """'cat' -> 'cat:c,a,t' (the spelling format both tasks share)."""
    return f"{word}:{','.join(word)}"


@functools.lru_cache(maxsize=4)
def _read_words(path: str, mtime_ns: int) -> tuple[str, ...]:
    with open(path, encoding="utf-8") as f:
        words = tuple(w for w in (line.strip() for line in f) if w)
    if not words:
        raise UserError(f"word list {path} is empty")
    return words


def _validate_word_list(path: str | os.PathLike) -> None:
    head = Path(path).read_bytes()[:4096]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not a UTF-8 word list") from e
    if not text.strip() or "<" in text:  # an empty body or an HTML error page
        raise UserError(f"{path} does not look like a word list (one word per line)")


def load_words(words_path: str | os.PathLike | None = None, *, base_dir=None,
               url: str | None = None) -> tuple[str, ...]:
    """The word list: `words_path` if given, else <base_dir>/words_alpha.txt, downloaded
    from `url` ($NANOCHAT_WORDS_URL, default dwyl/english-words on GitHub) the first time."""
    if words_path is not None:
        path = Path(words_path).expanduser()
        if not path.is_file():
            raise MissingInputError(f"word list {path} does not exist; pass words_path=None to download it")
    else:
        path = get_base_dir(base_dir) / WORDS_FILE
        if not path.is_file():
            url = url or os.environ.get(WORDS_URL_ENV) or WORDS_URL
            try:
                download_file(url, path, timeout=60, retries=5, validate=_validate_word_list)
            except DownloadError as e:
                if not is_missing(e):
                    raise
                raise MissingInputError(f"could not download the word list from {url}: {e}. "
                                        f"Put a copy at {path}, or set ${WORDS_URL_ENV} to a reachable URL") from e
    return _read_words(str(path), path.stat().st_mtime_ns)


class _WordTask(Task):
    """Shared by the spelling tasks: a fixed number of generated examples per split."""

    eval_type = "generative"
    random_baseline = 0.0

    def __init__(self, size: int = 1000, split: str = "train", *, words_path=None, base_dir=None,
                 words_url: str | None = None, **view):
        super().__init__(**view)
        if split not in SPLITS:
            raise ValueError(f"{type(self).__name__} split must be one of {SPLITS}, got {split!r}")
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{type(self).__name__} size must be a positive integer, got {size!r}")
        self.size, self.split = size, split
        self.words = load_words(words_path, base_dir=base_dir, url=words_url)

    def num_examples(self) -> int:
        return self.size

    def rng(self, index: int) -> random.Random:
        # str seeds are hashed with SHA-512 by random.seed: stable across runs and machines
        return random.Random(f"{type(self).__name__}/{self.split}/{index}")


class SpellingBee(_WordTask):
    """`SpellingBee(size=1000, split="train" | "test")`: count a letter in a word."""

    def get_example(self, index: int) -> Conversation:
        rng = self.rng(index)
        word = rng.choice(self.words)
        # mostly a letter the word has; sometimes any letter, so that 0 is a possible answer
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(ALPHABET)
        count = word.count(letter)

        template = rng.choice(COUNT_TEMPLATES)
        if rng.random() < 0.3:
            template = template.lower()  # people often skip capitals
        lq, wq = rng.choice(QUOTES), rng.choice(QUOTES)
        question = template.format(letter=f"{lq}{letter}{lq}", word=f"{wq}{word}{wq}")
        if rng.random() < 0.5 and not question.endswith(("?", "？")):
            question += "?"

        return {"messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": self._solution(word, letter, count)},
        ]}

    @staticmethod
    def _solution(word: str, letter: str, count: int) -> list[dict[str, str]]:
        # Positions are written "3:r" with no space: " r" and "r" are different tokens,
        # and the model should see the same letter tokens as in the spelling "word:w,o,r,d".
        lines = []
        running = 0
        for i, ch in enumerate(word, 1):
            if ch == letter:
                running += 1
                lines.append(f"{i}:{ch} found, count={running}")
            else:
                lines.append(f"{i}:{ch}")
        by_hand = (f"I need the number of '{letter}' in the word '{word}'. I'll count by hand first.\n\n"
                   f"Spelled out:\n{spelled(word)}\n\n"
                   f"Now each letter in turn, counting every '{letter}':\n" + "\n".join(lines) +
                   f"\n\nCounting by hand gives {running}.")
        return [
            {"type": "text", "text": by_hand},
            {"type": "text", "text": "\n\nLet me verify with Python:\n\n"},
            {"type": "python", "text": f"{word!r}.count({letter!r})"},  # 'strawberry'.count('r')
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nPython agrees: {count}.\n\nFinal answer:\n\n#### {count}"},
        ]

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        if not isinstance(completion, str):
            raise TypeError(f"SpellingBee grades a completion string, got {type(completion).__name__}")
        return answers_match(extract_answer(completion), reference_answer(conversation))


class SimpleSpelling(_WordTask):
    """`SimpleSpelling(size=1000, split="train" | "test")`: spell a word letter by letter."""

    def get_example(self, index: int) -> Conversation:
        rng = self.rng(index)
        word = rng.choice(self.words)
        request = rng.choice(SPELL_TEMPLATES).format(word=word)
        return {"messages": [
            {"role": "user", "content": request},
            {"role": "assistant", "content": spelled(word)},
        ]}

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        return isinstance(completion, str) and completion.strip() == conversation["messages"][-1]["content"]
