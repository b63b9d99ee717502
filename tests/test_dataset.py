"""nanochat.dataset and the `download` stage on the real OpenStax shards (6 shards,
shard_00005 = val), fetched over loopback HTTP and from file:// URLs."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from httpserver import FileServer

from nanochat import cli
from nanochat import dataset as ds


@pytest.fixture
def openstax(shared_data) -> Path:
    return shared_data / "pretrain_openstax" / "base_data"


def _all_texts(path: Path) -> list[str]:
    return pq.read_table(path, columns=["text"]).column("text").to_pylist()


def test_cli_download_end_to_end_over_http(openstax, base_dir, capsys):
    with FileServer(openstax) as srv:  # (faults and retries: test_downloads.py)
        rc = cli.main(["download", "-n", "2", "--url", srv.url, "--num-shards", "6", "--timeout", "2"])
        assert rc == 0
        assert sorted(p for p, _ in srv.requests) == ["/shard_00000.parquet", "/shard_00001.parquet",
                                                      "/shard_00005.parquet"]
    data = base_dir / "base_data"
    names = ["shard_00000.parquet", "shard_00001.parquet", "shard_00005.parquet"]
    assert sorted(p.name for p in data.iterdir()) == sorted(names + ["source.json"])
    for n in names:
        assert (data / n).read_bytes() == (openstax / n).read_bytes()
    assert json.loads((data / "source.json").read_text())["val_shard"] == "shard_00005.parquet"
    assert ds.split_files("val", base_dir) == [data / "shard_00005.parquet"]
    assert ds.split_files("train", base_dir) == [data / names[0], data / names[1]]


def test_download_shards_metrics_and_rerun(openstax, tmp_path):
    m = ds.download_shards(tmp_path, 1, url=openstax.as_uri(), workers=2)  # count inferred: 6
    assert (m["files_fetched"], m["files_skipped"], m["val_shard"]) == (2, 0, "shard_00005.parquet")
    assert m["bytes_fetched"] == sum((openstax / ds.shard_name(i)).stat().st_size for i in (0, 5))
    m = ds.download_shards(tmp_path, 100, url=openstax.as_uri())  # more than the source has: all 5 train
    assert (m["files_fetched"], m["files_skipped"], m["num_train_shards"]) == (4, 2, 5)
    assert [p.name for p in ds.split_files("train", tmp_path)] == [ds.shard_name(i) for i in range(5)]


def test_val_shard_is_the_sources_last_not_the_highest_present(openstax, tmp_path, monkeypatch):
    # a source of 6 shards of which the env var says there are 6: only shards 0 and 5 fetched
    monkeypatch.setenv(ds.URL_ENV, openstax.as_uri())
    monkeypatch.setenv(ds.SHARDS_ENV, "6")
    ds.download_shards(tmp_path, 1)
    data = ds.data_dir(tmp_path)
    # a stray extra shard with a higher number must not take over as val
    (data / "shard_00007.parquet").symlink_to(openstax / "shard_00003.parquet")
    assert ds.split_files("val", tmp_path) == [data / "shard_00005.parquet"]
    assert [p.name for p in ds.split_files("train", tmp_path)] == ["shard_00000.parquet", "shard_00007.parquet"]
    # the recorded val shard missing is an error, not a silent fallback
    (data / "shard_00005.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="shard_00005.*nanochat download"):
        ds.split_files("val", tmp_path)


def test_without_source_json_the_highest_shard_is_val(openstax, tmp_path):
    data = ds.data_dir(tmp_path)
    data.mkdir(parents=True)
    for i in (0, 2, 5):
        (data / ds.shard_name(i)).symlink_to(openstax / ds.shard_name(i))
    (data / ".shard_00009.parquet.x.tmp").write_bytes(b"partial download")
    assert ds.split_files("val", tmp_path) == [data / "shard_00005.parquet"]
    assert ds.split_files("train", tmp_path) == [data / "shard_00000.parquet", data / "shard_00002.parquet"]


def test_mixing_sources_is_refused(openstax, tmp_path):
    ds.download_shards(tmp_path, 1, url=openstax.as_uri(), num_shards=6)
    with pytest.raises(ValueError, match="already holds shards of"):
        ds.download_shards(tmp_path, 1, url=openstax.as_uri(), num_shards=5)


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nanochat download"):
        ds.split_files("train", tmp_path)
    with pytest.raises(FileNotFoundError, match="nanochat download"):
        ds.parquets_iter_batched("val", tmp_path)
    with pytest.raises(ValueError, match="'train' or 'val'"):
        ds.split_files("test", tmp_path)
    with pytest.raises(ValueError, match="--num-shards"):
        ds.resolve_source("https://example.com/shards")
    with pytest.raises(ValueError, match="at least 2 shards"):
        ds.val_shard_index(1)
    assert ds.resolve_source() == (ds.DEFAULT_URL, ds.DEFAULT_NUM_SHARDS)
    assert ds.val_shard_index(ds.DEFAULT_NUM_SHARDS) == 6542
    assert cli.main(["download", "-n", "-1"]) == 2


def test_parquets_iter_batched_strides_row_groups(openstax, tmp_path):
    data = ds.data_dir(tmp_path)
    data.mkdir(parents=True)
    for shard in ds.list_parquet_files(openstax):
        (data / shard.name).symlink_to(shard)
    train = [t for i in range(5) for t in _all_texts(openstax / ds.shard_name(i))]
    everything = [t for batch in ds.parquets_iter_batched("train", tmp_path) for t in batch]
    assert train and everything == train
    per_rank = [[t for b in ds.parquets_iter_batched("train", tmp_path, start=r, step=3) for t in b] for r in range(3)]
    assert sum(map(len, per_rank)) == len(train)
    assert sorted(t for r in per_rank for t in r) == sorted(train)
    val_batches = list(ds.parquets_iter_batched("val", tmp_path))
    assert val_batches and all(0 < len(b) <= 128 for b in val_batches)
    assert [t for b in ds.parquets_iter_batched("val", tmp_path) for t in b] == _all_texts(openstax / "shard_00005.parquet")


def test_validate_shard(openstax, tmp_path):
    ds.validate_shard(openstax / "shard_00005.parquet")
    no_text = tmp_path / "no_text.parquet"
    pq.write_table(pa.table({"body": ["a", "b"]}), no_text)
    with pytest.raises(ValueError, match="no 'text' column"):
        ds.validate_shard(no_text)
    wrong_type = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), wrong_type)
    with pytest.raises(ValueError, match="expected string"):
        ds.validate_shard(wrong_type)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"<html>not found</html>")
    with pytest.raises(ValueError, match="not a readable parquet"):
        ds.validate_shard(junk)


# -----------------------------------------------------------------------------
# Named datasets (<base_dir>/datasets/NAME/, built by `nanochat ingest`)

def _named(tmp_path: Path, openstax: Path, name: str = "books") -> Path:
    """A named dataset by hand: two OpenStax train shards and the val shard, plus the manifest."""
    d = ds.data_dir(tmp_path, name)
    d.mkdir(parents=True)
    for i, src in enumerate(("shard_00000.parquet", "shard_00001.parquet", "shard_00005.parquet")):
        (d / ds.shard_name(i)).symlink_to(openstax / src)
    manifest = {"name": name, "shards": {"train": [ds.shard_name(0), ds.shard_name(1)], "val": ds.shard_name(2)}}
    (d / ds.MANIFEST_FILE).write_text(json.dumps(manifest))
    return d


def test_named_dataset_layout_and_readers(openstax, tmp_path):
    d = _named(tmp_path, openstax)
    assert d == tmp_path / "datasets" / "books"
    assert ds.split_files("train", tmp_path, "books") == [d / "shard_00000.parquet", d / "shard_00001.parquet"]
    assert ds.split_files("val", tmp_path, "books") == [d / "shard_00002.parquet"]
    val = [t for b in ds.parquets_iter_batched("val", tmp_path, dataset="books") for t in b]
    assert val == _all_texts(openstax / "shard_00005.parquet")
    first = next(iter(ds.tokenizer_train_texts(tmp_path, 10_000, 500, dataset="books")))
    assert first == _all_texts(openstax / "shard_00000.parquet")[0][:500]
    assert ds.list_datasets(tmp_path) == ["books"]
    # the web text stays the default, and is not there
    with pytest.raises(FileNotFoundError, match="nanochat download"):
        ds.split_files("train", tmp_path)


def test_named_dataset_errors(openstax, tmp_path):
    d = _named(tmp_path, openstax)
    with pytest.raises(FileNotFoundError, match="no dataset 'papers'.*nanochat ingest.*datasets there: books"):
        ds.split_files("train", tmp_path, "papers")
    (tmp_path / "datasets" / "half").mkdir()  # an ingest that never wrote its manifest
    with pytest.raises(FileNotFoundError, match="unfinished.*run the same"):
        ds.split_files("val", tmp_path, "half")
    (d / "shard_00001.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="missing shard_00001.parquet"):
        ds.split_files("train", tmp_path, "books")
    (d / ds.MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="damaged"):
        ds.split_files("train", tmp_path, "books")
    for bad in ("", "..", "a/b", "-x", ".hidden", "x" * 65, "sp ace"):
        with pytest.raises(ValueError, match="dataset name"):
            ds.data_dir(tmp_path, bad)
    for good in ("books", "my_books-2", "v1.0", "X"):
        assert ds.check_dataset_name(good) == good
    assert cli.main(["tok-train", "--dataset", "a/b", "--base-dir", str(tmp_path)]) == 2
