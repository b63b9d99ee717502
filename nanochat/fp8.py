"""
Optional fp8 training matmuls for H100-class GPUs (compute capability 8.9 or newer).

`convert_to_fp8(model, recipe)` swaps the model's eligible linear layers for fp8 ones,
in place, sharing their weights (no copy). Two implementations:

- torchao's `Float8Linear` when `torchao` is installed (recipes "tensorwise" and
  "rowwise");
- otherwise the small one in this file (recipe "tensorwise" only): each of a linear
  layer's three GEMMs (forward y = x W^T; backward dx = dy W, dW = dy^T x) quantizes its
  operands with one dynamic scale per tensor, amax -> the format's largest finite value,
  and runs `torch._scaled_mm`, which applies the inverse scales and returns bf16/fp32.
  Inputs and weights use e4m3 (more mantissa), gradients e5m2 (more range), as in
  Micikevicius et al. 2022, "FP8 Formats for Deep Learning", https://arxiv.org/abs/2209.05433.
  The forward GEMM accumulates fast (lower precision); the backward ones do not.

Eligible layers (as the reference): nn.Linear with both dimensions divisible by 16 (an
fp8 GEMM requirement) and at least 128 (smaller GEMMs lose more to quantization than
they gain). The head qualifies; it runs in fp8 wherever the model calls it as a module
(the plain loss used on CUDA, and logits), while the chunked loss reads its weight
directly and stays in the compute dtype.

`disable_fp8(model)` temporarily puts plain linear layers back (same weights), for
evaluation in the compute dtype.

This module is imported only when fp8 is requested; it needs a CUDA build of PyTorch to
be useful. Its own matmul runs wherever `torch._scaled_mm` does, which lets the tests
check its numerics on CPU through `_convert_local`.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

import torch
import torch.nn as nn
from torch import Tensor

from nanochat.errors import UserError

log = logging.getLogger("nanochat.fp8")

RECIPES = ("tensorwise", "rowwise")
_AMAX_FLOOR = 1e-12  # an all-zero tensor gets a finite scale


# -----------------------------------------------------------------------------
# Quantization and the three GEMMs

@torch.no_grad()
def quantize(x: Tensor, fp8_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(x in fp8, inverse scale) with one scale for the whole tensor: x * scale maps
    max|x| to the format's largest finite value. Values are clamped (saturated) before
    the cast, because a plain cast overflows to inf/nan."""
    top = torch.finfo(fp8_dtype).max
    amax = x.abs().max().double().clamp(min=_AMAX_FLOOR)  # double: identical in eager and compiled code
    scale = (top / amax).float()
    q = (x.float() * scale).clamp(-top, top).to(fp8_dtype)
    return q, scale.reciprocal()


def _column_major(x: Tensor) -> Tensor:
    """Same values and shape, column-major strides (what _scaled_mm wants for its 2nd operand)."""
    return x.t().contiguous().t()


class _Fp8Matmul(torch.autograd.Function):
    """y = x @ w^T with x: (M, K) in the compute dtype, w: (N, K) master weight."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:
        x8, x_inv = quantize(x, torch.float8_e4m3fn)
        w8, w_inv = quantize(w, torch.float8_e4m3fn)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.w_dtype = w.dtype
        # w8 is (N, K) row-major, so its transpose is already column-major
        return torch._scaled_mm(x8, w8.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=x.dtype, use_fast_accum=True)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, Tensor]:
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        dy8, dy_inv = quantize(dy, torch.float8_e5m2)
        dx = torch._scaled_mm(dy8, _column_major(w8), scale_a=dy_inv, scale_b=w_inv,
                              out_dtype=dy.dtype, use_fast_accum=False)  # (M, N) @ (N, K)
        dw = torch._scaled_mm(dy8.t().contiguous(), _column_major(x8), scale_a=dy_inv, scale_b=x_inv,
                              out_dtype=dy.dtype, use_fast_accum=False)  # (N, M) @ (M, K)
        return dx, dw.to(ctx.w_dtype)


# torch.compile keeps the function as one opaque node instead of tracing into it
_Fp8Matmul = torch.compiler.allow_in_graph(_Fp8Matmul)


class Float8Linear(nn.Linear):
    """A linear layer whose three GEMMs run in fp8 (tensorwise scaling); the weight
    (and bias) stay in their master dtype."""

    def forward(self, x: Tensor) -> Tensor:
        y = _Fp8Matmul.apply(x.reshape(-1, x.size(-1)), self.weight)
        y = y.reshape(*x.shape[:-1], y.size(-1))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @classmethod
    def wrap(cls, linear: nn.Linear) -> Float8Linear:
        """A Float8Linear holding `linear`'s own parameters (declared on meta, so the
        shell allocates nothing)."""
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=False)
        new.weight = linear.weight
        new.bias = linear.bias
        return new


# -----------------------------------------------------------------------------
# Converting a model

def default_filter(module: nn.Module, fqn: str) -> bool:
    """Linear layers worth fp8: both dims multiples of 16 and at least 128."""
    if not isinstance(module, nn.Linear):
        return False
    dims = (module.in_features, module.out_features)
    return all(d % 16 == 0 for d in dims) and min(dims) >= 128


def _swap_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module],
                  keep: Callable[[nn.Module, str], bool]) -> int:
    count = 0
    for fqn, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not isinstance(module, Float8Linear) and keep(module, fqn):
            parent_name, _, attr = fqn.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, make(module))
            count += 1
    return count


def _check_device(model: nn.Module) -> None:
    try:
        device = next(model.parameters()).device
    except StopIteration:
        raise ValueError("the model has no parameters to convert to fp8") from None
    if device.type != "cuda":
        raise UserError(f"fp8 training needs a CUDA GPU of the H100 class; the model is on {device.type}. "
                        "Drop --fp8 on this machine.")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise UserError(f"fp8 matmuls need compute capability 8.9 or newer (Ada, Hopper); this GPU is "
                        f"{major}.{minor}. Drop --fp8 on this machine.")


def _torchao_available() -> bool:
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return False
    return True


def _convert_local(model: nn.Module, module_filter: Callable[[nn.Module, str], bool] = default_filter) -> int:
    """Swap eligible linears for this file's Float8Linear (no device check)."""
    return _swap_linears(model, Float8Linear.wrap, module_filter)


def convert_to_fp8(model: nn.Module, recipe: str = "tensorwise", *, backend: str = "auto",
                   module_filter: Callable[[nn.Module, str], bool] = default_filter) -> int:
    """Convert `model`'s eligible linear layers to fp8 in place; returns how many.

    recipe: "tensorwise" (one scale per tensor; fastest) or "rowwise" (a scale per row;
      more accurate, needs torchao).
    backend: "auto" (torchao if installed, else ours), "torchao" or "nanochat".
    Call it before torch.compile; the optimizer may be built before or after (the
    parameters are shared, not replaced).
    """
    if recipe not in RECIPES:
        raise UserError(f"fp8 recipe {recipe!r} is not one of {RECIPES}")
    if backend not in ("auto", "torchao", "nanochat"):
        raise UserError(f"fp8 backend {backend!r} is not one of auto, torchao, nanochat")
    _check_device(model)
    use_torchao = backend == "torchao" or (backend == "auto" and _torchao_available())
    if use_torchao:
        if not _torchao_available():
            raise UserError("fp8 backend 'torchao' needs the torchao package: pip install torchao")
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
        before = sum(isinstance(m, nn.Linear) for m in model.modules())
        convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe),
                                   module_filter_fn=module_filter)
        count = sum("Float8" in type(m).__name__ for m in model.modules())
        log.info("fp8 (torchao, %s): %d of %d linear layers converted", recipe, count, before)
        return count
    if recipe != "tensorwise":
        raise UserError(f"fp8 recipe {recipe!r} needs torchao (pip install torchao); "
                        "the built-in implementation does 'tensorwise' only")
    count = _convert_local(model, module_filter)
    log.info("fp8 (built-in, tensorwise): %d linear layers converted", count)
    return count


@contextlib.contextmanager
def disable_fp8(model: nn.Module) -> Iterator[None]:
    """Within the block, fp8 layers (ours or torchao's) are replaced by the model's
    compute-dtype Linear over the same parameters; they are put back afterwards."""
    from nanochat.gpt import Linear
    swapped = []
    for fqn, module in list(model.named_modules()):
        if "Float8" in type(module).__name__ and isinstance(module, nn.Linear):
            parent_name, _, attr = fqn.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            with torch.device("meta"):
                plain = Linear(module.in_features, module.out_features, bias=False)
            plain.weight, plain.bias = module.weight, module.bias
            setattr(parent, attr, plain)
            swapped.append((parent, attr, module))
    try:
        yield
    finally:
        for parent, attr, module in swapped:
            setattr(parent, attr, module)

