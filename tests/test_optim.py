"""MuonAdamW: AdamW against torch's, Muon's orthogonalisation and cautious decay, the
sharded run on 2 gloo processes against the single-process run, state round trips."""
from __future__ import annotations

import copy
import io
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from nanochat.optim import MuonAdamW, equilibrate_rows, polar_express, renormalize_frobenius

VOCAB, DIM = 64, 32


class TinyLM(nn.Module):
    """Embedding, a few block matrices of three shapes (tall, wide, square), scalars, head.
    Shapes are chosen to hit every sharding path on 2 ranks: sharded AdamW rows (64 rows),
    replicated AdamW (33 rows: not divisible; 3 scalars: too small), Muon groups of 2 and
    of 3 matrices (uneven chunks)."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(torch.randn(33, DIM) * 0.1)
        self.fc = nn.ModuleList(nn.Linear(DIM, 4 * DIM, bias=False) for _ in range(2))
        self.proj = nn.ModuleList(nn.Linear(4 * DIM, DIM, bias=False) for _ in range(2))
        self.mix = nn.ModuleList(nn.Linear(DIM, DIM, bias=False) for _ in range(3))
        self.scales = nn.Parameter(torch.ones(3))
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.pos[: idx.size(1)]
        for i, lin in enumerate(self.mix):
            x = x + self.scales[i] * torch.tanh(lin(x))
        for fc, proj in zip(self.fc, self.proj):
            x = x + proj(F.relu(fc(x)))
        return F.cross_entropy(self.lm_head(x).flatten(0, 1), targets.flatten())


def param_groups(model: TinyLM, weight_decay: float = 0.1) -> list[dict]:
    """Groups in the shape GPT.setup_optimizer builds (reference hyperparameters)."""
    matrices = [*model.fc.parameters(), *model.proj.parameters(), *model.mix.parameters()]
    groups = [
        dict(kind="adamw", params=[model.lm_head.weight], lr=0.004, betas=(0.8, 0.96), eps=1e-10, weight_decay=0.01),
        dict(kind="adamw", params=[model.wte.weight, model.pos], lr=0.2, betas=(0.8, 0.995), eps=1e-10, weight_decay=0.001),
        dict(kind="adamw", params=[model.scales], lr=0.5, betas=(0.96, 0.95), eps=1e-10, weight_decay=0.05),
    ]
    for shape in sorted({tuple(p.shape) for p in matrices}):
        groups.append(dict(kind="muon", params=[p for p in matrices if tuple(p.shape) == shape], lr=0.02,
                           momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=weight_decay))
    return groups


def batch(seed: int, n: int = 8, t: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, VOCAB, (n, t + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]


def grads_of(model: nn.Module, idx: torch.Tensor, tgt: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(idx, tgt).backward()
    return [p.grad.clone() for p in model.parameters()]


def set_grads(model: nn.Module, grads: list[torch.Tensor]) -> None:
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()


# -----------------------------------------------------------------------------
# AdamW

def test_adamw_groups_match_torch_adamw_and_follow_lr_changes():
    torch.manual_seed(0)
    a = nn.Linear(24, 40)
    b = copy.deepcopy(a)
    start = copy.deepcopy(a.weight.detach())
    hp = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)
    ours = MuonAdamW([dict(kind="adamw", params=list(a.parameters()), **hp)])
    ref = torch.optim.AdamW(b.parameters(), **hp)
    for step in range(6):
        if step == 3:  # a schedule mutates the group dicts between steps
            ours.param_groups[0]["lr"] = ref.param_groups[0]["lr"] = 0.003
        for pa, pb in zip(a.parameters(), b.parameters()):
            pa.grad = torch.randn_like(pa)
            pb.grad = pa.grad.clone()
        ours.step()
        ref.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
    assert (a.weight - start).abs().max() > 1e-2  # the steps did move the weights
    assert ours.state[a.weight]["step"] == 6


def test_adamw_on_bf16_param_does_the_math_in_fp32():
    torch.manual_seed(1)
    w32 = nn.Parameter(torch.randn(16, 8).bfloat16().float())
    w16 = nn.Parameter(w32.detach().bfloat16())
    hp = dict(lr=1e-3, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.01)
    o32 = MuonAdamW([dict(kind="adamw", params=[w32], **hp)])
    o16 = MuonAdamW([dict(kind="adamw", params=[w16], **hp)])
    g = torch.randn(16, 8).bfloat16()
    w32.grad, w16.grad = g.float(), g
    o32.step()
    o16.step()
    # one step from the same start: the bf16 result is the fp32 result, rounded once
    assert w16.dtype == torch.bfloat16
    assert torch.equal(w16.detach(), w32.detach().bfloat16())
    for _ in range(3):
        g = torch.randn(16, 8).bfloat16()
        w32.grad, w16.grad = g.float(), g
        o32.step()
        o16.step()
    s16, s32 = o16.state[w16], o32.state[w32]
    assert s16["exp_avg"].dtype == torch.float32 and s16["exp_avg_sq"].dtype == torch.float32
    # the moments depend only on the gradients, which were identical: bit-equal
    assert torch.equal(s16["exp_avg"], s32["exp_avg"]) and torch.equal(s16["exp_avg_sq"], s32["exp_avg_sq"])
    torch.testing.assert_close(w16.detach().float(), w32.detach(), rtol=0, atol=2 ** -7)


# -----------------------------------------------------------------------------
# Muon

def test_polar_express_approximates_the_svd_polar_factor():
    """Stated tolerance: with the reference's 5 Polar Express steps the singular values
    land in [0.8, 1.2] and the result is within 15% (Frobenius) of U V^T, for inputs
    with condition number 100; the input itself is far from it."""
    torch.manual_seed(2)
    for rows, cols in [(48, 16), (16, 48), (24, 24)]:
        k = min(rows, cols)
        u, _ = torch.linalg.qr(torch.randn(rows, k))
        v, _ = torch.linalg.qr(torch.randn(cols, k))
        g = u @ torch.diag(torch.logspace(0, -2, k)) @ v.T * 3.0
        uu, _, vh = torch.linalg.svd(g, full_matrices=False)
        polar = uu @ vh
        for dtype in (torch.float32, torch.bfloat16):
            x = polar_express(g, 5, dtype).float()
            assert x.shape == g.shape
            s = torch.linalg.svdvals(x)
            assert 0.8 < s.min() and s.max() < 1.2, (rows, cols, dtype, s.min(), s.max())
            assert (x - polar).norm() / polar.norm() < 0.15
        raw = g / g.norm() * math.sqrt(k)
        assert (raw - polar).norm() / polar.norm() > 0.5
    # batched: each matrix of a stack is orthogonalised on its own
    stack = torch.randn(3, 20, 12)
    torch.testing.assert_close(polar_express(stack, 5, torch.float32)[1], polar_express(stack[1], 5, torch.float32))


def _one_muon_step(p0: torch.Tensor, grad: torch.Tensor, muon_eq: bool = False, muon_plus: bool = False,
                   **group) -> torch.Tensor:
    p = nn.Parameter(p0.clone())
    opt = MuonAdamW([dict(kind="muon", params=[p], **group)], ns_dtype=torch.float32, muon_eq=muon_eq,
                    muon_plus=muon_plus)
    p.grad = grad.clone()
    opt.step()
    return p.detach()


def test_muon_step_is_orthogonalised_row_normalised_and_shape_scaled():
    torch.manual_seed(3)
    hp = dict(lr=0.02, momentum=0.95, ns_steps=5, beta2=None, weight_decay=0.0)
    for rows, cols in [(64, 16), (16, 64)]:
        p0 = torch.randn(rows, cols) * 0.1
        # a strongly anisotropic gradient (cond ~ 30): orthogonalisation must flatten it
        g = torch.randn(rows, 4) @ torch.randn(4, cols) * 5 + torch.randn(rows, cols) * 0.3
        delta = p0 - _one_muon_step(p0, g, **hp)
        lr_eff = 0.02 * math.sqrt(max(1.0, rows / cols))  # tall matrices get sqrt(rows/cols)
        u = delta / lr_eff
        s = torch.linalg.svdvals(u)
        assert s.max() / s.min() < 1.6, (rows, cols, s)
        assert torch.linalg.svdvals(g).max() / torch.linalg.svdvals(g).min() > 10
        # NorMuon with beta2=None on one step: every row (tall) / column (wide) gets equal RMS
        rms = u.square().mean(dim=1 if rows >= cols else 0).sqrt()
        torch.testing.assert_close(rms, torch.full_like(rms, rms.mean().item()), rtol=1e-4, atol=0)
        # ...and the Frobenius norm of the orthogonalised update, ~sqrt(min(rows, cols)), is kept
        assert abs(u.norm() / math.sqrt(min(rows, cols)) - 1) < 0.15


def test_muon_eq_gives_every_row_the_mean_norm_and_ignores_row_scales():
    torch.manual_seed(5)
    g = torch.randn(3, 48, 16)
    scales = torch.rand(3, 48, 1) * 20 + 0.05       # rows of wildly different size
    e = equilibrate_rows(g * scales)
    rows = e.norm(dim=-1)                            # (3, 48)
    want = (g * scales).norm(dim=(-2, -1)) / math.sqrt(48)
    torch.testing.assert_close(rows, want[:, None].expand_as(rows), rtol=1e-5, atol=0)
    # the rows' directions are kept, their sizes dropped: the orthogonalised update no longer
    # depends on how large each row of the gradient was
    u_scaled = polar_express(e, 5, torch.float32)
    u_plain = polar_express(equilibrate_rows(g), 5, torch.float32)
    torch.testing.assert_close(u_scaled, u_plain, rtol=1e-4, atol=1e-5)
    assert (polar_express(g * scales, 5, torch.float32) - polar_express(g, 5, torch.float32)).abs().max() > 0.1


def test_muon_plus_gives_the_norm_of_a_semi_orthogonal_matrix():
    torch.manual_seed(6)
    for shape in [(2, 64, 16), (2, 16, 64)]:
        g = torch.randn(*shape)
        u = polar_express(g, 5, torch.float32)
        assert (u.norm(dim=(-2, -1)) - 4.0).abs().max() > 0.05  # Polar Express alone does not converge exactly
        torch.testing.assert_close(renormalize_frobenius(u).norm(dim=(-2, -1)), torch.full((2,), 4.0))


def test_muon_variants_are_off_by_default_and_change_the_step():
    torch.manual_seed(7)
    p0 = torch.randn(32, 16) * 0.1
    # unequal rows (MuonEq has work to do) and a spectrum Polar Express cannot fully flatten
    # in 5 iterations (singular values from ~10 down to ~1e-3: Muon+ has work to do)
    g = (torch.randn(32, 2) @ torch.randn(2, 16) * 10 + torch.randn(32, 16) * 1e-3) * torch.rand(32, 1) * 10
    hp = dict(lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.0)
    plain = _one_muon_step(p0, g, **hp)
    p = nn.Parameter(p0.clone())
    default = MuonAdamW([dict(kind="muon", params=[p], **hp)], ns_dtype=torch.float32)
    assert (default.muon_eq, default.muon_plus) == (False, False)  # the reference's step
    step = (p0 - plain).norm()
    for flags in [dict(muon_eq=True), dict(muon_plus=True), dict(muon_eq=True, muon_plus=True)]:
        assert (_one_muon_step(p0, g, **flags, **hp) - plain).norm() > 0.05 * step, flags


def test_cautious_weight_decay_applies_only_where_signs_agree():
    torch.manual_seed(4)
    p0 = torch.randn(32, 32)
    g = torch.randn(32, 32)
    hp = dict(lr=0.05, momentum=0.9, ns_steps=5, beta2=0.95)
    no_wd = _one_muon_step(p0, g, weight_decay=0.0, **hp)
    wd = 0.5
    with_wd = _one_muon_step(p0, g, weight_decay=wd, **hp)
    u = (p0 - no_wd) / 0.05                      # the update itself (square: no LR scaling)
    agree = (u * p0) >= 0
    assert 0.2 < agree.float().mean() < 0.8      # both cases are well represented
    decay = no_wd - with_wd                      # = lr * wd * p0 where the signs agree, else 0
    torch.testing.assert_close(decay[agree], (0.05 * wd * p0)[agree], rtol=1e-5, atol=1e-6)
    assert torch.equal(decay[~agree], torch.zeros_like(decay[~agree]))


def test_group_validation_messages():
    w = nn.Parameter(torch.zeros(4, 4))
    v = nn.Parameter(torch.zeros(4, 8))
    good = dict(kind="muon", lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.0)
    with pytest.raises(ValueError, match="mixes shapes"):
        MuonAdamW([dict(good, params=[w, v])])
    with pytest.raises(ValueError, match="ns_steps"):
        MuonAdamW([dict(good, params=[w], ns_steps=7)])
    with pytest.raises(ValueError, match="needs matrices"):
        MuonAdamW([dict(good, params=[nn.Parameter(torch.zeros(4))])])
    with pytest.raises(ValueError, match="lacks"):
        MuonAdamW([dict(kind="adamw", params=[w], lr=0.1)])
    with pytest.raises(ValueError, match="kind"):
        MuonAdamW([dict(kind="sgd", params=[w], lr=0.1)])


# -----------------------------------------------------------------------------
# State

def test_state_dict_round_trip_continues_bit_exactly():
    torch.manual_seed(5)
    model = TinyLM()
    model.wte.weight.data = model.wte.weight.data.bfloat16()  # as the reference stores embeddings
    opt = MuonAdamW(param_groups(model))
    for s in range(3):
        set_grads(model, [g.to(p.dtype) for p, g in zip(model.parameters(), grads_of(model, *batch(s)))])
        opt.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    twin = TinyLM()
    twin.wte.weight.data = twin.wte.weight.data.bfloat16()
    twin.load_state_dict(saved["model"])
    twin_opt = MuonAdamW(param_groups(twin, weight_decay=0.0))  # hyperparameters come from the save
    twin_opt.load_state_dict(saved["optim"])
    assert twin_opt.param_groups[3]["weight_decay"] == 0.1
    for s in range(3, 5):
        grads = grads_of(model, *batch(s))
        for m, o in ((model, opt), (twin, twin_opt)):
            set_grads(m, [g.to(p.dtype) for p, g in zip(m.parameters(), grads)])
            o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    # loading must copy, not alias: the twin's state is its own
    k = next(iter(opt.state))
    assert opt.state[k]["exp_avg"].data_ptr() != twin_opt.state[next(iter(twin_opt.state))]["exp_avg"].data_ptr()


def test_load_state_dict_rejects_mismatches():
    model = TinyLM()
    opt = MuonAdamW(param_groups(model))
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="param groups"):
        MuonAdamW(param_groups(model)[:-1]).load_state_dict(sd)
    with pytest.raises(ValueError, match="same number of processes"):
        MuonAdamW(param_groups(model)).load_state_dict(dict(sd, sharding={"world_size": 2, "rank": 1}))


# -----------------------------------------------------------------------------
# Distributed: 2 gloo ranks, half a batch each, against one process with the mean gradient

STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for fast in (False, True):  # all-reduce path (any backend) and reduce-scatter path (NCCL's)
            torch.manual_seed(0)
            model = TinyLM()
            opt = MuonAdamW(param_groups(model), fast_collectives=fast)
            for s in range(STEPS):
                idx, tgt = batch(100 + s)
                half = idx.size(0) // world
                set_grads(model, grads_of(model, idx[rank * half:(rank + 1) * half], tgt[rank * half:(rank + 1) * half]))
                opt.step()
            results[fast] = {k: v.clone() for k, v in model.state_dict().items()}
            shard = copy.deepcopy(opt.state_dict())  # state_dict() refers to the live tensors
            results[f"wte_state_rows_{fast}"] = opt.state[model.wte.weight]["exp_avg"].shape[0]
            # per-rank round trip: continue from the saved shard in a fresh optimizer
            snapshot = copy.deepcopy(model.state_dict())
            extra = batch(200)
            set_grads(model, grads_of(model, *extra))
            opt.step()
            cont = {k: v.clone() for k, v in model.state_dict().items()}
            model.load_state_dict(snapshot)
            fresh = MuonAdamW(param_groups(model), fast_collectives=fast)
            fresh.load_state_dict(shard)
            set_grads(model, grads_of(model, *extra))
            fresh.step()
            results[f"roundtrip_{fast}"] = all(torch.equal(cont[k], v) for k, v in model.state_dict().items())
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_equal_single_process(tmp_path):
    mp.spawn(_dist_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)

    torch.manual_seed(0)
    model = TinyLM()
    start = copy.deepcopy(model.state_dict())
    opt = MuonAdamW(param_groups(model))
    for s in range(STEPS):
        idx, tgt = batch(100 + s)
        g0 = grads_of(model, idx[:4], tgt[:4])
        g1 = grads_of(model, idx[4:], tgt[4:])
        set_grads(model, [(a + b) / 2 for a, b in zip(g0, g1)])  # what the ranks average to
        opt.step()
    single = model.state_dict()
    for fast in (False, True):
        for k, v in single.items():
            assert torch.equal(r0[fast][k], r1[fast][k]), f"ranks disagree on {k}"
            torch.testing.assert_close(r0[fast][k], v, rtol=1e-5, atol=1e-6, msg=f"{k} (fast={fast})")
        assert r0[f"wte_state_rows_{fast}"] == VOCAB // 2  # the embedding's moments are sharded
        assert r0[f"roundtrip_{fast}"] and r1[f"roundtrip_{fast}"]
    # and the steps did move the weights
    for k in ("fc.0.weight", "wte.weight", "scales"):
        assert not torch.allclose(single[k], start[k])


# -----------------------------------------------------------------------------
# With the real GPT's param groups, on real tokens

@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_gpt_setup_optimizer_groups_train_on_real_text(tiny_tokenizer, shared_data, compute_dtype):
    gpt = pytest.importorskip("nanochat.gpt")
    import pyarrow.parquet as pq

    shard = pq.ParquetFile(shared_data / "pretrain_openstax" / "base_data" / "shard_00000.parquet")
    text = shard.read_row_group(0, columns=["text"]).column(0)[0].as_py()
    ids = tiny_tokenizer.encode(text, prepend=tiny_tokenizer.get_bos_token_id())[: 4 * 33]
    seq = torch.tensor(ids).view(4, 33)
    x, y = seq[:, :-1], seq[:, 1:]
    torch.manual_seed(0)
    config = gpt.GPTConfig(sequence_len=32, vocab_size=tiny_tokenizer.get_vocab_size(), n_layer=2, n_head=2,
                           n_kv_head=2, n_embd=32, window_pattern="L")
    model = gpt.build_model(config, torch.device("cpu"), compute_dtype)
    opt = model.setup_optimizer(weight_decay=0.01)
    assert isinstance(opt, MuonAdamW)
    assert {g["kind"] for g in opt.param_groups} == {"adamw", "muon"}
    losses = []
    for _ in range(8):
        loss = model(x, y)
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.6 * losses[0], losses  # memorising one batch of real text
    wte = model.transformer.wte.weight
    assert opt.state[wte]["exp_avg"].dtype == torch.float32  # fp32 moments whatever the param dtype


@pytest.mark.parametrize("env_dtype, expected", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_polar_express_matmuls_follow_the_runtime_dtype(monkeypatch, env_dtype, expected):
    """The runtime's compute dtype decides Muon's matmul dtype: bf16 only where the model
    computes in bf16 (on an AVX2-only CPU, emulated bf16 made the optimizer 76% of a step)."""
    gpt = pytest.importorskip("nanochat.gpt")
    import nanochat.optim as optim
    from nanochat.common import build_runtime

    monkeypatch.setenv("NANOCHAT_DTYPE", env_dtype)
    runtime = build_runtime("cpu")
    assert runtime.dtype == expected
    config = gpt.GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32,
                           window_pattern="L")
    model = gpt.build_model(config, runtime.device, runtime.dtype)
    opt = model.setup_optimizer()
    assert opt.ns_dtype == expected
    seen = []
    real = optim.polar_express

    def spy(g, steps=5, dtype=torch.bfloat16):
        out = real(g, steps, dtype)
        seen.append(out.dtype)  # the dtype the matmuls actually ran in
        return out

    monkeypatch.setattr(optim, "polar_express", spy)
    model(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))).backward()
    opt.step()
    assert seen and set(seen) == {expected}
    # an explicit choice still wins (the reference's bf16 everywhere, one argument away)
    assert model.setup_optimizer(ns_dtype=torch.bfloat16).ns_dtype == torch.bfloat16


def test_reference_muon_dtype_is_one_variable_away(monkeypatch):
    """NANOCHAT_MUON_DTYPE=bfloat16 restores the reference's bf16 Polar Express on an fp32 runtime."""
    gpt = pytest.importorskip("nanochat.gpt")
    from nanochat.common import build_runtime

    monkeypatch.setenv("NANOCHAT_DTYPE", "float32")
    monkeypatch.setenv("NANOCHAT_MUON_DTYPE", "bfloat16")
    runtime = build_runtime("cpu")
    assert runtime.dtype == torch.float32 and runtime.muon_dtype == torch.bfloat16
    config = gpt.GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    model = gpt.build_model(config, runtime.device, runtime.dtype)
    assert model.setup_optimizer(ns_dtype=runtime.muon_dtype).ns_dtype == torch.bfloat16
    monkeypatch.setenv("NANOCHAT_MUON_DTYPE", "fp8")
    with pytest.raises(ValueError, match="NANOCHAT_MUON_DTYPE='fp8' is not one of"):
        build_runtime("cpu")
