"""
The one download routine of the project: pretraining shards, the CORE eval bundle,
Hugging Face parquet exports and word lists all come through `download_file`.

What it guarantees:

- A file at `dest` is always complete. Bytes stream into a temporary file next to
  `dest`; only after the length checks and the caller's `validate` pass is it fsynced
  and renamed over `dest` (`nanochat.common.atomic_path`). An existing `dest` is
  therefore trusted and skipped.
- Transient failures are retried with exponential backoff and jitter: HTTP 5xx, 408,
  425 and 429 (honouring `Retry-After`), refused or dropped connections, timeouts,
  bodies shorter than their Content-Length, and files that fail `validate`.
  Permanent failures (HTTP 404 and other 4xx, a missing local file) fail at once.
- On final failure `DownloadError` names the URL, the number of attempts and the last
  reason, and nothing is left behind (no partial file, no temporary file, no lock).
- Several processes (ranks on one node) asking for the same file serialise on an
  `fcntl.flock` lock on `dest + ".lock"`: one downloads, the others wait and then find
  the finished file.

Sources: http:// and https:// (stdlib urllib, no extra dependency), file:// URLs and
plain local paths (handy for mirrors and for tests).
"""
from __future__ import annotations

import contextlib
import errno
import http.client
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from nanochat.common import atomic_path
from nanochat.errors import UserError

log = logging.getLogger("nanochat.downloads")

CHUNK_BYTES = 1 << 20               # read and write 1 MiB at a time
MAX_BACKOFF_S = 60.0                # cap on one wait between attempts
RETRY_HTTP_CODES = frozenset({408, 425, 429})  # plus every 5xx
USER_AGENT = "nanochat-downloader"
# `nanochat.common.atomic_path` names its temporary files ".<name>.<random>.tmp" next to
# the target; leftovers of a killed process are removed under the lock.
_STALE_TMP_GLOB = ".{name}.*.tmp"

Validator = Callable[[Path], None]


class DownloadError(RuntimeError):
    """A download failed for good. `url`, `attempts` and `reason` say which, how often, why."""

    def __init__(self, url: str, attempts: int, reason: str, failures: list[DownloadError] | None = None):
        self.url, self.attempts, self.reason = url, attempts, reason
        self.failures = failures or [self]  # download_many: one entry per failed file
        tries = "1 attempt" if attempts == 1 else f"{attempts} attempts"
        super().__init__(f"could not download {url} ({tries}): {reason}")


@dataclass(frozen=True)
class DownloadResult:
    url: str
    path: Path
    fetched: bool      # False when the file was already there
    nbytes: int        # size of the file on disk
    seconds: float     # time spent, waiting on a lock included


class _Retryable(Exception):
    """One attempt failed in a way that another attempt may fix."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


class _Permanent(Exception):
    """Failed in a way no retry will fix."""


class _Cancelled(Exception):
    pass


# -----------------------------------------------------------------------------
# Public API

def download_file(url: str, dest: str | os.PathLike, *, timeout: float = 30.0, retries: int = 5,
                  backoff: float = 1.0, validate: Validator | None = None,
                  expected_size: int | None = None) -> Path:
    """Fetch `url` to `dest` unless `dest` already exists, and return `dest`.

    url: http(s)://..., file://... or a local path.
    timeout: seconds any single connect or read may block (a stalled server counts as a
        failed attempt); it is not a limit on the whole transfer.
    retries: attempts after the first one (0 = try once). Waits grow as
        backoff * 2**k seconds (k = 0, 1, ...), times a random factor in [0.5, 1.5),
        capped at 60 s; a server's Retry-After is respected within the same cap.
    validate: called on the complete temporary file; raising rejects it (counted as a
        failed attempt, so a corrupted transfer is fetched again).
    expected_size: if given, a file of any other size is rejected the same way.

    Raises DownloadError when every attempt failed or the failure is permanent (404).
    """
    return _download(url, Path(dest), timeout=timeout, retries=retries, backoff=backoff,
                     validate=validate, expected_size=expected_size).path


def download_many(items: Iterable[tuple[str, str | os.PathLike]], *, max_workers: int = 4,
                  timeout: float = 30.0, retries: int = 5, backoff: float = 1.0,
                  validate: Validator | None = None) -> list[DownloadResult]:
    """Download every (url, dest) pair with `max_workers` threads; results in input order.

    Every download runs to completion (or final failure) even when others fail; then one
    DownloadError lists all the failures. Ctrl-C stops the workers at their next chunk
    and removes their temporary files.
    """
    items = [(u, Path(d)) for u, d in items]
    if max_workers < 1:
        raise ValueError(f"max_workers must be at least 1, got {max_workers}")
    cancel = threading.Event()
    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="nanochat-download") as pool:
        futures = [pool.submit(_download, u, d, timeout=timeout, retries=retries, backoff=backoff,
                               validate=validate, expected_size=None, cancel=cancel) for u, d in items]
        try:
            outcomes = []
            for fut in futures:
                try:
                    outcomes.append(fut.result())
                except DownloadError as e:
                    outcomes.append(e)
        except BaseException:
            cancel.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    failures = [o for o in outcomes if isinstance(o, DownloadError)]
    if len(failures) == 1:
        raise failures[0]
    if failures:
        lines = "\n  ".join(str(f) for f in failures)
        raise DownloadError(f"{len(failures)} of {len(items)} files", max(f.attempts for f in failures),
                            f"\n  {lines}", failures)
    return outcomes  # type: ignore[return-value]


# -----------------------------------------------------------------------------
# One file

def _download(url: str, dest: Path, *, timeout: float, retries: int, backoff: float,
              validate: Validator | None, expected_size: int | None,
              cancel: threading.Event | None = None) -> DownloadResult:
    t0 = time.monotonic()
    if dest.exists():
        return DownloadResult(url, dest, False, dest.stat().st_size, 0.0)
    _check_source(url)
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    cancel = cancel or threading.Event()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(dest.with_name(dest.name + ".lock"), url):
        if dest.exists():  # another process finished it while we waited for the lock
            return DownloadResult(url, dest, False, dest.stat().st_size, time.monotonic() - t0)
        _remove_stale_temporaries(dest)
        attempts = retries + 1
        log.info("downloading %s -> %s", url, dest)
        for attempt in range(1, attempts + 1):
            try:
                with atomic_path(dest) as tmp:
                    nbytes = _fetch_once(url, tmp, timeout, cancel)
                    _check_file(tmp, nbytes, expected_size, validate)
            except _Permanent as e:
                raise DownloadError(url, attempt, str(e)) from None
            except _Cancelled:
                raise DownloadError(url, attempt, "cancelled") from None
            except _Retryable as e:
                if attempt == attempts:
                    raise DownloadError(url, attempt, str(e)) from None
                delay = min(backoff * 2 ** (attempt - 1), MAX_BACKOFF_S) * random.uniform(0.5, 1.5)
                if e.retry_after is not None:
                    delay = max(delay, min(e.retry_after, MAX_BACKOFF_S))
                log.warning("attempt %d/%d for %s failed: %s; retrying in %.1fs", attempt, attempts, url, e, delay)
                if cancel.wait(delay):
                    raise DownloadError(url, attempt, f"cancelled after: {e}") from None
                continue
            seconds = time.monotonic() - t0
            log.info("fetched %s (%.1f MB in %.1fs)", dest.name, nbytes / 1e6, seconds)
            return DownloadResult(url, dest, True, nbytes, seconds)
    raise AssertionError("unreachable")


def _check_source(url: str) -> None:
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if "://" in url and scheme not in ("http", "https", "file"):
        raise UserError(f"cannot download {url!r}: only http://, https://, file:// URLs and local paths are supported")


def _check_file(tmp: Path, nbytes: int, expected_size: int | None, validate: Validator | None) -> None:
    if expected_size is not None and nbytes != expected_size:
        raise _Retryable(f"got {nbytes} bytes, expected {expected_size}")
    if validate is not None:
        try:
            validate(tmp)
        except Exception as e:  # any complaint of the validator rejects this copy
            raise _Retryable(f"validation failed: {type(e).__name__}: {e}") from e


def _fetch_once(url: str, tmp: Path, timeout: float, cancel: threading.Event) -> int:
    """Stream `url` into `tmp`; return the byte count. Raises _Retryable/_Permanent/_Cancelled."""
    local = local_source_path(url)
    try:
        if local is not None:
            if not local.is_file():
                raise _Permanent(f"no such file: {local}")
            with open(local, "rb") as src, open(tmp, "wb") as out:
                return _copy(src, out, cancel)
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        with urllib.request.urlopen(request, timeout=timeout) as response, open(tmp, "wb") as out:
            nbytes = _copy(response, out, cancel)
            declared = response.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and nbytes != int(declared):
            raise _Retryable(f"truncated body: got {nbytes} of {int(declared)} bytes")
        return nbytes
    except (_Retryable, _Permanent, _Cancelled):
        raise
    except urllib.error.HTTPError as e:
        reason = f"HTTP {e.code} {e.reason}"
        if e.code >= 500 or e.code in RETRY_HTTP_CODES:
            raise _Retryable(reason, _retry_after(e.headers.get("Retry-After"))) from e
        raise _Permanent(reason + (" (check the URL)" if e.code == 404 else "")) from e
    except urllib.error.URLError as e:  # refused, unreachable, DNS, timeout while connecting
        raise _Retryable(f"connection failed: {e.reason}") from e
    except TimeoutError as e:
        raise _Retryable(f"timed out after {timeout:g}s without data") from e
    except (http.client.HTTPException, ConnectionError) as e:
        raise _Retryable(f"connection dropped: {type(e).__name__}: {e}") from e
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise _Permanent(f"cannot write {tmp.parent}: {e}") from e
        raise _Retryable(f"{type(e).__name__}: {e}") from e


def _copy(src, out, cancel: threading.Event) -> int:
    nbytes = 0
    while True:
        if cancel.is_set():
            raise _Cancelled()
        chunk = src.read(CHUNK_BYTES)
        if not chunk:
            return nbytes
        out.write(chunk)
        nbytes += len(chunk)


def local_source_path(url: str) -> Path | None:
    """The filesystem path for file:// URLs and plain paths; None for http(s)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() == "file":
        return Path(urllib.request.url2pathname(parts.path))
    if "://" not in url:
        return Path(url).expanduser()
    return None


def _retry_after(value: str | None) -> float | None:
    # Only the delta-seconds form; an HTTP date is rare enough to ignore (backoff applies).
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _remove_stale_temporaries(dest: Path) -> None:
    # Called under the lock, so no live download of `dest` owns these.
    for stale in dest.parent.glob(_STALE_TMP_GLOB.format(name=dest.name)):
        log.info("removing leftover partial download %s", stale)
        stale.unlink(missing_ok=True)


# -----------------------------------------------------------------------------
# Cross-process lock

@contextlib.contextmanager
def _file_lock(lock_path: Path, what: str) -> Iterator[None]:
    """Exclusive flock on `lock_path`, deleted on release.

    Deleting a lock file is racy unless waiters check, once they hold the lock, that the
    path still names the file they locked; if it does not (the previous holder removed
    it), they lock afresh. Without fcntl (Windows) there is no locking.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another process downloading %s", what)
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                st = os.stat(lock_path)
                current = (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
            except FileNotFoundError:
                current = False
        except BaseException:
            os.close(fd)
            raise
        if current:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)  # still holding the lock, so no one else is using this file
        os.close(fd)
