"""SFT mixture specs (nanochat.tasks.mixture): the default mixtures, the NAME[:EPOCHS][@ROWS]
forms and their error messages, and mixtures built from the real chat data."""
from __future__ import annotations

import pytest

from nanochat.tasks.mixture import (IDENTITY_FILE, Component, build_mixture, default_mixture, default_val_mixture,
                                    ensure_identity_conversations, parse_component, parse_mixture)


def test_default_mixture_is_the_reference():
    assert default_mixture() == ["smoltalk", "identity:2", "mmlu-aux:3", "gsm8k:4", "simple-spelling", "spelling"]
    assert default_mixture(mmlu_epochs=1, gsm8k_epochs=0) == ["smoltalk", "identity:2", "mmlu-aux:1",
                                                              "simple-spelling", "spelling"]
    assert default_val_mixture(default_mixture()) == ["smoltalk-test", "mmlu-test@5200", "gsm8k-test@420"]
    # no SmolTalk trained on (offline): its test split is left out too
    assert default_val_mixture(["identity", "gsm8k"]) == ["mmlu-test@5200", "gsm8k-test@420"]


def test_parse_component_forms():
    assert parse_component("gsm8k:4") == Component("gsm8k", 4)
    assert parse_component("spelling@500") == Component("spelling", 1, 500)
    assert parse_component(" mmlu-aux:3@100 ") == Component("mmlu-aux", 3, 100)
    assert parse_component("jsonl:/data/a:b/my@file.jsonl:2@5") == Component("jsonl", 2, 5, "/data/a:b/my@file.jsonl")
    assert parse_component("jsonl:rel/path.jsonl") == Component("jsonl", 1, None, "rel/path.jsonl")
    assert str(parse_component("jsonl:/x.jsonl:2@5")) == "jsonl:/x.jsonl:2@5"
    assert [c.name for c in parse_mixture(["identity:0", "gsm8k"])] == ["gsm8k"]  # 0 epochs: dropped


@pytest.mark.parametrize("spec, message", [
    ("gsm9k", "unknown component 'gsm9k' (did you mean gsm8k?)"),
    ("gsm8k:x", "EPOCHS must be an integer >= 0, got 'x'"),
    ("gsm8k:-1", "EPOCHS must be an integer"),
    ("spelling@0", "ROWS must be an integer >= 1"),
    ("jsonl:", "give a file, as jsonl:/path/to/file.jsonl"),
    ("", "empty mixture spec"),
    ("jsonl", "unknown component 'jsonl'"),
    ("mmlu-aux:3:4", "unknown component 'mmlu-aux:3:4'"),
])
def test_parse_component_errors_say_what_and_how(spec, message):
    with pytest.raises(ValueError) as e:
        parse_component(spec)
    assert message in str(e.value)
    assert repr(spec.strip()) in str(e.value) or spec.strip() == ""


def test_mixture_errors(tmp_path):
    with pytest.raises(ValueError) as e:
        parse_mixture(["identity:0"])
    assert "no component with at least one epoch" in str(e.value)
    # every bad spec is reported at once
    with pytest.raises(ValueError) as e:
        parse_mixture(["gsm9k", "identity", "spelling@0"])
    assert "'gsm9k'" in str(e.value) and "'spelling@0'" in str(e.value)
    # a jsonl file that does not exist is reported when the mixture is built
    with pytest.raises(FileNotFoundError, match="jsonl:/no/such.jsonl: no such file"):
        build_mixture(parse_mixture(["jsonl:/no/such.jsonl"]), tmp_path)


def test_build_mixture_from_real_data(shared_data, tmp_path):
    identity = shared_data / "chat_sft" / "identity_conversations.jsonl"
    (tmp_path / "words_alpha.txt").symlink_to(shared_data / "words" / "words_alpha.txt")
    # the identity file is fetched into the base dir the first time (file:// like any URL)
    assert ensure_identity_conversations(tmp_path, identity.as_uri()) == tmp_path / IDENTITY_FILE
    assert (tmp_path / IDENTITY_FILE).read_bytes() == identity.read_bytes()
    dataset, lines = build_mixture(parse_mixture(["identity:2@10", "spelling@7", f"jsonl:{identity}@3"]), tmp_path)
    assert lines == ["identity:2@10: 10 rows × 2 = 20", "spelling@7: 7 rows × 1 = 7",
                     f"jsonl:{identity}@3: 3 rows × 1 = 3"]
    assert len(dataset) == 30
    assert all(dataset[i]["messages"][0]["role"] in ("system", "user") for i in range(len(dataset)))
    # a missing identity file that cannot be fetched says how to go on without it
    with pytest.raises(FileNotFoundError, match="leave 'identity' out of --mixture"):
        build_mixture(parse_mixture(["identity"]), tmp_path / "empty", identity_url=(tmp_path / "none").as_uri())
