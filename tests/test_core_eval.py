"""CORE metric: prompt rendering, item order and few-shot choice (the reference's
procedure), batched scoring, centered accuracy, skipped tasks, and fetching the eval
bundle — on hand-made items and on the real bundle in ../shared/data/core_eval."""
from __future__ import annotations

import csv
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nanochat import core_eval as ce

BUNDLE_REL = Path("core_eval") / "eval_bundle"
DATA = ce.DATA_SUBDIR


@pytest.fixture(scope="module")
def bundle(shared_data) -> Path:
    return shared_data / BUNDLE_REL


def _spec(bundle: Path, label: str) -> ce.TaskSpec:
    return next(s for s in ce.load_task_specs(bundle) if s.label == label)


# -----------------------------------------------------------------------------
# Rendering, hand-made items

def test_render_mc_fewshot_order_delimiter_and_choices():
    shots = [{"query": "Q1", "choices": ["a", "b"], "gold": 1},
             {"query": "Q2", "choices": ["c", "d"], "gold": 0}]
    item = {"query": "Q3", "choices": ["e", "f", "g"], "gold": 2}
    assert ce.render_mc(item, "\nAnswer: ", shots) == [
        "Q1\nAnswer: b\n\nQ2\nAnswer: c\n\nQ3\nAnswer: e",
        "Q1\nAnswer: b\n\nQ2\nAnswer: c\n\nQ3\nAnswer: f",
        "Q1\nAnswer: b\n\nQ2\nAnswer: c\n\nQ3\nAnswer: g",
    ]
    # zero-shot, default delimiter; nothing is stripped in MC prompts
    assert ce.render_mc({"query": " Q ", "choices": ["x", "y"], "gold": 0}, " ") == [" Q  x", " Q  y"]


def test_render_schema_shared_continuation():
    shots = [{"context_options": ["A1", "A2"], "continuation": "end one", "gold": 1}]
    item = {"context_options": ["X said", "Y said"], "continuation": "tail.", "gold": 0}
    assert ce.render_schema(item, " ", shots) == ["A2 end one\n\nX said tail.", "A2 end one\n\nY said tail."]
    assert ce.render_schema(item, " ") == ["X said tail.", "Y said tail."]


def test_render_lm_trims_contexts_and_the_prompt_without_continuation():
    shots = [{"context": "  c1 \n", "continuation": "k1"}, {"context": "c2", "continuation": " k2"}]
    item = {"context": "c3 ", "continuation": "k3"}
    assert ce.render_lm(item, "\nAnswer: ", shots) == [
        "c1\nAnswer: k1\n\nc2\nAnswer:  k2\n\nc3\nAnswer:",
        "c1\nAnswer: k1\n\nc2\nAnswer:  k2\n\nc3\nAnswer: k3",
    ]
    assert ce.render_lm(item, " ") == ["c3", "c3 k3"]


# -----------------------------------------------------------------------------
# Item order and few-shot choice: the reference's Random(1337) shuffle, then
# Random(1234 + i).sample(other indices, k). Expected values written out from Python's random.

def test_item_order_and_fewshot_indices(tmp_path):
    (tmp_path / DATA).mkdir(parents=True)
    (tmp_path / DATA / "t.jsonl").write_text("".join(json.dumps({"i": i}) + "\n" for i in range(10)) + "\n")
    spec = ce.TaskSpec("t", "language_modeling", "t.jsonl", 4, " ", 0.0)
    assert [x["i"] for x in ce.load_task_items(tmp_path, spec)] == [0, 3, 7, 2, 1, 6, 4, 5, 8, 9]
    assert [x["i"] for x in ce.load_task_items(tmp_path, spec, max_per_task=4)] == [0, 3, 7, 2]
    assert ce.fewshot_indices(3, 10, 4) == [2, 7, 9, 1]
    assert ce.fewshot_indices(0, 10, 3) == [8, 2, 1]
    assert ce.fewshot_indices(5, 10, 0) == []
    # fewer items than shots (tiny --max-per-task): every other item, never the item itself
    assert sorted(ce.fewshot_indices(1, 4, 10)) == [0, 2, 3]



def test_real_items_render_like_the_reference(bundle):
    copa = _spec(bundle, "copa")
    assert (copa.task_type, copa.num_fewshot, copa.continuation_delimiter) == ("multiple_choice", 0, " ")
    item = ce.load_task_items(bundle, copa, max_per_task=5)[0]  # line 84 of copa.jsonl after the shuffle
    assert ce.render_mc(item, " ") == [
        "Political violence broke out in the nation, therefore many citizens relocated to the capitol.",
        "Political violence broke out in the nation, therefore many citizens took refuge in other territories.",
    ]
    wino = _spec(bundle, "winograd")
    item = ce.load_task_items(bundle, wino)[0]
    stem = "In the storm, the tree fell down and crashed through the roof of my house. Now, I have to get the"
    assert ce.render_schema(item, wino.continuation_delimiter) == [f"{stem} tree repaired.", f"{stem} roof repaired."]

    arc = _spec(bundle, "arc_easy")
    assert (arc.num_fewshot, arc.continuation_delimiter) == (10, "\nAnswer: ")
    items = ce.load_task_items(bundle, arc, max_per_task=20)
    shots_idx = ce.fewshot_indices(0, len(items), arc.num_fewshot)
    assert shots_idx == [15, 4, 1, 3, 19, 13, 10, 17, 11, 2]
    prompts = ce.render_mc(items[0], arc.continuation_delimiter, [items[j] for j in shots_idx])
    first = items[15]
    assert len(prompts) == len(items[0]["choices"]) == 4
    for prompt, choice in zip(prompts, items[0]["choices"]):
        assert prompt.startswith(f"{first['query']}\nAnswer: {first['choices'][first['gold']]}\n\n")
        assert prompt.endswith("Which statement is an inference?\nAnswer: " + choice)
        assert prompt.count("\n\nQuestion: ") == 10

    ops = _spec(bundle, "bigbench_operators")
    items = ce.load_task_items(bundle, ops, max_per_task=10)
    without, with_ = ce.render_lm(items[0], ops.continuation_delimiter, [items[j] for j in ce.fewshot_indices(0, 10, 3)])
    assert with_ == without + " 1256"
    assert without.endswith("i op j suppresses the j last digits of i.\n125690 op 2 =")
    assert without.count("\n\n") == 3 and "25 op 7 = 6\n\n" in without  # items[1] is one of the shots


# -----------------------------------------------------------------------------
# Token rows

def test_common_prefix_suffix_and_rows():
    assert ce.common_prefix_length([[1, 2, 3], [1, 2, 4, 5], [1, 2]]) == 2
    assert ce.common_prefix_length([[1, 2], [1, 2, 3]]) == 2
    assert ce.common_suffix_length([[9, 1, 2, 3], [8, 2, 3], [2, 3]]) == 2
    assert ce.common_suffix_length([[1], [2]]) == 0
    mc = ce.item_rows("multiple_choice", [[0, 5, 6, 7], [0, 5, 6, 8, 9]], item=4)
    assert [(r.item, r.start, r.end) for r in mc] == [(4, 3, 4), (4, 3, 5)]
    schema = ce.item_rows("schema", [[0, 1, 7, 8], [0, 2, 3, 7, 8]], item=0)
    assert [(r.start, r.end) for r in schema] == [(2, 4), (3, 5)]
    lm = ce.item_rows("language_modeling", [[0, 5, 6], [0, 5, 6, 7, 8]], item=1)
    assert [(r.tokens, r.start, r.end) for r in lm] == [([0, 5, 6, 7, 8], 3, 5)]


def test_crop_left_keeps_the_scored_tokens():
    row = ce.Row(0, list(range(10)), 7, 10)
    cropped = ce.crop_left(row, 6)
    assert cropped.tokens == [4, 5, 6, 7, 8, 9] and (cropped.start, cropped.end) == (3, 6)
    assert ce.crop_left(row, 10) is row
    with pytest.raises(ValueError, match="context"):
        ce.crop_left(row, 3)


# -----------------------------------------------------------------------------
# Scoring with a tiny random causal LM and the tiny real tokenizer

class TinyCausalLM(torch.nn.Module):
    """Fallback when nanochat.gpt is absent: logits at t depend on tokens <= t only
    (a running mean of embeddings plus the current one)."""

    def __init__(self, vocab: int, dim: int = 32):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.mix = torch.nn.Linear(2 * dim, dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, idx):
        e = self.emb(idx)
        steps = torch.arange(1, idx.size(1) + 1, device=idx.device).view(1, -1, 1)
        h = torch.tanh(self.mix(torch.cat([e.cumsum(1) / steps, e], dim=-1)))
        return self.head(h) * 3.0


def _tiny_model(vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    try:
        from nanochat.gpt import GPTConfig, build_model
    except ImportError:
        return TinyCausalLM(vocab).eval()
    cfg = GPTConfig(sequence_len=256, vocab_size=vocab, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                    window_pattern="SL")
    return build_model(cfg, torch.device("cpu"), torch.float32).eval()


@pytest.fixture(scope="module")
def tiny_model(tiny_tokenizer):
    return _tiny_model(tiny_tokenizer.get_vocab_size())


def _unbatched_scores(model, rows):
    """Straightforward per-sequence scoring (full cross-entropy over the unpadded
    sequence, then the scored span), as an oracle for the batched path."""
    out = []
    for r in rows:
        ids = torch.tensor([r.tokens])
        with torch.no_grad():
            logits = model(ids)[0].float()
        losses = F.cross_entropy(logits[:-1], ids[0, 1:], reduction="none")[r.start - 1:r.end - 1]
        greedy = logits[:-1].argmax(-1)[r.start - 1:r.end - 1] == ids[0, r.start:r.end]
        out.append((losses.mean().item(), bool(greedy.all())))
    return out


@pytest.mark.parametrize("label", ["copa", "winograd", "bigbench_operators"])
def test_batched_scores_match_unbatched_at_any_batch_size(bundle, tiny_tokenizer, tiny_model, label):
    spec = _spec(bundle, label)
    items = ce.load_task_items(bundle, spec, max_per_task=5)
    assert len(items) == 5
    rows = ce.build_rows(items, range(len(items)), spec, tiny_tokenizer)
    oracle = _unbatched_scores(tiny_model, rows)
    bos = tiny_tokenizer.get_bos_token_id()
    verdicts = []
    for bs in (1, 8):
        scores = ce.score_rows(tiny_model, rows, bos, "cpu", batch_size=bs)
        assert [ok for _, ok in scores] == [ok for _, ok in oracle]
        assert [loss for loss, _ in scores] == pytest.approx([loss for loss, _ in oracle], rel=1e-5, abs=1e-6)
        verdicts.append(ce.judge_items(spec.task_type, items, rows, scores))
    assert verdicts[0] == verdicts[1] and len(verdicts[0]) == len(items)
    acc = ce.evaluate_task(tiny_model, tiny_tokenizer, items, spec, "cpu", batch_size=8)
    assert acc == sum(verdicts[0].values()) / len(items)


def test_models_with_a_context_limit_are_cropped(bundle, tiny_tokenizer, tiny_model):
    spec = _spec(bundle, "arc_easy")  # 10-shot prompts, several hundred tokens
    items = ce.load_task_items(bundle, spec, max_per_task=12)
    rows = ce.build_rows(items, range(3), spec, tiny_tokenizer, max_seq_len=64)
    assert rows and all(len(r.tokens) <= 64 and 1 <= r.start < r.end == len(r.tokens) for r in rows)
    full = ce.build_rows(items, range(3), spec, tiny_tokenizer)
    assert len(rows) == len(full)
    assert all(c.tokens == f.tokens[-len(c.tokens):] for c, f in zip(rows, full))
    assert max(len(f.tokens) for f in full) > 64
    # our GPT has no position limit but its rotary tables; a GPT-2-like model declares one
    assert ce.context_limit(torch.nn.Linear(1, 1)) is None
    model = TinyCausalLM(8)
    model.max_seq_len = 64
    assert ce.context_limit(model) == 64
    if hasattr(tiny_model, "cos"):
        assert ce.context_limit(tiny_model) == tiny_model.cos.size(1) >= 256


def test_mc_judgement_follows_the_lowest_mean_loss():
    items = [{"gold": 1}, {"gold": 0}]
    rows = [ce.Row(0, [0], 0, 0), ce.Row(0, [0], 0, 0), ce.Row(1, [0], 0, 0), ce.Row(1, [0], 0, 0)]
    scores = [(2.0, False), (1.5, False), (3.0, True), (0.5, True)]
    assert ce.judge_items("multiple_choice", items, rows, scores) == {0: True, 1: False}
    assert ce.judge_items("language_modeling", items, rows[::2], [(9.0, True), (0.1, False)]) == {0: True, 1: False}


def test_ranks_split_the_items_and_sum_to_the_single_process_result(bundle, tiny_tokenizer, tiny_model, tmp_path):
    import torch.distributed as dist
    spec = _spec(bundle, "copa")
    items = ce.load_task_items(bundle, spec, max_per_task=7)
    full = ce.evaluate_task(tiny_model, tiny_tokenizer, items, spec, "cpu", batch_size=4)
    # a one-process gloo group makes all_reduce the identity, so each "rank" returns its share
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        shares = [ce.evaluate_task(tiny_model, tiny_tokenizer, items, spec, "cpu", batch_size=4, rank=r, world_size=2)
                  for r in (0, 1)]
    finally:
        dist.destroy_process_group()
    assert sum(shares) == pytest.approx(full)


# -----------------------------------------------------------------------------
# Centered accuracy and CORE

def test_centered_accuracy_and_core_reproduce_the_reference_gpt2_csv(bundle):
    baselines = ce.load_random_baselines(bundle)
    with open(bundle / "reference" / "openai-community-gpt2.csv") as f:
        rows = [[c.strip() for c in r] for r in csv.reader(f)][1:]
    centered = {}
    for label, acc, cen in rows[:-1]:
        centered[label] = ce.centered_accuracy(float(acc), baselines[label])
        # both columns are rounded to 6 decimals; the accuracy's rounding is scaled by 1/(1-baseline)
        tol = 0.5e-6 / (1 - baselines[label]) + 0.5e-6
        assert centered[label] == pytest.approx(float(cen), abs=tol), label
    assert len(centered) == 22
    assert rows[-1][0] == "CORE"
    assert ce.core_metric(centered) == pytest.approx(float(rows[-1][2]), abs=1e-6)
    assert ce.centered_accuracy(0.75, 0.5) == 0.5 and ce.centered_accuracy(0.25, 0.25) == 0.0
    with pytest.raises(ValueError):
        ce.core_metric({})


def _subset_bundle(src: Path, dst: Path, labels: set[str]) -> Path:
    """core.yaml and eval_meta_data.csv of the real bundle, but only `labels`' data files."""
    dst.mkdir(parents=True)
    for name in ce.REQUIRED_BUNDLE_FILES:
        shutil.copy(src / name, dst / name)
    for spec in ce.load_task_specs(src):
        if spec.label in labels:
            (dst / DATA / spec.dataset_uri).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / DATA / spec.dataset_uri, dst / DATA / spec.dataset_uri)
    return dst


def test_evaluate_core_reports_missing_tasks(bundle, tiny_tokenizer, tiny_model, tmp_path):
    present = {"copa", "winograd", "bigbench_operators"}
    sub = _subset_bundle(bundle, tmp_path / "eval_bundle", present)
    res = ce.evaluate_core(tiny_model, tiny_tokenizer, "cpu", sub, max_per_task=6, batch_size=8)
    all_labels = [s.label for s in ce.load_task_specs(bundle)]
    assert set(res["tasks"]) == present
    assert res["skipped"] == [label for label in all_labels if label not in present]
    assert {"squad", "coqa", "hellaswag"} <= set(res["skipped"])
    assert res["skipped_reasons"]["squad"] == "missing eval_data/reading_comprehension/squad.jsonl"
    assert (res["num_tasks"], res["num_tasks_total"], res["comparable"]) == (3, 22, False)
    assert "not comparable" in res["note"] and "squad" in res["note"]
    baselines = {"copa": 0.5, "winograd": 0.5, "bigbench_operators": 0.0}
    for label, t in res["tasks"].items():
        assert t["num_examples"] == 6 and round(t["accuracy"] * 6) == pytest.approx(t["accuracy"] * 6)
        assert t["random_baseline"] == pytest.approx(baselines[label])
        assert t["centered"] == pytest.approx((t["accuracy"] - baselines[label]) / (1 - baselines[label]))
    assert res["core"] == pytest.approx(sum(t["centered"] for t in res["tasks"].values()) / 3)
    assert res["examples"] == 18 and res["examples_per_s"] > 0


def test_evaluate_core_with_no_task_data_is_an_error(bundle, tiny_tokenizer, tiny_model, tmp_path):
    sub = _subset_bundle(bundle, tmp_path / "eval_bundle", set())
    with pytest.raises(FileNotFoundError, match="none of the 22 CORE tasks"):
        ce.evaluate_core(tiny_model, tiny_tokenizer, "cpu", sub, max_per_task=2)


# -----------------------------------------------------------------------------
# Fetching the bundle

SMALL = {"copa", "winograd"}


def _assert_placed(base: Path) -> None:
    target = base / "eval_bundle"
    assert (target / "core.yaml").is_file() and (target / "eval_meta_data.csv").is_file()
    assert (target / DATA / "commonsense_reasoning" / "copa.jsonl").is_file()
    assert not [p.name for p in base.iterdir() if p.name.endswith(".tmp")]  # no staging left behind


def test_bundle_from_a_directory_path_and_file_url(bundle, tmp_path, monkeypatch):
    src = _subset_bundle(bundle, tmp_path / "src" / "eval_bundle", SMALL)
    base = tmp_path / "base1"
    assert ce.ensure_eval_bundle(base, url=str(src)) == base / "eval_bundle"
    _assert_placed(base)
    # already there: nothing is fetched (the source may be gone)
    shutil.rmtree(src.parent)
    assert ce.ensure_eval_bundle(base, url=str(tmp_path / "nowhere")) == base / "eval_bundle"
    # a file:// URL of the folder that *contains* eval_bundle/, given through the environment
    src = _subset_bundle(bundle, tmp_path / "src2" / "eval_bundle", SMALL)
    monkeypatch.setenv(ce.BUNDLE_URL_ENV, src.parent.as_uri())
    base = tmp_path / "base2"
    ce.ensure_eval_bundle(base)
    _assert_placed(base)


def _zip_dir(src: Path, zip_path: Path, prefix: str) -> Path:
    with zipfile.ZipFile(zip_path, "w") as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, f"{prefix}{p.relative_to(src)}")
    return zip_path


@pytest.mark.parametrize("prefix", ["eval_bundle/", ""])
def test_bundle_from_a_zip_over_file_url_and_path(bundle, tmp_path, prefix):
    pytest.importorskip("nanochat.downloads")
    src = _subset_bundle(bundle, tmp_path / "src" / "eval_bundle", SMALL)
    zip_path = _zip_dir(src, tmp_path / "eval_bundle.zip", prefix)
    base = tmp_path / "base_url"
    ce.ensure_eval_bundle(base, url=zip_path.as_uri())
    _assert_placed(base)
    assert not (base / "eval_bundle.zip").exists()
    base = tmp_path / "base_path"
    ce.ensure_eval_bundle(base, url=str(zip_path))
    _assert_placed(base)


def test_incomplete_or_wrong_bundles_are_clear_errors(bundle, tmp_path):
    src = tmp_path / "partial"
    src.mkdir()
    shutil.copy(bundle / "core.yaml", src / "core.yaml")
    base = tmp_path / "base"
    with pytest.raises(FileNotFoundError, match=r"incomplete: missing eval_meta_data\.csv"):
        ce.ensure_eval_bundle(base, url=str(src))
    assert not (base / "eval_bundle").exists()
    (base / "eval_bundle").mkdir()
    with pytest.raises(FileNotFoundError, match=r"missing core\.yaml, eval_meta_data\.csv"):
        ce.ensure_eval_bundle(base)
    with pytest.raises(FileNotFoundError, match="no eval bundle at"):
        ce.ensure_eval_bundle(tmp_path / "b2", url=str(tmp_path / "does-not-exist.zip"))
    not_zip = tmp_path / "bundle.zip"
    not_zip.write_text("hello")
    with pytest.raises(ValueError, match="neither a directory nor a zip"):
        ce.ensure_eval_bundle(tmp_path / "b3", url=str(not_zip))
    assert ce.missing_bundle_files(bundle) == []
