"""
MuonAdamW: one optimizer for the whole model, single-process or sharded across ranks.

Two update rules share one `torch.optim.Optimizer`, chosen per param group by
`group["kind"]`:

- ``"adamw"`` (embeddings, lm_head, value embeddings, scalars): AdamW with decoupled
  weight decay and bias correction (Loshchilov & Hutter, https://arxiv.org/abs/1711.05101).
  The arithmetic and the moment buffers are fp32 whatever the parameter's dtype, so
  bf16 embeddings still accumulate small updates correctly.
- ``"muon"`` (the transformer blocks' matrices; every param of a group has one shape):
  Muon (https://kellerjordan.github.io/posts/muon/): Nesterov momentum, then the update
  is replaced by (approximately) its polar factor U V^T, computed with the Polar Express
  iteration (Amsel et al., https://arxiv.org/abs/2505.16932); then NorMuon's per-row or
  per-column second-moment normalisation (https://arxiv.org/abs/2510.05491); then
  "cautious" weight decay, which only shrinks weights where the update already pushes
  them toward zero. The matrices of a group are stacked into one (K, rows, cols) tensor
  so each step is a handful of batched matmuls. Two later refinements are options of the
  constructor (upstream nanochat has both on; the reference has neither): MuonEq row
  equilibration before the orthogonalisation and Muon+ Frobenius renormalisation after it.

Distributed (ZeRO-2 style): when `torch.distributed` is initialised with more than one
rank at construction time, the same class averages gradients across ranks and shards
the work and the optimizer state:

- AdamW params with at least `shard_min_numel` elements and a first dimension divisible
  by the world size: each rank gets the averaged gradient of its block of rows, updates
  those rows (holding moments only for them) and the rows are all-gathered back.
  Smaller params are all-reduced and updated identically on every rank.
- Muon groups: the K stacked matrices are split into `world_size` chunks of
  ceil(K / world_size) (zero-padded); each rank orthogonalises and updates its chunk only
  and the updated matrices are all-gathered.

The result equals the single-process step on the rank-averaged gradient. On NCCL this
uses async reduce-scatter with AVG and all-gather-into-tensor, overlapping the collectives
of later groups with the compute of earlier ones; on other backends (gloo) it uses async
all-reduce (SUM, then divide) and list all-gather, which every gloo build supports.

Hyperparameters (`lr`, `betas`, `eps`, `weight_decay`, `momentum`, `beta2`) are read
from the group dicts at every step, so schedules just assign `group["lr"] = ...`.
`state_dict()` holds this rank's shard; load it on the same rank of a run with the same
world size (checked).
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from nanochat.errors import UserError

log = logging.getLogger("nanochat.optim")

# Polar Express coefficients (a, b, c) of the odd quintic a*x + b*x^3 + c*x^5 applied per
# iteration, from Amsel et al. 2025 (computed for 5 iterations, safety factor 2e-2,
# cushion 2). They push every singular value in (~1e-3, 1] toward 1; after 5 steps the
# singular values land in about [0.86, 1.14], which is as good as exact U V^T for Muon.
POLAR_EXPRESS_COEFFS: tuple[tuple[float, float, float], ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

_ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay")
_MUON_KEYS = ("lr", "momentum", "ns_steps", "beta2", "weight_decay")

Scalar = float | Tensor  # a Python float in eager mode, a 0-D CPU tensor under torch.compile


# -----------------------------------------------------------------------------
# The math, as plain functions (eager, or wrapped by torch.compile on CUDA)

def polar_express(g: Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Approximate polar factor U V^T of each matrix in `g` (..., rows, cols), in `dtype`.

    The input is first scaled so its spectral norm is below 1 (the Frobenius norm bounds
    it; the 1.01 and 1e-6 keep a margin). Each iteration applies X <- a X + b (X X^T) X +
    c (X X^T)^2 X, written with the smaller Gram matrix: X^T X (cols x cols) for tall X.
    """
    shape = g.shape
    x = g.to(dtype).reshape(-1, *shape[-2:])      # (K, rows, cols)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    tall = x.size(-2) > x.size(-1)
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        # one new full-size matrix per iteration besides the Gram-sized ones (each fresh
        # large tensor costs page faults on a CPU). The coefficients enter as Python
        # floats (add's alpha, mul): baddbmm's beta/alpha would be rounded to bf16, and
        # 8.16 -> 8.125 visibly weakens the iteration.
        gram = x.mT @ x if tall else x @ x.mT     # (K, cols, cols) | (K, rows, rows)
        poly = (gram @ gram).mul_(c).add_(gram, alpha=b)
        x = (x @ poly if tall else poly @ x).add_(x, alpha=a)
    return x.reshape(shape)


def equilibrate_rows(g: Tensor) -> Tensor:
    """MuonEq (https://arxiv.org/abs/2603.28254): scale every row of each matrix in `g`
    (..., rows, cols) to the matrices' mean row norm ||G||_F / sqrt(rows). Rows of very
    different size make the spectrum badly conditioned, and Polar Express, which starts
    from G / ||G||_F, then leaves the small singular values far from 1."""
    row = g.norm(dim=-1, keepdim=True).clamp_min(1e-6)                       # (..., rows, 1)
    mean = g.norm(dim=(-2, -1), keepdim=True) / math.sqrt(g.size(-2))        # (..., 1, 1)
    return g * (mean / row)


def renormalize_frobenius(u: Tensor) -> Tensor:
    """Muon+ (https://arxiv.org/abs/2602.21545): rescale each orthogonalised matrix in `u`
    (..., rows, cols) in place to Frobenius norm sqrt(min(rows, cols)), the norm of an
    exactly semi-orthogonal matrix, undoing the iteration's incomplete convergence."""
    target = math.sqrt(min(u.size(-2), u.size(-1)))
    return u.mul_(target / u.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6))


def adamw_update(p: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Scalar,
                 lr: Scalar, beta1: Scalar, beta2: Scalar, eps: Scalar, wd: Scalar) -> None:
    """One AdamW step on `p` in place; moments are fp32 and so is the arithmetic.

    Order: decoupled decay p *= 1 - lr*wd, moment updates, bias correction
    m_hat = m / (1 - beta1^t), v_hat = v / (1 - beta2^t), p -= lr * m_hat / (sqrt(v_hat) + eps).
    """
    p32 = p.float()                               # p itself when p is fp32
    g = grad.float()
    p32.mul_(1 - lr * wd)
    # one temporary serves as g^2, the denominator and the update (fresh tensors the size
    # of an embedding table cost page faults on the CPU); the operations are the ones above
    tmp = torch.mul(g, g)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.lerp_(tmp, 1 - beta2)
    bias1 = 1 - beta1 ** step
    bias2 = 1 - beta2 ** step
    torch.div(exp_avg_sq, bias2, out=tmp).sqrt_().add_(eps)
    torch.div(exp_avg, tmp, out=tmp)
    p32.sub_(tmp.mul_(lr / bias1))
    if p.dtype != torch.float32:
        p.copy_(p32)


def muon_update(grads: Tensor, params: Tensor, momentum_buffer: Tensor, second_moment: Tensor,
                momentum: Scalar, lr: Scalar, wd: Scalar, beta2: Scalar, ns_steps: int,
                red_dim: int, ns_dtype: torch.dtype = torch.bfloat16, muon_eq: bool = False,
                muon_plus: bool = False) -> None:
    """One Muon step on a stack of K same-shape matrices, `params` (K, rows, cols) in place.

    momentum_buffer: (K, rows, cols) fp32. second_moment: (K, rows, 1) when red_dim=-1
    (per-row statistics, rows >= cols) or (K, 1, cols) when red_dim=-2; fp32. `lr` already
    includes the shape scaling. muon_eq / muon_plus: equilibrate_rows before Polar Express,
    renormalize_frobenius after it.
    """
    # (written with in-place ops: two full-size fp32 temporaries besides Polar Express's)
    g = grads.float()
    # Nesterov momentum: the update looks one step ahead along the momentum
    momentum_buffer.lerp_(g, 1 - momentum)
    g = torch.lerp(g, momentum_buffer, momentum)
    if muon_eq:
        g = equilibrate_rows(g)
    u = polar_express(g, ns_steps, ns_dtype).float()
    del g
    if muon_plus:
        renormalize_frobenius(u)
    # NorMuon: divide each row (or column) by the RMS of its recent orthogonalised updates,
    # then rescale so the update keeps the Frobenius norm it had after orthogonalisation.
    n = u.size(red_dim)
    v_mean = u.norm(dim=red_dim, keepdim=True).square_().div_(n)            # (K, rows, 1) | (K, 1, cols)
    norm_before = (v_mean.sum(dim=(-2, -1), keepdim=True) * n).sqrt()       # (K, 1, 1)
    second_moment.lerp_(v_mean, 1 - beta2)
    scale = second_moment.clamp_min(1e-10).rsqrt()
    norm_after = (v_mean * n * scale.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    u.mul_(scale * (norm_before / norm_after.clamp_min(1e-10)))
    # Cautious weight decay: decay only the entries where the update has the same sign as
    # the weight (so the step already moves them toward zero):
    # p -= lr * (u + wd * p * [u * p >= 0])
    p32 = params.float()
    step = torch.mul(u, p32)
    torch.mul(p32, step >= 0, out=step)
    p32.sub_(step.mul_(wd).add_(u).mul_(lr))
    if params.dtype != torch.float32:
        params.copy_(p32)


# Eager CPU AdamW runs on blocks of rows of about this many elements: the update is
# elementwise, and on blocks its fp32 temporaries stay in cache (and below glibc's mmap
# threshold) instead of being page-faulted in at the size of a whole embedding table.
ADAMW_BLOCK_ELEMENTS = 1 << 18


def _row_blocks(p: Tensor, compiled: bool) -> list[Any]:
    """Indices that split `p` into blocks of whole rows (`...`: the whole tensor at once)."""
    if compiled or p.device.type != "cpu" or p.dim() == 0 or p.numel() <= ADAMW_BLOCK_ELEMENTS:
        return [...]
    rows = max(1, ADAMW_BLOCK_ELEMENTS // (p.numel() // p.size(0)))
    return [slice(r, r + rows) for r in range(0, p.size(0), rows)]


_COMPILED: dict[str, Callable[..., Any]] = {}


def _compiled(name: str) -> Callable[..., Any]:
    """The torch.compile'd version of a step function, created on first use (not import)."""
    if name not in _COMPILED:
        fn = {"adamw": adamw_update, "muon": muon_update}[name]
        log.info("torch.compile of the %s step (compiled once per parameter shape)", name)
        _COMPILED[name] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _COMPILED[name]


# -----------------------------------------------------------------------------
# Collectives

class _Pending:
    """A launched reduction; `wait()` returns this rank's averaged gradient (shard)."""

    def __init__(self, work: Any, result: Tensor, divide_by: int = 1, buffer: Tensor | None = None):
        self.work, self.result, self.divide_by = work, result, divide_by
        self.buffer = buffer  # the full reduction input, free for reuse once waited on

    def wait(self) -> Tensor:
        if self.work is not None:
            self.work.wait()
            self.work = None
            if self.divide_by != 1:
                self.result.div_(self.divide_by)
        return self.result


class _Comm:
    """The collectives the optimizer needs, on NCCL (reduce-scatter + AVG, all-gather into
    one tensor) or on anything else (all-reduce SUM + divide, list all-gather)."""

    def __init__(self, world_size: int, rank: int, fast: bool):
        self.world_size, self.rank, self.fast = world_size, rank, fast
        self._reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        self._all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

    def all_reduce_mean(self, t: Tensor) -> _Pending:
        if self.fast:
            return _Pending(dist.all_reduce(t, op=dist.ReduceOp.AVG, async_op=True), t)
        return _Pending(dist.all_reduce(t, op=dist.ReduceOp.SUM, async_op=True), t, self.world_size)

    def reduce_scatter_mean(self, full: Tensor) -> _Pending:
        """Average `full` (world_size * n, ...) across ranks; this rank gets rows [rank*n, (rank+1)*n)."""
        n = full.size(0) // self.world_size
        if self.fast:
            out = torch.empty_like(full[:n])
            return _Pending(self._reduce_scatter(out, full, op=dist.ReduceOp.AVG, async_op=True), out, buffer=full)
        work = dist.all_reduce(full, op=dist.ReduceOp.SUM, async_op=True)
        return _Pending(work, full[self.rank * n:(self.rank + 1) * n], self.world_size, buffer=full)

    def all_gather(self, full: Tensor, shard: Tensor) -> Any:
        """Fill `full` (world_size * n, ...) with every rank's `shard` (n, ...); returns the work."""
        if self.fast:
            return self._all_gather_single(full, shard, async_op=True)
        # gloo: the input must not alias an output slot, hence the clone
        return dist.all_gather(list(full.chunk(self.world_size)), shard.clone(), async_op=True)


# -----------------------------------------------------------------------------
# The optimizer

class MuonAdamW(torch.optim.Optimizer):
    """Muon for the matrix groups and AdamW for the others; see the module docstring.

    param_groups: dicts with `params` and `kind`:
      kind="adamw": lr, betas=(beta1, beta2), eps, weight_decay
      kind="muon":  lr, momentum, ns_steps (1..5), beta2 (None: no averaging), weight_decay;
                    all params of the group have the same shape (2-D or more).
    compile: torch.compile the step functions (None: only when the params are on CUDA).
    ns_dtype: dtype of the Polar Express matmuls (bf16 as in the reference; fp32 is slower
      and slightly more exact).
    fast_collectives: use reduce-scatter/AVG (None: on the NCCL backend only).
    shard_min_numel: AdamW params smaller than this are all-reduced, not sharded.
    muon_eq, muon_plus: MuonEq row equilibration and Muon+ renormalisation in the Muon step
      (both off: the reference's step).
    Extra keys in a group (e.g. initial_lr) are kept and saved with the state.
    """

    def __init__(self, param_groups: Iterable[dict], *, compile: bool | None = None,
                 ns_dtype: torch.dtype = torch.bfloat16, fast_collectives: bool | None = None,
                 shard_min_numel: int = 1024, muon_eq: bool = False, muon_plus: bool = False):
        super().__init__(list(param_groups), defaults={})  # groups are checked in add_param_group
        self.ns_dtype = ns_dtype
        self.muon_eq, self.muon_plus = muon_eq, muon_plus
        self.shard_min_numel = shard_min_numel
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
            if fast_collectives is None:
                fast_collectives = dist.get_backend() == "nccl"
            self._comm: _Comm | None = _Comm(self.world_size, self.rank, fast_collectives)
        else:
            self.world_size, self.rank, self._comm = 1, 0, None
        if compile is None:
            compile = any(p.is_cuda for g in self.param_groups for p in g["params"])
        self.use_compile = compile
        # 0-D CPU tensors carry the hyperparameters into compiled code, so changing a value
        # (the LR schedule) refills a tensor instead of triggering a recompile.
        self._scalars: dict[str, Tensor] = {}

    # --- helpers ---------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        group = dict(param_group)
        params = group.get("params", [])
        group["params"] = [params] if isinstance(params, Tensor) else list(params)
        _validate_group(len(self.param_groups), group)
        super().add_param_group(group)

    def _scalar(self, name: str, value: float) -> Scalar:
        if not self.use_compile:
            return float(value)
        t = self._scalars.get(name)
        if t is None:
            t = self._scalars[name] = torch.tensor(0.0, dtype=torch.float32)
        return t.fill_(value)

    def _fn(self, name: str) -> Callable[..., Any]:
        if self.use_compile:
            return _compiled(name)
        return adamw_update if name == "adamw" else muon_update

    def _adamw_sharded(self, p: Tensor) -> bool:
        return (self.world_size > 1 and p.numel() >= self.shard_min_numel
                and p.shape[0] % self.world_size == 0)

    def _muon_chunk(self, num_params: int) -> int:
        return -(-num_params // self.world_size)

    def _grad(self, p: Tensor) -> Tensor | None:
        # Under data parallelism every rank must join every collective, so a missing
        # gradient counts as zero there; alone, a param without gradient is skipped.
        if p.grad is None and self.world_size > 1:
            return torch.zeros_like(p)
        return p.grad

    def _check_world(self) -> None:
        now = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if now != self.world_size:
            raise ValueError(
                f"MuonAdamW was built for world size {self.world_size} but torch.distributed now has "
                f"{now} ranks; build the optimizer after init_process_group (and rebuild it if the group changes)")

    # --- step ------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_world()
        # Phase 1: launch every reduction; phase 2: per group, wait for its reduction,
        # update, launch its gather; phase 3: wait for the gathers and copy back.
        launched = [self._launch(group) for group in self.param_groups]
        finishers: list[Callable[[], None]] = []
        for group, pending in zip(self.param_groups, launched):
            if group["kind"] == "adamw":
                self._update_adamw(group, pending, finishers)
            else:
                self._update_muon(group, pending, finishers)
        for finish in finishers:
            finish()
        return loss

    def _launch(self, group: dict) -> Any:
        if group["kind"] == "adamw":
            return [self._launch_adamw_param(p) for p in group["params"]]
        return self._launch_muon(group)

    def _launch_adamw_param(self, p: Tensor) -> _Pending | None:
        grad = self._grad(p)
        if grad is None:
            return None
        if self._comm is None:
            return _Pending(None, grad)
        if self._adamw_sharded(p):
            return self._comm.reduce_scatter_mean(grad)
        return self._comm.all_reduce_mean(grad)

    def _update_adamw(self, group: dict, pendings: list, finishers: list) -> None:
        fn = self._fn("adamw")
        beta1, beta2 = group["betas"]
        for p, pending in zip(group["params"], pendings):
            if pending is None:
                continue
            grad = pending.wait()
            sharded = self._adamw_sharded(p)
            if sharded:
                rows = p.shape[0] // self.world_size
                target = p[self.rank * rows:(self.rank + 1) * rows]
            else:
                target = p
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros(target.shape, dtype=torch.float32, device=p.device)
                state["exp_avg_sq"] = torch.zeros(target.shape, dtype=torch.float32, device=p.device)
            state["step"] += 1
            hyper = (self._scalar("adamw_step", state["step"]), self._scalar("adamw_lr", group["lr"]),
                     self._scalar("adamw_beta1", beta1), self._scalar("adamw_beta2", beta2),
                     self._scalar("adamw_eps", group["eps"]), self._scalar("adamw_wd", group["weight_decay"]))
            for rows in _row_blocks(target, self.use_compile):
                fn(target[rows], grad[rows], state["exp_avg"][rows], state["exp_avg_sq"][rows], *hyper)
            if sharded:
                work = self._comm.all_gather(p, target)
                finishers.append(work.wait)

    def _launch_muon(self, group: dict) -> _Pending | None:
        params = group["params"]
        if not params:
            return None
        grads = [self._grad(p) for p in params]
        if all(g is None for g in grads):
            return None
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        if self._comm is None:
            return _Pending(None, torch.stack(grads))
        chunk = self._muon_chunk(len(params))
        p0 = params[0]
        stacked = torch.zeros(chunk * self.world_size, *p0.shape, dtype=grads[0].dtype, device=p0.device)
        torch.stack(grads, out=stacked[:len(params)])
        return self._comm.reduce_scatter_mean(stacked)

    def _update_muon(self, group: dict, pending: _Pending | None, finishers: list) -> None:
        if pending is None:
            return
        params = group["params"]
        grads = pending.wait()                             # (chunk, rows, cols), averaged
        p0 = params[0]
        chunk = grads.size(0)
        start = self.rank * chunk
        owned = params[start:start + chunk]                # may be empty on the last ranks
        rows, cols = p0.shape[-2], p0.shape[-1]
        red_dim = -1 if rows >= cols else -2
        state = self.state[p0]
        if not state:
            state["momentum_buffer"] = torch.zeros(chunk, *p0.shape, dtype=torch.float32, device=p0.device)
            moment_shape = (chunk, *p0.shape[:-2], rows, 1) if red_dim == -1 else (chunk, *p0.shape[:-2], 1, cols)
            state["second_momentum_buffer"] = torch.zeros(moment_shape, dtype=torch.float32, device=p0.device)
        stacked = torch.stack(owned) if owned else None
        if owned:
            n = len(owned)
            beta2 = group["beta2"] if group["beta2"] is not None else 0.0
            # Muon's update has RMS ~ 1/sqrt(max(rows, cols)); tall matrices get a larger step
            lr = group["lr"] * math.sqrt(max(1.0, rows / cols))
            self._fn("muon")(
                grads[:n], stacked, state["momentum_buffer"][:n], state["second_momentum_buffer"][:n],
                self._scalar("muon_momentum", group["momentum"]), self._scalar("muon_lr", lr),
                self._scalar("muon_wd", group["weight_decay"]), self._scalar("muon_beta2", beta2),
                group["ns_steps"], red_dim, self.ns_dtype, self.muon_eq, self.muon_plus)
        if self._comm is None:
            torch._foreach_copy_(params, list(stacked.unbind(0)))
            return
        mine = torch.zeros(chunk, *p0.shape, dtype=p0.dtype, device=p0.device)
        if owned:
            mine[:len(owned)].copy_(stacked)
        # the stacked gradients are consumed: reuse their buffer for the gathered params
        full = pending.buffer
        if full is None or full.dtype != p0.dtype:
            full = torch.empty(chunk * self.world_size, *p0.shape, dtype=p0.dtype, device=p0.device)
        work = self._comm.all_gather(full, mine)

        def finish() -> None:
            work.wait()
            torch._foreach_copy_(params, list(full[:len(params)].unbind(0)))
        finishers.append(finish)

    # --- state -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["sharding"] = {"world_size": self.world_size, "rank": self.rank}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by `state_dict()` on the same rank and world size (or by the
        reference nanochat's MuonAdamW/DistMuonAdamW). Tensors are copied onto each
        param's device; moment buffers become fp32."""
        saved_groups = state_dict.get("param_groups")
        saved_state = state_dict.get("state")
        if saved_groups is None or saved_state is None:
            raise ValueError("not an optimizer state dict (no 'param_groups'/'state'); pass optimizer.state_dict() output")
        sharding = state_dict.get("sharding")
        if sharding is not None and sharding.get("world_size") != self.world_size:
            raise UserError(
                f"this optimizer state was saved by rank {sharding.get('rank')} of {sharding.get('world_size')} "
                f"ranks but this run has {self.world_size}; resume with the same number of processes")
        if len(saved_groups) != len(self.param_groups):
            raise UserError(f"the saved optimizer has {len(saved_groups)} param groups, this one has "
                            f"{len(self.param_groups)}: the model or its optimizer setup changed since the save")
        index: dict[int, Tensor] = {}
        for i, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(group["params"]) or saved.get("kind", group["kind"]) != group["kind"]:
                raise UserError(f"param group {i} does not match the saved one ({saved.get('kind')} with "
                                f"{len(saved['params'])} params vs {group['kind']} with {len(group['params'])})")
            index.update(zip(saved["params"], group["params"]))
        new_state: defaultdict[Tensor, dict] = defaultdict(dict)
        for key, values in saved_state.items():
            if key not in index:
                raise UserError(f"the saved optimizer state refers to parameter #{key}, which this optimizer lacks")
            p = index[key]
            new_state[p] = {k: _restore_value(k, v, p) for k, v in values.items()}
        self._check_state_shapes(new_state)
        self.state = new_state
        for group, saved in zip(self.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})

    def _check_state_shapes(self, state: dict) -> None:
        for group in self.param_groups:
            for j, p in enumerate(group["params"]):
                s = state.get(p)
                if not s:
                    continue
                if group["kind"] == "adamw":
                    rows = p.shape[0] // self.world_size if self._adamw_sharded(p) else p.shape[0]
                    expected = {"exp_avg": (rows, *p.shape[1:]), "exp_avg_sq": (rows, *p.shape[1:])}
                elif j == 0:
                    chunk = self._muon_chunk(len(group["params"]))
                    expected = {"momentum_buffer": (chunk, *p.shape)}
                else:
                    expected = {}
                for k, shape in expected.items():
                    if k in s and tuple(s[k].shape) != tuple(shape):
                        raise UserError(
                            f"saved optimizer state {k!r} has shape {tuple(s[k].shape)} but this optimizer expects "
                            f"{tuple(shape)}: it was saved with another world size or model shape; resume with "
                            f"the original number of processes and model flags")


def _restore_value(key: str, value: Any, p: Tensor) -> Any:
    if key == "step":
        return int(value.item()) if isinstance(value, Tensor) else int(value)
    if isinstance(value, Tensor):
        dtype = torch.float32 if value.is_floating_point() else value.dtype
        return value.to(device=p.device, dtype=dtype, copy=True)
    return value


def _validate_group(i: int, group: dict) -> None:
    kind = group.get("kind")
    if kind not in ("adamw", "muon"):
        raise ValueError(f"param group {i} has kind={kind!r}; set kind to 'adamw' or 'muon'")
    keys = _ADAMW_KEYS if kind == "adamw" else _MUON_KEYS
    missing = [k for k in keys if k not in group]
    if missing:
        raise ValueError(f"param group {i} (kind={kind}) lacks {missing}; every {kind} group needs {list(keys)}")
    if group["lr"] < 0 or group["weight_decay"] < 0:
        raise ValueError(f"param group {i}: lr and weight_decay must be >= 0 (got {group['lr']}, {group['weight_decay']})")
    if kind == "adamw":
        if len(group["betas"]) != 2 or not all(0 <= b < 1 for b in group["betas"]):
            raise ValueError(f"param group {i}: betas must be two numbers in [0, 1), got {group['betas']}")
        return
    if not (isinstance(group["ns_steps"], int) and 1 <= group["ns_steps"] <= len(POLAR_EXPRESS_COEFFS)):
        raise ValueError(f"param group {i}: ns_steps must be an int in 1..{len(POLAR_EXPRESS_COEFFS)}, got {group['ns_steps']!r}")
    if not 0 <= group["momentum"] < 1:
        raise ValueError(f"param group {i}: momentum must be in [0, 1), got {group['momentum']}")
    if group["beta2"] is not None and not 0 <= group["beta2"] < 1:
        raise ValueError(f"param group {i}: beta2 must be None or in [0, 1), got {group['beta2']}")
    shapes = {tuple(p.shape) for p in group["params"]}
    if len(shapes) > 1:
        raise ValueError(f"muon param group {i} mixes shapes {sorted(shapes)}; make one muon group per shape")
    if shapes and len(next(iter(shapes))) < 2:
        raise ValueError(f"muon param group {i} holds {len(next(iter(shapes)))}-D params; Muon needs matrices, "
                         "put vectors and scalars in an adamw group")
