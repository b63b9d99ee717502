"""nanochat.downloads against a real loopback HTTP server that misbehaves on cue,
serving the real OpenStax shards."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
from httpserver import FileServer

from nanochat.dataset import validate_shard
from nanochat.downloads import DownloadError, download_file, download_many

# quick retries; the read timeout is long enough that a loaded machine does not turn a
# healthy loopback answer into a timeout (and an extra request the counts below would see)
FAST = {"timeout": 2.0, "backoff": 0.01}


@pytest.fixture
def openstax(shared_data) -> Path:
    return shared_data / "pretrain_openstax" / "base_data"


def _leftovers(directory: Path, keep: set[str]) -> list[str]:
    """Every entry of `directory` (hidden ones too) that is not a name in `keep`."""
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


def test_retries_through_every_fault_and_ends_byte_identical(openstax, tmp_path):
    s0, s1, s5 = "/shard_00000.parquet", "/shard_00001.parquet", "/shard_00005.parquet"
    faults = {s0: ["500", "drop", "truncate", "slow", "corrupt"], s1: ["429", "503"], s5: ["truncate"]}
    out = tmp_path / "data"
    with FileServer(openstax, faults, slow_seconds=2 * FAST["timeout"]) as srv:  # "slow" outlasts the timeout
        results = download_many([(srv.url + p, out / p[1:]) for p in (s0, s1, s5)], max_workers=3,
                                retries=5, validate=validate_shard, **FAST)
        assert len(results) == 3
        assert srv.count(s0) == 6 and srv.count(s1) == 3 and srv.count(s5) == 2
    for p, r in zip((s0, s1, s5), results):
        assert r.fetched and r.path == out / p[1:]
        assert r.path.read_bytes() == (openstax / p[1:]).read_bytes()
        assert r.nbytes == (openstax / p[1:]).stat().st_size
    assert _leftovers(out, {s0[1:], s1[1:], s5[1:]}) == []


def test_permanent_failure_leaves_nothing(openstax, tmp_path):
    path = "/shard_00002.parquet"
    dest = tmp_path / "shard_00002.parquet"
    with FileServer(openstax, {path: ["500", "drop", "truncate", "500"]}) as srv:
        with pytest.raises(DownloadError) as e:
            download_file(srv.url + path, dest, retries=2, **FAST)
        assert srv.count(path) == 3
    msg = str(e.value)
    assert srv.url + path in msg and "3 attempts" in msg and "truncated" in msg  # last reason
    assert e.value.attempts == 3
    assert _leftovers(tmp_path, set()) == []


def test_404_is_not_retried(openstax, tmp_path):
    with FileServer(openstax) as srv:
        with pytest.raises(DownloadError, match="HTTP 404") as e:
            download_file(srv.url + "/shard_09999.parquet", tmp_path / "x.parquet", retries=5, **FAST)
        assert srv.requests == [("/shard_09999.parquet", "404")]
    assert e.value.attempts == 1
    assert _leftovers(tmp_path, set()) == []


def test_validation_failure_is_retried_then_final(openstax, tmp_path):
    path = "/shard_00005.parquet"
    with FileServer(openstax, {path: ["corrupt"] * 10}) as srv:
        with pytest.raises(DownloadError, match="validation failed"):
            download_file(srv.url + path, tmp_path / "v.parquet", retries=1, validate=validate_shard, **FAST)
        assert srv.count(path) == 2
        # without a validator the zeroed bytes have the right length and are accepted;
        # expected_size catches a wrong length
        with pytest.raises(DownloadError, match="got 843090 bytes, expected 7"):
            download_file(srv.url + path, tmp_path / "w.parquet", retries=0, expected_size=7, **FAST)
    assert _leftovers(tmp_path, set()) == []


def test_file_url_and_plain_path(openstax, tmp_path):
    src = openstax / "shard_00004.parquet"
    a = download_file(src.as_uri(), tmp_path / "a.parquet", validate=validate_shard)
    b = download_file(str(src), tmp_path / "b.parquet")
    assert a.read_bytes() == b.read_bytes() == src.read_bytes()
    with pytest.raises(DownloadError, match="no such file") as e:
        download_file((openstax / "missing.parquet").as_uri(), tmp_path / "c.parquet", retries=3, **FAST)
    assert e.value.attempts == 1
    with pytest.raises(ValueError, match="only http"):
        download_file("ftp://example.com/x", tmp_path / "d")
    assert _leftovers(tmp_path, {"a.parquet", "b.parquet"}) == []


def test_existing_file_is_skipped_and_stale_temporaries_removed(openstax, tmp_path):
    with FileServer(openstax) as srv:
        done = tmp_path / "shard_00000.parquet"
        done.write_bytes(b"already here")
        assert download_file(srv.url + "/shard_00000.parquet", done) == done
        assert done.read_bytes() == b"already here" and srv.requests == []
        # a killed earlier download left a temporary file behind
        stale = tmp_path / ".shard_00001.parquet.abc123.tmp"
        stale.write_bytes(b"partial")
        download_file(srv.url + "/shard_00001.parquet", tmp_path / "shard_00001.parquet")
    assert not stale.exists()
    assert _leftovers(tmp_path, {"shard_00000.parquet", "shard_00001.parquet"}) == []


def test_concurrent_requests_for_one_file_download_it_once(openstax, tmp_path):
    path = "/shard_00005.parquet"
    dest = tmp_path / "shard_00005.parquet"
    errors: list[BaseException] = []

    def fetch():
        try:
            download_file(srv.url + path, dest, **FAST | {"timeout": 5})
        except BaseException as e:  # surfaced below
            errors.append(e)

    # the first request is held for a while, so the others must queue on the lock
    with FileServer(openstax, {path: ["delay"]}, slow_seconds=0.5) as srv:
        threads = [threading.Thread(target=fetch) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert srv.count(path) == 1
    assert not errors
    assert dest.read_bytes() == (openstax / path[1:]).read_bytes()
    assert _leftovers(tmp_path, {dest.name}) == []


def test_download_many_collects_every_failure(openstax, tmp_path):
    with FileServer(openstax) as srv:
        items = [(srv.url + "/shard_00000.parquet", tmp_path / "ok.parquet"),
                 (srv.url + "/nope1.parquet", tmp_path / "n1.parquet"),
                 (srv.url + "/nope2.parquet", tmp_path / "n2.parquet")]
        with pytest.raises(DownloadError) as e:
            download_many(items, max_workers=2, **FAST)
    assert len(e.value.failures) == 2
    assert "nope1" in str(e.value) and "nope2" in str(e.value) and "2 of 3 files" in str(e.value)
    assert (tmp_path / "ok.parquet").read_bytes() == (openstax / "shard_00000.parquet").read_bytes()
    assert _leftovers(tmp_path, {"ok.parquet"}) == []
    assert not any(t.name.startswith("nanochat-download") for t in threading.enumerate())

