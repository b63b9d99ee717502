"""nanochat.attention: the SDPA path against a naive attention with an explicit mask,
the KV cache (prefill, chunked prefill, decode past the window, batch spreading), the
mask sharing, and backend selection. FA3 comparisons run only on a Hopper GPU."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from nanochat import attention
from nanochat.attention import KVCache, attend, causal_window_mask, fa3_available, set_backend
from nanochat.errors import UserError


def naive_attention(q, k, v, window):
    """Reference: softmax(q k^T / sqrt(D) + mask) v with every head's K/V repeated and
    an explicit (T, T) mask; q, k, v in (B, T, H, D), queries = all T positions."""
    B, T, H, D = q.shape
    rep = H // k.size(2)
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(D)
    i = torch.arange(T).unsqueeze(1)
    j = torch.arange(T).unsqueeze(0)
    allowed = j <= i
    if window >= 0:
        allowed &= j >= i - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double()).to(q.dtype)


def qkv(B=2, T=40, H=4, Hkv=2, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, H, D, generator=g, dtype=dtype), torch.randn(B, T, Hkv, D, generator=g, dtype=dtype),
            torch.randn(B, T, Hkv, D, generator=g, dtype=dtype))


@pytest.fixture(autouse=True)
def sdpa_backend():
    previous = set_backend("auto")
    yield
    set_backend(previous)


@pytest.mark.parametrize("window", [-1, 0, 1, 7, 38, 39, 100])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
def test_sdpa_matches_naive_attention(window, heads):
    q, k, v = qkv(H=heads[0], Hkv=heads[1])
    y = attend(q, k, v, window, masks={})
    torch.testing.assert_close(y, naive_attention(q, k, v, window), atol=1e-5, rtol=1e-5)


def test_sdpa_gradients_match_naive():
    q, k, v = (t.requires_grad_() for t in qkv(T=24))
    attend(q, k, v, 5).square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    naive_attention(q, k, v, 5).square().sum().backward()
    for got, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(got, t.grad, atol=1e-4, rtol=1e-4)


def test_one_mask_per_shape_and_none_when_causal_suffices():
    q, k, v = qkv(T=32)
    masks: dict = {}
    for window in (8, 8, 8, 31, -1, 1000):  # three short layers, then windows covering the sequence
        attend(q, k, v, window, masks=masks)
    assert list(masks) == [(32, 32, 8)]
    torch.testing.assert_close(masks[(32, 32, 8)], causal_window_mask(32, 32, 8, q.device))


def test_kv_cache_prefill_chunk_and_decode_past_the_window():
    """Prefill 12 tokens, add a chunk of 9 at position 12, then decode one at a time to
    40: each step equals the matching rows of full attention (window 6, GQA)."""
    B, T, H, Hkv, D, window = 2, 40, 4, 2, 16, 6
    q, k, v = qkv(B, T, H, Hkv, D)
    full = naive_attention(q, k, v, window)
    cache = KVCache(B, Hkv, T, D, num_layers=2, device="cpu", dtype=torch.float32)
    layer = 1
    masks: dict = {}
    out = [attend(q[:, :12], k[:, :12], v[:, :12], window, cache, layer, masks)]
    cache.advance(12)
    out.append(attend(q[:, 12:21], k[:, 12:21], v[:, 12:21], window, cache, layer, masks))
    cache.advance(9)
    decode_masks: dict = {}
    for t in range(21, T):
        out.append(attend(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], window, cache, layer, decode_masks))
        cache.advance(1)
    assert decode_masks == {}  # decoding slices the cache instead of masking
    torch.testing.assert_close(torch.cat(out, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.get_pos() == T
    k_layer, _ = cache.get_layer_cache(layer)
    torch.testing.assert_close(k_layer, k)
    assert cache.get_layer_cache(0)[0].abs().sum() == 0  # other layers untouched


def test_kv_cache_bf16_on_cpu():
    q, k, v = qkv(T=10, dtype=torch.bfloat16)
    cache = KVCache(2, 2, 16, 16, 1, "cpu", torch.bfloat16)
    y = attend(q, k, v, -1, cache, 0)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    full = naive_attention(q.float(), k.float(), v.float(), -1)
    torch.testing.assert_close(y.float(), full, atol=3e-2, rtol=3e-2)


def test_kv_cache_api_and_errors():
    cache = KVCache(batch_size=1, num_heads=2, seq_len=8, head_dim=4, num_layers=3, device="cpu", dtype=torch.float32)
    assert cache.k_cache.shape == (3, 1, 8, 2, 4) and cache.cache_seqlens.dtype == torch.int32
    cache.k_cache[:, :, :5] = torch.randn(3, 1, 5, 2, 4)
    cache.v_cache[:, :, :5] = torch.randn(3, 1, 5, 2, 4)
    cache.prev_embedding = torch.randn(1, 1, 6)
    cache.advance(5)
    assert cache.get_pos() == 5

    wide = KVCache(3, 2, 12, 4, 3, "cpu", torch.float32)
    wide.prefill(cache)
    assert wide.get_pos() == 5 and wide.cache_seqlens.tolist() == [5, 5, 5]
    for row in range(3):
        torch.testing.assert_close(wide.k_cache[:, row, :5], cache.k_cache[:, 0, :5])
        torch.testing.assert_close(wide.v_cache[:, row, :5], cache.v_cache[:, 0, :5])
    assert wide.prev_embedding.shape == (3, 1, 6)
    torch.testing.assert_close(wide.prev_embedding[2], cache.prev_embedding[0])
    with pytest.raises(ValueError, match="empty cache"):
        wide.prefill(cache)
    wide.advance(2)  # the position is kept as an int and in the tensor FA3 reads: the two agree
    assert wide.get_pos() == 7 and wide.cache_seqlens.tolist() == [7, 7, 7]
    wide.reset()
    assert wide.get_pos() == 0 and wide.prev_embedding is None and wide.cache_seqlens.tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="shapes differ"):
        KVCache(3, 1, 12, 4, 3, "cpu", torch.float32).prefill(cache)

    q, k, v = qkv(B=1, T=4, H=2, Hkv=2, D=4)
    with pytest.raises(ValueError, match="dtype=model.compute_dtype"):
        attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), -1, cache, 0)
    with pytest.raises(ValueError, match="do not fit"):
        attend(q, k, v, -1, cache, 0)  # 5 used + 4 > 8


def test_backend_selection_on_cpu(caplog):
    with pytest.raises(ValueError):
        set_backend("flash")
    q, k, v = qkv(T=8)
    attention._logged.clear()
    attention._decided.clear()  # forget earlier decisions, so this one is made (and logged) here
    with caplog.at_level(logging.INFO, logger="nanochat.attention"):
        attend(q, k, v, -1)
        attend(q, k, v, -1)
    assert [r.getMessage() for r in caplog.records].count(
        "attention: PyTorch SDPA (FA3 needs a Hopper GPU; tensors are on cpu)") == 1
    if not fa3_available():
        set_backend("fa3")
        with pytest.raises(UserError, match="FA3 is unavailable"):
            attend(q, k, v, -1)


@pytest.mark.skipif(not torch.cuda.is_available() or not fa3_available(), reason="needs Flash Attention 3 (Hopper GPU)")
def test_fa3_matches_sdpa_on_gpu():
    B, T, H, Hkv, D, window = 2, 256, 8, 2, 64, 48
    q, k, v = (t.cuda() for t in qkv(B, T, H, Hkv, D, dtype=torch.bfloat16))
    outputs = {}
    for backend in ("fa3", "sdpa"):
        set_backend(backend)
        train = attend(q, k, v, window)
        cache = KVCache(B, Hkv, T, D, 1, "cuda", torch.bfloat16)
        steps = [attend(q[:, :200], k[:, :200], v[:, :200], window, cache, 0)]
        cache.advance(200)
        for t in range(200, T):
            steps.append(attend(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], window, cache, 0))
            cache.advance(1)
        outputs[backend] = (train, torch.cat(steps, dim=1))
    for a, b in zip(outputs["fa3"], outputs["sdpa"]):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("capability, repo", [((9, 0), attention.FA3_HOPPER_KERNEL),
                                              ((8, 0), attention.FA3_COMMUNITY_KERNEL),
                                              ((8, 9), attention.FA3_COMMUNITY_KERNEL),
                                              ((10, 0), None), ((12, 0), None), ((7, 5), None)])
def test_fa3_build_chosen_per_compute_capability(monkeypatch, capability, repo):
    """Which FA3 build loads where, with the `kernels` package and the GPU faked: the
    lookup asks for exactly the chosen build, or for none, and says why."""
    import sys
    import types

    asked = []

    class Interface:
        @staticmethod
        def flash_attn_func(*args, **kwargs):
            raise AssertionError("not called in this test")

    def get_kernel(name):
        asked.append(name)
        # the Hopper build nests the API in flash_attn_interface; the community one does not
        return types.SimpleNamespace(flash_attn_interface=Interface) if name == attention.FA3_HOPPER_KERNEL else Interface

    monkeypatch.setitem(sys.modules, "kernels", types.SimpleNamespace(get_kernel=get_kernel))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    module, why = attention._lookup_fa3()
    assert asked == ([repo] if repo else [])
    assert (module is Interface) == (repo is not None)
    assert f"SM{capability[0]}{capability[1]}" in why
    if repo:
        assert why.startswith(f"loaded {repo}")

    monkeypatch.setitem(sys.modules, "kernels", None)  # the package is not installed: import fails
    module, why = attention._lookup_fa3()
    assert module is None
    if repo:
        assert "pip install 'nanochat[gpu]'" in why


@pytest.mark.parametrize("layout", ["bthd", "bhtd"])
def test_both_cache_layouts_decode_like_full_attention(layout):
    B, T, H, Hkv, D, window = 2, 30, 4, 2, 16, 9
    q, k, v = qkv(B, T, H, Hkv, D, seed=3)
    full = naive_attention(q, k, v, window)
    cache = KVCache(B, Hkv, T, D, num_layers=1, device="cpu", dtype=torch.float32, layout=layout)
    shape = (1, B, T, Hkv, D) if layout == "bthd" else (1, B, Hkv, T, D)
    assert cache.k_cache.shape == shape and cache.max_seq_len == T
    out = [attend(q[:, :11], k[:, :11], v[:, :11], window, cache, 0)]
    cache.advance(11)
    for t in range(11, T):
        out.append(attend(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], window, cache, 0))
        cache.advance(1)
    torch.testing.assert_close(torch.cat(out, dim=1), full, atol=1e-5, rtol=1e-5)
    keys, _ = cache.heads_view(0, T)
    torch.testing.assert_close(keys, k.transpose(1, 2))


@pytest.mark.parametrize("window", [-1, 25, 12, 3])
def test_rows_sharing_a_prompt_attend_like_full_attention(window):
    """Three rows continue one 20-token prompt kept once (a batch-1 prefix cache): each
    decoded token equals full attention over its own row, for windows that cover
    everything, reach into the prompt, or stay inside the row's own keys."""
    B, P, T, H, Hkv, D = 3, 20, 32, 4, 2, 16
    q, k, v = qkv(B, T, H, Hkv, D, seed=5)
    k[:, :P], v[:, :P] = k[:1, :P].clone(), v[:1, :P].clone()  # every row starts with the same prompt
    full = naive_attention(q, k, v, window)
    prompt = KVCache(1, Hkv, P, D, num_layers=2, device="cpu", dtype=torch.float32, layout="bhtd")
    attend(q[:1, :P], k[:1, :P], v[:1, :P], window, prompt, 1)
    prompt.advance(P)
    rows = KVCache(B, Hkv, T - P, D, num_layers=2, device="cpu", dtype=torch.float32, layout="bhtd", prefix=prompt)
    assert rows.get_pos() == P and rows.max_seq_len == T and rows.k_cache.shape == (2, B, Hkv, T - P, D)
    out = []
    for t in range(P, T):
        out.append(attend(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], window, rows, 1))
        rows.advance(1)
    torch.testing.assert_close(torch.cat(out, dim=1), full[:, P:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        attend(q[:, :1], k[:, :1], v[:, :1], window, rows, 1)


def test_shared_prefix_several_tokens_and_misuse():
    B, P, H, Hkv, D = 2, 6, 2, 2, 8
    q, k, v = qkv(B, 10, H, Hkv, D, seed=9)
    k[:, :P], v[:, :P] = k[:1, :P].clone(), v[:1, :P].clone()
    prompt = KVCache(1, Hkv, P, D, 1, "cpu", torch.float32, layout="bhtd")
    attend(q[:1, :P], k[:1, :P], v[:1, :P], -1, prompt, 0)
    prompt.advance(P)
    rows = KVCache(B, Hkv, 4, D, 1, "cpu", torch.float32, layout="bhtd", prefix=prompt)
    y = attend(q[:, P:], k[:, P:], v[:, P:], -1, rows, 0)  # a 4-token chunk after the shared prompt
    torch.testing.assert_close(y, naive_attention(q, k, v, -1)[:, P:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="layout 'bhtd'"):
        KVCache(B, Hkv, 4, D, 1, "cpu", torch.float32, layout="bthd", prefix=prompt)
    with pytest.raises(ValueError, match="batch-1"):
        KVCache(B, Hkv, 4, D, 1, "cpu", torch.float32, layout="bhtd", prefix=rows)
    with pytest.raises(ValueError, match="layout"):
        KVCache(B, Hkv, 4, D, 1, "cpu", torch.float32, layout="thbd")
    with pytest.raises(ValueError, match="empty cache"):
        rows.prefill(prompt)
    rows.reset()
    assert rows.prefix is None and rows.get_pos() == 0
