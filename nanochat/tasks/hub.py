"""
Hugging Face hub datasets without the `datasets` library: download the hub's Parquet
export of one (dataset, subset, split) once, then read it with pyarrow.

Where the files come from
-------------------------
The hub converts every public dataset to Parquet and keeps the result on the git
branch `refs/convert/parquet` of the dataset's repository, one folder per subset
("config") and split, files numbered from 0000:

    https://huggingface.co/datasets/<org>/<name>/resolve/refs%2Fconvert%2Fparquet/<subset>/<split>/0000.parquet
                                                                                              .../0001.parquet ...

(splits too big to convert whole live in `<subset>/partial-<split>/`). How many files
a split has is only known from the hub's listing endpoint,

    https://huggingface.co/api/datasets/<org>/<name>/parquet/<subset>/<split>
    -> ["https://huggingface.co/api/datasets/<org>/<name>/parquet/<subset>/<split>/0.parquet", ...]

which answers with the download URLs of the files in order (each redirects to the
`resolve/refs%2Fconvert%2Fparquet/...` file above). This is what `hub_parquet` uses by
default. `$HF_ENDPOINT` (the variable huggingface_hub reads) or `endpoint=` replaces
`https://huggingface.co` with a hub-compatible server.

Mirrors and the local cache share one layout
--------------------------------------------
Downloaded files land in

    <base_dir>/hub/<org>--<name>/<subset>/<split>/00000.parquet, 00001.parquet, ..., manifest.json

where file k is the hub's file k (`0000.parquet` -> `00000.parquet`) and
`manifest.json` (a JSON list of the file names, written last) marks a complete
download. A *mirror* is any folder or web server with that same layout below its
root: `mirror="file:///data/hf_schema"` or `mirror="https://host/hf"`, or
`$NANOCHAT_HF_MIRROR`. From a mirror the manifest is read first; when a mirror has
no manifest, `00000.parquet`, `00001.parquet`, ... are fetched until one is missing.
Because the cache has the mirror layout, `file://<base_dir>/hub` of a machine that
has downloaded once serves as a mirror for machines that cannot reach the hub.

A second call finds the manifest and touches no network. Concurrent callers (ranks
under torchrun) serialise on a lock file, so one downloads and the others wait.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import atomic_write_text, get_base_dir
from nanochat.downloads import DownloadError, download_file
from nanochat.errors import MissingInputError, UserError

log = logging.getLogger("nanochat.tasks.hub")

HUB_ENDPOINT = "https://huggingface.co"
MIRROR_ENV = "NANOCHAT_HF_MIRROR"
ENDPOINT_ENV = "HF_ENDPOINT"
MANIFEST = "manifest.json"
PARQUET_BRANCH = "refs/convert/parquet"

_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# -----------------------------------------------------------------------------
# URLs and paths

def repo_slug(repo: str) -> str:
    """'openai/gsm8k' -> 'openai--gsm8k' (the folder name on mirrors and in the cache)."""
    return repo.replace("/", "--")


def hub_file_url(repo: str, subset: str, split: str, index: int, endpoint: str = HUB_ENDPOINT) -> str:
    """URL of the hub's Parquet-export file number `index` (what mirror file `{index:05d}.parquet` holds)."""
    branch = quote(PARQUET_BRANCH, safe="")
    return f"{endpoint.rstrip('/')}/datasets/{repo}/resolve/{branch}/{subset}/{split}/{index:04d}.parquet"


def hub_listing_url(repo: str, subset: str, split: str, endpoint: str = HUB_ENDPOINT) -> str:
    """The hub endpoint that lists a split's Parquet-export files (a JSON list of URLs)."""
    return f"{endpoint.rstrip('/')}/api/datasets/{repo}/parquet/{subset}/{split}"


def mirror_file_url(mirror: str, repo: str, subset: str, split: str, name: str) -> str:
    return f"{mirror.rstrip('/')}/{repo_slug(repo)}/{subset}/{split}/{name}"


def local_split_dir(repo: str, subset: str, split: str, base_dir: str | os.PathLike | None = None) -> Path:
    """Where one split's files are cached: <base_dir>/hub/<org>--<name>/<subset>/<split>."""
    return get_base_dir(base_dir) / "hub" / repo_slug(repo) / subset / split


def resolve_mirror(mirror: str | None) -> str | None:
    """The mirror to use: the argument, else $NANOCHAT_HF_MIRROR, else None (the real hub)."""
    mirror = mirror if mirror is not None else (os.environ.get(MIRROR_ENV) or None)
    if mirror is None:
        return None
    if not mirror.startswith(("http://", "https://", "file://")):
        # a bare local path is the likeliest mistake; say how to write it
        hint = f" (did you mean file://{Path(mirror).expanduser().resolve()}?)" if "://" not in mirror else ""
        raise UserError(f"HF mirror {mirror!r} must be an http://, https:// or file:// URL{hint}; "
                        f"set it with mirror=... or ${MIRROR_ENV}")
    return mirror


def _check_names(repo: str, subset: str, split: str) -> None:
    if not isinstance(repo, str) or not _REPO_RE.match(repo):
        raise ValueError(f"hub dataset {repo!r} must look like 'org/name'")
    for what, value in (("subset", subset), ("split", split)):
        if not isinstance(value, str) or not _NAME_RE.match(value):
            raise ValueError(f"hub {what} {value!r} of {repo} must be a plain name like 'main' or 'train'")


# -----------------------------------------------------------------------------
# Downloading

def _validate_parquet(path: str | os.PathLike) -> None:
    """Raise ValueError unless `path` is a readable Parquet file (an HTML error page or a
    truncated transfer would otherwise be cached forever)."""
    try:
        pq.read_metadata(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for non-parquet bytes
        raise UserError(f"{path} is not a valid Parquet file: {e}") from e


def _validate_json_list(path: str | os.PathLike) -> None:
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not JSON: {e}") from e
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"{path} is not a JSON list of strings")


@contextlib.contextmanager
def _dir_lock(directory: Path) -> Iterator[None]:
    """Exclusive lock on `directory` across processes (POSIX flock; no-op elsewhere)."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(directory / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_manifest(directory: Path) -> list[Path] | None:
    """The cached files if the manifest and every file it names are present, else None."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return None
    try:
        names = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    paths = [directory / n for n in names]
    return paths if names and all(p.is_file() for p in paths) else None


def is_missing(error: Exception) -> bool:
    """True when a DownloadError means "no such file" (HTTP 404/410, missing local file),
    as opposed to a network or validation failure, which must not pass for absence."""
    reason = getattr(error, "reason", "")
    return reason.startswith(("HTTP 404", "HTTP 410", "no such file"))


def _fetch_json_list(url: str, dest: Path, timeout: float, retries: int) -> list[str]:
    dest.unlink(missing_ok=True)  # download_file keeps an existing file; this one is scratch
    download_file(url, dest, timeout=timeout, retries=retries, validate=_validate_json_list)
    try:
        return json.loads(dest.read_text(encoding="utf-8"))
    finally:
        dest.unlink(missing_ok=True)


def _sources_from_mirror(mirror: str, repo: str, subset: str, split: str, directory: Path,
                         timeout: float, retries: int) -> list[tuple[str, str]]:
    """[(url, local name)] for a split on a mirror: from its manifest if it has one."""
    try:
        names = _fetch_json_list(mirror_file_url(mirror, repo, subset, split, MANIFEST),
                                 directory / ".remote-manifest.json", timeout, retries)
    except DownloadError as e:
        if not is_missing(e):
            raise
        names = None
    if names is not None:
        for n in names:
            if not _NAME_RE.match(n) or not n.endswith(".parquet"):
                raise UserError(f"mirror manifest of {repo}/{subset}/{split} lists a bad file name {n!r}")
        if not names:
            raise UserError(f"mirror manifest of {repo}/{subset}/{split} at {mirror} lists no files")
        return [(mirror_file_url(mirror, repo, subset, split, n), n) for n in names]
    return []  # no manifest: the caller probes 00000.parquet, 00001.parquet, ...


def _sources_from_hub(endpoint: str, repo: str, subset: str, split: str, directory: Path,
                      timeout: float, retries: int) -> list[tuple[str, str]]:
    url = hub_listing_url(repo, subset, split, endpoint)
    try:
        urls = _fetch_json_list(url, directory / ".listing.json", timeout, retries)
    except DownloadError as e:
        if not is_missing(e):
            raise
        raise MissingInputError(
            f"could not list the Parquet export of {repo} (subset {subset!r}, split {split!r}) at {url}: {e}. "
            f"Check the dataset, subset and split names, your network, or point ${MIRROR_ENV} at a mirror "
            f"(file:// or http(s)://) laid out as <org>--<name>/<subset>/<split>/00000.parquet") from e
    if not urls:
        raise MissingInputError(f"the hub lists no Parquet files for {repo} subset {subset!r} split {split!r} ({url})")
    return [(u, f"{k:05d}.parquet") for k, u in enumerate(urls)]


def hub_parquet(repo: str, subset: str, split: str, *, base_dir: str | os.PathLike | None = None,
                mirror: str | None = None, endpoint: str | None = None,
                timeout: float = 60.0, retries: int = 5) -> list[Path]:
    """Local paths of the Parquet files of `repo` / `subset` / `split`, downloading them
    into `<base_dir>/hub/<org>--<name>/<subset>/<split>/` the first time.

    `mirror` (or $NANOCHAT_HF_MIRROR): a file:// or http(s):// root laid out like the
    cache; when unset, the real hub (`endpoint`, $HF_ENDPOINT, https://huggingface.co).
    `base_dir` defaults to $NANOCHAT_BASE_DIR or ~/.cache/nanochat. `timeout` and
    `retries` go to `nanochat.downloads.download_file` for every request.
    Raises ValueError for malformed names or mirror URLs, FileNotFoundError when the
    split is not on the hub or mirror, DownloadError when a transfer fails for good.
    """
    _check_names(repo, subset, split)
    directory = local_split_dir(repo, subset, split, base_dir)
    cached = _read_manifest(directory)
    if cached is not None:
        return cached
    mirror = resolve_mirror(mirror)
    with _dir_lock(directory):
        cached = _read_manifest(directory)  # another process may have finished meanwhile
        if cached is not None:
            return cached
        if mirror is not None:
            sources = _sources_from_mirror(mirror, repo, subset, split, directory, timeout, retries)
            names = _download_all(sources, directory, timeout, retries) if sources else \
                _probe_mirror(mirror, repo, subset, split, directory, timeout, retries)
        else:
            endpoint = (endpoint or os.environ.get(ENDPOINT_ENV) or HUB_ENDPOINT)
            sources = _sources_from_hub(endpoint, repo, subset, split, directory, timeout, retries)
            names = _download_all(sources, directory, timeout, retries)
        atomic_write_text(directory / MANIFEST, json.dumps(names))
        log.info("cached %s/%s/%s: %d parquet file(s) in %s", repo, subset, split, len(names), directory)
        return [directory / n for n in names]


def _download_all(sources: list[tuple[str, str]], directory: Path, timeout: float, retries: int) -> list[str]:
    """Fetch every (url, name) into `directory` (DownloadError propagates: it names the URL and why)."""
    for url, name in sources:
        # download_file skips a file that exists: one left by an interrupted earlier
        # attempt is complete, because it was written atomically and validated
        download_file(url, directory / name, timeout=timeout, retries=retries, validate=_validate_parquet)
    return [name for _, name in sources]


def _probe_mirror(mirror: str, repo: str, subset: str, split: str, directory: Path,
                  timeout: float, retries: int) -> list[str]:
    """A mirror without manifest: 00000.parquet must exist; then 00001, ... until one is missing."""
    names: list[str] = []
    while True:
        name = f"{len(names):05d}.parquet"
        url = mirror_file_url(mirror, repo, subset, split, name)
        try:
            download_file(url, directory / name, timeout=timeout, retries=retries, validate=_validate_parquet)
        except DownloadError as e:
            if not is_missing(e):
                raise
            if not names:
                raise MissingInputError(
                    f"{repo} (subset {subset!r}, split {split!r}) is not on mirror {mirror}: {e}. The mirror must "
                    f"hold <org>--<name>/<subset>/<split>/00000.parquet (and manifest.json)") from e
            return names
        names.append(name)


# -----------------------------------------------------------------------------
# Reading

def load_hub_table(repo: str, subset: str, split: str, **kwargs: Any) -> pa.Table:
    """The whole split as one pyarrow Table (files concatenated in order, chunks combined
    so that row lookups are O(1)). Keyword arguments go to `hub_parquet`."""
    paths = hub_parquet(repo, subset, split, **kwargs)
    table = pa.concat_tables([pq.read_table(p) for p in paths])
    return table.combine_chunks()


class Rows:
    """Random access to the rows of a pyarrow Table as dicts, optionally in a shuffled order.

    `shuffled(seed)` permutes with `np.random.default_rng(seed).permutation(n)`, the
    permutation `datasets.Dataset.shuffle(seed=seed)` applies, so tasks see their rows
    in the same order as the reference implementation (given the same source order).
    """

    def __init__(self, table: pa.Table, order: np.ndarray | None = None):
        self.table = table
        self.order = order

    def shuffled(self, seed: int) -> "Rows":
        return Rows(self.table, np.random.default_rng(seed).permutation(self.table.num_rows))

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.table.num_rows:
            raise IndexError(f"row {index} out of range for {self.table.num_rows} rows")
        physical = int(index if self.order is None else self.order[index])
        return self.table.slice(physical, 1).to_pylist()[0]


def load_hub_rows(repo: str, subset: str, split: str, *, shuffle_seed: int | None = 42, **kwargs: Any) -> Rows:
    """Rows of a hub split, shuffled with `shuffle_seed` (None keeps the file order)."""
    rows = Rows(load_hub_table(repo, subset, split, **kwargs))
    return rows if shuffle_seed is None else rows.shuffled(shuffle_seed)
