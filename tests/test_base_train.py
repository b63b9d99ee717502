"""Pretraining end to end on the real OpenStax shards, at toy size, through the CLI:
tok-train → base-train (eval, sample, save) → base-loss; exact resume; torchrun on CPU."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat import cli
from nanochat.common import Runtime
from nanochat.stages import base_train

OPENSTAX = Path(__file__).resolve().parents[2] / "shared" / "data" / "pretrain_openstax" / "base_data"

TOY = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "128",
       "--window-pattern", "SL", "--device-batch-size", "4", "--total-batch-size", "1024",
       "--warmup-steps", "2", "--eval-tokens", "2048", "--core-metric-every", "0", "--device-type", "cpu"]


def _toy_config(**overrides) -> base_train.Config:
    cfg = base_train.Config(depth=2, aspect_ratio=32, head_dim=32, max_seq_len=128, window_pattern="SL",
                            device_batch_size=4, total_batch_size=1024, warmup_steps=2, eval_tokens=2048,
                            core_metric_every=0, sample_every=0, num_iterations=6, eval_every=3)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def trained_tok_dir(tmp_path_factory) -> Path:
    """A base dir with the OpenStax shards and a tokenizer trained through the CLI."""
    base = tmp_path_factory.mktemp("pretrain")
    (base / "base_data").mkdir()
    for p in sorted(OPENSTAX.glob("shard_*.parquet")):
        (base / "base_data" / p.name).symlink_to(p)
    rc = cli.main(["tok-train", "--max-chars", "3000000", "--vocab-size", "2048", "--base-dir", str(base)])
    assert rc == 0
    assert (base / "tokenizer" / "tokenizer.pkl").is_file()
    return base


def _fresh_base(src: Path, dst: Path) -> Path:
    dst.mkdir()
    (dst / "base_data").symlink_to(src / "base_data")
    shutil.copytree(src / "tokenizer", dst / "tokenizer")
    return dst


def _losses(ckpt_dir: Path) -> dict[int, float]:
    out = {}
    for line in (ckpt_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r["loss"]
    return out


def test_plan_derives_horizon_and_accumulation():
    plan = base_train.make_plan(_toy_config(num_iterations=None), vocab_size=2048, world_size=1)
    assert plan.grad_accum_steps == 2
    assert plan.num_iterations == plan.target_tokens // 1024
    assert plan.target_tokens == int(base_train.DEFAULT_PARAM_DATA_RATIO * plan.num_scaling_params) == int(12 * plan.num_scaling_params)
    plan2 = base_train.make_plan(_toy_config(num_iterations=None, total_batch_size=None), vocab_size=2048, world_size=1)
    assert plan2.total_batch_size & (plan2.total_batch_size - 1) == 0  # a power of two
    with pytest.raises(ValueError, match="not a multiple"):
        base_train.make_plan(_toy_config(total_batch_size=1000), vocab_size=2048, world_size=1)


def test_config_validation_lists_problems():
    cfg = _toy_config(target_flops=1e12, depth=0, window_pattern="SXL", resume="first")
    with pytest.raises(ValueError) as e:
        cfg.validate()
    msg = str(e.value)
    assert "at most one training horizon" in msg and "--depth" in msg and "window-pattern" in msg and "latest" in msg


@pytest.mark.slow
def test_cli_pipeline_train_eval_sample_save_then_base_loss(trained_tok_dir, tmp_path, capsys):
    base = _fresh_base(trained_tok_dir, tmp_path / "run")
    rc = cli.main(["base-train", *TOY, "--num-iterations", "4", "--eval-every", "2", "--sample-every", "2",
                   "--save-every", "2", "--base-dir", str(base)])
    assert rc == 0
    ckpt_dir = base / "base_checkpoints" / "d2"
    assert {p.name for p in ckpt_dir.glob("meta_*.json")} == {"meta_000002.json", "meta_000004.json"}
    meta = json.loads((ckpt_dir / "meta_000004.json").read_text())
    assert meta["step"] == 4 and meta["val_bpb"] > 0 and meta["model_config"]["n_layer"] == 2
    records = [json.loads(l) for l in (ckpt_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [0, 1, 2, 3]
    assert [r["step"] for r in records if "val_bpb" in r] == [0, 2, 4]
    assert all(r["loss"] == r["loss"] for r in records if "loss" in r)  # finite, not NaN
    err = capsys.readouterr().err
    assert "val bpb" in err and "The capital of France is" in err and "tok/s" in err
    # the MFU denominator was measured once and kept for every later stage of this base dir
    peaks = json.loads((base / "peak_flops.json").read_text())
    assert len(peaks) == 1 and list(peaks.values())[0] > 0

    rc = cli.main(["base-loss", "--split-tokens", "2048", "--device-batch-size", "4", "--max-tokens", "4",
                   "--device-type", "cpu", "--base-dir", str(base)])
    assert rc == 0
    captured = capsys.readouterr()
    assert "The capital of France is" in captured.out
    assert "train bpb" in captured.err and "val bpb" in captured.err


@pytest.mark.slow
def test_evaluation_stops_after_one_pass_of_a_small_val_split(trained_tok_dir, tmp_path, capsys):
    """--eval-tokens / --split-tokens far beyond the val shard evaluate one pass of it,
    instead of looping over the same tokens (base-train at the end, base-loss per split)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from nanochat.dataloader import pretrain_batches
    from nanochat.tokenizer import get_tokenizer

    base = tmp_path / "run"
    (base / "base_data").mkdir(parents=True)
    (base / "base_data" / "shard_00000.parquet").symlink_to(OPENSTAX / "shard_00000.parquet")
    docs = pq.read_table(OPENSTAX / "shard_00005.parquet").column("text").to_pylist()[:12]
    pq.write_table(pa.table({"text": docs}), base / "base_data" / "shard_00001.parquet")  # the val split
    shutil.copytree(trained_tok_dir / "tokenizer", base / "tokenizer")

    tok = get_tokenizer(base)
    val_tokens = sum(len(t) + 1 for t in tok.encode(docs))  # + BOS each
    def passes(long_docs: str) -> int:
        # the default buffer (1,000 documents) is larger than this split: the loader has
        # read past its end before the first batch, and one pass must still be all of it
        loader = pretrain_batches(tok, 4, 128, "val", base_dir=base, device="cpu", long_docs=long_docs, epochs=1)
        try:
            return sum(1 for _ in loader)  # it ends by itself
        finally:
            loader.close()

    # split: every token is placed, so one pass is all the rows the split fills
    assert val_tokens // (4 * 129) - 1 <= passes("split") <= val_tokens // (4 * 129) + 1
    # crop (the reference's packing): each of the 12 documents opens one row, once (not
    # copies of the shortest one, which a 1,000-document buffer holds ~80 of)
    assert passes("crop") == 12 // 4

    rc = cli.main(["base-train", *TOY, "--num-iterations", "1", "--eval-every", "0", "--eval-tokens", str(10 ** 9),
                   "--base-dir", str(base)])
    assert rc == 0
    assert "evaluating on one pass" in capsys.readouterr().err
    rc = cli.main(["base-loss", "--split-tokens", str(10 ** 9), "--device-batch-size", "4", "--max-tokens", "2",
                   "--device-type", "cpu", "--base-dir", str(base)])
    assert rc == 0
    assert "val bpb" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_equals_uninterrupted(trained_tok_dir, tmp_path, monkeypatch):
    """6 steps straight vs 3 steps, restart from the step-3 checkpoint, 3 more: same losses
    and bit-identical weights (fp32 on the CPU)."""
    base = _fresh_base(trained_tok_dir, tmp_path / "run")
    rt = Runtime(device=torch.device("cpu"), dtype=torch.float32, base_dir=base)
    cfg = _toy_config(save_every=3)
    base_train.run(cfg, rt)
    ckpt_dir = base / "base_checkpoints" / "d2"
    straight_losses = _losses(ckpt_dir)
    straight_weights = torch.load(ckpt_dir / "model_000006.pt")

    resumed = base_train.run(_toy_config(save_every=3, resume_from_step=3), rt)
    assert resumed["steps"] == 6
    resumed_losses = _losses(ckpt_dir)
    assert sorted(resumed_losses) == list(range(6))
    assert resumed_losses == straight_losses
    resumed_weights = torch.load(ckpt_dir / "model_000006.pt")
    for k, v in straight_weights.items():
        assert torch.equal(v, resumed_weights[k]), k

    # --resume latest picks the newest complete checkpoint (step 6: nothing left to do)
    latest = base_train.run(_toy_config(save_every=3, resume="latest"), rt)
    assert latest["steps"] == 6


@pytest.mark.slow
def test_nan_loss_stops_without_saving(trained_tok_dir, tmp_path):
    base = _fresh_base(trained_tok_dir, tmp_path / "run")
    rt = Runtime(device=torch.device("cpu"), dtype=torch.float32, base_dir=base)
    from nanochat import checkpoint as ckpt
    from nanochat.training import NonFiniteLossError
    with pytest.raises(NonFiniteLossError, match="not applied"):
        base_train.run(_toy_config(matrix_lr=1e30, embedding_lr=1e30, unembedding_lr=1e30, num_iterations=8,
                                   eval_every=0, save_every=1), rt)
    # step 0 trains on a finite loss (the huge LRs blow the weights up) and step 1 is saved;
    # step 1's loss is not finite, so nothing after it is: step 1 is the last good checkpoint
    ckpt_dir = base / "base_checkpoints" / "d2"
    assert ckpt.complete_steps(ckpt_dir) == [1]
    saved = sorted(ckpt_dir.glob("model_*.pt"))
    assert [p.name for p in saved] == ["model_000001.pt"]
    assert sorted(_losses(ckpt_dir)) == [0]
    for p in saved:
        assert all(torch.isfinite(t).all() for t in torch.load(p).values() if t.is_floating_point())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_match_one(trained_tok_dir, tmp_path):
    """Data-parallel on 2 CPU processes (gloo) gives the same loss curve as one process with
    the same total batch. The two runs see different documents (each rank reads its own
    row groups), so the curves agree to a tolerance, not bit for bit."""
    env = {**os.environ, "NANOCHAT_DTYPE": "float32", "OMP_NUM_THREADS": "1"}
    args = ["base-train", *TOY, "--num-iterations", "4", "--eval-every", "0", "--sample-every", "0"]
    one = _fresh_base(trained_tok_dir, tmp_path / "one")
    two = _fresh_base(trained_tok_dir, tmp_path / "two")
    subprocess.run([sys.executable, "-m", "nanochat", *args, "--base-dir", str(one)], env=env, check=True,
                   capture_output=True, timeout=300)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "--master-port", str(_free_port()), "-m", "nanochat", *args, "--base-dir", str(two)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    l1, l2 = _losses(one / "base_checkpoints" / "d2"), _losses(two / "base_checkpoints" / "d2")
    assert sorted(l1) == sorted(l2) == [0, 1, 2, 3]
    assert abs(l1[0] - l2[0]) < 0.05  # at init both are ≈ ln(vocab)
    for s in l1:
        assert abs(l1[s] - l2[s]) < 0.25, (s, l1[s], l2[s])
    # each rank wrote its optimizer shard; only rank 0 wrote the model
    ckpt = two / "base_checkpoints" / "d2"
    assert (ckpt / "optim_000004_rank0.pt").is_file() and (ckpt / "optim_000004_rank1.pt").is_file()
    assert len(list(ckpt.glob("model_*.pt"))) == 1


def _two_nodes(args: list[str], bases: list[Path], env: dict) -> list[subprocess.CompletedProcess]:
    """Two `torchrun --nnodes 2` launches on localhost, one process each, each with its
    own base dir: two nodes that share no disk."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--node-rank", str(i), "--master-addr", "127.0.0.1", "--master-port", str(port),
                               "-m", "nanochat", *args, "--base-dir", str(base)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i, base in enumerate(bases)]
    out = []
    for p in procs:
        try:
            stdout, _ = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, ""))
    return out


def _node0_with_source(trained_tok_dir: Path, node0: Path, source: Path, env: dict) -> None:
    """A first node's base dir as `nanochat download` leaves it (shards of a recorded
    file:// source) plus the tokenizer."""
    shutil.copytree(OPENSTAX, source)
    node0.mkdir()
    shutil.copytree(trained_tok_dir / "tokenizer", node0 / "tokenizer")
    subprocess.run([sys.executable, "-m", "nanochat", "download", "-n", "8", "--base-dir", str(node0)],
                   env={**env, "NANOCHAT_DATA_URL": f"file://{source}", "NANOCHAT_DATA_SHARDS": "6"},
                   check=True, capture_output=True, timeout=300)


@pytest.mark.slow
def test_two_nodes_without_a_shared_disk(trained_tok_dir, tmp_path):
    """Multi-node without a shared disk: the second node starts with an empty base dir;
    base-train gives it rank 0's tokenizer (sent over the process group) and the shards
    (downloaded from the source node 0 recorded), and the losses equal a one-node
    two-process run's."""
    env = {**os.environ, "NANOCHAT_DTYPE": "float32", "OMP_NUM_THREADS": "1"}
    args = ["base-train", *TOY, "--num-iterations", "3", "--eval-every", "0", "--sample-every", "0"]
    one = _fresh_base(trained_tok_dir, tmp_path / "one")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "--master-port", str(_free_port()), "-m", "nanochat", *args, "--base-dir", str(one)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    _node0_with_source(trained_tok_dir, node0, tmp_path / "source", env)
    node1.mkdir()
    runs = _two_nodes(args, [node0, node1], env)
    assert [p.returncode for p in runs] == [0, 0], runs[0].stdout[-3000:] + runs[1].stdout[-3000:]
    # the tokenizer and source.json were sent; the shards came from the source
    assert "rank 1 downloaded 6 and received 3 file(s)" in runs[0].stdout, runs[0].stdout[-3000:]
    for rel in ["tokenizer/tokenizer.pkl", "tokenizer/token_bytes.pt", *(f"base_data/shard_{i:05d}.parquet" for i in range(6))]:
        assert (node1 / rel).read_bytes() == (node0 / rel).read_bytes(), rel
    assert _losses(node0 / "base_checkpoints" / "d2") == _losses(one / "base_checkpoints" / "d2")
    # only global rank 0 writes weights; the other node keeps its own optimizer shard
    assert (node0 / "base_checkpoints" / "d2" / "model_000003.pt").is_file()
    assert (node1 / "base_checkpoints" / "d2" / "optim_000003_rank1.pt").is_file()

    # resume on both nodes: node 1 has no weights on its disk, so it is sent step 3's;
    # and with the source gone, shards a node lacks come from rank 0 too
    shutil.rmtree(tmp_path / "source")
    for p in (node1 / "base_data").glob("shard_0000[45].parquet"):
        p.unlink()
    runs = _two_nodes([*args[:-6], "--num-iterations", "4", "--eval-every", "0", "--sample-every", "0",
                                 "--resume", "latest"], [node0, node1], env)
    assert [p.returncode for p in runs] == [0, 0], runs[0].stdout[-3000:] + runs[1].stdout[-3000:]
    # two syncs: the missing shards, then step 3's weights and meta
    assert "resumed from" in runs[0].stdout, runs[0].stdout[-3000:]
    assert runs[0].stdout.count("rank 1 downloaded 0 and received 2 file(s)") == 2, runs[0].stdout[-3000:]
    assert sorted(_losses(node0 / "base_checkpoints" / "d2")) == [0, 1, 2, 3]  # step 3 trained after the resume

    # an evaluation stage loads rank 0's newest checkpoint on every node
    for p in (node1 / "base_checkpoints" / "d2").glob("*_000004*"):
        p.unlink()
    runs = _two_nodes(["base-loss", "--split-tokens", "2048", "--device-batch-size", "4", "--max-tokens", "2",
                       "--device-type", "cpu"], [node0, node1], env)
    assert [p.returncode for p in runs] == [0, 0], runs[0].stdout[-3000:] + runs[1].stdout[-3000:]
    assert "rank 1 downloaded 0 and received 2 file(s)" in runs[0].stdout, runs[0].stdout[-3000:]
    assert (node1 / "base_checkpoints" / "d2" / "model_000004.pt").is_file()


@pytest.mark.slow
def test_two_nodes_download_and_tok_train(tmp_path):
    """`download` on two nodes fetches on each node's disk; `tok-train` trains once and
    sends the tokenizer to the other node; with one shared base dir nothing is sent."""
    env = {**os.environ, "NANOCHAT_DTYPE": "float32", "OMP_NUM_THREADS": "1",
           "NANOCHAT_DATA_URL": f"file://{OPENSTAX}", "NANOCHAT_DATA_SHARDS": "6"}
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    node0.mkdir(), node1.mkdir()
    runs = _two_nodes(["download", "-n", "2"], [node0, node1], env)
    assert [p.returncode for p in runs] == [0, 0], runs[0].stdout[-3000:] + runs[1].stdout[-3000:]
    for base in (node0, node1):
        assert sorted(p.name for p in (base / "base_data").glob("*.parquet")) == [
            "shard_00000.parquet", "shard_00001.parquet", "shard_00005.parquet"]
    tok = ["tok-train", "--max-chars", "200000", "--vocab-size", "512"]
    runs = _two_nodes(tok, [node0, node1], env)
    assert [p.returncode for p in runs] == [0, 0], runs[0].stdout[-3000:] + runs[1].stdout[-3000:]
    assert "rank 1 downloaded 0 and received 2 file(s)" in runs[0].stdout, runs[0].stdout[-3000:]
    for name in ("tokenizer.pkl", "token_bytes.pt"):
        assert (node1 / "tokenizer" / name).read_bytes() == (node0 / "tokenizer" / name).read_bytes()
    # one base dir for both nodes (a shared disk): the probe sees it, nothing is sent
    runs = _two_nodes(tok, [node0, node0], env)
    assert [p.returncode for p in runs] == [0, 0], runs[0].stdout[-3000:] + runs[1].stdout[-3000:]
    assert "node sync" not in runs[0].stdout and "saved tokenizer" in runs[0].stdout


@pytest.mark.slow
def test_reference_minus_one_means_never(trained_tok_dir, tmp_path):
    """A reference command line's `-1` keeps its meaning: no evaluation, CORE or samples at
    all, and checkpoints only at the end; below -1 is an error."""
    base = _fresh_base(trained_tok_dir, tmp_path / "run")
    never = ["--eval-every", "-1", "--core-metric-every", "-1", "--sample-every", "-1", "--save-every", "-1"]
    assert cli.main(["base-train", *TOY, "--num-iterations", "3", *never, "--base-dir", str(base)]) == 0
    ckpt_dir = base / "base_checkpoints" / "d2"
    assert {p.name for p in ckpt_dir.glob("meta_*.json")} == {"meta_000003.json"}
    records = [json.loads(line) for line in (ckpt_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [0, 1, 2]
    assert not any("val_bpb" in r or "core" in r for r in records)
    assert json.loads((ckpt_dir / "meta_000003.json").read_text())["val_bpb"] is None
    assert cli.main(["base-train", *TOY, "--eval-every", "-2", "--base-dir", str(base)]) == 2
