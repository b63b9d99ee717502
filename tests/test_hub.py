"""Hub Parquet-export downloads against real data: a file:// mirror, a loopback HTTP mirror,
and a loopback server that answers like huggingface.co (listing API + resolve URLs)."""
from __future__ import annotations

import http.server
import json
import shutil
import threading
from pathlib import Path
from urllib.parse import unquote

import pyarrow.parquet as pq
import pytest

from nanochat.downloads import DownloadError
from nanochat.tasks import hub
from nanochat.tasks.hub import hub_file_url, hub_listing_url, hub_parquet, load_hub_table


class _Server:
    """A loopback HTTP server; `routes(path) -> (status, bytes)`; records every request path."""

    def __init__(self, routes):
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                status, body = routes(self.path)
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _static(root: Path):
    """Serve files below `root` (404 for anything else)."""
    def routes(path):
        target = (root / unquote(path).lstrip("/")).resolve()
        if root.resolve() in target.parents and target.is_file():
            return 200, target.read_bytes()
        return 404, b"not found"
    return routes


@pytest.fixture
def schema(shared_data) -> Path:
    return shared_data / "hf_schema"


@pytest.fixture
def no_env_mirror(monkeypatch):
    monkeypatch.delenv(hub.MIRROR_ENV, raising=False)
    monkeypatch.delenv(hub.ENDPOINT_ENV, raising=False)


def _forbid_downloads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected download {args}")
    monkeypatch.setattr(hub, "download_file", refuse)


def test_file_mirror_downloads_once(tmp_path, schema, monkeypatch, no_env_mirror):
    mirror = f"file://{schema}"
    paths = hub_parquet("openai/gsm8k", "main", "test", base_dir=tmp_path, mirror=mirror)
    split_dir = tmp_path / "hub" / "openai--gsm8k" / "main" / "test"
    assert paths == [split_dir / "00000.parquet"]
    assert paths[0].read_bytes() == (schema / "openai--gsm8k/main/test/00000.parquet").read_bytes()
    assert json.loads((split_dir / "manifest.json").read_text()) == ["00000.parquet"]
    _forbid_downloads(monkeypatch)
    assert hub_parquet("openai/gsm8k", "main", "test", base_dir=tmp_path, mirror=mirror) == paths
    table = load_hub_table("openai/gsm8k", "main", "test", base_dir=tmp_path)  # cached: no mirror needed
    assert table.num_rows == pq.read_metadata(paths[0]).num_rows and table.column_names == ["question", "answer"]


def test_mirror_from_environment(tmp_path, schema, monkeypatch, no_env_mirror):
    monkeypatch.setenv(hub.MIRROR_ENV, f"file://{schema}")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    (path,) = hub_parquet("allenai/ai2_arc", "ARC-Easy", "validation")
    assert path == tmp_path / "hub/allenai--ai2_arc/ARC-Easy/validation/00000.parquet"


def test_http_mirror_downloads_once(tmp_path, schema, no_env_mirror):
    server = _Server(_static(schema))
    try:
        paths = hub_parquet("cais/mmlu", "all", "dev", base_dir=tmp_path, mirror=server.url + "/")
        assert server.requests == ["/cais--mmlu/all/dev/manifest.json", "/cais--mmlu/all/dev/00000.parquet"]
        assert paths[0].read_bytes() == (schema / "cais--mmlu/all/dev/00000.parquet").read_bytes()
        again = hub_parquet("cais/mmlu", "all", "dev", base_dir=tmp_path, mirror=server.url)
        assert again == paths and len(server.requests) == 2  # the second call hit no network
    finally:
        server.close()


def test_mirror_with_several_files_and_no_manifest(tmp_path, schema, no_env_mirror):
    # A mirror split into three numbered files and no manifest.json: all are found, in order.
    source = pq.read_table(schema / "openai--gsm8k/main/test/00000.parquet")
    split_dir = tmp_path / "mirror" / "openai--gsm8k" / "main" / "test"
    split_dir.mkdir(parents=True)
    bounds = [0, 500, 1000, source.num_rows]
    for k in range(3):
        pq.write_table(source.slice(bounds[k], bounds[k + 1] - bounds[k]), split_dir / f"{k:05d}.parquet")
    server = _Server(_static(tmp_path / "mirror"))
    try:
        paths = hub_parquet("openai/gsm8k", "main", "test", base_dir=tmp_path / "base", mirror=server.url)
        assert [p.name for p in paths] == ["00000.parquet", "00001.parquet", "00002.parquet"]
        assert load_hub_table("openai/gsm8k", "main", "test", base_dir=tmp_path / "base").equals(source)
        assert server.requests[-1] == "/openai--gsm8k/main/test/00003.parquet"  # the probe that ended the list
    finally:
        server.close()


def test_fake_hub_listing_and_resolve_urls(tmp_path, schema, no_env_mirror):
    """A loopback server that answers like huggingface.co: the listing endpoint returns
    resolve URLs on the refs/convert/parquet branch, which map onto the mirror layout."""
    def routes(path):
        if path == "/api/datasets/openai/openai_humaneval/parquet/openai_humaneval/test":
            url = f"{server.url}/datasets/openai/openai_humaneval/resolve/refs%2Fconvert%2Fparquet/openai_humaneval/test/0000.parquet"
            return 200, json.dumps([url]).encode()
        prefix = "/datasets/openai/openai_humaneval/resolve/refs%2Fconvert%2Fparquet/openai_humaneval/test/"
        if path.startswith(prefix):
            k = int(path.removeprefix(prefix).removesuffix(".parquet"))  # hub file 0000 = mirror file 00000
            target = schema / f"openai--openai_humaneval/openai_humaneval/test/{k:05d}.parquet"
            return (200, target.read_bytes()) if target.is_file() else (404, b"")
        return 404, b'{"error":"not found"}'

    server = _Server(routes)
    try:
        paths = hub_parquet("openai/openai_humaneval", "openai_humaneval", "test", base_dir=tmp_path, endpoint=server.url)
        assert server.requests == ["/api/datasets/openai/openai_humaneval/parquet/openai_humaneval/test",
                                   "/datasets/openai/openai_humaneval/resolve/refs%2Fconvert%2Fparquet/openai_humaneval/test/0000.parquet"]
        assert pq.read_table(paths[0]).num_rows == 164
        assert hub_file_url("openai/openai_humaneval", "openai_humaneval", "test", 0, server.url) == \
            server.url + server.requests[1]
        with pytest.raises(FileNotFoundError, match="could not list the Parquet export of openai/gsm8k"):
            hub_parquet("openai/gsm8k", "main", "train", base_dir=tmp_path, endpoint=server.url, retries=0)
    finally:
        server.close()


def test_default_urls_are_the_real_hub():
    assert hub_listing_url("openai/gsm8k", "main", "train") == "https://huggingface.co/api/datasets/openai/gsm8k/parquet/main/train"
    assert hub_file_url("openai/gsm8k", "main", "train", 1) == \
        "https://huggingface.co/datasets/openai/gsm8k/resolve/refs%2Fconvert%2Fparquet/main/train/0001.parquet"


def test_user_mistakes(tmp_path, schema, no_env_mirror):
    with pytest.raises(ValueError, match="file://"):
        hub_parquet("openai/gsm8k", "main", "test", base_dir=tmp_path, mirror=str(schema))
    with pytest.raises(ValueError, match="org/name"):
        hub_parquet("gsm8k", "main", "test", base_dir=tmp_path, mirror=f"file://{schema}")
    with pytest.raises(ValueError, match="split"):
        hub_parquet("openai/gsm8k", "main", "../x", base_dir=tmp_path, mirror=f"file://{schema}")
    with pytest.raises(FileNotFoundError, match="not on mirror"):
        hub_parquet("openai/gsm8k", "socratic", "test", base_dir=tmp_path, mirror=f"file://{schema}", retries=0)
    assert not (tmp_path / "hub/openai--gsm8k/socratic/test/manifest.json").exists()


def test_corrupt_file_is_not_cached(tmp_path, no_env_mirror):
    split_dir = tmp_path / "mirror" / "openai--gsm8k" / "main" / "test"
    split_dir.mkdir(parents=True)
    (split_dir / "00000.parquet").write_text("<html>rate limited</html>")
    with pytest.raises(DownloadError, match="not a valid Parquet file"):
        hub_parquet("openai/gsm8k", "main", "test", base_dir=tmp_path / "base",
                    mirror=f"file://{tmp_path / 'mirror'}", retries=0)
    cached = tmp_path / "base" / "hub" / "openai--gsm8k" / "main" / "test"
    assert not (cached / "00000.parquet").exists() and not (cached / "manifest.json").exists()


def test_cache_serves_as_mirror(tmp_path, schema, monkeypatch, no_env_mirror):
    hub_parquet("openai/gsm8k", "main", "test", base_dir=tmp_path / "a", mirror=f"file://{schema}")
    paths = hub_parquet("openai/gsm8k", "main", "test", base_dir=tmp_path / "b", mirror=f"file://{tmp_path / 'a' / 'hub'}")
    assert paths[0].read_bytes() == (schema / "openai--gsm8k/main/test/00000.parquet").read_bytes()
    shutil.rmtree(tmp_path / "a")
