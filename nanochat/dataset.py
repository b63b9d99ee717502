"""
The pretraining corpus: parquet shards `shard_00000.parquet`, `shard_00001.parquet`, ...
with a `text` column, kept in `<base_dir>/base_data/`.

A source is a URL prefix under which shards 0 .. num_shards-1 live. The LAST shard of the
source is the validation split and every other shard is train, whichever subset of them
is on disk. The default source is the reference's ClimbMix-400B shuffle (6,543 shards,
shard_06542 = val); `$NANOCHAT_DATA_URL` / `--url` and `$NANOCHAT_DATA_SHARDS` /
`--num-shards` point at another (http(s)://, file:// or a local directory).

`download_shards` records the source in `base_data/source.json`, so the val shard is
known by name even when only a few train shards have been fetched; without that file
(shards copied in by hand) the highest-named shard present is val.

Named datasets (`nanochat ingest PATH --dataset NAME`, see nanochat/ingest.py) live in
`<base_dir>/datasets/NAME/`: the same shard layout, plus a `manifest.json` that lists the
train shards and the val shard (again the last one) and is written last, so a dataset
without it is an unfinished ingest. Every reader here takes `dataset=NAME`; None means
the downloaded web text in `base_data/`.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

from nanochat.common import atomic_write_text, get_base_dir
from nanochat.errors import MissingInputError, UserError

log = logging.getLogger("nanochat.dataset")

DEFAULT_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
DEFAULT_NUM_SHARDS = 6543           # shard_00000 .. shard_06542; shard_06542 is val
URL_ENV = "NANOCHAT_DATA_URL"
SHARDS_ENV = "NANOCHAT_DATA_SHARDS"
DATA_SUBDIR = "base_data"
SOURCE_FILE = "source.json"
DATASETS_SUBDIR = "datasets"        # named datasets: <base_dir>/datasets/<name>/
MANIFEST_FILE = "manifest.json"
TEXT_COLUMN = "text"
SPLITS = ("train", "val")
_SHARD_RE = re.compile(r"^shard_(\d+)\.parquet$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def data_dir(base_dir: str | os.PathLike | None = None, dataset: str | None = None) -> Path:
    """`<base_dir>/base_data`, or `<base_dir>/datasets/<dataset>` for a named dataset
    (base_dir defaults to $NANOCHAT_BASE_DIR or ~/.cache/nanochat)."""
    if dataset is not None:
        return get_base_dir(base_dir) / DATASETS_SUBDIR / check_dataset_name(dataset)
    return get_base_dir(base_dir) / DATA_SUBDIR


def check_dataset_name(name: str) -> str:
    """`name` if it can name a dataset directory (letters, digits, '.', '_', '-'), else ValueError."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in (".", ".."):
        raise UserError(f"dataset name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
                        "letter or digit (e.g. --dataset my_books)")
    return name


def dataset_problems(name: str | None) -> list[str]:
    """For a stage's validate(): what is wrong with `--dataset NAME` ([] when None or valid)."""
    if name is None:
        return []
    try:
        check_dataset_name(name)
    except ValueError as e:
        return [f"--dataset: {e}"]
    return []


def list_datasets(base_dir: str | os.PathLike | None = None) -> list[str]:
    """Names of the complete named datasets (those with a manifest) under the base dir."""
    root = get_base_dir(base_dir) / DATASETS_SUBDIR
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / MANIFEST_FILE).is_file())


def read_manifest(directory: str | os.PathLike) -> dict | None:
    """The manifest of a named dataset directory (None when absent: no dataset, or an
    ingest that did not finish)."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        [str(n) for n in manifest["shards"]["train"]], str(manifest["shards"]["val"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is damaged ({e}); run `nanochat ingest ... --overwrite` to rebuild the dataset") from e
    return manifest


def list_parquet_files(directory: str | os.PathLike) -> list[Path]:
    """The parquet files in `directory`, sorted by name (hidden and temporary files skipped)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir()
                  if p.suffix == ".parquet" and not p.name.startswith(".") and p.is_file())


def val_shard_index(num_shards: int) -> int:
    """Index of the validation shard of a source with `num_shards` shards: the last one."""
    if num_shards < 2:
        raise UserError(f"a source needs at least 2 shards (train + the last one for val), got {num_shards}")
    return num_shards - 1


def read_source(directory: str | os.PathLike) -> dict | None:
    """The source recorded by `download_shards` ({"url", "num_shards", "val_shard"}), if any."""
    path = Path(directory) / SOURCE_FILE
    if not path.is_file():
        return None
    try:
        source = json.loads(path.read_text(encoding="utf-8"))
        int(source["num_shards"]), str(source["val_shard"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is damaged ({e}); delete it and run `nanochat download` again") from e
    return source


def split_files(split: str, base_dir: str | os.PathLike | None = None, dataset: str | None = None) -> list[Path]:
    """The shards of `split` ("train" or "val") on disk, sorted by name: of the
    downloaded web text, or of the named `dataset`."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if dataset is not None:
        return _dataset_split_files(split, base_dir, dataset)
    directory = data_dir(base_dir)
    files = list_parquet_files(directory)
    if not files:
        raise MissingInputError(f"no pretraining shards in {directory}; fetch some with `nanochat download` "
                                f"(e.g. `nanochat download -n 8`)")
    source = read_source(directory)
    if source is not None:
        val = directory / source["val_shard"]
        if not val.is_file():
            raise MissingInputError(f"the validation shard {val.name} of {source.get('url')} is missing from "
                                    f"{directory}; run `nanochat download` to fetch it")
    else:
        val = files[-1]
    if split == "val":
        return [val]
    train = [f for f in files if f != val]
    if not train:
        raise MissingInputError(f"{directory} holds only the validation shard {val.name}; fetch train shards "
                                f"with `nanochat download -n N`")
    return train


def _dataset_split_files(split: str, base_dir: str | os.PathLike | None, name: str) -> list[Path]:
    directory = data_dir(base_dir, name)
    manifest = read_manifest(directory)
    if manifest is None:
        if directory.is_dir():
            raise MissingInputError(f"dataset {name!r} in {directory} is unfinished (no {MANIFEST_FILE}: its ingest "
                                    f"was interrupted?); run the same `nanochat ingest ... --dataset {name}` again")
        known = list_datasets(base_dir)
        raise MissingInputError(f"no dataset {name!r} in {directory.parent}; build it with `nanochat ingest PATH "
                                f"--dataset {name}`" + (f" (datasets there: {', '.join(known)})" if known else ""))
    names = list(manifest["shards"]["train"]) if split == "train" else [manifest["shards"]["val"]]
    files = [directory / n for n in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise MissingInputError(f"dataset {name!r} is missing {', '.join(missing)} listed in its {MANIFEST_FILE}; "
                                f"rebuild it with `nanochat ingest ... --dataset {name} --overwrite`")
    return files


def parquets_iter_batched(split: str, base_dir: str | os.PathLike | None = None, start: int = 0,
                          step: int = 1, dataset: str | None = None) -> Iterator[list[str]]:
    """Yield the texts of one parquet row group at a time, for the shards of `split`.

    In every shard, row groups start, start+step, start+2*step, ... are read, so DDP
    ranks passing start=rank, step=world_size see disjoint documents. The shard list is
    resolved (and missing shards reported) at call time, not at the first next().
    """
    if start < 0 or step < 1:
        raise ValueError(f"need start >= 0 and step >= 1, got start={start}, step={step}")
    files = split_files(split, base_dir, dataset)
    return _iter_row_groups(files, start, step)


def tokenizer_train_texts(base_dir: str | os.PathLike | None, max_chars: int, doc_cap: int,
                          dataset: str | None = None) -> Iterator[str]:
    """The tokenizer's training stream (tok-train, bench-tok): train-split documents in
    shard order, each cropped to `doc_cap` characters, `max_chars` characters in all."""
    from nanochat.tokenizer import iter_capped  # lazy: reading shards needs no tokenizer (tiktoken)

    batches = parquets_iter_batched("train", base_dir, dataset=dataset)  # raises now if shards are missing
    docs = (doc for batch in batches for doc in batch)
    return iter_capped(docs, max_chars, doc_cap)


def _iter_row_groups(files: list[Path], start: int, step: int) -> Iterator[list[str]]:
    import pyarrow.parquet as pq
    for path in files:
        pf = pq.ParquetFile(path)
        for rg in range(start, pf.num_row_groups, step):
            yield pf.read_row_group(rg, columns=[TEXT_COLUMN]).column(TEXT_COLUMN).to_pylist()


def validate_shard(path: str | os.PathLike) -> None:
    """Raise ValueError unless `path` is a readable parquet file with a string `text` column."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise UserError(f"{path} is not a readable parquet file: {e}") from e
    schema = pf.schema_arrow
    if TEXT_COLUMN not in schema.names:
        raise UserError(f"{path} has no {TEXT_COLUMN!r} column (columns: {schema.names})")
    if not (pa.types.is_string(schema.field(TEXT_COLUMN).type) or pa.types.is_large_string(schema.field(TEXT_COLUMN).type)):
        raise UserError(f"{path}: column {TEXT_COLUMN!r} has type {schema.field(TEXT_COLUMN).type}, expected string")
    if pf.metadata.num_rows > 0:
        pf.read_row_group(0, columns=[TEXT_COLUMN])  # the data pages decode, not just the footer


# -----------------------------------------------------------------------------
# Download

def resolve_source(url: str | None = None, num_shards: int | None = None) -> tuple[str, int]:
    """(url prefix, shard count): arguments first, then $NANOCHAT_DATA_URL /
    $NANOCHAT_DATA_SHARDS, then the ClimbMix default. A local source (file:// or a
    directory) with no count given is counted from its shard files."""
    url = (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
    if num_shards is None and os.environ.get(SHARDS_ENV):
        raw = os.environ[SHARDS_ENV]
        try:
            num_shards = int(raw)
        except ValueError:
            raise UserError(f"${SHARDS_ENV}={raw!r} is not an integer shard count") from None
    if num_shards is None:
        if url == DEFAULT_URL:
            num_shards = DEFAULT_NUM_SHARDS
        else:
            num_shards = _count_local_shards(url)
    if num_shards is None:
        raise UserError(f"how many shards does {url} hold? pass --num-shards (or set ${SHARDS_ENV}); "
                        "the last shard is used for validation")
    val_shard_index(num_shards)
    return url, num_shards


def _count_local_shards(url: str) -> int | None:
    from nanochat.downloads import local_source_path
    path = local_source_path(url)
    if path is None:
        return None
    if not path.is_dir():
        raise MissingInputError(f"data source {url} is not a directory")
    indices = [int(m.group(1)) for p in path.iterdir() if (m := _SHARD_RE.match(p.name))]
    if not indices:
        raise MissingInputError(f"data source {url} holds no shard_NNNNN.parquet files")
    return max(indices) + 1


def download_shards(base_dir: str | os.PathLike | None = None, num_train: int = 8, url: str | None = None,
                    num_shards: int | None = None, workers: int = 4, *, timeout: float = 30.0,
                    retries: int = 5, backoff: float = 1.0) -> dict:
    """Fetch the first `num_train` train shards of the source plus its val shard into
    `<base_dir>/base_data/`, keeping only files that read back as parquet with a text
    column. Shards already present are skipped. Returns metrics (files fetched and
    skipped, bytes fetched, seconds, the source). Raises DownloadError if any fail."""
    from nanochat.downloads import download_many

    if num_train < 0:
        raise UserError(f"the number of train shards must be >= 0, got {num_train}")
    url, num_shards = resolve_source(url, num_shards)
    val_index = val_shard_index(num_shards)
    if num_train > val_index:
        log.info("the source has %d train shards; fetching all of them", val_index)
    num_train = min(num_train, val_index)
    directory = data_dir(base_dir)
    _record_source(directory, url, num_shards)
    indices = list(range(num_train)) + [val_index]
    items = [(f"{url}/{shard_name(i)}", directory / shard_name(i)) for i in indices]
    log.info("shards: %d train + val %s from %s into %s (%d workers)",
             num_train, shard_name(val_index), url, directory, workers)
    t0 = time.monotonic()
    results = download_many(items, max_workers=workers, timeout=timeout, retries=retries,
                            backoff=backoff, validate=validate_shard)
    fetched = [r for r in results if r.fetched]
    return {
        "files_fetched": len(fetched),
        "files_skipped": len(results) - len(fetched),
        "bytes_fetched": sum(r.nbytes for r in fetched),
        "seconds": round(time.monotonic() - t0, 3),
        "num_train_shards": num_train,
        "val_shard": shard_name(val_index),
        "url": url,
        "data_dir": str(directory),
    }


def _record_source(directory: Path, url: str, num_shards: int) -> None:
    """Write source.json, refusing to mix shards of two different sources in one directory
    (same file names, different data: skipped-because-present would be wrong)."""
    source = {"url": url, "num_shards": num_shards, "val_shard": shard_name(val_shard_index(num_shards))}
    old = read_source(directory)
    if old is not None and (old["url"].rstrip("/"), int(old["num_shards"])) != (url, num_shards):
        raise UserError(
            f"{directory} already holds shards of {old['url']} ({old['num_shards']} shards), not of {url} "
            f"({num_shards} shards); use another --base-dir / $NANOCHAT_BASE_DIR or delete {directory}")
    if old is None:
        present = list_parquet_files(directory)
        if present:
            log.warning("%s holds %d shard(s) of unknown origin; recording %s as their source",
                        directory, len(present), url)
        atomic_write_text(directory / SOURCE_FILE, json.dumps(source, indent=1) + "\n")
