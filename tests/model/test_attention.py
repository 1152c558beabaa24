"""Packed causal attention: every backend against an independent per-document reference, the
backend routing, and RoPE on the packed tensor against megatron-core's own RoPE."""

import pytest
import torch

from pretrain.model import attention as attn
from pretrain.model.attention import (
    PackedAttentionParams, apply_rope, packed_causal_attention, select_attention_backend,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def naive_document_attention(q, k, v, cu_seqlens, hidden=None):
    """Each document alone, plain softmax: query i sees keys j <= i of its document that are not
    hidden, and itself. fp64 accumulation. (Not the code under test.)"""
    out = torch.zeros_like(q, dtype=torch.float64)
    groups = q.shape[1] // k.shape[1]
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        for i in range(s, e):
            keys = [j for j in range(s, i + 1) if j == i or hidden is None or not hidden[j]]
            for h in range(q.shape[1]):
                scores = torch.stack([q[i, h].double() @ k[j, h // groups].double() for j in keys]) / q.shape[2] ** 0.5
                out[i, h] = scores.softmax(0) @ torch.stack([v[j, h // groups].double() for j in keys])
    return out


def dense_reference(q, k, v, cu_seqlens, hidden=None):
    """Plain softmax attention over all T tokens with a block-diagonal causal mask built in full."""
    total, heads, dim = q.shape
    doc = torch.zeros(total, dtype=torch.long)
    for i, (s, e) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        doc[s:e] = i
    allowed = (doc[:, None] == doc[None, :]) & (torch.arange(total)[None, :] <= torch.arange(total)[:, None])
    if hidden is not None:
        allowed &= ~hidden[None, :] | torch.eye(total, dtype=torch.bool)
    if k.shape[1] != heads:
        k = k.repeat_interleave(heads // k.shape[1], dim=1)
        v = v.repeat_interleave(heads // v.shape[1], dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / dim**0.5
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def packed_case(seed=0, dtype=torch.float32, device="cpu"):
    """4 query heads over 2 key/value heads; documents of 5, 0 (empty), 1, 9 and 7 tokens; a
    dropped prompt (hidden keys 1..4) in the fourth document and one in the last."""
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, 5, 5, 6, 15, 22], dtype=torch.int32)
    q = torch.randn(22, 4, 8, generator=g)
    k, v = (torch.randn(22, 2, 8, generator=g) for _ in range(2))
    hidden = torch.zeros(22, dtype=torch.bool)
    hidden[7:11] = True
    hidden[16:18] = True
    return [x.to(device) for x in (q.to(dtype), k.to(dtype), v.to(dtype), cu, hidden)]


def test_matches_dense_block_diagonal_mask():
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 5, 6, 13, 20], dtype=torch.int32)
    q, k, v = (torch.randn(20, 4, 8, generator=g) for _ in range(3))
    torch.testing.assert_close(packed_causal_attention(q, k, v, cu), dense_reference(q, k, v, cu), atol=1e-6, rtol=0)


def test_grouped_query_heads_and_hidden_keys():
    g = torch.Generator().manual_seed(1)
    cu = torch.tensor([0, 9, 16], dtype=torch.int32)
    q = torch.randn(16, 4, 8, generator=g)
    k, v = (torch.randn(16, 2, 8, generator=g) for _ in range(2))
    hidden = torch.zeros(16, dtype=torch.bool)
    hidden[1:5] = True  # a dropped prompt in the first document
    got = packed_causal_attention(q, k, v, cu, hidden)
    torch.testing.assert_close(got, dense_reference(q, k, v, cu, hidden), atol=1e-6, rtol=0)
    # The hidden keys really change what visible tokens see (the test could fail).
    assert not torch.allclose(got[5:9], packed_causal_attention(q, k, v, cu)[5:9])


@pytest.mark.parametrize("backend", ["dense", "flex"])
def test_single_call_equals_documents_run_apart(backend):
    """One call over all documents (empty one, GQA, hidden keys) equals each document through a
    naive softmax. FlexAttention runs eagerly on the CPU (unfused), which checks its mask rule."""
    q, k, v, cu, hidden = packed_case()
    want = naive_document_attention(q, k, v, cu, hidden).float()
    got = packed_causal_attention(q, k, v, cu, hidden, backend=backend, max_seqlen=9)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        packed_causal_attention(q, k, v, cu, backend=backend), naive_document_attention(q, k, v, cu).float(),
        atol=1e-6, rtol=0,
    )


def many_documents_case(seed=5, dtype=torch.float32, device="cpu"):
    """14 documents (one empty) of 1..12 tokens, 4 query heads over 2 key/value heads, dropped
    prompts in three of them: enough documents for the dense backend's tiled layout to pay."""
    g = torch.Generator().manual_seed(seed)
    lengths = [3, 12, 1, 0, 7, 9, 2, 11, 5, 8, 12, 4, 6, 10]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    total = int(cu[-1])
    q = torch.randn(total, 4, 8, generator=g)
    k, v = (torch.randn(total, 2, 8, generator=g) for _ in range(2))
    hidden = torch.zeros(total, dtype=torch.bool)
    for doc, (a, b) in ((1, (1, 6)), (7, (2, 4)), (13, (1, 9))):
        hidden[int(cu[doc]) + a:int(cu[doc]) + b] = True
    return [x.to(device) for x in (q.to(dtype), k.to(dtype), v.to(dtype), cu, hidden)], tuple(lengths)


def test_dense_tiles_keep_documents_whole_and_in_order():
    _, lengths = many_documents_case()
    layout = attn.dense_tiles(lengths, "cpu")
    total = sum(lengths)
    assert layout.capacity == 16 and layout.tiles * layout.capacity**2 * 2 <= total**2
    slot = layout.slot.tolist()
    assert len(set(slot)) == total and max(slot) < layout.tiles * layout.capacity
    start = 0
    for n in lengths:  # a document's tokens sit side by side in one tile, documents in order
        doc = slot[start:start + n]
        assert doc == list(range(doc[0], doc[0] + n)) if n else True
        assert n == 0 or doc[0] // 16 == doc[-1] // 16
        start += n
    assert slot == sorted(slot)
    assert torch.equal(layout.gather[layout.slot], torch.arange(total))  # each slot's token
    # Three documents of 9 in 27 tokens: a tile per document would not halve the work.
    assert attn.dense_tiles((9, 9, 9), "cpu") is None


def test_tiled_dense_attention_equals_documents_run_apart_with_gradients():
    """The tiled layout (forced by the host lengths) against the naive per-document softmax, and
    its gradients against autograd through the plain [T, T] reference."""
    (q, k, v, cu, hidden), lengths = many_documents_case()
    params = PackedAttentionParams(qkv_format="thd", doc_lengths=lengths)
    got = packed_causal_attention(q, k, v, cu, hidden, max_seqlen=12, params=params, backend="dense")
    assert params.cache["tiles"] is not None  # the tiled route was taken
    torch.testing.assert_close(got, naive_document_attention(q, k, v, cu, hidden).float(), atol=1e-6, rtol=0)
    # Without host lengths the CPU reads them from cu_seqlens: the same route, the same numbers.
    assert torch.equal(packed_causal_attention(q, k, v, cu, hidden, backend="dense"), got)

    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    weights = torch.randn(got.shape, generator=torch.Generator().manual_seed(6))
    fresh = PackedAttentionParams(qkv_format="thd", doc_lengths=lengths)
    (packed_causal_attention(*leaves, cu, hidden, params=fresh, backend="dense") * weights).sum().backward()
    refs = [x.clone().requires_grad_() for x in (q, k, v)]
    (dense_reference(*refs, cu, hidden) * weights).sum().backward()
    for mine, ref in zip(leaves, refs):
        torch.testing.assert_close(mine.grad, ref.grad, atol=1e-6, rtol=0)


def naive_varlen_kernel(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=True):
    """flash-attn's varlen contract, naively: each segment alone, causal (equal q/k lengths here)."""
    assert torch.equal(cu_q, cu_k) and causal and cu_q.dtype == torch.int32
    assert int(torch.diff(cu_q).max()) <= max_q
    return naive_document_attention(q, k, v, cu_q).to(q.dtype)


def test_flash_path_hides_keys_in_the_same_call():
    """The flash route's reordering (hidden tokens in front, as their own segment) gives every
    visible query exactly the reference; checked with a naive varlen kernel in place of flash-attn.
    Rows of hidden queries are unspecified on this route (nobody reads them)."""
    q, k, v, cu, hidden = packed_case(seed=2)
    got = attn._flash(q, k, v, cu, hidden, None, 9, {}, kernel=naive_varlen_kernel)
    want = naive_document_attention(q, k, v, cu, hidden).float()
    torch.testing.assert_close(got[~hidden], want[~hidden], atol=1e-6, rtol=0)
    no_hidden = attn._flash(q, k, v, cu, None, None, 9, {}, kernel=naive_varlen_kernel)
    torch.testing.assert_close(no_hidden, naive_document_attention(q, k, v, cu).float(), atol=1e-6, rtol=0)


def test_hidden_first_order_is_a_per_document_stable_partition():
    _, _, _, cu, hidden = packed_case()
    order, place, segments = attn.hidden_first_order(cu, hidden)
    assert torch.equal(order[place], torch.arange(22)) and segments.dtype == torch.int32
    expected = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        expected += [i for i in range(s, e) if hidden[i]] + [i for i in range(s, e) if not hidden[i]]
    assert order.tolist() == expected
    assert segments.tolist() == [0, 0, 5, 5, 5, 5, 6, 10, 15, 17, 22]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("has_flash", [True, False])
@pytest.mark.parametrize("has_flex", [True, False])
def test_backend_routing(device, dtype, has_flash, has_flex, monkeypatch):
    got = select_attention_backend(device, dtype, has_flash=has_flash, has_flex=has_flex)
    if device == "cpu":
        want = "dense"
    elif has_flash and dtype != torch.float32:  # flash-attn refuses fp32
        want = "flash"
    else:
        want = "flex" if has_flex else "dense"
    assert got == want
    # The defaults read this host's availability (patched here).
    monkeypatch.setattr(attn, "flash_attn_varlen_func", object() if has_flash else None)
    monkeypatch.setattr(attn, "flex_attention", attn.flex_attention if has_flex else None)
    assert select_attention_backend(torch.device(device), dtype) == want


def test_rope_on_the_packed_tensor_equals_megatron_rope():
    """Our one-pass RoPE is bit-for-bit megatron-core's unfused RoPE with per-token angles."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from pretrain.model.llm import rope_frequencies

    g = torch.Generator().manual_seed(3)
    positions = torch.tensor([0, 1, 2, 3, 0, 1, 0, 1, 2, 5, 9])  # restarts and gaps (CFG sampler)
    freqs = rope_frequencies(positions, 16, 10000.0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(11, 3, 16, generator=g).to(dtype)
        params = PackedAttentionParams(qkv_format="thd", rope_freqs=freqs)
        cos, sin = params.rope_cos_sin(dtype)
        want = _apply_rotary_pos_emb_bshd(x.unsqueeze(1), freqs).squeeze(1)
        assert torch.equal(apply_rope(x, cos, sin), want)
        assert params.rope_cos_sin(dtype)[0] is cos  # computed once per micro-step


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("backend", ["flash", "flex", "dense"])
def test_gpu_backends_match_the_reference(backend, dtype):
    if backend == "flash" and (not attn.flash_available() or dtype == torch.float32):
        pytest.skip("flash-attn not installed" if not attn.flash_available() else "flash-attn refuses fp32")
    q, k, v, cu, hidden = packed_case(seed=4, dtype=dtype, device="cuda")
    if backend == "flash" or backend == "flex":  # kernels want head_dim >= 16
        q, k, v = (torch.cat([x] * 4, dim=-1) for x in (q, k, v))
    want = naive_document_attention(q.cpu().float(), k.cpu().float(), v.cpu().float(), cu.cpu(), hidden.cpu())
    got = packed_causal_attention(q, k, v, cu, hidden, max_seqlen=9, backend=backend).float().cpu()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    rows = ~hidden.cpu() if backend == "flash" else torch.ones(22, dtype=torch.bool)
    torch.testing.assert_close(got[rows], want.float()[rows], atol=tol, rtol=0)
    assert not attn._FLEX_FAILED, "FlexAttention fell back to the dense mask on this GPU"
    if backend == "dense":  # and its tiled layout, from host lengths as in training
        (q, k, v, cu, hidden), lengths = many_documents_case(dtype=dtype, device="cuda")
        want = naive_document_attention(q.cpu().float(), k.cpu().float(), v.cpu().float(), cu.cpu(), hidden.cpu())
        params = PackedAttentionParams(qkv_format="thd", doc_lengths=lengths)
        got = packed_causal_attention(q, k, v, cu, hidden, max_seqlen=12, params=params, backend=backend)
        assert params.cache["tiles"] is not None
        torch.testing.assert_close(got.float().cpu(), want.float(), atol=tol, rtol=0)
    assert select_attention_backend("cuda", dtype) in ("flash", "flex", "dense")
