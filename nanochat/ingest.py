"""
Build a named pretraining dataset from local files (`nanochat ingest`).

Inputs are files, directories (read recursively, hidden entries skipped) and globs:
  .txt .md      one document per file (or per blank-line-separated paragraph)
  .jsonl        one document per line, from a string field (default "text")
  .parquet      one document per row, from a string column (default "text")
each also as .gz or .zst (zstd: pyarrow's codec, else the `zstandard` module).

Output: `<base_dir>/datasets/<name>/shard_NNNNN.parquet` in the layout of the downloaded
shards (a `text` column, row groups of 1,024 documents, zstd level 3, ~250M characters a
shard), the LAST shard being the validation split, and `manifest.json` (sources, counts,
options, when, our version), written last: a directory without it is unfinished.

How it runs, in two passes so that a corpus larger than memory can be shuffled:
1. read every input in sorted order, drop bad and (with `dedup`) repeated documents, and
   deal each document to one of K spill files at random (seeded);
2. shuffle each spill file in memory (seeded) and write them out one after the other:
   dealing at random then shuffling each pile is a uniform random permutation.
   The first documents of that order (`val_fraction` of them, at least a few, at most
   one shard's worth) are the validation split; the rest fill the train shards.
Every shard is written to a temporary name and renamed, and a progress file records the
spill pass and each finished shard, so an interrupted ingest, run again with the same
inputs and options, skips what is done; with its manifest present it is a no-op.

Bad input never stops the run: empty or binary files, invalid UTF-8 (replaced by U+FFFD
or the document skipped), JSONL lines that are not JSON objects or lack the field, lines
over `max_doc_bytes` (skipped without being held in memory), unreadable files. Each is
counted by reason, and the first few of each are logged with their file and line.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from nanochat.common import atomic_path, atomic_write_text
from nanochat.dataset import MANIFEST_FILE, TEXT_COLUMN, data_dir, shard_name
from nanochat.errors import MissingInputError, UserError

log = logging.getLogger("nanochat.ingest")

FORMAT_VERSION = 1
TEXT_SUFFIXES = (".txt", ".md", ".markdown")
KINDS = {**{s: "text" for s in TEXT_SUFFIXES}, ".jsonl": "jsonl", ".parquet": "parquet"}
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
WORK_SUBDIR = ".ingest"              # spill files and progress of an unfinished ingest
PROGRESS_FILE = "progress.json"
SPILL_BYTES = 256 * 2 ** 20          # aim for spill files of ~256 MiB of text (one is in memory at a time)
MAX_SPILLS = 1024                    # open files in the first pass
COMPRESSED_RATIO = 4                 # assumed text bytes per compressed byte, to size the spill files
MIN_VAL_DOCS = 5
EXAMPLES_LOGGED = 5                  # problems logged one by one, per reason
_READ_CHUNK = 2 ** 20
_BINARY_SNIFF = 8192


@dataclass
class IngestOptions:
    """What turns inputs into documents, and documents into shards (all part of the
    dataset's identity: changing one rebuilds it)."""
    text_field: str = "text"             # JSONL: the field holding the document
    text_column: str = "text"            # parquet: the column holding the document
    split_on_blank_lines: bool = False   # txt/md: one document per paragraph instead of per file
    val_fraction: float = 0.005          # documents held out for validation
    seed: int = 42                       # of the shuffle
    dedup: bool = False                  # drop exact duplicate documents (after the first)
    invalid_utf8: str = "replace"        # "replace" (U+FFFD) or "skip" the document
    max_doc_bytes: int = 16 * 2 ** 20    # longer JSONL lines / text lines are skipped; longer text documents cut at a line
    shard_chars: int = 250_000_000       # characters per shard (the downloaded shards' size)
    row_group_size: int = 1024           # documents per parquet row group

    def problems(self) -> list[str]:
        p = []
        if not 0 < self.val_fraction < 1:
            p.append(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.invalid_utf8 not in ("replace", "skip"):
            p.append(f"--invalid-utf8 must be 'replace' or 'skip', got {self.invalid_utf8!r}")
        for name in ("max_doc_bytes", "shard_chars", "row_group_size"):
            if getattr(self, name) < 1:
                p.append(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not self.text_field:
            p.append("--text-field must not be empty")
        if not self.text_column:
            p.append("--text-column must not be empty")
        return p


# -----------------------------------------------------------------------------
# Inputs

@dataclass(frozen=True)
class Source:
    path: Path
    kind: str                   # "text", "jsonl" or "parquet"
    compression: str | None     # None, "gzip" or "zstd"


def classify(path: Path) -> Source | None:
    """The Source for a supported file name, else None (`notes.md.gz` -> text, gzip)."""
    name = path.name.lower()
    compression = None
    for suffix, codec in COMPRESSIONS.items():
        if name.endswith(suffix):
            compression, name = codec, name[: -len(suffix)]
            break
    kind = KINDS.get(os.path.splitext(name)[1])
    if kind is None or (kind == "parquet" and compression):  # parquet compresses inside the file
        return None
    return Source(path, kind, compression)


def find_sources(paths: list[str | os.PathLike], exclude: Path | None = None) -> tuple[list[Source], list[Path]]:
    """(supported files, unsupported files) under `paths`, each list sorted by path and
    without repeats. A path that exists as given is used as is (a directory is walked,
    skipping hidden entries); otherwise it is a glob (`**` recurses). A path matching
    nothing raises FileNotFoundError. Files under `exclude` are left out."""
    if not paths:
        raise UserError("give at least one file, directory or glob to ingest")
    files: set[Path] = set()
    explicit: set[Path] = set()
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_file():
            files.add(p.resolve())
            explicit.add(p.resolve())
        elif p.is_dir():
            for root, dirs, names in os.walk(p, followlinks=True):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                files.update((Path(root) / n).resolve() for n in names if not n.startswith("."))
        else:
            matches = [Path(m) for m in glob.glob(str(p), recursive=True)]
            matched = [m.resolve() for m in matches if m.is_file()]
            if not matched:
                raise MissingInputError(f"{raw}: no such file or directory, and no file matches it as a glob")
            files.update(matched)
            explicit.update(matched)
    if exclude is not None:
        exclude = exclude.resolve()
        files = {f for f in files if not f.is_relative_to(exclude)}
    supported, unsupported = [], []
    for f in sorted(files):
        source = classify(f)
        if source is not None:
            supported.append(source)
        elif f in explicit:  # named by the user: worth a word; a directory's other files are not
            unsupported.append(f)
    return supported, unsupported


# -----------------------------------------------------------------------------
# Reading documents, counting what is skipped

class Tally:
    """Problems by reason, with the first few locations of each logged and kept."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES_LOGGED:
            examples.append(where)
            log.warning("%s: %s", where, reason)


class _Reader:
    """Turns one Source into documents (str), reporting problems to a Tally."""

    def __init__(self, options: IngestOptions, tally: Tally):
        self.options, self.tally = options, tally
        self.bytes_read = 0

    def documents(self, source: Source) -> Iterator[str]:
        if source.kind == "parquet":
            yield from self._parquet(source)
            return
        with _open(source) as stream:
            head = stream.read(_BINARY_SNIFF)
            if not head:
                self.tally.add("empty file", str(source.path))
                return
            if b"\0" in head:  # text in UTF-8 never holds a NUL byte; binaries (and UTF-16) do
                self.tally.add("binary file (NUL bytes), skipped", str(source.path))
                return
            lines = _lines(stream, self.options.max_doc_bytes, self, head)
            if source.kind == "jsonl":
                yield from self._jsonl(source.path, lines)
            else:
                yield from self._text(source.path, lines)

    # -- per format -------------------------------------------------------------

    def _text(self, path: Path, lines) -> Iterator[str]:
        """One document per file, or per paragraph; a document growing past
        max_doc_bytes is cut at a line boundary and continued as the next one."""
        limit, per_paragraph = self.options.max_doc_bytes, self.options.split_on_blank_lines
        parts: list[bytes] = []
        size, start = 0, 1
        for lineno, line in lines:
            if line is None:
                self.tally.add(f"line longer than {limit:,} bytes, skipped", f"{path}:{lineno}")
                continue
            if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark
                line = line[3:]
            if per_paragraph and not line.strip():
                yield from self._finish_text(parts, path, start, paragraph=True)
                parts, size, start = [], 0, lineno + 1
                continue
            if size + len(line) + 1 > limit and parts:
                self.tally.add(f"document cut at {limit:,} bytes (kept, as several documents)", f"{path}:{lineno}")
                yield from self._finish_text(parts, path, start, paragraph=per_paragraph)
                parts, size, start = [], 0, lineno
            parts.append(line)
            size += len(line) + 1
        if parts or not per_paragraph:
            yield from self._finish_text(parts, path, start, paragraph=per_paragraph)

    def _finish_text(self, parts: list[bytes], path: Path, first: int, paragraph: bool) -> Iterator[str]:
        if not parts or not any(p.strip() for p in parts):
            if not paragraph:
                self.tally.add("empty document", f"{path}:{first}" if first > 1 else str(path))
            return
        text = self._decode(b"\n".join(parts), path, first)
        if text is not None:
            yield text.strip("\r\n") if paragraph else text

    def _jsonl(self, path: Path, lines) -> Iterator[str]:
        key = self.options.text_field
        for lineno, line in lines:
            where = f"{path}:{lineno}"
            if line is None:
                self.tally.add(f"line longer than {self.options.max_doc_bytes:,} bytes, skipped", where)
                continue
            if not line.strip():
                continue
            if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark
                line = line[3:]
            raw = self._decode(line, path, lineno)
            if raw is None:
                continue
            try:
                record = json.loads(raw)
            except ValueError:
                self.tally.add("not JSON, skipped", where)
                continue
            if not isinstance(record, dict) or key not in record:
                self.tally.add(f"no {key!r} field, skipped", where)
                continue
            text = record[key]
            if not isinstance(text, str):
                self.tally.add(f"{key!r} is not a string, skipped", where)
                continue
            text = self._clean(text, where)
            if text is not None:
                yield text

    def _parquet(self, source: Source) -> Iterator[str]:
        import pyarrow as pa
        import pyarrow.parquet as pq
        column = self.options.text_column
        pf = pq.ParquetFile(source.path)
        schema = pf.schema_arrow
        if column not in schema.names:
            self.tally.add(f"no {column!r} column (columns: {', '.join(schema.names)}), file skipped", str(source.path))
            return
        kind = schema.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            self.tally.add(f"column {column!r} is {kind}, not text, file skipped", str(source.path))
            return
        row = 0
        for batch in pf.iter_batches(batch_size=1024, columns=[column]):
            for text in batch.column(0).to_pylist():
                row += 1
                if text is None:
                    self.tally.add("empty document", f"{source.path}: row {row}")
                    continue
                self.bytes_read += len(text)
                text = self._clean(text, f"{source.path}: row {row}")
                if text is not None:
                    yield text

    # -- shared checks ------------------------------------------------------------

    def _decode(self, data: bytes, where: str | Path, first_line: int | None = None) -> str | None:
        """`data` as text, or None to skip it. `data` starts at line `first_line` of the
        file `where` (or `where` is a finished location): errors name line and byte."""
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            if first_line is not None:
                line = first_line + data.count(b"\n", 0, e.start)
                column = e.start - data.rfind(b"\n", 0, e.start) - 1
                where = f"{where}:{line} (byte {column})"
            if self.options.invalid_utf8 == "skip":
                self.tally.add("invalid UTF-8, document skipped", str(where))
                return None
            self.tally.add("invalid UTF-8, replaced with U+FFFD", str(where))
            return data.decode("utf-8", errors="replace")

    def _clean(self, text: str, where: str) -> str | None:
        """None for an empty document; lone surrogates (JSON's "\\ud800", which UTF-8
        cannot store) go the way of invalid UTF-8."""
        if not text.strip():
            self.tally.add("empty document", where)
            return None
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return self._decode(text.encode("utf-8", errors="surrogatepass"), where)
        return text


class _open:
    """A binary stream over a possibly compressed file (context manager)."""

    def __init__(self, source: Source):
        self.source = source
        self.stream: Any = None

    def __enter__(self):
        path, codec = self.source.path, self.source.compression
        if codec is None:
            self.stream = open(path, "rb")
        elif codec == "gzip":
            self.stream = gzip.open(path, "rb")
        else:
            self.stream = _open_zstd(path)
        return self.stream

    def __exit__(self, *exc) -> None:
        self.stream.close()


def _open_zstd(path: Path):
    # pyarrow (a dependency) ships zstd in its wheels; the `zstandard` module covers builds without it
    import pyarrow as pa
    if pa.Codec.is_available("zstd"):
        return pa.input_stream(str(path), compression="zstd")
    try:
        import zstandard
    except ImportError:
        raise UserError(f"{path}: reading .zst files needs zstd support: pip install zstandard "
                        "(this pyarrow was built without its zstd codec)") from None
    return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True, closefd=True)


def _zstd_available() -> bool:
    import importlib.util

    import pyarrow as pa
    return importlib.util.find_spec("zstandard") is not None or pa.Codec.is_available("zstd")


def _lines(stream, limit: int, reader: _Reader, head: bytes = b"") -> Iterator[tuple[int, bytes | None]]:
    """(line number from 1, line without its newline) for each line of a binary stream
    (after `head`, bytes already read from it); None instead of a line longer than
    `limit` bytes, which is never held whole."""
    lineno, pending, too_long = 0, b"", False
    while True:
        chunk, head = (head, b"") if head else (stream.read(_READ_CHUNK), b"")
        if not chunk:
            break
        reader.bytes_read += len(chunk)
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                break
            lineno += 1
            if too_long or len(pending) + end - start > limit:
                yield lineno, None
            else:
                yield lineno, (pending + chunk[start:end]) if pending else chunk[start:end]
            pending, too_long, start = b"", False, end + 1
        if not too_long:
            pending += chunk[start:]
            if len(pending) > limit:
                pending, too_long = b"", True
    if pending or too_long:
        yield lineno + 1, None if too_long else pending


# -----------------------------------------------------------------------------
# The dataset

class _Progress:
    """A log line every few seconds: files, documents, MB read, MB/s."""

    def __init__(self, total_files: int, every: float):
        self.total_files, self.every = total_files, every
        self.t0 = self.last = time.monotonic()

    def maybe(self, files: int, docs: int, nbytes: int, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last >= self.every:
            self.last = now
            mb = nbytes / 1e6
            log.info("ingest: %d/%d files, %s documents, %.1f MB read, %.1f MB/s", files, self.total_files,
                     f"{docs:,}", mb, mb / max(now - self.t0, 1e-9))


def ingest(paths: list[str | os.PathLike], name: str, base_dir: str | os.PathLike | None = None,
           options: IngestOptions | None = None, *, overwrite: bool = False,
           progress_every: float = 5.0) -> dict:
    """Build (or finish, or confirm) the dataset `name` from `paths`; returns a summary:
    documents and characters per split, shards, files, skipped documents by reason."""
    options = options or IngestOptions()
    problems = options.problems()
    if problems:
        raise UserError("; ".join(problems))
    out = data_dir(base_dir, name)  # validates the name
    sources, unsupported = find_sources(paths, exclude=out)
    if not sources:
        listed = f" (unsupported: {', '.join(str(u) for u in unsupported[:5])})" if unsupported else ""
        raise UserError(f"no .txt, .md, .jsonl or .parquet files (optionally .gz/.zst) in {', '.join(map(str, paths))}"
                        f"{listed}")
    if any(s.compression == "zstd" for s in sources) and not _zstd_available():
        raise UserError("reading .zst files needs zstd support, which this pyarrow lacks: pip install zstandard")
    fingerprint = _fingerprint(sources, options)

    manifest_path = out / MANIFEST_FILE
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("fingerprint") == fingerprint and not overwrite:
            log.info("dataset %r in %s is already built from these inputs; nothing to do", name, out)
            return {**_summary(manifest, out), "already_built": True}
        if not overwrite:
            raise UserError(f"dataset {name!r} in {out} was built from other inputs or options; pass --overwrite to "
                            f"rebuild it, or choose another --dataset name")
    work = out / WORK_SUBDIR
    state = _read_progress(work)
    if overwrite or (state is not None and state.get("fingerprint") != fingerprint) or (
            state is None and out.is_dir()):
        if out.is_dir() and any(out.iterdir()):
            log.info("starting %s afresh (%s)", out, "--overwrite" if overwrite else "inputs or options changed")
        _clear(out)
        state = None
    if state is None:
        state = {"fingerprint": fingerprint, "spilled": False, "shards_done": []}

    t0 = time.monotonic()
    tally = Tally()
    if state["spilled"] and all((work / s).is_file() for s in state["spills"]):
        log.info("resuming: the reading pass of an earlier run is complete (%s documents)", f"{state['documents']:,}")
        tally.counts.update(state["skipped"])
        tally.examples = state["examples"]
        bytes_read = state["bytes_read"]
    else:
        for u in unsupported:
            tally.add("unsupported file type (want .txt .md .jsonl .parquet, optionally .gz/.zst), skipped", str(u))
        bytes_read = _spill(sources, options, work, state, tally, progress_every)
    num_docs = state["documents"]
    if num_docs < 2:
        raise UserError(f"{num_docs} usable document(s) in {len(sources)} file(s): too little to train on (a dataset "
                        f"needs at least 2 documents: one to train on, one to validate with)"
                        + (f"; skipped: {_reasons(tally.counts)}" if tally.counts else ""))
    shards = _write_shards(out, work, state, options)

    manifest = {
        "name": name, "format": FORMAT_VERSION, "nanochat_version": _version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sources": [str(Path(p).expanduser().absolute()) for p in paths],
        "files": len(sources), "files_skipped": len(unsupported),
        "documents": shards["documents"], "characters": shards["characters"],
        "shards": {"train": shards["train"], "val": shards["val"]},
        "skipped": dict(sorted(tally.counts.items())),
        "skipped_examples": {k: v for k, v in sorted(tally.examples.items())},
        "bytes_read": bytes_read, "options": asdict(options), "fingerprint": fingerprint,
    }
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    summary = {**_summary(manifest, out), "already_built": False, "seconds": round(time.monotonic() - t0, 3)}
    _log_summary(summary)
    return summary


def _spill(sources: list[Source], options: IngestOptions, work: Path, state: dict, tally: Tally,
           progress_every: float) -> int:
    """Pass 1: read every source; deal the documents to the spill files. Returns bytes read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    estimate = sum(s.path.stat().st_size * (COMPRESSED_RATIO if s.compression else 1) for s in sources)
    num_spills = max(1, min(MAX_SPILLS, math.ceil(estimate / SPILL_BYTES)))
    names = [f"spill_{i:05d}.parquet" for i in range(num_spills)]
    rng = random.Random(options.seed)
    writers: list[Any] = [None] * num_spills
    pending: list[list[str]] = [[] for _ in range(num_spills)]
    pending_chars = [0] * num_spills
    schema = pa.schema([(TEXT_COLUMN, pa.string())])

    def flush(i: int) -> None:
        if writers[i] is None:
            writers[i] = pq.ParquetWriter(work / names[i], schema, compression="zstd", compression_level=1)
        writers[i].write_table(pa.table({TEXT_COLUMN: pending[i]}, schema=schema))
        pending[i], pending_chars[i] = [], 0

    reader = _Reader(options, tally)
    seen: set[bytes] = set()
    docs = files = 0
    progress = _Progress(len(sources), progress_every)
    try:
        for source in sources:
            try:
                for text in reader.documents(source):
                    if options.dedup:
                        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
                        if digest in seen:
                            tally.counts["exact duplicate, dropped"] += 1
                            continue
                        seen.add(digest)
                    i = rng.randrange(num_spills)
                    pending[i].append(text)
                    pending_chars[i] += len(text)
                    if len(pending[i]) >= 1024 or pending_chars[i] >= 16 * 2 ** 20:
                        flush(i)
                    docs += 1
                    progress.maybe(files, docs, reader.bytes_read)
            except Exception as e:  # noqa: BLE001 - bad input is reported, never fatal
                # a corrupt or unreadable file (truncated gzip/zstd, damaged parquet, no
                # permission, ...): what it yielded so far is kept, the rest of it is lost
                tally.add(f"unreadable ({type(e).__name__}), rest of file skipped", f"{source.path}: {e}")
            files += 1
        for i in range(num_spills):
            if pending[i] or writers[i] is None:
                flush(i)
    finally:
        for w in writers:
            if w is not None:
                w.close()
    progress.maybe(files, docs, reader.bytes_read, force=True)
    state.update(spilled=True, spills=names, documents=docs, skipped=dict(tally.counts), examples=tally.examples,
                 bytes_read=reader.bytes_read)
    _write_progress(work, state)
    return reader.bytes_read


def _write_shards(out: Path, work: Path, state: dict, options: IngestOptions) -> dict:
    """Pass 2: shuffle each spill file and write the shards, val (the first documents of
    the shuffled order) last. Shards recorded as done in the progress file are skipped."""
    import pyarrow.parquet as pq

    num_docs = state["documents"]
    want_val = min(max(MIN_VAL_DOCS, round(num_docs * options.val_fraction)), num_docs // 2)
    val: list[str] = []
    val_chars = 0
    val_open = True
    train: list[str] = []
    train_chars = 0
    written: list[str] = []
    counts = {"documents": {"train": 0, "val": 0}, "characters": {"train": 0, "val": 0}}
    done = set(state["shards_done"])

    def write(docs: list[str], index: int) -> str:
        name = shard_name(index)
        if name not in done or not (out / name).is_file():
            _write_shard(out / name, docs, options.row_group_size)
            state["shards_done"].append(name)
            _write_progress(work, state)
        return name

    for i, spill in enumerate(state["spills"]):
        texts = pq.read_table(work / spill, columns=[TEXT_COLUMN]).column(TEXT_COLUMN).to_pylist()
        random.Random(f"{options.seed}/{i}").shuffle(texts)
        for text in texts:
            if val_open and len(val) < want_val and (not val or val_chars + len(text) <= options.shard_chars):
                val.append(text)
                val_chars += len(text)
                continue
            val_open = False  # the val split is a prefix of the order: at most one shard's worth
            train.append(text)
            train_chars += len(text)
            # as the downloaded shards: close a shard once it has enough characters and a
            # whole number of row groups
            if train_chars >= options.shard_chars and len(train) % options.row_group_size == 0:
                counts["documents"]["train"] += len(train)
                counts["characters"]["train"] += train_chars
                written.append(write(train, len(written)))
                train, train_chars = [], 0
    if train:
        counts["documents"]["train"] += len(train)
        counts["characters"]["train"] += train_chars
        written.append(write(train, len(written)))
    counts["documents"]["val"], counts["characters"]["val"] = len(val), val_chars
    val_name = write(val, len(written))
    return {"train": written, "val": val_name, **counts}


def _write_shard(path: Path, docs: list[str], row_group_size: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    with atomic_path(path) as tmp:
        # the reference's settings for its published shards
        pq.write_table(pa.table({TEXT_COLUMN: pa.array(docs, pa.string())}), tmp, row_group_size=row_group_size,
                       use_dictionary=False, compression="zstd", compression_level=3, write_statistics=False)


# -----------------------------------------------------------------------------
# Bookkeeping

def _fingerprint(sources: list[Source], options: IngestOptions) -> str:
    """What the shards depend on: the options and each input's path, size and mtime."""
    h = hashlib.sha256(json.dumps(asdict(options), sort_keys=True).encode())
    h.update(str(FORMAT_VERSION).encode())
    for s in sources:
        st = s.path.stat()
        h.update(f"\n{s.path}\t{st.st_size}\t{st.st_mtime_ns}".encode("utf-8", errors="surrogateescape"))
    return h.hexdigest()[:32]


def _read_progress(work: Path) -> dict | None:
    path = work / PROGRESS_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_progress(work: Path, state: dict) -> None:
    atomic_write_text(work / PROGRESS_FILE, json.dumps(state) + "\n")


def _clear(out: Path) -> None:
    """Remove what an ingest writes (shards, manifest, work files), nothing else."""
    if not out.is_dir():
        return
    shutil.rmtree(out / WORK_SUBDIR, ignore_errors=True)
    for p in out.iterdir():
        if p.name == MANIFEST_FILE or (p.name.startswith(("shard_", ".shard_")) and p.name.endswith((".parquet", ".tmp"))):
            p.unlink()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("nanochat")
    except PackageNotFoundError:
        return "unknown"


def _reasons(counts: Counter | dict) -> str:
    return "; ".join(f"{n:,} {reason}" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def _summary(manifest: dict, out: Path) -> dict:
    return {
        "dataset": manifest["name"], "directory": str(out),
        "documents": manifest["documents"], "characters": manifest["characters"],
        "train_shards": len(manifest["shards"]["train"]), "val_shard": manifest["shards"]["val"],
        "files": manifest["files"], "files_skipped": manifest.get("files_skipped", 0),
        "skipped": manifest["skipped"], "bytes_read": manifest.get("bytes_read", 0),
    }


def _log_summary(s: dict) -> None:
    docs, chars = s["documents"], s["characters"]
    log.info("dataset %r: %s train documents (%s characters) in %d shard(s), %s val documents (%s characters) "
             "in %s; %d file(s) read in %.1f s", s["dataset"], f"{docs['train']:,}", f"{chars['train']:,}",
             s["train_shards"], f"{docs['val']:,}", f"{chars['val']:,}", s["val_shard"], s["files"], s["seconds"])
    if s["skipped"]:
        log.info("skipped or changed: %s", _reasons(s["skipped"]))
    log.info("written to %s", s["directory"])
