"""`nanochat ingest` (nanochat/ingest.py): every input format, bad input counted and
reported with file and line, the shard layout, the seeded split, dedup, atomic and
resumable writes; and the whole path through the CLI on a dataset made from the real
OpenStax text: ingest → tok-train → base-train → base-loss, all with --dataset."""
from __future__ import annotations

import gzip
import json
import logging
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import cli
from nanochat import dataset as ds
from nanochat import ingest as ing
from nanochat.ingest import IngestOptions, ingest


def _texts(path: Path) -> list[str]:
    return pq.read_table(path, columns=["text"]).column("text").to_pylist()


def _dataset_texts(base: Path, name: str, split: str) -> list[str]:
    return [t for f in ds.split_files(split, base, name) for t in _texts(f)]


def _ingest_argv(path, *more, dataset: str, base: Path, extra=()) -> list[str]:
    """`nanochat ingest PATH [MORE...] --dataset NAME ...`"""
    return ["ingest", str(path), *map(str, more), "--dataset", dataset, "--base-dir", str(base), *extra]


def _zstd(data: bytes) -> bytes:
    return pa.Codec("zstd").compress(data, asbytes=True)


def _jsonl(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A directory with every supported format and every kind of bad input."""
    d = tmp_path / "corpus"
    (d / "sub" / "deeper").mkdir(parents=True)
    (d / "a.txt").write_text("A plain text file.\nIt is one document.\n")
    (d / "b.md").write_text("# A heading\n\nMarkdown paragraph.\n")
    (d / "sub" / "c.jsonl").write_bytes(
        b'{"text": "jsonl one"}\n'
        b'this line is not json\n'
        b'{"body": "no text field"}\n'
        b'\n'                                            # blank lines are not documents
        b'{"text": 42}\n'
        b'{"text": "lone \\ud800 surrogate"}\n'
        b'{"text": "bad \xff byte"}\n'
        b'["a list"]\n'
        b'{"text": "   "}\n'
        b'{"text": "jsonl two"}')                        # no newline at the end
    pq.write_table(pa.table({"text": ["parquet one", None, "parquet two"], "other": [1, 2, 3]}), d / "d.parquet")
    pq.write_table(pa.table({"body": ["no text column"]}), d / "sub" / "wrong_column.parquet")
    (d / "sub" / "e.txt.gz").write_bytes(gzip.compress(b"A gzipped text file.\n"))
    (d / "sub" / "deeper" / "f.jsonl.gz").write_bytes(gzip.compress(_jsonl({"text": f"gz jsonl {i}"} for i in range(3))))
    (d / "sub" / "g.jsonl.zst").write_bytes(_zstd(_jsonl({"text": f"zst jsonl {i}"} for i in range(3))))
    (d / "sub" / "h.md.zst").write_bytes(_zstd(b"A zstd markdown file.\n"))
    (d / "empty.txt").write_bytes(b"")
    (d / "blank.md").write_text("\n  \n\n")
    (d / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (d / "latin1.txt").write_bytes("first line\ncaf\xe9 in Latin-1\n".encode("latin-1"))
    (d / "truncated.txt.gz").write_bytes(gzip.compress("\n".join(map(str, range(100_000))).encode())[:200])
    (d / "image.png").write_bytes(b"\x89PNG")                      # not a text format: ignored in a directory
    (d / ".hidden.txt").write_text("hidden files are skipped")
    return d


def test_every_format_and_every_bad_input_is_counted_with_its_place(corpus, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="nanochat.ingest"):
        summary = ingest([corpus], "mix", tmp_path / "base", progress_every=0.0)
    texts = _dataset_texts(tmp_path / "base", "mix", "train") + _dataset_texts(tmp_path / "base", "mix", "val")
    assert sorted(texts) == sorted([
        "A plain text file.\nIt is one document.", "# A heading\n\nMarkdown paragraph.",
        "jsonl one", "lone \ufffd\ufffd\ufffd surrogate", "bad \ufffd byte", "jsonl two",
        "parquet one", "parquet two", "A gzipped text file.", "gz jsonl 0", "gz jsonl 1", "gz jsonl 2",
        "zst jsonl 0", "zst jsonl 1", "zst jsonl 2", "A zstd markdown file.", "first line\ncaf\ufffd in Latin-1",
    ])
    skipped = summary["skipped"]
    assert skipped["not JSON, skipped"] == 1
    assert skipped["no 'text' field, skipped"] == 2               # a dict without it, and a list
    assert skipped["'text' is not a string, skipped"] == 1
    assert skipped["invalid UTF-8, replaced with U+FFFD"] == 3    # surrogate, \xff, Latin-1
    assert skipped["empty document"] == 3                         # "   ", a parquet null, blank.md
    assert skipped["empty file"] == 1 and skipped["binary file (NUL bytes), skipped"] == 1
    assert skipped["unreadable (EOFError), rest of file skipped"] == 1
    assert any(k.startswith("no 'text' column") for k in skipped)
    assert summary["documents"]["train"] + summary["documents"]["val"] == len(texts) == 17
    # each problem is reported with its file and line
    log = caplog.text
    for where in ("c.jsonl:2: not JSON", "c.jsonl:3: no 'text' field", "c.jsonl:5: 'text' is not a string",
                  "c.jsonl:7 (byte 14): invalid UTF-8", "latin1.txt:2 (byte 3): invalid UTF-8", "d.parquet: row 2: empty",
                  "empty.txt: empty file", "binary.txt: binary file", "truncated.txt.gz: "):
        assert where in log, where
    manifest = ds.read_manifest(ds.data_dir(tmp_path / "base", "mix"))
    assert manifest["skipped"] == skipped and manifest["files"] == 14
    assert any("c.jsonl:2" in w for w in manifest["skipped_examples"]["not JSON, skipped"])


def test_invalid_utf8_skip_and_paragraph_documents(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "book.txt").write_bytes(b"Para one,\nstill one.\n\nPara two.\r\n  \r\nPara \xff three.\n\n\n")
    opts = IngestOptions(split_on_blank_lines=True, invalid_utf8="skip", text_field="body")
    (src / "x.jsonl").write_bytes(b'{"body": "from the body field"}\n{"body": "bad \xfe"}\n')
    summary = ingest([src / "book.txt", src / "x.jsonl"], "paras", tmp_path, opts)
    texts = _dataset_texts(tmp_path, "paras", "train") + _dataset_texts(tmp_path, "paras", "val")
    assert sorted(texts) == sorted(["Para one,\nstill one.", "Para two.", "from the body field"])
    assert summary["skipped"] == {"invalid UTF-8, document skipped": 2}


def test_a_100mb_line_is_skipped_without_holding_it(tmp_path, caplog):
    src = tmp_path / "src"
    src.mkdir()
    line = b"x" * (100 * 2 ** 20)
    with open(src / "huge.jsonl", "wb") as f:
        f.write(b'{"text": "before"}\n{"text": "' + line + b'"}\n{"text": "after"}\n')
    (src / "one_line_book.txt").write_bytes(line)  # a whole file in one line, no newline
    (src / "ok.txt").write_text("fine\n")
    with caplog.at_level(logging.WARNING, logger="nanochat.ingest"):
        summary = ingest([src], "huge", tmp_path / "base")
    texts = _dataset_texts(tmp_path / "base", "huge", "train") + _dataset_texts(tmp_path / "base", "huge", "val")
    assert sorted(texts) == ["after", "before", "fine"]
    assert summary["skipped"][f"line longer than {16 * 2 ** 20:,} bytes, skipped"] == 2
    assert summary["skipped"]["empty document"] == 1  # the book: nothing left of it
    assert "huge.jsonl:2: line longer than" in caplog.text and "one_line_book.txt:1: line longer" in caplog.text


def test_long_text_documents_are_cut_at_line_breaks(tmp_path):
    src = tmp_path / "long.txt"
    lines = [f"line {i:04d} " + "y" * 80 for i in range(100)]
    src.write_text("\n".join(lines) + "\n")
    summary = ingest([src], "cut", tmp_path, IngestOptions(max_doc_bytes=2000))
    texts = _dataset_texts(tmp_path, "cut", "train") + _dataset_texts(tmp_path, "cut", "val")
    assert all(len(t.encode()) <= 2000 for t in texts)
    assert sorted(l for t in texts for l in t.split("\n")) == lines  # nothing lost, nothing repeated
    assert summary["skipped"][f"document cut at {2000:,} bytes (kept, as several documents)"] == len(texts) - 1


def _many_docs(d: Path, n: int = 300) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "docs.jsonl").write_bytes(_jsonl({"text": f"document {i:04d} " + "z" * (i % 37)} for i in range(n)))
    return d


def test_layout_split_shuffle_and_dedup(tmp_path):
    src = _many_docs(tmp_path / "src")
    (src / "dupes.jsonl").write_bytes(_jsonl({"text": f"document {i:04d} " + "z" * (i % 37)} for i in range(0, 300, 3)))
    opts = IngestOptions(shard_chars=2000, row_group_size=16, dedup=True, val_fraction=0.05)
    summary = ingest([src], "lay", tmp_path / "b1", opts)
    assert summary["skipped"] == {"exact duplicate, dropped": 100}
    assert summary["documents"] == {"train": 285, "val": 15}  # 5% of 300
    files = ds.split_files("train", tmp_path / "b1", "lay")
    val = ds.split_files("val", tmp_path / "b1", "lay")
    names = [f.name for f in files + val]
    assert names == [ds.shard_name(i) for i in range(len(names))] and len(files) > 2  # val is the last shard
    for f in files[:-1]:  # like the downloaded shards: whole row groups, then >= shard_chars characters
        md = pq.ParquetFile(f).metadata
        assert md.num_rows % 16 == 0 and all(md.row_group(i).num_rows == 16 for i in range(md.num_row_groups))
        assert sum(map(len, _texts(f))) >= 2000
        ds.validate_shard(f)
    train, held = _dataset_texts(tmp_path / "b1", "lay", "train"), _texts(val[0])
    everything = [f"document {i:04d} " + "z" * (i % 37) for i in range(300)]
    assert sorted(train + held) == everything and not set(train) & set(held)
    assert train + held != everything  # shuffled
    # the same seed gives the same bytes; another seed another order
    ingest([src], "lay", tmp_path / "b2", opts)
    for a, b in zip(files + val, ds.split_files("train", tmp_path / "b2", "lay") + ds.split_files("val", tmp_path / "b2", "lay")):
        assert a.read_bytes() == b.read_bytes()
    ingest([src], "lay", tmp_path / "b3", IngestOptions(**{**opts.__dict__, "seed": 7}))
    assert _texts(ds.split_files("val", tmp_path / "b3", "lay")[0]) != held
    # at least a few val documents however small the fraction, and never more than half
    small = ingest([_many_docs(tmp_path / "small", 12)], "small", tmp_path / "b4")
    assert small["documents"] == {"train": 7, "val": 5}
    tiny = ingest([_many_docs(tmp_path / "tiny", 3)], "tiny", tmp_path / "b4")
    assert tiny["documents"] == {"train": 2, "val": 1}


def test_too_little_text_is_a_clear_error(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "empty.txt").write_bytes(b"")
    (src / "one.txt").write_text("only one document")
    (src / "bad.jsonl").write_text("not json\n")
    rc = cli.main(_ingest_argv(src, dataset="small", base=tmp_path / "base"))
    assert rc == 2
    err = capsys.readouterr().err
    assert "1 usable document(s)" in err and "at least 2 documents" in err and "not JSON" in err
    assert ds.read_manifest(ds.data_dir(tmp_path / "base", "small")) is None
    with pytest.raises(FileNotFoundError, match="unfinished"):
        ds.split_files("train", tmp_path / "base", "small")
    # no supported files at all / nothing at the path / a bad name / no paths
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(b"\x89PNG")
    assert cli.main(_ingest_argv(tmp_path / "pics", dataset="x", base=tmp_path / "base")) == 2
    assert "no .txt, .md, .jsonl or .parquet files" in capsys.readouterr().err
    assert cli.main(_ingest_argv(tmp_path / "nope*.txt", dataset="x", base=tmp_path / "base")) == 2
    assert "no file matches it" in capsys.readouterr().err
    assert cli.main(_ingest_argv(src, dataset="../up", base=tmp_path / "base")) == 2
    assert cli.main(["ingest", "--dataset", "x", "--base-dir", str(tmp_path)]) == 2
    assert "nanochat ingest PATH... --dataset NAME" in capsys.readouterr().err
    # several inputs, in any order around the flags
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "x.txt").write_text("another document")
    assert cli.main(_ingest_argv(src, tmp_path / "two", dataset="both", base=tmp_path / "base")) == 0
    assert cli.main(["ingest", "--dataset", "both", str(src), str(tmp_path / "two"),
                     "--base-dir", str(tmp_path / "base")]) == 0  # the same inputs: already built
    assert "already built" in capsys.readouterr().err


def test_zstd_without_a_codec_is_a_clear_error(tmp_path, monkeypatch):
    src = tmp_path / "a.txt.zst"
    src.write_bytes(_zstd(b"hello\n"))
    monkeypatch.setattr(ing, "_zstd_available", lambda: False)
    with pytest.raises(ValueError, match="pip install zstandard"):
        ingest([src], "z", tmp_path)


def test_zstd_files_from_the_zstd_tool(tmp_path):
    """Frames as the command-line tool writes them (streamed, several concatenated)."""
    zstd = shutil.which("zstd")
    if zstd is None:
        pytest.skip("no zstd command")
    src = tmp_path / "src"
    src.mkdir()
    records = _jsonl({"text": f"doc {i}"} for i in range(50))
    one = subprocess.run([zstd, "-q", "-c"], input=records, capture_output=True, check=True).stdout
    (src / "two_frames.jsonl.zst").write_bytes(one + one)
    summary = ingest([src], "z", tmp_path / "base")
    assert summary["documents"]["train"] + summary["documents"]["val"] == 100


def test_rerun_is_a_no_op_and_other_inputs_need_overwrite(tmp_path, capsys):
    src = _many_docs(tmp_path / "src", 40)
    base = tmp_path / "base"
    assert cli.main(_ingest_argv(src, dataset="d", base=base)) == 0
    shard = ds.split_files("train", base, "d")[0]
    before = shard.stat().st_mtime_ns
    capsys.readouterr()
    assert cli.main(_ingest_argv(src, dataset="d", base=base)) == 0
    assert "already built" in capsys.readouterr().err and shard.stat().st_mtime_ns == before
    (src / "more.txt").write_text("a new document")
    assert cli.main(_ingest_argv(src, dataset="d", base=base)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(_ingest_argv(src, dataset="d", base=base, extra=["--overwrite"])) == 0
    assert sum(ds.read_manifest(ds.data_dir(base, "d"))["documents"].values()) == 41
    assert ds.list_datasets(base) == ["d"]


def test_an_interrupted_ingest_leaves_no_half_shard_and_finishes_on_rerun(tmp_path, monkeypatch):
    src = _many_docs(tmp_path / "src", 400)
    opts = IngestOptions(shard_chars=1500, row_group_size=8)
    ingest([src], "ref", tmp_path / "ref", opts)
    reference = [f.read_bytes() for f in ds.split_files("train", tmp_path / "ref", "ref")]

    base = tmp_path / "base"
    real_write = ing._write_shard
    calls = {"n": 0}

    def write_then_die(path, docs, row_group_size):
        calls["n"] += 1
        if calls["n"] == 4:  # killed half way through writing the 4th shard
            with ing.atomic_path(path) as tmp:
                tmp.write_bytes(b"half a shard")
                raise KeyboardInterrupt
        real_write(path, docs, row_group_size)

    monkeypatch.setattr(ing, "_write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        ingest([src], "ref", base, opts)
    out = ds.data_dir(base, "ref")
    assert sorted(p.name for p in out.glob("*.parquet")) == [ds.shard_name(i) for i in range(3)]
    assert not list(out.glob(".shard*")) and not (out / ds.MANIFEST_FILE).exists()
    with pytest.raises(FileNotFoundError, match="unfinished.*again"):
        ds.split_files("train", base, "ref")

    # the rerun reuses the reading pass and the three finished shards
    monkeypatch.setattr(ing, "_write_shard", real_write)
    monkeypatch.setattr(ing, "_spill", lambda *a, **k: pytest.fail("the reading pass ran again"))
    written = []
    monkeypatch.setattr(ing, "_write_shard", lambda path, *a: (written.append(path.name), real_write(path, *a)))
    summary = ingest([src], "ref", base, opts)
    assert written[0] == ds.shard_name(3) and len(written) == summary["train_shards"] - 3 + 1
    assert [f.read_bytes() for f in ds.split_files("train", base, "ref")] == reference
    assert not (out / ing.WORK_SUBDIR).exists()


@pytest.mark.slow
def test_cli_ingest_tok_train_base_train_base_loss_on_a_named_dataset(shared_data, tmp_path, capsys):
    """A mixed directory made from the OpenStax text (txt, jsonl, parquet, gz) → a dataset
    → tokenizer → a few training steps → bits per byte on the dataset's val split. No
    base_data/ exists: everything reads the named dataset."""
    docs = [t for f in sorted((shared_data / "pretrain_openstax" / "base_data").glob("*.parquet"))[:2] for t in _texts(f)]
    docs = docs[:240]
    src = tmp_path / "my corpus"
    (src / "books").mkdir(parents=True)
    for i, doc in enumerate(docs[:60]):
        (src / "books" / f"chapter_{i:03d}.txt").write_text(doc)
    (src / "more.jsonl").write_bytes(_jsonl({"text": d} for d in docs[60:120]) + b"oops\n")
    pq.write_table(pa.table({"text": docs[120:180]}), src / "table.parquet")
    (src / "books" / "zipped.jsonl.gz").write_bytes(gzip.compress(_jsonl({"text": d} for d in docs[180:240])))
    base = tmp_path / "base"

    assert cli.main(_ingest_argv(src, dataset="openstax_mix", base=base, extra=["--val-fraction", "0.05"])) == 0
    err = capsys.readouterr().err
    assert "not JSON" in err and "more.jsonl:61" in err and "240" in err.replace(",", "")
    assert not (base / "base_data").exists()
    cpu = ["--device-type", "cpu", "--base-dir", str(base)]
    assert cli.main(["tok-train", "--dataset", "openstax_mix", "--max-chars", "1000000", "--vocab-size", "1024", *cpu]) == 0
    assert cli.main(["tok-eval", "--dataset", "openstax_mix", "--shard-chars", "20000", *cpu]) == 0
    capsys.readouterr()
    assert cli.main(["bench-tok", "--dataset", "openstax_mix", "--max-chars", "200000", "--vocab-size", "400",
                     "--encode-chars", "50000", "--repeats", "1", "--num-threads", "2", *cpu]) == 0
    assert "training:  200,000 chars" in capsys.readouterr().out
    # this base dir has no downloaded web text: without --dataset bench-tok has nothing to read
    assert cli.main(["bench-tok", "--max-chars", "200000", "--vocab-size", "400", *cpu]) == 2
    rc = cli.main(["base-train", "--dataset", "openstax_mix", "--depth", "2", "--aspect-ratio", "32", "--head-dim", "32",
                   "--max-seq-len", "128", "--window-pattern", "L", "--device-batch-size", "4", "--total-batch-size", "512",
                   "--num-iterations", "3", "--warmup-steps", "1", "--eval-every", "0", "--eval-tokens", "1024",
                   "--core-metric-every", "0", "--sample-every", "0", *cpu])
    assert rc == 0
    err = capsys.readouterr().err
    assert "val bpb" in err and "100.0% of the dataset tokens" in err and "--long-docs split" in err
    meta = json.loads((base / "base_checkpoints" / "d2" / "meta_000003.json").read_text())
    assert meta["user_config"]["dataset"] == "openstax_mix" and meta["user_config"]["long_docs"] == "split"
    assert meta["dataloader_state_dict"]["shard"] == "shard_00000.parquet"
    rc = cli.main(["base-loss", "--dataset", "openstax_mix", "--split-tokens", "1024", "--device-batch-size", "4",
                   "--max-tokens", "2", *cpu])
    assert rc == 0
    result = json.loads(capsys.readouterr().err.split("result: ")[-1].splitlines()[0])
    assert 0 < result["val_bpb"] < 10 and 0 < result["train_bpb"] < 10
    # the web-text default is still the default: without --dataset there is nothing to read
    assert cli.main(["base-loss", "--split-tokens", "1024", "--device-batch-size", "4", *cpu]) == 2
    assert "nanochat download" in capsys.readouterr().err
