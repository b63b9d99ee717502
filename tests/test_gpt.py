"""nanochat.gpt (and nanochat.fp8 where it runs on CPU): tiny models on real text
(UTF-8 bytes of the OpenStax validation shard as token ids). Exactness checks run in
fp32; bf16 runs are checked for sanity and closeness."""
from __future__ import annotations

import math

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from nanochat import gpt as gpt_module
from nanochat.errors import UserError
from nanochat.gpt import GPT, GPTConfig, LOGIT_SOFTCAP, build_model, rotary_tables

# "SL" with sequence_len 256: layer 0 sees 128 tokens back, the others everything
TINY = dict(sequence_len=256, vocab_size=300, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL")


@pytest.fixture(scope="module")
def text_tokens(shared_data) -> torch.Tensor:
    """About 20k real tokens: the bytes of the first validation documents."""
    table = pq.ParquetFile(shared_data / "pretrain_openstax" / "base_data" / "shard_00005.parquet").read_row_group(0)
    text = "\n".join(table.column("text").to_pylist()[:5])
    return torch.tensor(list(text.encode("utf-8")[:20000]), dtype=torch.long)


def batch(tokens: torch.Tensor, B: int, T: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rows = tokens[offset:offset + B * (T + 1)].view(B, T + 1)
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def tiny_model(dtype=torch.float32, randomize=True, seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = build_model(GPTConfig(**{**TINY, **overrides}), "cpu", dtype)
    if randomize:
        # trained-looking weights: init zeroes the output projections and turns the
        # smear off, which would hide mistakes in those paths
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 2 and "wte" not in name and "value_embeds" not in name:
                    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.size(1)))
            model.smear_lambda.fill_(0.7)
            model.backout_lambda.fill_(0.3)
    return model


def full_loss_reference(model: GPT, idx, targets, reduction="mean"):
    """The reference's unchunked path: all logits, softcap, F.cross_entropy."""
    logits = model.logits(model.hidden_states(idx))
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1, reduction=reduction)


# -----------------------------------------------------------------------------
# Shapes, config, padding

def test_forward_backward_shapes_and_padding(text_tokens):
    model = tiny_model()
    assert model.transformer.wte.weight.shape == (320, 64) and model.lm_head.weight.shape == (320, 64)
    assert model.window_sizes == [128, 256, 256]
    idx, targets = batch(text_tokens, 2, 200)
    logits = model(idx)
    assert logits.shape == (2, 200, 300) and logits.dtype == torch.float32
    assert logits.abs().max() <= LOGIT_SOFTCAP
    loss = model(idx, targets)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.lm_head.weight.grad[300:].abs().sum() == 0  # padded rows never reach a logit
    assert GPT(GPTConfig(**TINY), pad_vocab_size_to=1).lm_head.weight.shape == (300, 64)


def test_config_problems_raise_valueerror():
    for bad in (dict(n_embd=66), dict(n_kv_head=3), dict(window_pattern="SXL"), dict(n_layer=0)):
        with pytest.raises(ValueError, match="invalid GPTConfig"):
            GPT(GPTConfig(**{**TINY, **bad}))
    with pytest.raises(ValueError, match="compute_dtype"):
        GPT(GPTConfig(**TINY), compute_dtype=torch.int8)
    assert GPTConfig() == GPTConfig(sequence_len=2048, vocab_size=32768, n_layer=12, n_head=6, n_kv_head=6,
                                    n_embd=768, window_pattern="SSSL")
    with torch.device("meta"):
        assert GPT(GPTConfig()).window_sizes == [512, 512, 512, 2048] * 2 + [512, 512, 512, 2048]
        assert GPT(GPTConfig(window_pattern="SL", n_layer=4)).window_sizes == [512, 2048, 512, 2048]
        assert GPT(GPTConfig(window_pattern="S", n_layer=2)).window_sizes == [512, 2048]


def test_state_dict_has_the_reference_names_and_loads_like_the_reference(tmp_path, text_tokens):
    model = tiny_model()
    sd = model.state_dict()
    expected = {
        "resid_lambdas": (3,), "x0_lambdas": (3,), "smear_lambda": (1,), "backout_lambda": (1,),
        "transformer.wte.weight": (320, 64), "lm_head.weight": (320, 64), "smear_gate.weight": (1, 24),
        "value_embeds.0.weight": (320, 32), "value_embeds.2.weight": (320, 32),
        "transformer.h.0.attn.ve_gate.weight": (2, 12), "transformer.h.2.attn.ve_gate.weight": (2, 12),
    }
    for i in range(3):
        expected |= {f"transformer.h.{i}.attn.c_q.weight": (64, 64), f"transformer.h.{i}.attn.c_k.weight": (32, 64),
                     f"transformer.h.{i}.attn.c_v.weight": (32, 64), f"transformer.h.{i}.attn.c_proj.weight": (64, 64),
                     f"transformer.h.{i}.mlp.c_fc.weight": (256, 64), f"transformer.h.{i}.mlp.c_proj.weight": (64, 256)}
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected  # cos/sin are not saved
    # the reference's loader: meta -> to_empty -> init_weights -> load_state_dict(strict, assign)
    torch.save(sd, tmp_path / "model.pt")
    with torch.device("meta"):
        fresh = GPT(GPTConfig(**TINY))
    fresh.to_empty(device="cpu")
    fresh.init_weights()
    fresh.load_state_dict(torch.load(tmp_path / "model.pt"), strict=True, assign=True)
    idx, _ = batch(text_tokens, 1, 50)
    torch.testing.assert_close(fresh(idx), model(idx), atol=0, rtol=0)


# -----------------------------------------------------------------------------
# Initialization

def test_init_weights_sets_every_tensor_as_the_reference():
    with torch.device("meta"):
        model = GPT(GPTConfig(**TINY))
    model.to_empty(device="cpu")
    with torch.no_grad():  # what uninitialized memory may hold
        for t in [*model.parameters(), *model.buffers()]:
            t.fill_(float("nan"))
    torch.manual_seed(0)
    model.init_weights()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert torch.isfinite(t).all(), name

    c, s = 64, math.sqrt(3 / 64)

    def uniform(t, lo, hi):
        assert lo <= t.min() and t.max() <= hi and t.std() > 0.8 * (hi - lo) / math.sqrt(12)

    assert abs(model.transformer.wte.weight.std().item() - 0.8) < 0.03
    assert abs(model.lm_head.weight.std().item() - 0.001) < 0.0001
    for i, block in enumerate(model.transformer.h):
        for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
            uniform(lin.weight, -s, s)
            assert abs(lin.weight.std().item() - 1 / math.sqrt(c)) < 0.01
        uniform(block.mlp.c_fc.weight, -0.4 * s, 0.4 * s)
        assert block.attn.c_proj.weight.abs().sum() == 0 and block.mlp.c_proj.weight.abs().sum() == 0
        assert (block.attn.ve_gate is not None) == (i in (0, 2))  # alternating, last layer included
        if block.attn.ve_gate is not None:
            uniform(block.attn.ve_gate.weight, 0.0, 0.02)
    for ve in model.value_embeds.values():
        uniform(ve.weight, -s, s)
    uniform(model.smear_gate.weight, 0.0, 0.02)
    assert model.smear_lambda.item() == 0.0 and model.backout_lambda.item() == pytest.approx(0.2)
    assert model.resid_lambdas.tolist() == pytest.approx([1.15, 1.10, 1.05])
    assert model.x0_lambdas.tolist() == pytest.approx([0.20, 0.125, 0.05])
    assert model.cos.shape == (1, 2560, 1, 8)
    angle = 1000 * 100000 ** (-2 * 3 / 16)  # position 1000, channel pair 3
    assert model.cos[0, 1000, 0, 3].item() == pytest.approx(math.cos(angle), abs=1e-4)
    assert model.sin[0, 1000, 0, 3].item() == pytest.approx(math.sin(angle), abs=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compute_dtype_storage_policy(dtype):
    model = build_model(GPTConfig(**TINY), "cpu", dtype)
    embed = torch.float32 if dtype == torch.float16 else dtype  # fp16 keeps fp32 embeddings (GradScaler)
    assert model.transformer.wte.weight.dtype == embed
    assert all(ve.weight.dtype == embed for ve in model.value_embeds.values())
    assert model.lm_head.weight.dtype == torch.float32 and model.resid_lambdas.dtype == torch.float32
    assert model.transformer.h[0].attn.c_q.weight.dtype == torch.float32
    assert model.cos.dtype == dtype
    assert model.make_kv_cache(2, 16).k_cache.dtype == dtype


# -----------------------------------------------------------------------------
# KV cache

def test_kv_cache_decoding_equals_full_forward(text_tokens):
    """Prefill 100 tokens, add a 50-token chunk, then decode one token at a time to 190,
    past layer 0's 128-token window: each step's logits equal the full forward's."""
    model = tiny_model()
    idx, _ = batch(text_tokens, 1, 190, offset=3000)
    with torch.inference_mode():
        full = model(idx)
        cache = model.make_kv_cache(1, 256)
        steps = [model(idx[:, :100], kv_cache=cache), model(idx[:, 100:150], kv_cache=cache)]
        assert cache.get_pos() == 150
        for t in range(150, 190):
            steps.append(model(idx[:, t:t + 1], kv_cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)
    assert cache.get_pos() == 190


def continue_one_prompt(model, text_tokens, rows, prompt_len, total, offset, share):
    """Prefill a batch-1 prompt, continue it in `rows` rows one token at a time through a
    cache that shares the prompt (make_kv_cache(prefix=)) or holds copies (prefill);
    returns (decoded logits, the full forward's logits of those positions, the rows'
    cache, the prompt's cache)."""
    idx, _ = batch(text_tokens, rows, total, offset=offset)
    prompt, cont = idx[:1, :prompt_len], idx[:, prompt_len:]
    seqs = torch.cat([prompt.expand(rows, -1), cont], dim=1)
    with torch.inference_mode():
        full = model(seqs)
        one = model.make_kv_cache(1, prompt_len)
        model(prompt, kv_cache=one)
        if share:
            many = model.make_kv_cache(rows, total, prefix=one)
        else:
            many = model.make_kv_cache(rows, total)
            many.prefill(one)
        out = [model(cont[:, t:t + 1], kv_cache=many) for t in range(cont.size(1))]
    return torch.cat(out, dim=1), full[:, prompt_len:], many, one


def test_kv_cache_spread_to_several_samples(text_tokens):
    """A batch-1 prompt cache copied into 2 rows; each row then continues with its own
    tokens and matches a full forward of its own sequence (smear state included)."""
    out, full, _, _ = continue_one_prompt(tiny_model(), text_tokens, 2, 40, 60, offset=9000, share=False)
    torch.testing.assert_close(out, full, atol=1e-4, rtol=1e-4)


def test_positions_beyond_the_rotary_tables_raise():
    model = tiny_model(randomize=False, sequence_len=8)
    cache = model.make_kv_cache(1, 100)
    cache.advance(79)
    with pytest.raises(ValueError, match="rotary tables"):
        model(torch.zeros(1, 2, dtype=torch.long), kv_cache=cache)


# -----------------------------------------------------------------------------
# The chunked loss

def test_model_loss_chunked_equals_unchunked(text_tokens):
    model = tiny_model()
    model.loss_chunk_rows = 13
    idx, targets = batch(text_tokens, 2, 64, offset=500)
    targets[0, :5] = -1
    assert model.chunked_loss is None  # automatic: chunked on CPU
    loss = model(idx, targets)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    model.chunked_loss = False  # the reference's formulation (used on CUDA)
    want = model(idx, targets)
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(want, full_loss_reference(model, idx, targets), atol=0, rtol=0)
    for (name, _), a, b in zip(model.named_parameters(), grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4, msg=name)
    model.chunked_loss = True
    rows = model(idx, targets, loss_reduction="none")
    assert rows.shape == (128,)
    torch.testing.assert_close(rows, full_loss_reference(model, idx, targets, "none"), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="loss_reduction"):
        model(idx, targets, loss_reduction="avg")


# -----------------------------------------------------------------------------
# bf16, training stability

def test_bf16_forward_on_cpu_is_close_to_fp32(text_tokens):
    ref = tiny_model()
    fast = build_model(GPTConfig(**TINY), "cpu", torch.bfloat16)
    fast.load_state_dict(ref.state_dict())
    idx, targets = batch(text_tokens, 2, 128, offset=1000)
    logits = fast(idx)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert (logits - ref(idx)).abs().max() < 0.5
    loss, want = fast(idx, targets), ref(idx, targets)
    assert abs(loss.item() - want.item()) < 0.02 * want.item()


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)])
def test_depth6_trains_without_nan(text_tokens, dtype):
    """The reference's meta-init bug made depth 6 NaN; a few optimizer steps of a depth-6
    model (narrow, to stay fast) on real bytes stay finite and lower the loss."""
    torch.manual_seed(0)
    model = build_model(GPTConfig(sequence_len=64, vocab_size=256, n_layer=6, n_head=2, n_kv_head=2, n_embd=128),
                        "cpu", dtype)
    optimizer = model.setup_optimizer()
    assert all(g["initial_lr"] == g["lr"] for g in optimizer.param_groups)
    idx, targets = batch(text_tokens, 4, 64, offset=2000)
    losses = []
    for _ in range(3):
        loss = model(idx, targets)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0]


# -----------------------------------------------------------------------------
# Accounting, optimizer groups, sampling

def test_estimate_flops_and_param_counts():
    model = tiny_model(randomize=False)
    C, kv, V_pad, L, T = 64, 32, 320, 3, 256
    matmul = L * (C * C + 2 * C * kv + C * C + 8 * C * C) + 2 * 12 * 2 + V_pad * C  # ve_gate on 2 layers
    attention = 12 * 4 * 16 * (128 + 256 + 256)
    assert model.estimate_flops() == 6 * matmul + attention
    counts = model.num_scaling_params()
    assert counts == {"wte": V_pad * C, "value_embeds": 2 * V_pad * kv, "lm_head": V_pad * C,
                      "transformer_matrices": matmul - V_pad * C, "scalars": 2 * L + 24 + 2,
                      "total": sum(p.numel() for p in model.parameters())}


def test_optimizer_groups_are_the_reference_ones():
    model = tiny_model(randomize=False)
    groups = model.optimizer_groups(weight_decay=0.1)
    scale = math.sqrt(768 / 64)
    adamw = [(len(g["params"]), g["lr"], *g["betas"], g["eps"], g["weight_decay"]) for g in groups[:6]]
    want = [(1, 0.004 * scale, 0.8, 0.96, 1e-10, 0.01), (1, 0.2 * scale, 0.8, 0.995, 1e-10, 0.001),
            (2, 0.1 * scale, 0.8, 0.995, 1e-10, 0.01), (1, 0.005, 0.8, 0.95, 1e-10, 0.05),
            (1, 0.5, 0.96, 0.95, 1e-10, 0.0), (3, 0.2, 0.8, 0.95, 1e-10, 0.0)]
    for got_row, want_row in zip(adamw, want, strict=True):
        assert got_row == pytest.approx(want_row, rel=1e-12)
    assert [g["kind"] for g in groups] == ["adamw"] * 6 + ["muon"] * 5
    assert groups[0]["params"][0] is model.lm_head.weight and groups[5]["params"][2] is model.backout_lambda
    muon = [(tuple(g["params"][0].shape), len(g["params"]), g["lr"], g["momentum"], g["ns_steps"], g["beta2"],
             g["weight_decay"]) for g in groups[6:]]
    assert muon == [((2, 12), 2, 0.02, 0.95, 5, 0.9, 0.1), ((32, 64), 6, 0.02, 0.95, 5, 0.9, 0.1),
                    ((64, 64), 6, 0.02, 0.95, 5, 0.9, 0.1), ((64, 256), 3, 0.02, 0.95, 5, 0.9, 0.1),
                    ((256, 64), 3, 0.02, 0.95, 5, 0.9, 0.1)]
    assert all(g["betas"] == (0.9, 0.99) for g in model.optimizer_groups(adam_betas=(0.9, 0.99))[:6])


def test_generate(text_tokens):
    model = tiny_model()
    prompt = text_tokens[:10].tolist()
    greedy = list(model.generate(prompt, 8, temperature=0))
    assert len(greedy) == 8 and all(0 <= t < 300 for t in greedy)
    ids = torch.tensor([prompt])
    for t in greedy:  # greedy = argmax of the full forward at each step
        assert model(ids)[0, -1].argmax().item() == t
        ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
    assert list(model.generate(prompt, 8, temperature=1.0, top_k=1)) == greedy
    sampled = list(model.generate(prompt, 8, temperature=1.0, seed=3))
    assert sampled == list(model.generate(prompt, 8, temperature=1.0, seed=3))
    assert len(list(model.generate(prompt[:1], 3))) == 3  # a single-token prompt works
    with pytest.raises(ValueError):
        list(model.generate([], 3))


def test_rotary_tables_dtype_and_rotation_is_norm_preserving():
    cos, sin = rotary_tables(16, 8, torch.float32)
    from nanochat.gpt import apply_rotary
    x = torch.randn(2, 16, 3, 8)
    y = apply_rotary(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(y[:, 0], x[:, 0])  # position 0 is not rotated
    # pairs are (c, c + 4): channel 0 and 4 rotate together by angle t
    t = 5
    torch.testing.assert_close(y[:, t, :, 0], x[:, t, :, 0] * math.cos(t) + x[:, t, :, 4] * math.sin(t))


# -----------------------------------------------------------------------------
# fp8 (numerics of the built-in implementation, where torch._scaled_mm runs on CPU)

def _scaled_mm_on_cpu() -> bool:
    try:
        a = torch.zeros(16, 16).to(torch.float8_e4m3fn)
        torch._scaled_mm(a, a.t(), scale_a=torch.tensor(1.0), scale_b=torch.tensor(1.0), out_dtype=torch.bfloat16)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return True


def test_fp8_refuses_cpu_and_bad_recipes():
    from nanochat.fp8 import convert_to_fp8
    model = tiny_model(randomize=False)
    with pytest.raises(ValueError, match="CUDA GPU"):
        convert_to_fp8(model)
    with pytest.raises(ValueError, match="recipe"):
        convert_to_fp8(model, "blockwise")


@pytest.mark.skipif(not _scaled_mm_on_cpu(), reason="torch._scaled_mm does not run on this CPU build")
def test_fp8_linear_approximates_bf16_and_disable_restores(text_tokens):
    from nanochat.fp8 import Float8Linear, _convert_local, disable_fp8
    from nanochat.gpt import Linear
    model = tiny_model(dtype=torch.bfloat16, n_embd=128, n_head=2, n_kv_head=2)
    c_q_weight = model.transformer.h[1].attn.c_q.weight
    assert _convert_local(model) == 3 * 6 + 1  # q, k, v, proj, fc, mlp proj per layer, and the head
    layer = model.transformer.h[1].attn.c_q
    assert isinstance(layer, Float8Linear) and layer.weight is c_q_weight
    assert isinstance(model.lm_head, Float8Linear)
    assert type(model.transformer.h[0].attn.ve_gate) is Linear and type(model.smear_gate) is Linear  # too small

    # one layer's three fp8 GEMMs (CPU _scaled_mm is slow, so not the whole model)
    x = model.transformer.wte(batch(text_tokens, 1, 32)[0])[0].detach().requires_grad_()  # (32, 128) bf16
    dy = torch.randn(32, 128, dtype=torch.bfloat16)
    y = layer(x)
    dx, dw = torch.autograd.grad(y, (x, layer.weight), dy)
    want = F.linear(x, layer.weight.to(torch.bfloat16))
    want_dx, want_dw = torch.autograd.grad(want, (x, layer.weight), dy)
    assert y.dtype == torch.bfloat16 and dw.dtype == torch.float32
    for got, ref in ((y, want), (dx, want_dx), (dw, want_dw)):
        assert (got.float() - ref.float()).norm() < 0.1 * ref.float().norm()

    idx, targets = batch(text_tokens, 1, 32)
    with disable_fp8(model):
        assert type(model.transformer.h[1].attn.c_q) is Linear
        assert model.transformer.h[1].attn.c_q.weight is layer.weight
        assert torch.isfinite(model(idx, targets))
    assert model.transformer.h[1].attn.c_q is layer


# -----------------------------------------------------------------------------
# Kernel dispatch (the kernels themselves: tests/test_kernels.py)

def test_helpers_run_the_kernels_in_eager_mode_and_the_formulas_under_compile(monkeypatch):
    """norm, rope_norm, residual_mix and the MLP call nanochat.kernels.cpu in eager mode;
    under torch.compile (faked here) the first three run their plain formulas, and the
    MLP still runs its kernel (the compiler traces it)."""
    import nanochat.gpt as gpt
    from nanochat.kernels import cpu
    calls = []
    for name in ("rms_norm", "rope_norm", "residual_mix", "relu_squared_proj"):
        monkeypatch.setattr(cpu, name, lambda *a, _f=getattr(cpu, name), _n=name: calls.append(_n) or _f(*a))
    g = torch.Generator().manual_seed(4)
    B, T, H, D = 2, 5, 2, 16
    cos, sin = rotary_tables(T, D, torch.float32)
    x, x0 = (torch.randn(B, T, H, D, generator=g).requires_grad_() for _ in range(2))
    a, b = torch.tensor(1.1, requires_grad=True), torch.tensor(0.3, requires_grad=True)
    mlp = gpt.MLP(GPTConfig(**{**TINY, "n_embd": 16, "n_head": 2, "n_kv_head": 2}))

    def run():
        return [gpt.norm(x, 1.2), gpt.rope_norm(x, cos, sin, 1.2), gpt.residual_mix(x, x0, a, b), mlp(x)]

    eager = run()
    assert calls == ["rms_norm", "rope_norm", "residual_mix", "relu_squared_proj"]
    calls.clear()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    traced = run()
    assert calls == ["relu_squared_proj"]
    assert torch.equal(traced[0], F.rms_norm(x, (D,)) * 1.2)
    assert torch.equal(traced[1], F.rms_norm(gpt.apply_rotary(x, cos, sin), (D,)) * 1.2)
    assert torch.equal(traced[2], torch.addcmul(x * a, x0, b))
    assert torch.equal(eager[0], traced[0]) and torch.equal(eager[2], traced[2])  # bitwise, as documented
    torch.testing.assert_close(eager[1], traced[1])  # the fused rotation rounds once fewer


def test_samples_sharing_the_prompt_cache_match_the_full_forward(text_tokens):
    """make_kv_cache(prefix=) on the CPU in fp32: the rows read the batch-1 prompt cache
    (not copies of it), past layer 0's 128-token window, and match full forwards."""
    out, full, many, one = continue_one_prompt(tiny_model(), text_tokens, 3, 140, 170, offset=12000, share=True)
    assert many.prefix is one and many.layout == "bhtd" and many.k_cache.size(3) == 30  # own positions only
    torch.testing.assert_close(out, full, atol=1e-4, rtol=1e-4)
    # in bf16 the rows get copies instead (the shared path would round the scores)
    low = tiny_model(torch.bfloat16)
    assert not low.shares_prompt_cache()
    with torch.inference_mode():
        p16 = low.make_kv_cache(1, 5)
        low(torch.zeros(1, 5, dtype=torch.long), kv_cache=p16)
        assert low.make_kv_cache(2, 9, prefix=p16).prefix is None


def test_decoding_weight_layouts_follow_weight_updates(text_tokens):
    """Decode steps on the CPU multiply by cached copies of the weights (transposed for
    one or two rows, oneDNN-prepacked for more; q, k and v fused): the logits match the
    regular path, and an optimizer step or a loaded state dict is seen by the next step
    (RL decodes between updates)."""
    model = tiny_model()
    idx, targets = batch(text_tokens, 3, 24, offset=500)

    def decode_logits(rows):
        with torch.inference_mode():
            cache = model.make_kv_cache(rows, 24)
            return torch.cat([model(idx[:rows, t:t + 1], kv_cache=cache) for t in range(24)], dim=1)

    for rows in (1, 2, 3):
        with torch.inference_mode():
            torch.testing.assert_close(decode_logits(rows), model(idx[:rows]), atol=1e-4, rtol=1e-4)
    kinds = model.transformer.h[0].attn.__dict__["_decode_weights"]
    assert "row_major" in kinds and ("onednn" in kinds or gpt_module._onednn_failed)
    assert "_decode_weights" in model.lm_head.__dict__
    assert not any("decode" in n for n in model.state_dict())

    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(idx, targets).backward()
    optimizer.step()
    with torch.inference_mode():
        torch.testing.assert_close(decode_logits(1), model(idx[:1]), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(decode_logits(3), model(idx), atol=1e-4, rtol=1e-4)
    model.load_state_dict(tiny_model(seed=7).state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(decode_logits(2), model(idx[:2]), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(decode_logits(3), model(idx), atol=1e-4, rtol=1e-4)


def test_decoding_weight_copies_respect_their_memory_budget(text_tokens, monkeypatch):
    idx, _ = batch(text_tokens, 3, 12, offset=700)
    for budget, cached in (("0", False), ("4096", True)):
        monkeypatch.setenv("NANOCHAT_DECODE_WEIGHTS_MB", budget)
        model = tiny_model()
        with torch.inference_mode():
            for rows in (1, 3):
                cache = model.make_kv_cache(rows, 12)
                steps = torch.cat([model(idx[:rows, t:t + 1], kv_cache=cache) for t in range(12)], dim=1)
                torch.testing.assert_close(steps, model(idx[:rows]), atol=1e-4, rtol=1e-4)
        held = model.lm_head.__dict__.get("_decode_weights", {})
        assert bool(held) == cached
    monkeypatch.setenv("NANOCHAT_DECODE_WEIGHTS_MB", "lots")
    model = tiny_model()
    with pytest.raises(UserError, match="NANOCHAT_DECODE_WEIGHTS_MB"):
        with torch.inference_mode():
            model(idx[:1, :1])


def test_decode_matmul_benchmark_runs_and_checks_its_products():
    """benchmarks/decode_matmuls.py (README's figures for the decode layouts) compares
    each product both ways before timing them, and reports every row count it was given."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "decode_matmuls.py"
    out = subprocess.run([sys.executable, str(script), "--depth", "1", "--vocab-size", "512", "--rows", "1", "5",
                          "--repeats", "1", "--sweep-mb", "1", "--threads", "1"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    summary = json.loads(out.strip().splitlines()[-1])
    assert [r["rows"] for r in summary["results"]] == [1, 5] and summary["n_embd"] == 64
    assert all(r["reference_ms"] > 0 and r["ours_ms"] > 0 for r in summary["results"])
