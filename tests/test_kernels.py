"""nanochat.kernels.cpu: each kernel against its reference formula under autograd (in
fp64 where the kernel runs in fp64, else against an fp64 reference), with the row-block
sizes shrunk so the blocked loops really run in many blocks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nanochat import gpt
from nanochat.gpt import LOGIT_SOFTCAP, apply_rotary, rotary_tables
from nanochat.kernels import cpu


# -----------------------------------------------------------------------------
# RMSNorm, rotary + QK norm

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_forward_is_f_rms_norm(dtype):
    x = (torch.randn(4, 33, 3, 64, generator=torch.Generator().manual_seed(1)) * 5).to(dtype)
    want = F.rms_norm(x, (64,)) * 1.2
    assert torch.equal(cpu.rms_norm(x.requires_grad_(), 1.2).detach(), want)  # the training path
    with torch.no_grad():
        assert torch.equal(cpu.rms_norm(x, 1.2), want)  # the inference path


@pytest.mark.parametrize("block", [1 << 18, 64])  # one block, and many blocks of a few rows
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_blocked_rms_norm_and_rope_norm_match_the_plain_ops(monkeypatch, block, dtype):
    monkeypatch.setattr(cpu, "CPU_BLOCK_ELEMENTS", block)
    g = torch.Generator().manual_seed(2)
    B, T, H, D = 3, 7, 2, 16
    cos, sin = rotary_tables(T, D, dtype)
    x = (torch.randn(B, T, H, D, generator=g, dtype=torch.float64) * 3).to(dtype)
    up = torch.randn(B, T, H, D, generator=g, dtype=torch.float64).to(dtype)

    def plain_rope_norm(x):  # the unfused formula, in fp64
        return F.rms_norm(apply_rotary(x.double(), cos.double(), sin.double()), (D,)) * 1.2

    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    xr = x.clone().requires_grad_()
    y = cpu.rope_norm(xr, cos, sin, 1.2)
    assert y.dtype == dtype and y.shape == x.shape
    (dx,) = torch.autograd.grad(y, xr, up)
    xd = x.double().requires_grad_()
    want = plain_rope_norm(xd)
    (want_dx,) = torch.autograd.grad(want, xd, up.double())
    torch.testing.assert_close(y.double(), want, atol=tol * 4, rtol=tol)
    torch.testing.assert_close(dx.double(), want_dx, atol=tol * 8, rtol=tol * 2)
    with torch.no_grad():  # inference takes the same fused forward: identical numbers
        assert torch.equal(cpu.rope_norm(x, cos, sin, 1.2), y.detach())

    # rms_norm: forward bitwise equal to F.rms_norm on every path, gradient as autograd's
    x2 = x.reshape(B * T, H * D)
    want2 = F.rms_norm(x2, (H * D,)) * 0.5
    xr2 = x2.clone().requires_grad_()
    y2 = cpu.rms_norm(xr2, 0.5)
    assert torch.equal(y2.detach(), want2)
    with torch.no_grad():
        assert torch.equal(cpu.rms_norm(x2, 0.5), want2)
    (dx2,) = torch.autograd.grad(y2, xr2, up.reshape(B * T, H * D))
    xd2 = x2.double().requires_grad_()
    (want_dx2,) = torch.autograd.grad(F.rms_norm(xd2, (H * D,)) * 0.5, xd2, up.reshape(B * T, H * D).double())
    torch.testing.assert_close(dx2.double(), want_dx2, atol=tol * 8, rtol=tol * 2)


# -----------------------------------------------------------------------------
# ReLU^2 projection, residual mix

def mlp_weights(g: torch.Generator, dtype: torch.dtype, std: float | None = None):
    """c_fc (64, 16) and c_proj (16, 64) weights of a width-16 MLP, as leaf tensors;
    std None draws like nn.Linear's default (uniform, bound 1/sqrt(fan_in))."""
    ws = []
    for shape in ((64, 16), (16, 64)):
        w = torch.empty(shape, dtype=dtype)
        if std is None:
            w.uniform_(-shape[1] ** -0.5, shape[1] ** -0.5, generator=g)
        else:
            w.normal_(0, std, generator=g)
        ws.append(w.requires_grad_())
    return ws


def mlp(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor) -> torch.Tensor:
    """What gpt.MLP computes: c_fc (weight cast to x's dtype), then the kernel."""
    return cpu.relu_squared_proj(F.linear(x, w_fc.to(x.dtype)), w_proj)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lean_rms_norm_and_relu_squared_backward_match_autograd(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 16, generator=g, dtype=dtype) * 3).requires_grad_()
    up = torch.randn(3, 5, 16, generator=g, dtype=dtype)
    torch.testing.assert_close(torch.autograd.grad(cpu.rms_norm(x), x, up)[0],
                               torch.autograd.grad(F.rms_norm(x, (16,)), x, up)[0])
    w_fc, w_proj = mlp_weights(g, dtype)
    params = [x, w_fc, w_proj]
    ours = torch.autograd.grad(mlp(x, w_fc, w_proj), params, up)
    plain = torch.autograd.grad(F.linear(F.relu(F.linear(x, w_fc)).square(), w_proj), params, up)
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_blocked_relu_squared_proj_and_residual_mix_match_autograd(monkeypatch, dtype):
    monkeypatch.setattr(cpu, "MLP_BLOCK_BYTES", 64 * 4 * 8)  # a few rows per block
    monkeypatch.setattr(cpu, "CPU_BLOCK_ELEMENTS", 40)  # _dot in many blocks
    g = torch.Generator().manual_seed(3)
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    # fp32 masters, or fp64 for fp64 (else the weight gradients are rounded to fp32)
    w_fc, w_proj = mlp_weights(g, torch.float64 if dtype == torch.float64 else torch.float32, std=0.3)
    x = torch.randn(3, 9, 16, generator=g).to(dtype).requires_grad_()
    up = torch.randn(3, 9, 16, generator=g).to(dtype)
    params = [x, w_fc, w_proj]
    ours = torch.autograd.grad(mlp(x, w_fc, w_proj), params, up)
    wf, wp = w_fc.detach().double(), w_proj.detach().double()
    xd = x.detach().double().requires_grad_()
    wf_, wp_ = wf.clone().requires_grad_(), wp.clone().requires_grad_()
    plain = torch.autograd.grad(F.relu(xd @ wf_.t()).square() @ wp_.t(), [xd, wf_, wp_], up.double())
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a.double(), b, atol=tol * b.abs().max().item(), rtol=tol)

    # a * x + b * x0 with 0-dim lambdas: values and all four gradients
    lam = torch.tensor([1.1, 0.3], dtype=torch.float64 if dtype == torch.float64 else torch.float32, requires_grad=True)
    x, x0 = (torch.randn(2, 5, 16, generator=g).to(dtype).requires_grad_() for _ in range(2))
    y = cpu.residual_mix(x, x0, lam[0], lam[1])
    with torch.no_grad():
        assert torch.equal(cpu.residual_mix(x, x0, lam[0], lam[1]), y)  # inference: same numbers
    grads = torch.autograd.grad(y, [x, x0, lam], up[:2, :5])
    xd, x0d, lamd = (t.detach().double().requires_grad_() for t in (x, x0, lam))
    want = torch.autograd.grad(lamd[0] * xd + lamd[1] * x0d, [xd, x0d, lamd], up[:2, :5].double())
    torch.testing.assert_close(y.double(), (lamd[0] * xd + lamd[1] * x0d).detach(), atol=tol * 10, rtol=tol)
    for a, b in zip(grads, want):
        torch.testing.assert_close(a.double(), b, atol=tol * 10 * b.abs().max().item(), rtol=tol)


# -----------------------------------------------------------------------------
# Head + loss

def test_head_loss_equals_full_cross_entropy_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    N, C, V, V_pad = 50, 16, 37, 40
    x = torch.randn(N, C, generator=g, requires_grad=True)
    w = (torch.randn(V_pad, C, generator=g) * 2).requires_grad_()  # big logits: the softcap bites
    targets = torch.randint(0, V, (N,), generator=g)
    targets[[3, 17, 49]] = -1
    row_weights = torch.randn(N, generator=g)

    def reference(reduction):
        z = F.linear(x, w)[:, :V].float()
        return F.cross_entropy(LOGIT_SOFTCAP * torch.tanh(z / LOGIT_SOFTCAP), targets, ignore_index=-1,
                               reduction=reduction)

    for reduction in ("mean", "sum", "none"):
        want = reference(reduction)
        got = cpu.head_loss(x, w, targets, V, LOGIT_SOFTCAP, reduction, chunk_rows=7)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        upstream = row_weights if reduction == "none" else torch.tensor(1.7)
        want_grads = torch.autograd.grad((want * upstream).sum(), (x, w))
        got_grads = torch.autograd.grad((got * upstream).sum(), (x, w))
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        assert got_grads[1][V:].abs().sum() == 0
        with torch.no_grad():
            torch.testing.assert_close(cpu.head_loss(x, w, targets, V, LOGIT_SOFTCAP, reduction, chunk_rows=7),
                                       want.detach())
    assert torch.isnan(cpu.head_loss(x, w, torch.full((N,), -1), V, LOGIT_SOFTCAP))  # as F.cross_entropy: 0 / 0
    with pytest.raises(ValueError, match="loss_reduction"):
        cpu.head_loss(x, w, targets, V, LOGIT_SOFTCAP, "max")


# -----------------------------------------------------------------------------
# Decode steps: the small-inference paths give the blocked kernels' bits

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [(1, 1), (16, 1), (3, 5)])
def test_small_inference_paths_give_the_kernels_bits(monkeypatch, dtype, rows):
    B, T = rows
    g = torch.Generator().manual_seed(B * 10 + T)
    x = (torch.randn(B, T, 4, 32, generator=g) * 3).to(dtype)
    cos, sin = rotary_tables(64, 32, dtype)
    cos, sin = cos[:, 7:7 + T], sin[:, 7:7 + T]
    h = (torch.randn(B, T, 256, generator=g) * 2).to(dtype)
    w = torch.randn(64, 256, generator=g) * 0.1
    y, y0 = (torch.randn(B, T, 64, generator=g).to(dtype) for _ in range(2))
    a, b = torch.tensor(1.13), torch.tensor(0.21)

    def outputs():
        mlp = gpt.MLP(gpt.GPTConfig(n_embd=64, n_head=2, n_kv_head=2))
        mlp.c_proj.weight.data.copy_(w)
        mlp.c_fc = torch.nn.Identity()  # feed h straight to the ReLU^2 projection
        return (cpu.rope_norm(x, cos, sin, 1.2), gpt.norm(y, 1.0), gpt.residual_mix(y, y0, a, b), mlp(h))

    with torch.inference_mode():
        small = outputs()
        monkeypatch.setattr(cpu, "SMALL_INFERENCE_ELEMENTS", 0)  # every input now takes the blocked kernels
        blocked = outputs()
    for got, want in zip(small[:3], blocked[:3]):
        assert got.dtype == want.dtype and torch.equal(got, want)
    # the MLP's matmul takes decode_matmul's cached layouts for decode-sized inputs: the
    # same products summed in another order
    assert small[3].dtype == blocked[3].dtype
    torch.testing.assert_close(small[3], blocked[3], rtol=1e-5, atol=1e-5)
