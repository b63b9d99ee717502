"""
Multi-node runs without a shared disk: give every node the files global rank 0 has.

Under `torchrun --nnodes N`, each node has its own `$NANOCHAT_BASE_DIR` unless the nodes
mount one file system. Stages write their outputs on global rank 0 only (the tokenizer,
checkpoints' weights), and `nanochat download` may have run on the first node only, so a
second node would start without shards or a tokenizer. `sync_files` closes that gap:

1. a probe file tells whether all ranks see rank 0's base dir; if they do (one node, or a
   shared disk) nothing is read, copied or done twice (the answer is kept for the run);
2. otherwise rank 0 lists the files (path under the base dir and a digest that covers
   the size) and each node's local rank 0 (its "leader") compares its copies, downloads
   the missing web-text shards from the source recorded in `base_data/source.json` when
   there is one, and receives everything else from rank 0 in chunks over a gloo group of
   the leaders; each file is written atomically. The other ranks wait on a barrier.

The collectives run over gloo groups made here (also when training uses NCCL), so the
bytes never touch GPU memory. Every rank must call `sync_files` with the same arguments.
"""
from __future__ import annotations

import hashlib
import logging
import os
import secrets
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from nanochat.common import Runtime, atomic_path

log = logging.getLogger("nanochat.node_sync")

CHUNK_BYTES = 16 << 20  # bytes per broadcast while streaming a file to the leaders
# Ranks wait here while one process downloads shards or trains the tokenizer, which can
# take far longer than a training collective's timeout (10 min on NCCL).
WAIT_TIMEOUT = timedelta(hours=6)
_FULL_HASH_LIMIT = 64 << 20  # larger files are compared by size and a hash of their ends
PROBE_NAME = ".node_probe"


def file_digest(path: Path) -> str:
    """sha256 of the size and content of a file up to 64 MiB; above that, of its size,
    first and last MiB (a cheap check for shards, written atomically, never edited in place)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if size <= _FULL_HASH_LIMIT:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f.read(1 << 20))
            f.seek(size - (1 << 20))
            h.update(f.read())
    return h.hexdigest()


class _Groups:
    """gloo groups over all ranks and over the node leaders, made once per process group."""

    def __init__(self, runtime: Runtime):
        self.all = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
        local_ranks: list[int] = [0] * runtime.world_size
        dist.all_gather_object(local_ranks, runtime.local_rank, group=self.all)
        self.leaders = [r for r, lr in enumerate(local_ranks) if lr == 0]
        self.leader_group = dist.new_group(ranks=self.leaders, backend="gloo", timeout=WAIT_TIMEOUT)
        self.shared: dict[Path, bool] = {}  # base dir -> whether every rank sees rank 0's


_groups: dict[int, _Groups] = {}


def _get_groups(runtime: Runtime) -> _Groups:
    key = id(dist.distributed_c10d._get_default_group())
    if key not in _groups:
        _groups[key] = _Groups(runtime)
    return _groups[key]


def _broadcast(obj, group):
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def wait_for_all(runtime: Runtime) -> None:
    """A barrier for slow one-process work (downloads, tokenizer training): up to
    WAIT_TIMEOUT, where the training process group's barrier gives up after minutes."""
    if runtime.distributed:
        dist.barrier(group=_get_groups(runtime).all)


def from_master(runtime: Runtime, value):
    """Rank 0's `value` on every rank (a decision only rank 0 can make, e.g. which
    checkpoint to resume from when only rank 0's disk has the checkpoints)."""
    if not runtime.distributed:
        return value
    return _broadcast(value if runtime.is_master else None, _get_groups(runtime).all)


def base_dir_is_shared(runtime: Runtime) -> bool:
    """True when every rank sees rank 0's base dir (one node, or nodes on one file system).
    Probed once per base dir and process group."""
    if not runtime.distributed:
        return True
    groups = _get_groups(runtime)
    if runtime.base_dir not in groups.shared:
        groups.shared[runtime.base_dir] = _probe_shared(runtime, groups)
    return groups.shared[runtime.base_dir]


def _probe_shared(runtime: Runtime, groups: _Groups) -> bool:
    token = _broadcast(secrets.token_hex(16) if runtime.is_master else None, groups.all)
    probe = runtime.base_dir / PROBE_NAME
    if runtime.is_master:
        probe.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(probe) as tmp:
            tmp.write_text(token)
    dist.barrier(group=groups.all)
    try:
        sees = probe.read_text() == token
    except OSError:
        sees = False
    seen: list[bool] = [False] * runtime.world_size
    dist.all_gather_object(seen, sees, group=groups.all)
    dist.barrier(group=groups.all)  # everyone has read the probe before anyone moves on
    return all(seen)


def _download_from_source(runtime: Runtime, wanted: list[str], source: dict | None) -> list[str]:
    """Leader only: fetch the wanted `base_data/` shards from rank 0's recorded `source`;
    return the paths still missing (no source, or the download failed)."""
    from nanochat.dataset import validate_shard
    from nanochat.downloads import DownloadError, download_many

    shards = [rel for rel in wanted if rel.startswith("base_data/") and rel.endswith(".parquet")]
    if not shards or source is None:
        return wanted
    url = str(source["url"]).rstrip("/")
    items = [(f"{url}/{Path(rel).name}", runtime.base_dir / rel) for rel in shards]
    try:
        download_many(items, validate=validate_shard)
    except DownloadError as e:
        log.warning("node leader rank %d: %s; receiving the shards from rank 0 instead", runtime.rank, e)
    return [rel for rel in wanted if not (runtime.base_dir / rel).is_file()]


def sync_files(runtime: Runtime, rel_paths: list[str]) -> None:
    """Make every node hold rank 0's copy of `rel_paths` (paths under the base dir; those
    rank 0 lacks are ignored). A no-op in one process and on a shared base dir."""
    if base_dir_is_shared(runtime):
        return
    groups = _get_groups(runtime)
    manifest, source = None, None
    if runtime.is_master:
        from nanochat.dataset import data_dir, read_source

        manifest = [(rel, file_digest(runtime.base_dir / rel)) for rel in dict.fromkeys(rel_paths)
                    if (runtime.base_dir / rel).is_file()]
        source = read_source(data_dir(runtime.base_dir))
    manifest, source = _broadcast((manifest, source), groups.all)

    leader = runtime.rank in groups.leaders
    wanted, downloaded = [], 0
    if leader and not runtime.is_master:
        # a leader's own copy is kept only if it matches rank 0's (the digest covers the size)
        wanted = [rel for rel, digest in manifest
                  if not ((runtime.base_dir / rel).is_file() and file_digest(runtime.base_dir / rel) == digest)]
        for rel in wanted:  # a stale copy is replaced, by the download or by rank 0's
            (runtime.base_dir / rel).unlink(missing_ok=True)
        missing = _download_from_source(runtime, wanted, source)
        downloaded, wanted = len(wanted) - len(missing), missing
    needs: list[list[str]] = [[] for _ in range(runtime.world_size)]
    dist.all_gather_object(needs, wanted, group=groups.all)
    to_send = [(rel, digest) for rel, digest in manifest if any(rel in n for n in needs)]
    if leader:
        for rel, digest in to_send:
            _stream_file(runtime, groups, rel, keep=rel in wanted, digest=digest)
    # rank 0 reports for every node (the other ranks log warnings only)
    report: list = [None] * runtime.world_size
    dist.all_gather_object(report, (downloaded, len(wanted)) if leader else None, group=groups.all)
    if runtime.is_master:
        for rank, counts in enumerate(report):
            if rank > 0 and counts is not None:
                log.info("node sync: node leader rank %d downloaded %d and received %d file(s) from rank 0",
                         rank, *counts)


def _stream_file(runtime: Runtime, groups: _Groups, rel: str, *, keep: bool, digest: str) -> None:
    """Broadcast one file from rank 0 to the leaders, chunk by chunk; leaders that `keep`
    it write it atomically and check its digest."""
    path = runtime.base_dir / rel
    size = _broadcast(path.stat().st_size if runtime.is_master else None, groups.leader_group)
    reader = open(path, "rb") if runtime.is_master else None
    try:
        if keep:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as out:
                    _copy_chunks(reader, out, size, groups)
                if file_digest(tmp) != digest:
                    raise RuntimeError(f"node sync: {rel} arrived damaged on rank {runtime.rank}")
        else:
            _copy_chunks(reader, None, size, groups)
    finally:
        if reader is not None:
            reader.close()


def _copy_chunks(reader, out, size: int, groups: _Groups) -> None:
    sent = 0
    while sent < size:
        chunk = _broadcast(reader.read(CHUNK_BYTES) if reader is not None else None, groups.leader_group)
        if out is not None:
            out.write(chunk)
        sent += len(chunk)
        if not chunk:
            raise RuntimeError("node sync: the file shrank while it was being sent")


def tokenizer_files() -> list[str]:
    """The tokenizer's files, relative to the base dir."""
    from nanochat.tokenizer import PICKLE_NAME, TOKEN_BYTES_NAME, TOKENIZER_SUBDIR

    return [f"{TOKENIZER_SUBDIR}/{PICKLE_NAME}", f"{TOKENIZER_SUBDIR}/{TOKEN_BYTES_NAME}"]


def pretraining_files(base_dir: Path, dataset: str | None) -> list[str]:
    """Rank 0's view of what base-train, base-loss and tok-eval read: the tokenizer files
    and every shard of the dataset (train and val), plus their manifest or source record."""
    from nanochat.dataset import MANIFEST_FILE, SOURCE_FILE, data_dir, list_parquet_files

    rel = tokenizer_files()
    directory = data_dir(base_dir, dataset)
    for name in (SOURCE_FILE, MANIFEST_FILE):
        rel.append(os.path.relpath(directory / name, base_dir))
    rel.extend(os.path.relpath(p, base_dir) for p in list_parquet_files(directory))
    return rel


def checkpoint_files(base_dir: Path, ckpt_dir: Path, step: int) -> list[str]:
    """The files every rank reads to load step `step` of a checkpoint: weights and meta
    (each rank's optimizer shard is written on its own node, so it is already there)."""
    from nanochat.checkpoint import meta_path, model_path

    return [os.path.relpath(model_path(ckpt_dir, step), base_dir), os.path.relpath(meta_path(ckpt_dir, step), base_dir)]


def sync_checkpoint(runtime: Runtime, stage: str, tag: str | None, step: int | None,
                    extra: list[str] = ()) -> tuple[str | None, int | None]:
    """Before every rank loads a checkpoint: rank 0 resolves the tag and step (its newest,
    when not given) and every node gets that checkpoint's weights and meta, the tokenizer,
    and the `extra` files. Returns the (tag, step) to load (resolved in one process too)."""
    from nanochat.checkpoint import checkpoint_dir, find_largest_tag, find_last_step, stage_root

    if runtime.is_master:
        tag = tag or find_largest_tag(stage_root(runtime.base_dir, stage))
        if step is None and checkpoint_dir(runtime.base_dir, stage, tag).is_dir():
            step = find_last_step(checkpoint_dir(runtime.base_dir, stage, tag))
        # (a tag with no folder is left to load_model, whose error lists the tags there are)
    tag, step = from_master(runtime, (tag, step))
    ckpt_dir = checkpoint_dir(runtime.base_dir, stage, tag)
    ckpt_files = [] if step is None else checkpoint_files(runtime.base_dir, ckpt_dir, step)
    sync_files(runtime, [*tokenizer_files(), *ckpt_files, *extra])
    return tag, step
