"""Packed causal attention against a dense reference with an explicit [T, T] mask."""

import torch

from pretrain.model.attention import packed_causal_attention


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
