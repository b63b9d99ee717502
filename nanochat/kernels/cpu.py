"""Row-blocked autograd kernels for the model's elementwise work on a CPU.

Why: on a CPU every fresh large temporary is a round trip through memory, and a
whole-tensor temporary is a fresh mmap whose pages fault in one by one (about 1 us per
4 KiB page, as long as the arithmetic itself); once the matmuls run in bf16, these
elementwise passes are most of what is left of a training step. So each kernel below
allocates only its outputs (plus what its backward keeps), walks its inputs in row
blocks whose fp32 workspaces come from malloc's cached heap and stay in cache, and keeps
less for the backward than autograd would.

Kernels (each with its reference: the plain formula it equals, which `nanochat.gpt` uses
under torch.compile):
  rms_norm           scale * F.rms_norm(x)                       bitwise equal
  rope_norm          scale * F.rms_norm(apply_rotary(x))         one rounding fewer
  relu_squared_proj  relu(h)^2 @ w^T                             to rounding
  residual_mix       a * x + b * x0                              bitwise equal
  head_loss          F.cross_entropy(cap * tanh(x @ w^T / cap))  to rounding

They are correct on any device: off the CPU a "block" is the whole tensor (each op is
one kernel launch there, and a loop would only add launches).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Rows are walked in blocks of about this many elements: fp32 workspaces of 1 MiB each,
# reused from the heap and resident in cache.
CPU_BLOCK_ELEMENTS = 1 << 18
# Rows of h per block in relu_squared_proj: a relu(h)^2 workspace of at most 32 MiB,
# few enough blocks that grad_w's fp32 accumulation (one (C, 4C) conversion and add per
# block) stays cheap.
MLP_BLOCK_BYTES = 32 << 20
# head_loss: rows per matmul chunk are about 2^25 logits / vocab (1024 rows at vocab
# 32768: each chunk adds its bf16 grad_w into the fp32 one, a pass over a (V, C) matrix,
# so fewer chunks are faster; the chunk buffer is 64 MiB in bf16) ...
LOSS_CHUNK_ELEMENTS = 1 << 25
# ... and its elementwise passes run on pieces of about this many logits, whose fp32
# workspaces (2 x 1 MiB) stay in L2 cache between passes (measured at d4, vocab 32768:
# 2^18 beats 2^17 and 2^19).
LOSS_PIECE_ELEMENTS = 1 << 18
# inference inputs up to this size (a decode step) skip the blocking: one block, fewest ops,
# where the per-call overhead of the blocked versions exceeds the arithmetic
SMALL_INFERENCE_ELEMENTS = 1 << 16
# exp(z) of capped logits |z| <= softcap cannot overflow fp32 (nor underflow to a zero
# sum) below this cap, so the log-sum-exp needs no max subtraction (one pass fewer).
_SHIFT_FREE_SOFTCAP = 30.0


# -----------------------------------------------------------------------------
# Shared helpers

def _block_rows(x: Tensor, row_elements: int, block_elements: int | None = None) -> int:
    """Rows (along dim 0) per block of about `block_elements` (default
    CPU_BLOCK_ELEMENTS): all of them on accelerators."""
    if x.device.type != "cpu":
        return max(1, x.size(0))
    return max(1, (block_elements or CPU_BLOCK_ELEMENTS) // max(1, row_elements))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dot(u: Tensor, v: Tensor) -> Tensor:
    """sum(u * v) over all elements as a 0-dim tensor in the accumulation dtype, upcast
    block by block (no full-size product or upcast)."""
    u, v = u.reshape(-1), v.reshape(-1)
    if u.dtype == v.dtype and u.dtype in (torch.float32, torch.float64):
        return torch.dot(u, v)
    total = torch.zeros((), dtype=torch.float32, device=u.device)
    step = _block_rows(u, 1)
    for i in range(0, u.numel(), step):
        total += torch.dot(u[i:i + step].float(), v[i:i + step].float())
    return total


# -----------------------------------------------------------------------------
# RMSNorm

def _rms_forward_into(y: Tensor, rstd: Tensor, xf: Tensor, scratch: bool, scale: float) -> None:
    """One block of y = rms_norm(x) * scale, rounded like F.rms_norm(x) * scale (to
    y's dtype, then the scale), and rstd = 1 / rms(x). xf: the block in the accumulation
    dtype (rstd's), which may be overwritten when `scratch`; y: (R, ..., D) in the
    output dtype; rstd: (R, ..., 1). The same steps as F.rms_norm (mean of squares +
    the accumulation dtype's epsilon, rsqrt, multiply), so bitwise equal to it."""
    torch.mean(xf.square(), -1, keepdim=True, out=rstd)
    rstd.add_(torch.finfo(rstd.dtype).eps).rsqrt_()
    if scratch:
        y.copy_(xf.mul_(rstd))
    else:  # xf is x itself, already in y's dtype
        torch.mul(xf, rstd, out=y)
    if scale != 1.0:
        y.mul_(scale)


def _rms_backward(g: Tensor, y: Tensor, rstd: Tensor, scale: float) -> Tensor:
    """dL/dx of y = scale * rms_norm(x) for one block, from the output y and rstd, in
    rstd's dtype: with n = y / s and dn = s * g,
    dx = rstd * (dn - n * mean(dn * n)) = rstd * (s * g - y * mean(g * y) / s)."""
    acc = rstd.dtype
    gf, yf = g.to(acc), y.to(acc)
    m = (gf * yf).mean(-1, keepdim=True).mul_(-1.0 / scale)
    return torch.mul(gf, scale).addcmul_(yf, m).mul_(rstd)


def _rms_norm_rows(x: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(y, rstd) for x (N, D), block by block."""
    y = torch.empty_like(x)
    rstd = torch.empty(x.size(0), 1, dtype=_acc_dtype(x.dtype), device=x.device)
    step = _block_rows(x, x.size(1))
    for i in range(0, x.size(0), step):
        xb = x[i:i + step]
        xf = xb.to(rstd.dtype)
        _rms_forward_into(y[i:i + step], rstd[i:i + step], xf, xf is not xb, scale)
    return y, rstd


class _RMSNormFn(torch.autograd.Function):
    """Keeps the output (which the next layer saves anyway: the matmul input) plus one
    rstd per row for the backward, instead of the input."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        y, rstd = _rms_norm_rows(x.reshape(-1, x.size(-1)), scale)
        y = y.view(x.shape)
        ctx.save_for_backward(y, rstd)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        y, rstd = ctx.saved_tensors
        y2, g2 = y.view(-1, y.size(-1)), grad.reshape(-1, y.size(-1))
        dx = torch.empty_like(y2)
        step = _block_rows(y2, y2.size(1))
        for i in range(0, y2.size(0), step):
            dx[i:i + step].copy_(_rms_backward(g2[i:i + step], y2[i:i + step], rstd[i:i + step], ctx.scale))
        return dx.view(y.shape), None


def rms_norm(x: Tensor, scale: float = 1.0) -> Tensor:
    """RMSNorm over the last dimension, no gain, times `scale`, in x's dtype.

    Fuses the norm and the scale in row blocks; its backward keeps the output and one
    rstd per row rather than the input. Reference: F.rms_norm(x, (D,)) * scale, which it
    equals bitwise, forward and inference alike."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _RMSNormFn.apply(x, scale)
    return _rms_norm_rows(x.reshape(-1, x.size(-1)), scale)[0].view(x.shape)


# -----------------------------------------------------------------------------
# Rotary embedding + QK norm

def _rotate(xf: Tensor, cos: Tensor, sin: Tensor, sign: float) -> Tensor:
    """Rotate channel pairs (c, c + D/2) of a block in the accumulation dtype into a new
    tensor: (x1 cos + x2 sin, x2 cos - x1 sin); sign -1 rotates back (the transpose,
    which is the backward of the rotation)."""
    half = xf.size(-1) // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    out = torch.empty_like(xf)
    torch.mul(x1, cos, out=out[..., :half]).addcmul_(x2, sin, value=sign)
    torch.mul(x2, cos, out=out[..., half:]).addcmul_(x1, sin, value=-sign)
    return out


def _rope_norm_rows(x: Tensor, cos: Tensor, sin: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(y, rstd) for x (B, T, H, D), blocked over B; the rotation runs in the
    accumulation dtype, so y is rounded once (plus the scale), where the unfused ops
    would round after the rotation too."""
    y = torch.empty_like(x)
    rstd = torch.empty(*x.shape[:-1], 1, dtype=_acc_dtype(x.dtype), device=x.device)
    step = _block_rows(x, x[0].numel())
    for i in range(0, x.size(0), step):
        r = _rotate(x[i:i + step].to(rstd.dtype), cos, sin, 1.0)
        _rms_forward_into(y[i:i + step], rstd[i:i + step], r, True, scale)
    return y, rstd


class _RopeNormFn(torch.autograd.Function):
    """Keeps its output (attention keeps q and k anyway) and rstd for the backward."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor, scale: float) -> Tensor:
        acc = _acc_dtype(x.dtype)
        c, s = cos.to(acc), sin.to(acc)  # (1, T, 1, D/2)
        y, rstd = _rope_norm_rows(x, c, s, scale)
        ctx.save_for_backward(y, rstd, c, s)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        y, rstd, c, s = ctx.saved_tensors
        dx = torch.empty_like(y)
        step = _block_rows(y, y[0].numel())
        for i in range(0, y.size(0), step):
            dr = _rms_backward(grad[i:i + step], y[i:i + step], rstd[i:i + step], ctx.scale)
            dx[i:i + step].copy_(_rotate(dr, c, s, -1.0))
        return dx, None, None, None


def rope_norm(x: Tensor, cos: Tensor, sin: Tensor, scale: float) -> Tensor:
    """Rotary embedding then QK norm of q or k (B, T, H, D); cos, sin (1, T, 1, D/2).

    Fuses the rotation, the RMSNorm and the scale in one pass over blocks of x,
    allocating only the output and rstd instead of the ~8 full-size temporaries of the
    separate ops. Reference: F.rms_norm(gpt.apply_rotary(x, cos, sin), (D,)) * scale, equal up
    to the rounding after the rotation, which the kernel skips."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _RopeNormFn.apply(x, cos, sin, scale)
    acc = _acc_dtype(x.dtype)
    if x.numel() <= SMALL_INFERENCE_ELEMENTS:
        if cos.dtype != acc:  # the test skips two no-op calls per layer and decoded token
            cos, sin = cos.to(acc), sin.to(acc)
        return _rope_norm_small(x, cos, sin, scale)
    return _rope_norm_rows(x, cos.to(acc), sin.to(acc), scale)[0]


def _rope_norm_small(x: Tensor, cos: Tensor, sin: Tensor, scale: float) -> Tensor:
    """rope_norm's inference path for a few rows (a decode step), where the blocked
    version's Python and per-op overhead (~150 us a call) exceeds its arithmetic: the
    same rotation, then F.rms_norm, which rounds like `_rms_forward_into` (tested bitwise)."""
    r = _rotate(x if x.dtype == cos.dtype else x.to(cos.dtype), cos, sin, 1.0)
    y = F.rms_norm(r, (r.size(-1),))
    y = y if y.dtype == x.dtype else y.to(x.dtype)
    return y.mul_(scale) if scale != 1.0 else y


# -----------------------------------------------------------------------------
# ReLU^2 MLP projection

class _ReluSquaredProj(torch.autograd.Function):

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(h, w)
        h2, wt = h.reshape(-1, h.size(-1)), w.to(h.dtype)  # (N, 4C), (C, 4C)
        out = torch.empty(h2.size(0), wt.size(0), dtype=h.dtype, device=h.device)
        step = _block_rows(h2, h2.size(1), MLP_BLOCK_BYTES // h.element_size())
        for i in range(0, h2.size(0), step):
            torch.mm(F.relu(h2[i:i + step]).square_(), wt.t(), out=out[i:i + step])
        return out.view(*h.shape[:-1], wt.size(0))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        h, w = ctx.saved_tensors
        h2, g2 = h.reshape(-1, h.size(-1)), grad.reshape(-1, grad.size(-1))
        w2 = w.to(h.dtype) * 2  # d relu(h)^2 / dh = 2 relu(h); the 2 is exact in any dtype
        grad_h = torch.empty_like(h2)
        grad_w = torch.zeros(w.shape, dtype=_acc_dtype(h.dtype), device=w.device)  # (C, 4C), summed over blocks
        step = _block_rows(h2, h2.size(1), MLP_BLOCK_BYTES // h.element_size())
        for i in range(0, h2.size(0), step):
            r = F.relu(h2[i:i + step])
            torch.mm(g2[i:i + step], w2, out=grad_h[i:i + step]).mul_(r)  # zero where h <= 0, as relu's backward
            grad_w += (g2[i:i + step].t() @ r.square_()).to(grad_w.dtype)
        return grad_h.view(h.shape), grad_w.to(w.dtype)


def relu_squared_proj(h: Tensor, w: Tensor) -> Tensor:
    """The MLP's output projection of its hidden pre-activation h (B, T, 4C) by the
    fp32 master weight w (C, 4C), in h's dtype.

    Fuses the activation into the matmul: keeps only h for the backward and recomputes
    relu(h)^2 there (autograd would keep relu(h) and relu(h)^2, twice the bytes), and on
    a CPU runs both passes on row blocks, so relu(h)^2 never exists at full size.
    Reference: F.relu(h).square() @ w.to(h.dtype).t()."""
    return _ReluSquaredProj.apply(h, w)


# -----------------------------------------------------------------------------
# Per-layer residual mix

class _ResidualMixFn(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x: Tensor, x0: Tensor, a: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(x, x0, a, b)
        return (x * a).addcmul_(x0, b)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:
        x, x0, a, b = ctx.saved_tensors
        need = ctx.needs_input_grad
        return (g * a if need[0] else None, g * b if need[1] else None,
                _dot(g, x).to(a.dtype) if need[2] else None, _dot(g, x0).to(b.dtype) if need[3] else None)


def residual_mix(x: Tensor, x0: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """a * x + b * x0 for 0-dim scalars a, b.

    With autograd: one new tensor forward and two backward (the gradients of x and x0;
    the scalars' come from blocked dot products), where autograd's version makes four
    more for the products and the scalars' gradients. Reference:
    torch.addcmul(x * a, x0, b), which it equals bitwise (and is, without autograd)."""
    if torch.is_grad_enabled() and (x.requires_grad or x0.requires_grad or a.requires_grad or b.requires_grad):
        return _ResidualMixFn.apply(x, x0, a, b)
    return torch.addcmul(x * a, x0, b)


# -----------------------------------------------------------------------------
# Head + loss without the full logits
#
# For N = B*T rows and vocabulary V the fp32 logits are N*V*4 bytes (2 GiB at batch
# 32 x 512 tokens, V = 32768), and autograd would keep several such tensors for the
# backward. Instead rows are processed in chunks of about LOSS_CHUNK_ELEMENTS logits:
# each chunk's logits, softcap, log-sum-exp and (when training) gradient are computed
# and dropped before the next. With d = dL/dlogits_raw per chunk,
#     dL/dz = softmax(z) - onehot(target),  z = cap * tanh(u / cap),  dz/du = 1 - tanh^2,
#     grad_x = d @ W,  grad_W = d^T @ x.
# For "mean"/"sum" the gradient is computed during the forward pass (the upstream
# gradient is one scalar, applied in backward), so the head's logits are computed once;
# for "none" (per-row losses, e.g. RL) they are recomputed chunk by chunk in backward.

def _chunk_rows(vocab: int, chunk_rows: int | None) -> int:
    return chunk_rows if chunk_rows else max(1, LOSS_CHUNK_ELEMENTS // vocab)


def _head_chunks(x: Tensor, weight: Tensor, targets: Tensor, vocab_size: int, softcap: float,
                 ignore_index: int, chunk_rows: int, row_scale: Tensor | None, want_grad: bool
                 ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Per-row losses (N,) fp32 (0 where target == ignore_index), and when `want_grad`
    the gradients of sum(row_scale * losses) w.r.t. x (N, C; x's dtype) and weight
    (V_pad, C; fp32). row_scale None means 1 for every row.

    Speed (this is most of a CPU training step at small depth): the matmuls run on chunks
    of `chunk_rows` rows, the ~10 elementwise passes of softcap, softmax and gradient on
    pieces of a few rows whose fp32 workspaces stay in cache (3-4x faster on a CPU than
    streaming whole chunks through memory), and every buffer is allocated once per call:
    fresh tensors of tens of MiB per chunk would each be mmap'ed and page-faulted in.
    The gradient overwrites the raw logits it came from.
    """
    n, C, dev = x.size(0), x.size(1), x.device
    w = weight[:vocab_size].to(x.dtype)  # (V, C): the padded rows never reach a logit
    grad_x = torch.empty_like(x) if want_grad else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=dev) if want_grad else None
    rows = max(1, min(chunk_rows, n))
    # cache-sized pieces pay off on CPUs; on a GPU each op is a kernel launch, so one piece per chunk
    piece = max(1, min(rows, LOSS_PIECE_ELEMENTS // vocab_size)) if dev.type == "cpu" else rows
    valid = targets != ignore_index  # (N,)
    safe = targets.clamp(min=0).long().unsqueeze(1)  # (N, 1): a harmless index for ignored rows
    scale = valid.float() if row_scale is None else row_scale.float() * valid  # (N,)
    neg_scale = -scale.unsqueeze(1)  # (N, 1)
    sumexp = torch.empty(n, 1, dtype=torch.float32, device=dev)  # sum_j exp(z_j - shift)
    t_target = torch.empty(n, 1, dtype=torch.float32, device=dev)  # tanh(u_target / cap)
    shift = torch.zeros(n, 1, dtype=torch.float32, device=dev)
    raw_buf = torch.empty(rows, vocab_size, dtype=x.dtype, device=dev)  # u / cap = (x / cap) @ w^T, then dL/du
    t_buf = torch.empty(piece, vocab_size, dtype=torch.float32, device=dev)  # tanh(u / cap), then its square
    e_buf = torch.empty_like(t_buf)  # exp(z - shift), then the gradient in fp32
    low = x.dtype != torch.float32
    # the chunk's grad_w in x.dtype, added to the fp32 grad_w in row blocks (an op mixing
    # dtypes would convert the whole chunk into a temporary)
    gw_buf = torch.empty(vocab_size, C, dtype=x.dtype, device=dev) if want_grad and low else None
    gw_rows = _block_rows(grad_w, C) if want_grad else 0
    for start in range(0, n, rows):
        end = min(start + rows, n)
        xc, raw = x[start:end], raw_buf[:end - start]
        # the matmul yields u / cap straight away (one pass per piece fewer); the chunk of
        # x is scaled, a small temporary, rather than a copy of the whole weight
        torch.mm(xc * (1.0 / softcap), w.t(), out=raw)
        # per piece: only full-width passes; per-row values go to (N, 1) buffers via out=
        for p0 in range(start, end, piece):
            p1 = min(p0 + piece, end)
            t, e, u = t_buf[:p1 - p0], e_buf[:p1 - p0], raw[p0 - start:p1 - start]
            t.copy_(u).tanh_()
            torch.gather(t, 1, safe[p0:p1], out=t_target[p0:p1])
            torch.mul(t, softcap, out=e)  # z, the capped logits
            if softcap > _SHIFT_FREE_SOFTCAP:
                torch.amax(e, dim=1, keepdim=True, out=shift[p0:p1])
                e.sub_(shift[p0:p1])
            torch.sum(e.exp_(), dim=1, keepdim=True, out=sumexp[p0:p1])
            if not want_grad:
                continue
            # dL/du = (softmax(z) - onehot) * (1 - t^2), times the row's scale
            e.mul_(scale[p0:p1].unsqueeze(1) / sumexp[p0:p1])
            e.scatter_add_(1, safe[p0:p1], neg_scale[p0:p1])
            e.addcmul_(e, t.square_(), value=-1.0)
            u.copy_(e)
        if not want_grad:
            continue
        torch.mm(raw, w, out=grad_x[start:end])
        if low:
            torch.mm(raw.t(), xc, out=gw_buf)
            for r0 in range(0, vocab_size, gw_rows):
                grad_w[r0:min(r0 + gw_rows, vocab_size)] += gw_buf[r0:r0 + gw_rows].float()
        else:
            grad_w[:vocab_size].addmm_(raw.t(), xc)
    lse = sumexp.log_().add_(shift).squeeze(1)
    losses = torch.where(valid, lse - softcap * t_target.squeeze(1), 0.0)
    return losses, grad_x, grad_w


class _HeadLossSum(torch.autograd.Function):
    """sum of the per-row losses; gradients computed in forward, scaled in backward."""

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size, softcap, ignore_index, chunk_rows):
        losses, grad_x, grad_w = _head_chunks(x, weight, targets, vocab_size, softcap, ignore_index, chunk_rows,
                                              None, True)
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        return losses.sum()

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_w = ctx.saved_tensors
        return ((grad_x * grad_out.to(grad_x.dtype)), (grad_w * grad_out).to(ctx.weight_dtype),
                None, None, None, None, None)


class _HeadLossRows(torch.autograd.Function):
    """(N,) per-row losses; the backward recomputes the logits chunk by chunk."""

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size, softcap, ignore_index, chunk_rows):
        losses, _, _ = _head_chunks(x, weight, targets, vocab_size, softcap, ignore_index, chunk_rows, None, False)
        ctx.save_for_backward(x, weight, targets)
        ctx.args = (vocab_size, softcap, ignore_index, chunk_rows)
        return losses

    @staticmethod
    def backward(ctx, grad_rows):
        x, weight, targets = ctx.saved_tensors
        _, grad_x, grad_w = _head_chunks(x, weight, targets, *ctx.args, row_scale=grad_rows, want_grad=True)
        return grad_x, grad_w.to(weight.dtype), None, None, None, None, None


def head_loss(x: Tensor, weight: Tensor, targets: Tensor, vocab_size: int, softcap: float,
              reduction: str = "mean", chunk_rows: int | None = None, ignore_index: int = -1) -> Tensor:
    """Cross-entropy of softcapped logits against targets, in row chunks.

    x: (N, C) final hidden states in the compute dtype; weight: (V_pad, C) the lm_head
    master weight; targets: (N,) with ignore_index for positions without a loss.
    reduction: "mean" over the non-ignored rows, "sum", or "none" for (N,) fp32 losses
    (0 at ignored rows); chunk_rows: rows per matmul chunk (None: ~LOSS_CHUNK_ELEMENTS
    logits).

    Fuses the head matmul, softcap, log-sum-exp and their gradient chunk by chunk, so
    the full (N, vocab) fp32 logits (and autograd's copies of them) never exist.
    Reference: F.cross_entropy(softcap * tanh(z / softcap), targets, ignore_index,
    reduction) with z = (x @ weight[:vocab_size].to(x.dtype).t()).float().
    """
    if torch.compiler.is_compiling():
        # keep the chunk loop eager: tracing would unroll every chunk into the graph
        # (torch.compiler.disable is looked up here, not at import, where it costs a second)
        return torch.compiler.disable(_head_loss)(x, weight, targets, vocab_size, reduction, softcap, chunk_rows,
                                                  ignore_index)
    return _head_loss(x, weight, targets, vocab_size, reduction, softcap, chunk_rows, ignore_index)


def _head_loss(x: Tensor, weight: Tensor, targets: Tensor, vocab_size: int, reduction: str, softcap: float,
               chunk_rows: int | None, ignore_index: int) -> Tensor:
    rows = _chunk_rows(vocab_size, chunk_rows)
    args = (vocab_size, softcap, ignore_index, rows)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if reduction == "none":
        if needs_grad:
            return _HeadLossRows.apply(x, weight, targets, *args)
        return _head_chunks(x, weight, targets, *args, None, False)[0]
    if reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction={reduction!r} is not one of 'mean', 'sum', 'none'")
    if needs_grad:
        total = _HeadLossSum.apply(x, weight, targets, *args)
    else:
        total = _head_chunks(x, weight, targets, *args, None, False)[0].sum()
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum()  # 0/0 = nan when every target is ignored, as F.cross_entropy
