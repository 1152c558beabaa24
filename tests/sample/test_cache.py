"""Attention with a key/value cache equals attention over the whole documents."""

import torch

from pretrain.model.attention import cached_causal_attention, packed_causal_attention
from pretrain.sample.cache import KVCache


def split_documents(x, cu, cut):
    """Tokens of each document [start, start+cut[d]) and [start+cut[d], end) -> (prefix, suffix)."""
    pre, post = [], []
    for d, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        pre.append(x[s : s + cut[d]])
        post.append(x[s + cut[d] : e])
    return torch.cat(pre), torch.cat(post)


def cumulative(lengths):
    return torch.nn.functional.pad(torch.cumsum(torch.tensor(lengths), 0), (1, 0)).to(torch.int32)


def test_cached_attention_equals_whole_documents():
    g = torch.Generator().manual_seed(0)
    lengths, cut = [9, 7, 5, 6], [4, 7, 0, 2]  # a document with no new token, one with no cached token
    cu = cumulative(lengths)
    total = sum(lengths)
    q = torch.randn(total, 4, 8, generator=g)
    k, v = (torch.randn(total, 2, 8, generator=g) for _ in range(2))  # grouped-query heads
    hidden = torch.zeros(total, dtype=torch.bool)
    hidden[1:4] = True  # a dropped prompt in the first document's cached part
    hidden[18] = True  # a hidden key among the new tokens of the last document
    full = packed_causal_attention(q, k, v, cu, hidden)

    (q0, q1), (k0, k1), (v0, v1), (h0, h1) = (split_documents(x, cu, cut) for x in (q, k, v, hidden))
    new_cu = cumulative([n - c for n, c in zip(lengths, cut)])
    got = cached_causal_attention(q1, k1, v1, new_cu, k0, v0, cumulative(cut), h1, h0)
    torch.testing.assert_close(got, split_documents(full, cu, cut)[1], atol=1e-6, rtol=0)


def test_cache_appends_token_by_token():
    """Recording a prefix then appending one token per document per call = one whole pass."""
    g = torch.Generator().manual_seed(1)
    lengths = [6, 4]
    cu = cumulative(lengths)
    q, k, v = (torch.randn(sum(lengths), 2, 4, generator=g) for _ in range(3))
    full = packed_causal_attention(q, k, v, cu)

    cache = KVCache()
    outs = []
    # segments [start, end) within each document: the prefixes, then one token per call (a
    # document that is done contributes an empty segment)
    segments = [list(zip([0, 3, 4, 5], [3, 4, 5, 6])), list(zip([0, 2, 3, 4], [2, 3, 4, 4]))]
    for call in range(4):
        spans = [doc[call] for doc in segments]
        pick = torch.cat([torch.arange(int(cu[d]) + s, int(cu[d]) + e) for d, (s, e) in enumerate(spans)])
        out = cache.attend(1, q[pick], k[pick], v[pick], cumulative([e - s for s, e in spans]), None, None)
        outs.append((pick, out))
    assert cache.lengths.tolist() == lengths
    for pick, out in outs:
        torch.testing.assert_close(out, full[pick], atol=1e-6, rtol=0)
