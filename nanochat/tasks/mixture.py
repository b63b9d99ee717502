"""SFT mixture specs: the small language of `nanochat sft --mixture`, and the tasks it builds.

A spec is NAME[:EPOCHS][@ROWS] (or jsonl:PATH[:EPOCHS][@ROWS] for your own file): NAME is
a key of COMPONENTS, EPOCHS how many times the component is listed in the mixture, ROWS
how many of its first rows to keep (for the generated spelling tasks: how many to
generate). Train splits are plain names; evaluation splits end in -test.

    components = parse_mixture(["identity:2", "gsm8k:4", "spelling@5000"])
    dataset, lines = build_mixture(components, base_dir)   # a TaskMixture, one log line per component
"""
from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nanochat.downloads import DownloadError, download_file
from nanochat.errors import MissingInputError, UserError
from nanochat.tasks.arc import ARC
from nanochat.tasks.common import TaskMixture
from nanochat.tasks.customjson import IDENTITY_URL, CustomJSON, read_conversations
from nanochat.tasks.gsm8k import GSM8K
from nanochat.tasks.mmlu import MMLU
from nanochat.tasks.smoltalk import SmolTalk
from nanochat.tasks.spellingbee import SimpleSpelling, SpellingBee

log = logging.getLogger("nanochat.tasks.mixture")

IDENTITY_FILE = "identity_conversations.jsonl"
DEFAULT_MMLU_EPOCHS = 3
DEFAULT_GSM8K_EPOCHS = 4
# The reference's validation mixture, sized to roughly match the training proportions.
DEFAULT_VAL_MIXTURE = ("smoltalk-test", "mmlu-test@5200", "gsm8k-test@420")
# name -> what it holds. Train splits are plain names; evaluation splits end in -test.
COMPONENTS = {
    "smoltalk": "SmolTalk train, ~460K general conversations",
    "smoltalk-test": "SmolTalk test",
    "identity": f"identity conversations, <base_dir>/{IDENTITY_FILE} (downloaded when missing)",
    "mmlu-aux": "MMLU auxiliary_train, ~100K multiple-choice questions",
    "mmlu-test": "MMLU test, all subjects",
    "gsm8k": "GSM8K train, 7.5K math problems with calculator calls",
    "gsm8k-test": "GSM8K test",
    "arc-easy": "ARC-Easy train", "arc-easy-test": "ARC-Easy test",
    "arc-challenge": "ARC-Challenge train", "arc-challenge-test": "ARC-Challenge test",
    "simple-spelling": "SimpleSpelling train, 200K generated rows (@ROWS: how many)",
    "simple-spelling-test": "SimpleSpelling test, 256 generated rows",
    "spelling": "SpellingBee train, 80K generated rows (@ROWS: how many)",
    "spelling-test": "SpellingBee test, 256 generated rows",
}


@dataclass(frozen=True)
class Component:
    """One parsed spec: a COMPONENTS name or "jsonl" (with its `path`), how many times
    it is listed in the mixture, and an optional row limit."""
    name: str
    epochs: int = 1
    rows: int | None = None
    path: str | None = None

    def __str__(self) -> str:
        head = f"jsonl:{self.path}" if self.name == "jsonl" else self.name
        return head + (f":{self.epochs}" if self.epochs != 1 else "") + (f"@{self.rows}" if self.rows else "")


def default_mixture(mmlu_epochs: int = DEFAULT_MMLU_EPOCHS, gsm8k_epochs: int = DEFAULT_GSM8K_EPOCHS) -> list[str]:
    """The reference SFT mixture: SmolTalk, identity ×2, MMLU aux ×3, GSM8K ×4, the spelling tasks."""
    specs = ["smoltalk", "identity:2"]
    if mmlu_epochs:
        specs.append(f"mmlu-aux:{mmlu_epochs}")
    if gsm8k_epochs:
        specs.append(f"gsm8k:{gsm8k_epochs}")
    return specs + ["simple-spelling", "spelling"]


_SPEC_RE = re.compile(r"^(?P<head>[^:@]+)(?::(?P<epochs>[^:@]*))?(?:@(?P<rows>[^:@]*))?$")
# a path may hold ':' and '@' itself: only a trailing ':<digits>' and '@<digits>' are options
_JSONL_RE = re.compile(r"^jsonl:(?P<path>.+?)(?::(?P<epochs>\d+))?(?:@(?P<rows>\d+))?$")


def parse_component(spec: str) -> Component:
    """'gsm8k:4' -> Component('gsm8k', 4); 'jsonl:/data/my.jsonl:2@500' -> that file, 2
    epochs, its first 500 rows. Raises ValueError naming the spec and the accepted forms."""
    text = spec.strip() if isinstance(spec, str) else ""
    if not text:
        raise UserError(f"empty mixture spec {spec!r}; use NAME[:EPOCHS][@ROWS], e.g. gsm8k:4")
    if text.startswith("jsonl:"):
        m = _JSONL_RE.match(text)
        if not m:
            raise UserError(f"mixture spec {text!r}: give a file, as jsonl:/path/to/file.jsonl[:EPOCHS][@ROWS]")
        name, path = "jsonl", m.group("path")
    else:
        m = _SPEC_RE.match(text)
        name, path = (m.group("head") if m else text), None
        if not m or name not in COMPONENTS:
            close = difflib.get_close_matches(name, list(COMPONENTS), n=2, cutoff=0.6)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise UserError(f"mixture spec {text!r}: unknown component {name!r}{hint}; known: "
                            f"{', '.join(COMPONENTS)}, and jsonl:/path/file.jsonl (form NAME[:EPOCHS][@ROWS])")
    epochs = _spec_int(text, "EPOCHS", m.group("epochs"), minimum=0) if m.group("epochs") is not None else 1
    rows = _spec_int(text, "ROWS", m.group("rows"), minimum=1) if m.group("rows") is not None else None
    return Component(name=name, epochs=epochs, rows=rows, path=path)


def _spec_int(spec: str, what: str, text: str, minimum: int) -> int:
    if not text.isdigit() or int(text) < minimum:
        raise UserError(f"mixture spec {spec!r}: {what} must be an integer >= {minimum}, got {text!r} "
                        f"(form: NAME[:EPOCHS][@ROWS], e.g. gsm8k:4 or spelling@5000)")
    return int(text)


def parse_mixture(specs: Sequence[str]) -> list[Component]:
    """Parse every spec, reporting all bad ones at once; components of 0 epochs are dropped."""
    components, problems = [], []
    for spec in specs:
        try:
            components.append(parse_component(spec))
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise UserError("; ".join(problems))
    components = [c for c in components if c.epochs > 0]
    if not components:
        raise UserError(f"the mixture {list(specs)} has no component with at least one epoch")
    return components


def default_val_mixture(training: Sequence[str]) -> list[str]:
    """The reference's validation mixture for a training mixture: SmolTalk's test split
    only when SmolTalk is trained on (offline runs drop it, and its test split with it)."""
    trained = {c.name for c in parse_mixture(training)}
    return [s for s in DEFAULT_VAL_MIXTURE if s != "smoltalk-test" or "smoltalk" in trained]


def ensure_identity_conversations(base_dir: Path, url: str | None = None) -> Path:
    """<base_dir>/identity_conversations.jsonl, downloaded from `url` (default: the
    reference's) the first time; the download is checked as a conversations file."""
    path = Path(base_dir) / IDENTITY_FILE
    if path.is_file():
        return path
    url = url or IDENTITY_URL
    log.info("downloading identity conversations from %s to %s", url, path)
    try:
        download_file(url, path, timeout=60, retries=3, validate=read_conversations)
    except DownloadError as e:
        raise MissingInputError(f"{path} is missing and could not be downloaded from {url}: {e}. Put the file "
                                f"there, pass --identity-url (file:// works), or leave 'identity' out of --mixture") from e
    return path


def build_component(comp: Component, base_dir: Path, identity_url: str | None = None, mirror: str | None = None):
    """The Task of one component (hub data through `mirror`, default $NANOCHAT_HF_MIRROR)."""
    hub = {"base_dir": base_dir, "mirror": mirror, "stop": comp.rows}
    name = comp.name
    if name == "jsonl":
        path = Path(comp.path).expanduser()
        if not path.is_file():
            raise MissingInputError(f"mixture component jsonl:{comp.path}: no such file; give an existing JSONL "
                                    "file of conversations (one JSON list of messages per line)")
        return CustomJSON(filepath=path, stop=comp.rows)
    if name == "identity":
        return CustomJSON(filepath=ensure_identity_conversations(base_dir, identity_url), stop=comp.rows)
    if name in ("smoltalk", "smoltalk-test"):
        return SmolTalk(split="test" if name.endswith("-test") else "train", **hub)
    if name == "mmlu-aux":
        return MMLU(subset="auxiliary_train", split="train", **hub)
    if name == "mmlu-test":
        return MMLU(subset="all", split="test", **hub)
    if name in ("gsm8k", "gsm8k-test"):
        return GSM8K(subset="main", split="test" if name.endswith("-test") else "train", **hub)
    if name.startswith("arc-"):
        subset = "ARC-Easy" if name.startswith("arc-easy") else "ARC-Challenge"
        return ARC(subset=subset, split="test" if name.endswith("-test") else "train", **hub)
    test = name.endswith("-test")
    cls = SimpleSpelling if name.startswith("simple-spelling") else SpellingBee
    default_size = 256 if test else (200_000 if cls is SimpleSpelling else 80_000)
    return cls(size=comp.rows or default_size, split="test" if test else "train", base_dir=base_dir)


def build_mixture(components: Sequence[Component], base_dir: Path, identity_url: str | None = None,
                  mirror: str | None = None, seed: int = 42) -> tuple[TaskMixture, list[str]]:
    """(TaskMixture of the components, one description line per component). A component
    of E epochs is listed E times, so each of its rows appears E times per SFT epoch."""
    tasks, lines = [], []
    for comp in components:
        try:
            task = build_component(comp, base_dir, identity_url, mirror)
        except (FileNotFoundError, ValueError) as e:
            if comp.name == "jsonl" or str(e).startswith("mixture component"):
                raise
            kind = FileNotFoundError if isinstance(e, FileNotFoundError) else ValueError
            raise kind(f"mixture component {comp}: {e}. To go on without it, list the other components "
                       f"with --mixture (see `nanochat sft --help`)") from e
        if len(task) == 0:
            raise UserError(f"mixture component {comp} has no rows")
        tasks.extend([task] * comp.epochs)
        lines.append(f"{comp}: {len(task):,} rows × {comp.epochs} = {len(task) * comp.epochs:,}")
    return TaskMixture(tasks, seed=seed), lines
