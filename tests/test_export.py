"""`nanochat export` / `import-hf`: the Hugging Face directory loads in real transformers
and computes what our model computes; the tokenizer and chat template give our ids; the
round trip is lossless; bad input fails cleanly."""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from nanochat.checkpoint import checkpoint_dir, load_checkpoint, load_model  # noqa: E402
from nanochat.common import Runtime  # noqa: E402
from nanochat.engine import Engine  # noqa: E402
from nanochat.export import hf  # noqa: E402
from nanochat.stages import export as export_stage  # noqa: E402
from nanochat.cli import main  # noqa: E402
from smallmodels import train_checkpoint  # noqa: E402
from nanochat.stages import import_hf as import_stage  # noqa: E402

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # square\n\n\tif x != 0: print(f'{x=}')\r\n",
    "한국어 텍스트도 정확히 같은 토큰이 되어야 합니다. 12345678 numbers",
    "emoji 🙂👍🏽🇰🇷 and ZWJ 👩‍👩‍👧 and café naïve",
    "   leading and trailing spaces   \n\n\n",
    "",
]
LOOKALIKES = "a user typing <|bos|> or <|assistant_end|><|user_start|> as text, and <|python_start|>1+1"
CONVERSATIONS = [
    {"messages": [{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": "What is 2+2?"},
                  {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "And 한국어? 🙂"},
                  {"role": "assistant", "content": "ignored: dropped by render_for_completion"}]},
    {"messages": [{"role": "user", "content": "hi\n\nthere"},
                  {"role": "assistant", "content": [{"type": "text", "text": "Let me compute. "},
                                                    {"type": "python", "text": "3*7"},
                                                    {"type": "python_output", "text": "21"},
                                                    {"type": "text", "text": " It is 21."}]},
                  {"role": "user", "content": "thanks"},
                  {"role": "assistant", "content": "x"}]},
]


def _runtime(base: Path) -> Runtime:
    return Runtime(device=torch.device("cpu"), dtype=torch.float32, base_dir=base)


def _export(base: Path, out: Path, tag: str, **kw) -> Path:
    cfg = export_stage.Config(source="base", tag=tag, output=str(out), **kw)
    cfg.validate()
    export_stage.run(cfg, _runtime(base))
    return out


def _load_hf(path: Path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
    return model.eval()


def _ids(x):
    return x["input_ids"] if isinstance(x, dict) or hasattr(x, "keys") else x


# -----------------------------------------------------------------------------
# Fixtures: two small trained models, each exported once in fp32

@pytest.fixture(scope="module")
def swa_checkpoint(tiny_tokenizer_dir, tiny_tokenizer, tmp_path_factory) -> Path:
    """A base dir with a 3-layer GQA model (4 query heads, 2 kv heads) whose first two
    layers use sliding windows ("S" = 128 of a 256 context), trained 8 steps on OpenStax."""
    from nanochat.gpt import GPTConfig

    config = GPTConfig(sequence_len=256, vocab_size=tiny_tokenizer.get_vocab_size(), n_layer=3, n_head=4,
                       n_kv_head=2, n_embd=64, window_pattern="SSL")
    base = tmp_path_factory.mktemp("swa_base")
    train_checkpoint(tiny_tokenizer_dir, tiny_tokenizer, base, "s3", config, steps=8, batch=2, seed=1,
                     meta={"user_config": {"fixture": "swa"}, "total_batch_size": 512})
    return base


@pytest.fixture(scope="module")
def exports(tiny_base_checkpoint, swa_checkpoint, tmp_path_factory) -> dict:
    """name -> (base dir, tag, fp32 export dir)."""
    root = tmp_path_factory.mktemp("exports")
    return {
        "tiny": (tiny_base_checkpoint, "d2", _export(tiny_base_checkpoint, root / "tiny", "d2", dtype="float32")),
        "swa_gqa": (swa_checkpoint, "s3", _export(swa_checkpoint, root / "swa", "s3", dtype="float32")),
    }


# -----------------------------------------------------------------------------
# The directory

def test_export_directory_layout(exports):
    _, _, out = exports["swa_gqa"]
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "configuration_nanochat.py", "modeling_nanochat.py", "model.safetensors",
            "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "README.md"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_nanochat.NanochatForCausalLM"
    assert (config["n_kv_head"], config["window_pattern"], config["padded_vocab_size"]) == (2, "SSL", 2048)
    assert "sliding_window" not in config and "layer_types" not in config  # would make transformers drop keys
    gen = json.loads((out / "generation_config.json").read_text())
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["eos_token"] == "<|assistant_end|>" and tok_cfg["bos_token"] == "<|bos|>"
    assert gen["eos_token_id"][0] == 2048 - 9 + 4 and gen["bos_token_id"] == 2048 - 9  # assistant_end, bos
    card = (out / "README.md").read_text()
    assert "3 layers" in card and "4 query heads, 2 key/value heads" in card and "trust_remote_code" in card
    assert "training tokens: 4,096" in card  # 8 steps x 512 tokens
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "temporary directory left behind"


@pytest.mark.parametrize("name,length", [("tiny", 200), ("swa_gqa", 300)])
def test_transformers_logits_equal_ours(exports, name, length):
    base, tag, out = exports[name]
    ours, _, _ = load_model("base", base, "cpu", torch.float32, tag=tag)
    theirs = _load_hf(out)
    ids = torch.randint(0, ours.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(ids)
        got = theirs(ids, use_cache=False).logits
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert (got - expected).abs().max().item() < 1e-4
    # prefill then token-by-token decoding through transformers' cache gives the same logits
    with torch.no_grad():
        first = theirs(ids[:, :150], use_cache=True)
        cache = getattr(first, "cache", None) or getattr(first, "past_key_values", None)
        steps = [first.logits]
        for t in range(150, 170):
            step = theirs(ids[:, t:t + 1], **{"cache" if hasattr(first, "cache") else "past_key_values": cache},
                          use_cache=True)
            steps.append(step.logits)
    assert (torch.cat(steps, dim=1) - expected[:, :170]).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", ["tiny", "swa_gqa"])
def test_generate_greedy_equals_engine(exports, tiny_tokenizer, name):
    base, tag, out = exports[name]
    ours, _, _ = load_model("base", base, "cpu", torch.float32, tag=tag)
    theirs = _load_hf(out)
    text = ("The cell membrane is a lipid bilayer that separates the interior of the cell from the outside "
            "environment. It controls what enters and leaves, and proteins embedded in it act as channels, "
            "pumps and receptors. In the next section we look at")
    prompt = tiny_tokenizer.encode(text + " " + text, prepend="<|bos|>")
    assert len(prompt) > 128 or name == "tiny"  # beyond the sliding window: prefill and decode both masked
    engine = [col[0] for col, _ in Engine(ours, tiny_tokenizer).generate(prompt, max_tokens=32, temperature=0.0)]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        generated = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                                    use_cache=True)
    assert generated[0, len(prompt):].tolist() == engine


# -----------------------------------------------------------------------------
# Tokenizer and chat template

@pytest.fixture(scope="module")
def hf_tokenizer(exports):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(exports["tiny"][2])


def test_tokenizer_encodes_and_decodes_like_ours(hf_tokenizer, tiny_tokenizer):
    for text in TEXTS:
        ours = tiny_tokenizer.encode(text)
        assert hf_tokenizer.encode(text, add_special_tokens=False) == ours, text
        assert hf_tokenizer(text)["input_ids"] == ours, text  # no BOS added behind our back
        assert hf_tokenizer.decode(ours) == tiny_tokenizer.decode(ours) == text
    # special-token strings typed as text: ordinary text for us; transformers needs split_special_tokens
    ours = tiny_tokenizer.encode(LOOKALIKES)
    assert hf_tokenizer.encode(LOOKALIKES, add_special_tokens=False, split_special_tokens=True) == ours
    assert hf_tokenizer.decode(ours) == LOOKALIKES
    assert hf_tokenizer.convert_tokens_to_ids("<|assistant_end|>") == tiny_tokenizer.encode_special("<|assistant_end|>")
    assert hf_tokenizer.decode([tiny_tokenizer.get_bos_token_id()]) == "<|bos|>"


@pytest.fixture(scope="module")
def openstax_texts(shared_data) -> list[str]:
    import pyarrow.parquet as pq

    shard = sorted((shared_data / "pretrain_openstax" / "base_data").glob("*.parquet"))[0]
    return [t[:5000] for t in pq.read_table(shard, columns=["text"]).column("text").to_pylist()[:40]]


def test_tokenizer_matches_on_real_documents(hf_tokenizer, tiny_tokenizer, openstax_texts):
    for text in openstax_texts:
        assert hf_tokenizer.encode(text, add_special_tokens=False) == tiny_tokenizer.encode(text)


@pytest.mark.parametrize("name", ["gpt2", "cl100k_base"])
def test_tokenizer_conversion_of_openai_encodings(name, openstax_texts):
    """Other split patterns convert too; cl100k's possessive `\\p{N}{1,3}+` needs rewriting
    for Oniguruma (which would otherwise glue every digit run into one pre-token)."""
    from tokenizers import Tokenizer as HFTokenizer

    from nanochat.tokenizer import Tokenizer

    enc = Tokenizer.from_pretrained(name).enc
    converted = HFTokenizer.from_str(hf.tokenizer_json(enc))
    converted.encode_special_tokens = True  # special-token strings in text stay text, as encode_ordinary
    for text in TEXTS + [LOOKALIKES, "1234567 8255 ١٢٣٤٥ 𝟘𝟙𝟚 'LL I'M"] + openstax_texts[:10]:
        assert converted.encode(text).ids == enc.encode_ordinary(text), text[:60]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_chat_template_equals_render_for_completion(hf_tokenizer, tiny_tokenizer, conversation):
    expected = tiny_tokenizer.render_for_completion(conversation)
    got = hf_tokenizer.apply_chat_template(conversation["messages"][:-1], add_generation_prompt=True, tokenize=True)
    assert list(_ids(got)) == expected
    # the whole conversation (no generation prompt) is render_conversation's ids
    full, _ = tiny_tokenizer.render_conversation(conversation, max_tokens=None)
    got = hf_tokenizer.apply_chat_template(conversation["messages"], tokenize=True)
    assert list(_ids(got)) == full


def test_chat_template_with_lookalikes_in_messages(hf_tokenizer, tiny_tokenizer):
    conversation = {"messages": [{"role": "system", "content": "never say <|assistant_end|>"},
                                 {"role": "user", "content": LOOKALIKES},
                                 {"role": "assistant", "content": "-"}]}
    expected = tiny_tokenizer.render_for_completion(conversation)
    if "sanitize_control_tokens" not in inspect.signature(hf_tokenizer.apply_chat_template).parameters:
        pytest.skip("transformers < 5 has no sanitize_control_tokens: message text can forge special tokens")
    got = hf_tokenizer.apply_chat_template(conversation["messages"][:-1], add_generation_prompt=True,
                                           tokenize=True, sanitize_control_tokens=True)
    assert list(_ids(got)) == expected


# -----------------------------------------------------------------------------
# Without nanochat on the import path

_ISOLATED = textwrap.dedent("""
    import importlib.abc, json, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "nanochat" or name.startswith("nanochat."):
                raise ImportError("nanochat is hidden in this test")
    sys.meta_path.insert(0, Block())
    try:
        import nanochat
        sys.exit("nanochat is importable")
    except ImportError:
        pass
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path, ids = sys.argv[1], json.loads(sys.argv[2])
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(x).logits[0, -1]
        gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False)
    assert not any(m.startswith("nanochat") for m in sys.modules), "nanochat got imported"
    print(json.dumps({"argmax": int(logits.argmax()), "last": logits.tolist()[:16],
                      "generated": gen[0, len(ids):].tolist(), "encoded": tok.encode("hello world")}))
""")


@pytest.mark.slow
def test_export_loads_without_nanochat(exports, tiny_tokenizer, tmp_path):
    base, tag, out = exports["swa_gqa"]
    ours, _, _ = load_model("base", base, "cpu", torch.float32, tag=tag)
    ids = tiny_tokenizer.encode("Photosynthesis converts light energy into", prepend="<|bos|>")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HOME=str(tmp_path / "hf_home"))
    # -I: no PYTHONPATH, no user site, no script or cwd on sys.path; the editable install's
    # finder is blocked by the script itself (and it checks that `import nanochat` fails)
    proc = subprocess.run([sys.executable, "-I", "-c", _ISOLATED, str(out), json.dumps(ids)], cwd=tmp_path,
                          env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        expected = ours(torch.tensor([ids]))[0, -1]
    assert result["argmax"] == int(expected.argmax())
    assert torch.allclose(torch.tensor(result["last"]), expected[:16], atol=1e-4)
    engine = [c[0] for c, _ in Engine(ours, tiny_tokenizer).generate(ids, max_tokens=8, temperature=0.0)]
    assert result["generated"] == engine
    assert result["encoded"] == tiny_tokenizer.encode("hello world")


# -----------------------------------------------------------------------------
# Round trip, shards, dtypes

def test_round_trip_is_bit_exact(exports, tmp_path, tiny_tokenizer):
    base, tag, out = exports["swa_gqa"]
    original, _, _ = load_checkpoint(checkpoint_dir(base, "base", tag), 8, "cpu")
    fresh = tmp_path / "fresh"  # no tokenizer: import-hf installs the export's
    # through the command, as a user types it
    assert main(["import-hf", str(out), "-g", "back", "--base-dir", str(fresh), "--device-type", "cpu"]) == 0
    cfg = import_stage.Config(path=str(out), tag="back")
    cfg.validate()
    assert (meta_step := load_checkpoint(checkpoint_dir(fresh, "base", "back"), 8, "cpu")[2]["step"]) == 8, meta_step
    state, _, meta = load_checkpoint(checkpoint_dir(fresh, "base", "back"), 8, "cpu")
    assert state.keys() == original.keys()
    for k, v in original.items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k
    assert meta["model_config"] == json.loads(json.dumps(load_checkpoint(checkpoint_dir(base, "base", tag), 8,
                                                                         "cpu")[2]["model_config"]))
    model, tok, _ = load_model("base", fresh, "cpu", torch.float32, tag="back")  # loads like any checkpoint
    for text in TEXTS + [LOOKALIKES]:
        assert tok.encode(text) == tiny_tokenizer.encode(text)
    assert tok.render_for_completion(CONVERSATIONS[0]) == tiny_tokenizer.render_for_completion(CONVERSATIONS[0])
    with pytest.raises(ValueError, match="already has a checkpoint"):
        import_stage.run(cfg, _runtime(fresh))


def test_round_trip_keeps_mixed_dtypes(exports, tmp_path, tiny_tokenizer):
    """GPU training stores the embeddings in bf16 beside fp32 matrices: an fp32 export
    widens them exactly and the import narrows them back, so the state is identical."""
    base, tag, _ = exports["swa_gqa"]
    state, _, meta = load_checkpoint(checkpoint_dir(base, "base", tag), 8, "cpu")
    state = {k: v.to(torch.bfloat16) if "wte" in k or "value_embeds" in k else v for k, v in state.items()}
    out = hf.export_model(state, meta["model_config"], tiny_tokenizer.enc, tmp_path / "mixed", dtype="float32")
    assert json.loads((out / "config.json").read_text())["nanochat"]["original_dtypes"]["transformer.wte.weight"] \
        == "bfloat16"
    back, _, _ = hf.read_export(out)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_sharded_bfloat16_export(exports, tmp_path):
    base, tag, _ = exports["swa_gqa"]
    out = _export(base, tmp_path / "sharded", tag, dtype="bfloat16", max_shard_size="200KB")
    index = json.loads((out / hf.INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (out / hf.SINGLE_FILE).exists()
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype="auto")
    assert model.lm_head.weight.dtype == torch.bfloat16
    ids = torch.arange(1, 41).unsqueeze(0)
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        assert 40 < generated.size(1) <= 44
    state, _, _ = hf.read_export(out)
    original, _, _ = load_checkpoint(checkpoint_dir(base, "base", tag), 8, "cpu")
    for k, v in original.items():
        assert torch.equal(state[k], v.to(torch.bfloat16)), k


# -----------------------------------------------------------------------------
# Bad input

def test_bad_input_is_refused_cleanly(tiny_base_checkpoint, tmp_path, capsys):
    from nanochat.cli import main

    with pytest.raises(ValueError, match="ReLU"):
        export_stage.Config(dtype="float16").validate()
    with pytest.raises(ValueError, match="unknown --dtype 'float64'"):
        export_stage.Config(dtype="float64").validate()
    base = str(tiny_base_checkpoint)
    assert main(["export", "--base-dir", base, "-i", "base", "-o", str(tmp_path / "x"), "--dtype", "float16"]) == 2
    assert "float16" in capsys.readouterr().err
    # a missing checkpoint
    assert main(["export", "--base-dir", base, "-i", "base", "-g", "nope", "-o", str(tmp_path / "x")]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["export", "--base-dir", base, "-i", "base", "-s", "7", "-o", str(tmp_path / "x")]) == 2
    assert "step 7" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    # a non-empty output directory: refused, untouched; --force replaces it
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert main(["export", "--base-dir", base, "-i", "base", "-o", str(busy)]) == 2
    assert "--force" in capsys.readouterr().err and [p.name for p in busy.iterdir()] == ["keep.txt"]
    assert main(["export", "--base-dir", base, "-i", "base", "-o", str(busy), "--force"]) == 0
    assert (busy / "config.json").exists() and not (busy / "keep.txt").exists()
    # import of something that is not an export
    assert main(["import-hf", "--base-dir", str(tmp_path / "b"), str(tmp_path)]) == 2
    assert main(["import-hf", "--base-dir", str(tmp_path / "b")]) == 2  # no directory given
    assert "config.json" in capsys.readouterr().err


def test_model_card_carries_the_report_card(tiny_base_checkpoint, tmp_path):
    from nanochat.report import log_section

    base = tmp_path / "base"
    base.mkdir()
    for name in ("tokenizer", "base_checkpoints"):
        (base / name).symlink_to(tiny_base_checkpoint / name, target_is_directory=True)
    log_section(base, "Base model evaluation", {"step": 20, "CORE metric": 0.1234})
    card = (_export(base, tmp_path / "out", "d2") / "README.md").read_text()
    assert "## Report card" in card and "| CORE | 0.1234 |" in card
    assert "exported in bfloat16" in card


def test_failed_export_leaves_nothing(tiny_base_checkpoint, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(hf, "model_card", boom)  # fails after the weights were written
    with pytest.raises(RuntimeError, match="disk full"):
        _export(tiny_base_checkpoint, tmp_path / "out", "d2")
    assert list(tmp_path.iterdir()) == []


def test_push_to_hub_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(ValueError, match="needs the huggingface_hub package"):
        hf.push_to_hub(tmp_path, "me/model")
    monkeypatch.delitem(sys.modules, "huggingface_hub")
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def unreachable(self, *args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", unreachable)  # never touches the network
    with pytest.raises(ValueError, match="could not push .* hub unreachable"):
        hf.push_to_hub(tmp_path, "me/model")


# -----------------------------------------------------------------------------
# base-eval on an export

@pytest.mark.slow
def test_core_of_export_equals_native(exports, shared_data, tmp_path, monkeypatch):
    """CORE (3 tasks, 4 examples each) through `base-eval --hf-path EXPORT` equals CORE of
    the native checkpoint. The export's model code is this package's, so base-eval runs
    it without --trust-remote-code; changed by one byte, it is refused without the flag."""
    import shutil

    from corebundle import mini_core_bundle
    from nanochat.stages import base_eval

    tiny_base, tag, out = exports["tiny"]
    bundle = shared_data / "core_eval" / "eval_bundle"
    base = tmp_path / "base"
    base.mkdir(parents=True)
    for name in ("tokenizer", "base_checkpoints"):
        (base / name).symlink_to(tiny_base / name, target_is_directory=True)
    mini_core_bundle(bundle, base)
    runtime = _runtime(base)
    native = base_eval.run(base_eval.Config(eval="core", max_per_task=4, tag=tag), runtime)
    exported = base_eval.run(base_eval.Config(eval="core", max_per_task=4, hf_path=str(out)), runtime)
    assert set(exported["tasks"]) == set(native["tasks"]) == {"copa", "arc_easy", "bigbench_operators"}
    for label, task in native["tasks"].items():
        assert exported["tasks"][label]["accuracy"] == task["accuracy"], label
    assert exported["core"] == native["core"]
    # someone else's code in the same place is not run unless asked
    tampered = tmp_path / "tampered"
    shutil.copytree(out, tampered)
    with open(tampered / "modeling_nanochat.py", "a") as f:
        f.write("\n# changed\n")
    assert not base_eval._is_our_export(tampered) and base_eval._is_our_export(out)
    with pytest.raises(Exception, match="trust_remote_code"):
        base_eval.load_hf_model(str(tampered), torch.device("cpu"))
    assert base_eval.load_hf_model(str(tampered), torch.device("cpu"), trust_remote_code=True)[0] is not None
