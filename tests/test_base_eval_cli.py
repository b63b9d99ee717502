"""`nanochat base-eval` end to end: CORE on the real eval bundle (20 of 22 tasks present)
with a tiny trained base checkpoint, the CSV and the skipped-task report; config
validation; and a local Hugging Face model when transformers is installed."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from corebundle import mini_core_bundle
from nanochat import cli
from nanochat.common import Runtime
from nanochat.core_eval import load_task_specs
from nanochat.stages import base_eval

MISSING = ["squad", "coqa"]


@pytest.fixture(scope="module")
def bundle(shared_data) -> Path:
    return shared_data / "core_eval" / "eval_bundle"


def _read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return [[c.strip() for c in row] for row in csv.reader(f)]


# -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint_base(tiny_base_checkpoint, tiny_tokenizer_dir, tmp_path_factory) -> Path:
    """conftest's tiny trained checkpoint and tokenizer, plus the real shards (for bpb),
    in a base dir of this module's own: the evaluation writes eval_bundle/, base_eval/
    and report/ into it, and the shared fixture is read-only."""
    base = tmp_path_factory.mktemp("base_eval")
    for name in ("tokenizer", "base_checkpoints"):
        shutil.copytree(tiny_base_checkpoint / name, base / name)
    (base / "base_data").symlink_to(tiny_tokenizer_dir / "base_data", target_is_directory=True)
    return base


@pytest.mark.slow
def test_cli_core_on_the_real_bundle(checkpoint_base, bundle, capsys):
    """All three evaluations: every available CORE task gets a score and squad and coqa
    are reported as missing; bits per byte on both splits; samples."""
    n = 4
    rc = cli.main(["base-eval", "--max-per-task", str(n), "--batch-size", "16",  # default --eval: all three
                   "--split-tokens", "1024", "--device-batch-size", "4",
                   "--bundle-url", str(bundle), "--base-dir", str(checkpoint_base), "--device-type", "cpu"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert (checkpoint_base / "eval_bundle" / "core.yaml").is_file()
    labels = [s.label for s in load_task_specs(bundle)]
    present = [label for label in labels if label not in MISSING]
    assert len(present) == 20 and set(MISSING) <= set(labels)

    # the printed table
    lines = {line.split()[0]: line for line in out.out.splitlines() if line.strip()}
    for label in present:
        acc, centered = (float(v) for v in lines[label].split()[1:3])
        assert 0.0 <= acc <= 1.0 and centered <= 1.0, lines[label]
    for label in MISSING:
        assert "skipped" in lines[label] and "missing" in lines[label]
    assert "mean over 20 of 22 tasks" in lines["CORE"]
    assert "not comparable" in out.out and "squad, coqa" in out.out

    # the metrics the stage returned (logged as JSON by the CLI)
    (result,) = [line.split("result: ", 1)[1] for line in out.err.splitlines() if "result: " in line]
    metrics = json.loads(result)
    assert list(metrics["tasks"]) == present and metrics["skipped"] == MISSING
    assert metrics["comparable"] is False and metrics["core_examples_per_s"] > 0
    assert 0 < metrics["train_bpb"] < 20 and 0 < metrics["val_bpb"] < 20
    assert len(metrics["samples"]) == 11 and metrics["samples"][0].startswith("The capital of France is")
    assert "Conditioned samples:" in out.out and "Unconditioned samples:" in out.out
    assert metrics["model"] == "base model d2 step 20"  # conftest's checkpoint
    for t in metrics["tasks"].values():
        assert t["num_examples"] == n and t["accuracy"] * n == pytest.approx(round(t["accuracy"] * n))

    # the CSV, in the reference's layout, missing tasks visible
    (csv_path,) = (checkpoint_base / "base_eval").glob("*.csv")
    assert csv_path == Path(metrics["csv"]) and csv_path.name == "base_model_d2_000020.csv"
    rows = _read_csv(csv_path)
    assert rows[0] == ["Task", "Accuracy", "Centered"]
    by_label = {r[0]: r for r in rows[1:]}
    assert set(by_label) == set(labels) | {"CORE"}
    for label in present:
        assert float(by_label[label][1]) == pytest.approx(metrics["tasks"][label]["accuracy"], abs=1e-6)
    assert by_label["squad"][1:] == ["", ""] and by_label["coqa"][1:] == ["", ""]
    core = float(by_label["CORE"][2])
    assert core == pytest.approx(metrics["core"], abs=1e-6)
    assert metrics["core"] == pytest.approx(sum(metrics["tasks"][label]["centered"] for label in present) / 20)


# -----------------------------------------------------------------------------

def test_config_validation():
    base_eval.Config(eval="core,bpb").validate()
    with pytest.raises(ValueError) as e:
        base_eval.Config(eval="core,loss", max_per_task=0, batch_size=0, hf_path="x", tag="d4").validate()
    msg = str(e.value)
    for part in ("--eval", "--max-per-task", "--batch-size", "--hf-path"):
        assert part in msg


def test_cli_rejects_a_bad_eval_mode(capsys, tmp_path):
    assert cli.main(["base-eval", "--eval", "cor", "--base-dir", str(tmp_path), "--device-type", "cpu"]) == 2
    assert "--eval takes" in capsys.readouterr().err


def test_format_csv_marks_skipped_tasks():
    core = {"core": 0.125, "tasks": {"copa": {"accuracy": 0.75, "centered": 0.5},
                                     "jeopardy": {"accuracy": 0.0, "centered": 0.0}},
            "skipped": ["squad"], "skipped_reasons": {"squad": "missing"}, "num_tasks": 2, "num_tasks_total": 3,
            "note": "1 of 3 tasks skipped"}
    text = base_eval.format_csv(core)
    rows = [[c.strip() for c in r] for r in csv.reader(text.splitlines())]
    assert rows == [["Task", "Accuracy", "Centered"], ["copa", "0.750000", "0.500000"],
                    ["jeopardy", "0.000000", "0.000000"], ["squad", "", ""], ["CORE", "", "0.125000"]]
    table = base_eval.format_table(core)
    assert "squad" in table and "skipped" in table and "mean over 2 of 3 tasks" in table


# -----------------------------------------------------------------------------
# A Hugging Face model from a local folder (only where transformers is installed)

def test_hf_model_core(bundle, tmp_path, shared_data):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    import pyarrow.parquet as pq

    # a byte-level BPE tokenizer trained on a little real text, and a tiny random GPT-2
    text = pq.read_table(sorted((shared_data / "pretrain_openstax" / "base_data").glob("*.parquet"))[0],
                         columns=["text"]).column("text").to_pylist()[:20]
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(text, vocab_size=600, special_tokens=["<|endoftext|>"])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                               eos_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=1, n_head=2,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    hf_dir = tmp_path / "tiny-gpt2"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)

    base = tmp_path / "base"
    mini_core_bundle(bundle, base)
    runtime = Runtime(device=torch.device("cpu"), dtype=torch.float32, base_dir=base)
    metrics = base_eval.run(base_eval.Config(eval="core,sample", max_per_task=4, hf_path=str(hf_dir)), runtime)
    assert "samples" not in metrics  # sampling uses our KV-cache engine
    assert set(metrics["tasks"]) == {"copa", "arc_easy", "bigbench_operators"}
    assert len(metrics["skipped"]) == 19 and metrics["comparable"] is False
    model, hf_tok = base_eval.load_hf_model(str(hf_dir), torch.device("cpu"))
    assert model.max_seq_len == 256  # arc_easy's 10-shot prompts are longer: cropped from the left
    # the adapter's interface: logits, per-token losses for bits per byte, the tokenizer
    ids = torch.tensor(hf_tok.encode(["The cell membrane", "Energy is"], prepend=hf_tok.get_bos_token_id())[0:1])
    logits = model(ids)
    assert logits.shape == (1, ids.size(1), len(tok))
    losses = model(ids[:, :-1], ids[:, 1:], loss_reduction="none")
    assert losses.shape == (ids.size(1) - 1,)
    expected = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
    assert torch.allclose(losses, expected, atol=1e-5)
    assert hf_tok.token_bytes()[hf_tok.get_bos_token_id()] == 0 and hf_tok.decode(ids[0, 1:].tolist()) == "The cell membrane"
    assert Path(metrics["csv"]).name == "tiny-gpt2.csv"


def test_hf_path_without_transformers_is_a_clear_error(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("No module named 'transformers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(ValueError, match="pip install"):
        base_eval.load_hf_model(str(tmp_path), torch.device("cpu"))


def test_hf_path_hub_id_offline_and_missing_paths_are_clear_errors(tmp_path):
    """A hub id is fetched through transformers (never contacted here: offline mode); an
    unreachable one, and a path that does not exist, are each a clear FileNotFoundError
    (which the CLI prints as one line, exit 2)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("transformers")
    # a fresh process, so the hub library reads offline mode (and the empty cache) at import
    code = ("import torch\nfrom nanochat.stages import base_eval\n"
            "try:\n    base_eval.load_hf_model('nobody-here/no-such-model', torch.device('cpu'))\n"
            "except FileNotFoundError as e:\n    print('refused:', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "refused: --hf-path nobody-here/no-such-model: could not load it" in out.stdout, out.stderr[-2000:]
    with pytest.raises(FileNotFoundError, match="no such directory"):
        base_eval.load_hf_model(str(tmp_path / "missing"), torch.device("cpu"))
