"""SFT: mixture flags, hyperparameter inheritance, best-fit packing of real conversations
(only assistant tokens supervised), the optimizer warm start, and `nanochat sft` end to
end at toy size on the real chat data (no SmolTalk offline) → `chat-eval` → exact resume."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from logcapture import capture_log
from nanochat import cli
from nanochat.sft_data import SFTLoader
from nanochat.stages import sft
from nanochat.tasks.mixture import build_mixture, default_mixture, parse_mixture

BASE_TAG = "d2"
BASE_STEP = 21
# what base-train records in a checkpoint's meta (the tiny model was trained at this shape)
BASE_USER_CONFIG = {"depth": 2, "max_seq_len": 128, "device_batch_size": 4, "total_batch_size": 1024,
                    "embedding_lr": 0.3, "unembedding_lr": 0.008, "matrix_lr": 0.02, "scalar_lr": 0.5}


@pytest.fixture
def nanochat_log():
    with capture_log("nanochat.sft") as handler:
        yield handler


# -----------------------------------------------------------------------------
# Real data: a hub mirror with MMLU auxiliary_train, the word list, identity conversations

def build_mirror(shared_data: Path, dst: Path) -> Path:
    """The hf_schema mirror plus MMLU auxiliary_train, which it lacks: the real rows of
    ../shared/data/mmlu/auxiliary_train/*.csv in the hub's nested {"train": struct} shape."""
    for repo in ("allenai--ai2_arc", "openai--gsm8k", "openai--openai_humaneval"):
        dst.mkdir(parents=True, exist_ok=True)
        (dst / repo).symlink_to(shared_data / "hf_schema" / repo, target_is_directory=True)
    (dst / "cais--mmlu").mkdir()
    (dst / "cais--mmlu" / "all").symlink_to(shared_data / "hf_schema" / "cais--mmlu" / "all", target_is_directory=True)
    rows = []
    for path in sorted((shared_data / "mmlu" / "auxiliary_train").glob("*.csv")):
        with open(path, newline="", encoding="utf-8") as f:
            for question, a, b, c, d, answer in csv.reader(f):
                rows.append({"answer": "ABCD".index(answer), "choices": [a, b, c, d], "question": question,
                             "subject": ""})
    struct = pa.struct([("answer", pa.int64()), ("choices", pa.list_(pa.string())), ("question", pa.string()),
                        ("subject", pa.string())])
    split = dst / "cais--mmlu" / "auxiliary_train" / "train"
    split.mkdir(parents=True)
    pq.write_table(pa.table({"train": pa.array(rows, type=struct)}), split / "00000.parquet")
    return dst


@pytest.fixture(scope="module")
def mirror(shared_data, tmp_path_factory) -> str:
    return build_mirror(shared_data, tmp_path_factory.mktemp("mirror") / "hf").as_uri()


@pytest.fixture(scope="module")
def sft_base(tiny_base_checkpoint, tiny_tokenizer, shared_data, tmp_path_factory) -> Path:
    """A base dir holding the tiny tokenizer, the word list and a base checkpoint written
    the way base-train writes one: the tiny model after one more real optimizer step, its
    optimizer state, and base-train's meta fields (batch shape, learning rates)."""
    from nanochat.checkpoint import checkpoint_dir, load_model, save_checkpoint
    from nanochat.tasks import CustomJSON

    base = tmp_path_factory.mktemp("sft_base")
    (base / "tokenizer").symlink_to(tiny_base_checkpoint / "tokenizer", target_is_directory=True)
    (base / "words_alpha.txt").symlink_to(shared_data / "words" / "words_alpha.txt")
    model, tokenizer, meta = load_model("base", tiny_base_checkpoint, "cpu", torch.float32, tag=BASE_TAG)
    model.train()
    optimizer = model.setup_optimizer(embedding_lr=0.3 * 0.044, unembedding_lr=0.008 * 0.044, matrix_lr=0.02 * 0.044)
    convs = CustomJSON(shared_data / "chat_sft" / "identity_conversations.jsonl", stop=16)
    x, y = next(SFTLoader(convs, tokenizer, 4, 128))
    model(x, y).backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)
    meta = {"step": BASE_STEP, "val_bpb": None, "model_config": meta["model_config"], "user_config": BASE_USER_CONFIG,
            "device_batch_size": 4, "max_seq_len": 128, "total_batch_size": 1024}
    save_checkpoint(checkpoint_dir(base, "base", BASE_TAG), BASE_STEP, model.state_dict(), optimizer.state_dict(), meta)
    return base


# -----------------------------------------------------------------------------
# Mixture flags (the spec language itself is tested in test_mixture.py)

def test_mixture_flags_resolve_to_specs():
    cfg = sft.Config()
    assert cfg.training_specs() == default_mixture()
    assert cfg.validation_specs(cfg.training_specs()) == ["smoltalk-test", "mmlu-test@5200", "gsm8k-test@420"]
    cfg = sft.Config(mmlu_epochs=1, gsm8k_epochs=0, mixture_add=["jsonl:/data/mine.jsonl:2"])
    assert cfg.training_specs() == ["smoltalk", "identity:2", "mmlu-aux:1", "simple-spelling", "spelling",
                                    "jsonl:/data/mine.jsonl:2"]
    offline = sft.Config(mixture=["identity", "gsm8k"])
    assert offline.validation_specs(offline.training_specs()) == ["mmlu-test@5200", "gsm8k-test@420"]


def test_mixture_config_errors(tmp_path, capsys):
    problems = [
        (sft.Config(mixture=["gsm8k"], mixture_add=["spelling"]), "either --mixture"),
        (sft.Config(mixture=["gsm8k"], gsm8k_epochs=2), "write the epochs into the spec (e.g. gsm8k:4)"),
        (sft.Config(mixture=["gsm8k", "spelin"]), "--mixture: mixture spec 'spelin': unknown component"),
        (sft.Config(val_mixture=["mmlu-test@x"]), "--val-mixture: mixture spec 'mmlu-test@x'"),
        (sft.Config(warmup_ratio=0.6, warmdown_ratio=0.6), "at most 1"),
        (sft.Config(resume="first"), "only 'latest'"),
    ]
    for cfg, message in problems:
        with pytest.raises(ValueError) as e:
            cfg.validate()
        assert message in str(e.value), str(e.value)
    # through the CLI: one line, exit status 2, before any model is loaded
    assert cli.main(["sft", "--mixture", "identity", "gsm9k", "--base-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "gsm9k" in err and "did you mean gsm8k" in err


# -----------------------------------------------------------------------------
# Inheritance and schedules

def test_hyperparameters_inherited_overridden_and_logged(nanochat_log):
    meta = {"max_seq_len": 128, "device_batch_size": 4, "total_batch_size": 1024, "user_config": BASE_USER_CONFIG}
    cfg = sft.Config(max_seq_len=256, device_batch_size=4, matrix_lr=0.01)
    resolved = sft.resolve_hyperparameters(cfg, meta)
    assert {k: (r["value"], r["source"]) for k, r in resolved.items()} == {
        "max_seq_len": (256, "overridden"), "device_batch_size": (4, "given"), "total_batch_size": (1024, "inherited"),
        "embedding_lr": (0.3, "inherited"), "unembedding_lr": (0.008, "inherited"), "matrix_lr": (0.01, "overridden"),
        "scalar_lr": (0.5, "inherited")}
    sft.log_hyperparameters(resolved)
    assert "--max-seq-len=256 overrides the base checkpoint's 128" in nanochat_log.text
    assert "inherited total_batch_size=1024 from the base checkpoint" in nanochat_log.text
    # a checkpoint that records nothing (e.g. written by hand): base-train's defaults
    bare = sft.resolve_hyperparameters(sft.Config(), {"model_config": {}})
    assert bare["max_seq_len"] == {"value": 2048, "source": "default", "base": None}
    assert bare["matrix_lr"]["value"] == 0.02


def test_progress_schedule():
    lrm = lambda p: sft.progress_lr_multiplier(p, warmup_ratio=0.0, warmdown_ratio=0.5, final_lr_frac=0.0)
    assert [lrm(p) for p in (0.0, 0.25, 0.5, 0.75, 1.0, 1.2)] == [1.0, 1.0, 1.0, 0.5, 0.0, 0.0]
    assert sft.progress_lr_multiplier(0.05, 0.1, 0.5, 0.0) == pytest.approx(0.5)
    assert sft.sft_muon_momentum(0) == 0.85 and sft.sft_muon_momentum(300) == sft.sft_muon_momentum(900) == 0.95


# -----------------------------------------------------------------------------
# Packing

def _supervised_by_structure(ids: list[int], sp: dict[str, int]) -> list[bool]:
    """Independently of the renderer's mask: a token is trained on iff it is assistant
    text, a python call (with its delimiters) or <|assistant_end|>; <|assistant_start|>,
    tool output (with its delimiters), user turns, BOS and padding are not."""
    out, in_assistant, in_output = [], False, False
    for t in ids:
        if t == sp["<|assistant_start|>"]:
            in_assistant, supervised = True, False
        elif t == sp["<|assistant_end|>"]:
            supervised, in_assistant = in_assistant, False
        elif t == sp["<|output_start|>"]:
            in_output, supervised = True, False
        elif t == sp["<|output_end|>"]:
            in_output, supervised = False, False
        elif t in (sp["<|bos|>"], sp["<|user_start|>"], sp["<|user_end|>"]):
            in_assistant, supervised = False, False
        else:
            supervised = in_assistant and not in_output
        out.append(supervised)
    return out


def _segments(row: list[int], bos: int) -> list[list[int]]:
    cuts = [i for i, t in enumerate(row) if t == bos] + [len(row)]
    return [row[a:b] for a, b in zip(cuts, cuts[1:])]


def test_packing_supervises_only_assistant_tokens(tiny_tokenizer, shared_data, mirror, tmp_path):
    tok = tiny_tokenizer
    (tmp_path / "words_alpha.txt").symlink_to(shared_data / "words" / "words_alpha.txt")
    (tmp_path / "identity_conversations.jsonl").symlink_to(shared_data / "chat_sft" / "identity_conversations.jsonl")
    dataset, lines = build_mixture(parse_mixture(["identity@40", "gsm8k@30", "spelling@30", "mmlu-aux@20"]), tmp_path,
                                   mirror=mirror)
    assert len(dataset) == 120 and lines[0] == "identity@40: 40 rows × 1 = 40"
    names = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
             "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
    sp = {n: tok.encode_special(n) for n in names}
    bos = sp["<|bos|>"]
    T = 384
    rendered = {tuple(tok.render_conversation(dataset[i], max_tokens=T + 1)[0]) for i in range(len(dataset))}

    loader = SFTLoader(dataset, tok, 4, T, buffer_size=16)
    seen_tools = seen_padding = 0
    for _ in range(6):
        inputs, targets = next(loader)
        assert inputs.shape == targets.shape == (4, T) and targets.dtype == torch.long
        assert (inputs[:, 0] == bos).all()  # every row starts a conversation
        for x, y in zip(inputs.tolist(), targets.tolist()):
            # the row has T+1 tokens; the last one is visible only when it is a target
            full = x + ([y[-1]] if y[-1] >= 0 else [])
            structure = _supervised_by_structure(full, sp)
            for t in range(len(full) - 1):
                assert y[t] == (full[t + 1] if structure[t + 1] else -1), (t, full[max(0, t - 5):t + 5])
            seen_tools += x.count(sp["<|output_start|>"])
            # whole conversations, then BOS padding (nothing supervised in it)
            segments = _segments(full, bos)
            padding = [s for s in segments if s == [bos]]
            convs = [s for s in segments if s != [bos]]
            assert all(s[1] == sp["<|user_start|>"] for s in convs)
            assert all(tuple(s) in rendered for s in convs[:-1])  # the last may run into the row's end
            if padding:
                seen_padding += 1
                assert segments[-len(padding):] == padding  # padding only at the end
                pad_start = T - len(padding)
                assert all(v == -1 for v in y[pad_start - 1:])
                assert tuple(convs[-1]) in rendered
    assert seen_tools > 0 and seen_padding > 0  # the checks above met tool calls and padding
    assert 0 < loader.padding_fraction < 0.5

    # the state resumes the stream exactly
    state = json.loads(json.dumps(loader.state_dict()))
    expected = [next(loader) for _ in range(2)]
    again = SFTLoader(dataset, tok, 4, T, buffer_size=16, state=state)
    for (x1, y1), (x2, y2) in zip(expected, (next(again) for _ in range(2))):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    with pytest.raises(ValueError, match="same --mixture and number of processes"):
        SFTLoader(dataset, tok, 4, T, rank=0, world_size=2, state=state)


def test_epoch_accounting_across_ranks(tiny_tokenizer, shared_data):
    from nanochat.tasks import CustomJSON
    convs = CustomJSON(shared_data / "chat_sft" / "identity_conversations.jsonl", stop=50)
    loaders = [SFTLoader(convs, tiny_tokenizer, 2, 256, rank=r, world_size=2, buffer_size=4) for r in (0, 1)]
    steps = 0
    while not any(ld.epoch_done for ld in loaders):
        for ld in loaders:
            next(ld)
        steps += 1
    # each rank packed about half: together one epoch, each conversation roughly once
    assert all(0.9 <= ld.progress <= 1.3 for ld in loaders)
    assert steps >= 50 // (2 * 2 * 4)
    # a mixture whose every conversation is cut before the assistant speaks cannot train
    with pytest.raises(ValueError, match="raise --max-seq-len"):
        next(SFTLoader(convs, tiny_tokenizer, 1, 3))


# -----------------------------------------------------------------------------
# Optimizer warm start

def test_optimizer_warm_start_keeps_sft_settings(sft_base):
    from nanochat import checkpoint as ckpt
    from nanochat.common import Runtime

    rt = Runtime(device=torch.device("cpu"), dtype=torch.float32, base_dir=sft_base)
    model, _, _ = ckpt.load_model("base", sft_base, "cpu", tag=BASE_TAG)
    optimizer = model.setup_optimizer(matrix_lr=0.123, weight_decay=0.0)
    before = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    assert sft._warm_start_optimizer(optimizer, sft_base, BASE_TAG, BASE_STEP, rt) == "loaded"
    saved = torch.load(ckpt.optim_path(ckpt.checkpoint_dir(sft_base, "base", BASE_TAG), BASE_STEP), weights_only=True)
    loaded = optimizer.state_dict()["state"]
    assert loaded.keys() == saved["state"].keys() and len(loaded) > 0
    for index, values in saved["state"].items():
        for k, v in values.items():
            if isinstance(v, torch.Tensor) and v.ndim > 0:  # the moment buffers
                assert torch.equal(loaded[index][k], v.float()), (index, k)
    assert [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] == before

    # a state saved by 2 ranks does not fit one: fresh optimizer, said so
    fresh = model.setup_optimizer()
    bad = dict(saved, sharding={"world_size": 2, "rank": 0})
    path = ckpt.optim_path(ckpt.checkpoint_dir(sft_base, "base", BASE_TAG), BASE_STEP, rank=1)
    torch.save(bad, path)
    try:
        assert sft._warm_start_optimizer(fresh, sft_base, BASE_TAG, BASE_STEP,
                                         Runtime(device=torch.device("cpu"), dtype=torch.float32, rank=1)) == "mismatch"
    finally:
        path.unlink()
    assert not fresh.state
    assert sft._warm_start_optimizer(fresh, sft_base, BASE_TAG, BASE_STEP - 1, rt) == "missing"


# -----------------------------------------------------------------------------
# End to end

TOY = ["-g", BASE_TAG, "--mixture", "identity:2", "mmlu-aux", "gsm8k@400", "spelling@200", "simple-spelling@200",
       "--max-seq-len", "256", "--device-batch-size", "2", "--num-iterations", "4", "--eval-every", "2",
       "--eval-tokens", "1024", "--save-every", "2", "--device-type", "cpu"]


@pytest.mark.slow
def test_sft_cli_then_chat_eval_then_resume(sft_base, shared_data, mirror, tmp_path, monkeypatch, nanochat_log):
    from nanochat.checkpoint import checkpoint_dir
    from nanochat.report import read_sections

    monkeypatch.setenv("NANOCHAT_HF_MIRROR", mirror)
    monkeypatch.setenv("NANOCHAT_DTYPE", "float32")
    base = tmp_path / "base"
    base.mkdir()
    for name in ("tokenizer", "base_checkpoints", "words_alpha.txt"):
        (base / name).symlink_to((sft_base / name).resolve())
    identity = (shared_data / "chat_sft" / "identity_conversations.jsonl").as_uri()
    args = ["sft", *TOY, "--identity-url", identity, "--chatcore-every", "4", "--chatcore-max-problems", "1",
            "--chatcore-max-categorical", "2", "--chatcore-max-new-tokens", "8", "--base-dir", str(base)]
    assert cli.main(args) == 0
    assert (base / "identity_conversations.jsonl").is_file()  # fetched from --identity-url
    log_text = nanochat_log.text
    assert "--max-seq-len=256 overrides the base checkpoint's 128" in log_text
    assert "inherited total_batch_size=1024" in log_text and "inherited matrix_lr=0.02" in log_text
    assert "warm-started the optimizer" in log_text
    assert "mmlu-aux: 1,218 rows" in log_text and "gsm8k@400: 400 rows" in log_text

    ckpt = checkpoint_dir(base, "sft", BASE_TAG)
    assert sorted(p.name for p in ckpt.glob("meta_*.json")) == ["meta_000002.json", "meta_000004.json"]
    meta = json.loads((ckpt / "meta_000004.json").read_text())
    assert meta["step"] == 4 and meta["source"] == {"stage": "base", "tag": BASE_TAG, "step": BASE_STEP}
    assert (meta["max_seq_len"], meta["device_batch_size"], meta["total_batch_size"]) == (256, 2, 1024)
    assert meta["hyperparameters"]["max_seq_len"]["source"] == "overridden"
    assert meta["hyperparameters"]["matrix_lr"]["source"] == "inherited"
    assert meta["optimizer_warm_start"] == "loaded" and meta["model_tag"] == BASE_TAG
    assert 0 < meta["val_bpb"] < 20 and -1 <= meta["chatcore"] <= 1
    records = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(losses) == [0, 1, 2, 3] and all(0 < v < 10 for v in losses.values())
    assert [r["step"] for r in records if "val_bpb" in r] == [0, 2, 4]
    assert [r["step"] for r in records if "chatcore" in r] == [4]
    section = {s["title"]: s["data"] for s in read_sections(base)}["SFT"]
    assert section["metrics"]["steps"] == 4 and section["metrics"]["optimizer_warm_start"] == "loaded"

    # the SFT model on every chat task
    assert cli.main(["chat-eval", "-i", "sft", "-x", "2", "-m", "8", "--device-type", "cpu",
                     "--base-dir", str(base)]) == 0
    report = {s["title"]: s["data"] for s in read_sections(base)}["Chat evaluation sft"]
    assert set(report["results"]) == {"ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"}
    for name, r in report["results"].items():
        assert r["total"] == 2 and 0.0 <= r["passed"] / r["total"] <= 1.0, name
    assert report["model"] == {"source": "sft", "tag": BASE_TAG, "step": 4}
    expected = sum((report["accuracy"][t] - b) / (1 - b) for t, b in
                   [("ARC-Easy", .25), ("ARC-Challenge", .25), ("MMLU", .25), ("GSM8K", 0), ("HumanEval", 0),
                    ("SpellingBee", 0)]) / 6
    assert report["chatcore"] == pytest.approx(expected)
    # one task again: merged into the section, ChatCORE kept
    assert cli.main(["chat-eval", "-i", "sft", "-a", "GSM8K", "-x", "1", "-m", "8", "--device-type", "cpu",
                     "--base-dir", str(base)]) == 0
    report = {s["title"]: s["data"] for s in read_sections(base)}["Chat evaluation sft"]
    assert report["results"]["GSM8K"]["total"] == 1 and len(report["results"]) == 6
    assert report["chatcore"] is not None
    # compiled decoding (one sample per problem) grades the same as eager
    eager = {k: report["results"]["GSM8K"][k] for k in ("passed", "total")}
    with capture_log("nanochat.engine") as engine_log:
        assert cli.main(["chat-eval", "-i", "sft", "-a", "GSM8K", "-x", "1", "-m", "8", "--compile",
                         "--device-type", "cpu", "--base-dir", str(base)]) == 0
    report = {s["title"]: s["data"] for s in read_sections(base)}["Chat evaluation sft"]
    assert {k: report["results"]["GSM8K"][k] for k in ("passed", "total")} == eager
    assert "compiling the decode step" in engine_log.text and "decoding eagerly" not in engine_log.text

    # resume from step 2: the same steps 2, 3 and bit-identical weights at step 4
    final = torch.load(ckpt / "model_000004.pt", weights_only=True)
    assert cli.main([*args[:-2], "--chatcore-every", "0", "--resume-from-step", "2", "--base-dir", str(base)]) == 0
    again = torch.load(ckpt / "model_000004.pt", weights_only=True)
    for k in final:
        assert torch.equal(final[k], again[k]), k
    records = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"]: r["loss"] for r in records if "loss" in r} == losses
    # resuming with another mixture is refused
    assert cli.main([*args, "--resume", "latest", "--mixture", "identity", "--base-dir", str(base)]) == 2


def test_sft_runs_one_epoch_by_default(sft_base, shared_data, tmp_path):
    """Without --num-iterations the run ends when the mixture has been packed once; the
    LR follows the epoch's progress down to its warmdown."""
    from nanochat.common import Runtime

    base = tmp_path / "base"
    base.mkdir()
    for name in ("tokenizer", "base_checkpoints"):
        (base / name).symlink_to((sft_base / name).resolve())
    (base / "identity_conversations.jsonl").symlink_to(shared_data / "chat_sft" / "identity_conversations.jsonl")
    cfg = sft.Config(model_tag=BASE_TAG, mixture=["identity@12"], val_mixture=["identity@4"], max_seq_len=256,
                     device_batch_size=2, total_batch_size=512, eval_every=0, eval_tokens=512, chatcore_every=0,
                     load_optimizer=False, output_tag="epoch")
    metrics = sft.run(cfg, Runtime(device=torch.device("cpu"), dtype=torch.float32, base_dir=base))
    assert metrics["epoch_progress"] >= 1.0 and metrics["steps"] >= 2
    assert metrics["optimizer_warm_start"] == "off"
    assert metrics["hyperparameters"]["total_batch_size"]["source"] == "overridden"
    jsonl = base / "chatsft_checkpoints" / "epoch" / "metrics.jsonl"
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == metrics["steps"]
    assert steps[0]["lrm"] == 1.0 and steps[-1]["lrm"] < 1.0  # into the warmdown of the epoch
    assert all(a["progress"] < b["progress"] for a, b in zip(steps, steps[1:]))
