"""`nanochat chat` on a tiny trained checkpoint: one-shot prompts, an interactive session
through a real pipe, the conversation's tokens, and how replies are printed."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from nanochat import cli
from nanochat.checkpoint import load_model
from nanochat.common import choose_compute_dtype
from nanochat.engine import Engine, cast_for_inference
from nanochat.stages import chat_cli


def _expected_reply(base_dir, prompt_text: str, max_tokens: int) -> str:
    """The greedy reply computed directly with the engine, as the CLI should produce it."""
    dtype, _ = choose_compute_dtype("cpu")
    model, tok, _ = load_model("base", base_dir, "cpu", dtype)
    cast_for_inference(model.eval())
    sp = tok.encode_special
    prompt = [tok.get_bos_token_id(), sp("<|user_start|>"), *tok.encode(prompt_text), sp("<|user_end|>"),
              sp("<|assistant_start|>")]
    seqs, _ = Engine(model, tok).generate_batch(prompt, max_tokens=max_tokens, temperature=0.0)
    reply = seqs[0][len(prompt):]
    assert not set(reply) & {sp("<|python_start|>"), sp("<|output_start|>")}, "printing differs for tool tokens"
    return tok.decode(reply)


def test_one_prompt_through_the_cli(tiny_base_checkpoint, capsys, monkeypatch):
    monkeypatch.delenv("NANOCHAT_DTYPE", raising=False)
    code = cli.main(["chat", "-p", "What is a cell?", "-t", "0", "--max-tokens", "12", "--device-type", "cpu",
                     "--base-dir", str(tiny_base_checkpoint), "--log-level", "WARNING"])
    assert code == 0
    out = capsys.readouterr().out
    expected = _expected_reply(tiny_base_checkpoint, "What is a cell?", 12)
    assert expected.strip()
    assert out == expected + ("" if expected.endswith("\n") else "\n")


@pytest.mark.slow
def test_compiled_decoding_through_the_cli_gives_the_same_reply(tiny_base_checkpoint, capsys, monkeypatch):
    monkeypatch.delenv("NANOCHAT_DTYPE", raising=False)
    code = cli.main(["chat", "-p", "What is a cell?", "-t", "0", "--max-tokens", "12", "--device-type", "cpu",
                     "--base-dir", str(tiny_base_checkpoint), "--compile"])
    assert code == 0
    captured = capsys.readouterr()
    expected = _expected_reply(tiny_base_checkpoint, "What is a cell?", 12)
    assert captured.out == expected + ("" if expected.endswith("\n") else "\n")
    assert "compiling the decode step" in captured.err and "decoding eagerly" not in captured.err


@pytest.mark.slow
def test_interactive_session_through_a_pipe(tiny_base_checkpoint):
    script = "Hello there\n/clear\nWhat is energy?\n\n/help\nAnd heat?\n/quit\nthis line is never read\n"
    env = {k: v for k, v in os.environ.items() if k != "NANOCHAT_DTYPE"}
    env["OMP_NUM_THREADS"] = "1"  # a tiny model: extra threads only contend with other processes
    proc = subprocess.run([sys.executable, "-m", "nanochat", "chat", "--device-type", "cpu", "--max-tokens", "8",
                           "--base-dir", str(tiny_base_checkpoint)],
                          input=script, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.count("Assistant: ") == 3
    assert "(conversation cleared)" in out
    assert chat_cli.HELP in out.split("nanochat: chatting with the model.", 1)[1]  # /help answered, not only the banner
    assert out.rstrip().endswith("Goodbye!")
    assert '"turns": 3' in proc.stderr  # the metrics line: three replies, the line after /quit unread


def test_end_of_input_exits_cleanly(tiny_base_checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))  # no /quit: EOF ends the session
    code = cli.main(["chat", "--max-tokens", "4", "--device-type", "cpu", "--base-dir", str(tiny_base_checkpoint),
                     "--log-level", "WARNING"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.count("Assistant: ") == 1 and out.rstrip().endswith("Goodbye!")


def test_history_is_kept_as_tokens_and_cleared(tiny_base_checkpoint):
    model, tok, _ = load_model("base", tiny_base_checkpoint, "cpu")
    prompts: list[list[int]] = []

    class SpyEngine(Engine):
        def generate(self, tokens, *args, **kwargs):
            prompts.append(list(tokens))
            return super().generate(tokens, *args, **kwargs)

    config = chat_cli.Config(temperature=0.0, max_tokens=6)
    out = io.StringIO()
    session = chat_cli.ChatSession(SpyEngine(model, tok), tok, config, context_len=model.config.sequence_len, out=out)
    sp = tok.encode_special
    first = session.reply("Name a planet.")
    session.reply("Another one?")
    assert prompts[0] == [tok.get_bos_token_id(), sp("<|user_start|>"), *tok.encode("Name a planet."),
                          sp("<|user_end|>"), sp("<|assistant_start|>")]
    # turn 2 sees turn 1 verbatim, closed with <|assistant_end|> even though max_tokens cut the reply
    turn1 = prompts[0] + tok.encode(first) + [sp("<|assistant_end|>")]
    assert prompts[1][:len(turn1)] == turn1
    assert prompts[1][len(turn1):] == [sp("<|user_start|>"), *tok.encode("Another one?"), sp("<|user_end|>"),
                                       sp("<|assistant_start|>")]
    session.clear()
    session.reply("Fresh start.")
    assert prompts[2][:2] == [tok.get_bos_token_id(), sp("<|user_start|>")]
    assert len(prompts[2]) == len(prompts[0]) - len(tok.encode("Name a planet.")) + len(tok.encode("Fresh start."))


def test_long_history_drops_oldest_turns(tiny_base_checkpoint):
    model, tok, _ = load_model("base", tiny_base_checkpoint, "cpu")
    out = io.StringIO()
    session = chat_cli.ChatSession(Engine(model, tok), tok, chat_cli.Config(temperature=0.0, max_tokens=8),
                                   context_len=model.config.sequence_len, out=out)
    for i in range(12):
        session.reply(f"Tell me fact number {i} about the cells of the human body and their organelles.")
        assert len(session.tokens) <= model.config.sequence_len
    assert "oldest turns were dropped" in out.getvalue()
    assert session.tokens[0] == tok.get_bos_token_id()
    assert session.tokens[1] == tok.encode_special("<|user_start|>")


def test_reply_printer_shows_tool_calls_and_whole_characters(tiny_tokenizer):
    tok = tiny_tokenizer
    sp = tok.encode_special
    tokens = (tok.encode("Let me compute") + [sp("<|python_start|>")] + tok.encode("12*3") + [sp("<|python_end|>"),
              sp("<|output_start|>")] + tok.encode("36") + [sp("<|output_end|>")] + tok.encode("so it is 36."))
    out = io.StringIO()
    printer = chat_cli.ReplyPrinter(tok, out)
    for t in tokens:
        printer.push(t)
    printer.finish()
    assert out.getvalue() == "Let me compute\n[python] 12*3 → 36\nso it is 36.\n"

    text = "naïve café: 日本語 ✓ done"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some tokens split a character
    writes: list[str] = []

    class Recorder(io.StringIO):
        def write(self, s):
            writes.append(s)
            return super().write(s)

    printer = chat_cli.ReplyPrinter(tok, Recorder())
    for t in ids:
        printer.push(t)
    printer.finish()
    assert "".join(writes) == text + "\n"
    assert not any("\ufffd" in w for w in writes)


def test_missing_model_and_bad_flags(tmp_path, capsys):
    assert cli.main(["chat", "-p", "hi", "--device-type", "cpu", "--base-dir", str(tmp_path)]) == 2
    assert "no model to chat with" in capsys.readouterr().err
    assert cli.main(["chat", "-p", "hi", "-t", "-1", "--device-type", "cpu", "--base-dir", str(tmp_path)]) == 2
    assert "--temperature" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["chat", "-i", "nonsense"])


def test_default_model_is_the_latest_stage(tiny_base_checkpoint, tmp_path):
    """Without -i the chat takes rl if trained, else sft, else base (folders with only an
    incomplete checkpoint do not count)."""
    from nanochat.checkpoint import latest_stage

    assert latest_stage(tmp_path) is None
    assert latest_stage(tiny_base_checkpoint) == "base"
    d2 = tiny_base_checkpoint / "base_checkpoints" / "d2"
    (tmp_path / "chatrl_checkpoints" / "d2").mkdir(parents=True)  # a folder without a checkpoint
    for name in ("base_checkpoints", "chatsft_checkpoints"):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "d2").symlink_to(d2, target_is_directory=True)
    assert latest_stage(tmp_path) == "sft"
    (tmp_path / "chatrl_checkpoints" / "d2").rmdir()
    (tmp_path / "chatrl_checkpoints" / "d2").symlink_to(d2, target_is_directory=True)
    assert latest_stage(tmp_path) == "rl"
