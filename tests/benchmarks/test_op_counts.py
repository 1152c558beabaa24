"""The exact counters of benchmarks/op_counts.py on a few lines whose counts are known by hand."""

import torch

from benchmarks.op_counts import OpCounts, count_ops, tag_modules


def test_value_reads_and_data_dependent_shapes_are_syncs():
    x = torch.arange(6.0)
    with count_ops() as counts:
        float(x.sum()), x.max().item(), x.tolist(), bool(x[0] > 0), int(x.argmin())  # 5 reads
        x[x > 2], torch.nonzero(x), x.masked_select(x > 1)  # 3 data-dependent shapes
        torch.repeat_interleave(torch.tensor([1, 2]))  # no output_size: 1 more
        torch.repeat_interleave(torch.tensor([1, 2]), output_size=3)  # given: none
        x[torch.tensor([0, 2])], torch.where(x > 2, x, 0)  # index tensors and where: none
    syncs = counts.syncs["fwd"]
    assert sum(syncs.values()) == 9, dict(syncs)
    assert {k: syncs[k] for k in ("__float__", "item", "tolist", "__bool__", "__int__", "nonzero")} == dict.fromkeys(
        ("__float__", "item", "tolist", "__bool__", "__int__", "nonzero"), 1)


def test_launches_skip_views_and_allocations_and_split_by_phase():
    w = torch.randn(4, 3, requires_grad=True)
    counts = OpCounts()
    with count_ops(counts):
        y = (w * 2.0).view(2, 6).t()  # view and t are views: 1 launch (mul)
        torch.empty(5)  # an allocation: none
        loss = y.sum()  # 1 launch
        counts.phase = "bwd"
        loss.backward()  # sum's grad (ones seed + expand view), mul's grad: ones_like, mul
    assert dict(counts.launches["fwd"]) == {"mul": 1, "sum": 1}
    with count_ops() as copy:
        w.t().reshape(-1)  # a reshape that must copy is a launch
    assert dict(copy.launches["fwd"]) == {"clone": 1}
    assert counts.total_launches("bwd") == sum(counts.launches["bwd"].values()) >= 2
    assert counts.total_syncs() == 0


def test_forward_launches_are_attributed_to_the_innermost_tagged_module():
    inner = torch.nn.Linear(3, 3)
    outer = torch.nn.Sequential(inner, torch.nn.ReLU())
    counts = OpCounts()
    with count_ops(counts), tag_modules(counts, {"outer": outer, "inner": inner}):
        out = outer(torch.randn(2, 3))
    assert isinstance(out, torch.Tensor)  # the hooks leave the outputs alone
    assert counts.launches_by_module["fwd"]["inner"] == 1  # addmm
    assert counts.launches_by_module["fwd"]["outer"] == 1  # relu
