"""HF Llama <-> megatron conversion: logits equal transformers' Llama, shards gather back, round trips."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pretrain.convert import StateDictError
from pretrain.convert.__main__ import main
from pretrain.convert.llama import (
    gather_llm_shards,
    hf_config_dict,
    hf_shapes,
    hf_to_megatron,
    llm_config_from_hf,
    megatron_shapes,
    megatron_to_hf,
    pack_qkv,
    shard_llm_state,
)
from pretrain.convert.state import load_module_state, load_state, save_state
from pretrain.model.config import LLMConfig
from pretrain.model.llm import LanguageModel


def llm_cfg(**changes) -> LLMConfig:
    """A tiny GQA LLM (8 heads, 4 key/value groups, head dim 4) that splits over TP 2 and 4."""
    sizes = dict(vocab_size=64, hidden_size=32, ffn_hidden_size=48, num_layers=4, num_attention_heads=8,
                 num_query_groups=4)
    return LLMConfig(**{**sizes, **changes})


def hf_model(kv_heads: int, layers: int = 3) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=kv_heads, rms_norm_eps=1e-6, rope_theta=10000.0,
        max_position_embeddings=64, tie_word_embeddings=False, attn_implementation="eager",
    )
    torch.manual_seed(kv_heads)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random norms too, so swapped norm names cannot go unnoticed
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    return model


def random_state(shapes: dict) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_logits_equal_transformers_llama(runtime, kv_heads):
    hf = hf_model(kv_heads)
    cfg = llm_config_from_hf(hf.config.to_dict())
    assert cfg.query_groups == kv_heads
    ours = LanguageModel(cfg, pre_process=True, post_process=True).eval()
    full = hf_to_megatron(hf.state_dict(), cfg)
    assert load_module_state(ours, shard_llm_state(full, cfg, 0, 1, ours.layer_numbers, True, True)) == []

    def our_logits(docs: list[torch.Tensor]) -> torch.Tensor:
        """Documents packed on one token axis, positions restarting at 0 in each."""
        lengths = torch.tensor([len(d) for d in docs])
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)
        positions = torch.cat([torch.arange(len(d)) for d in docs])
        hidden, _ = ours(ours.embed_tokens(torch.cat(docs))[:, None, :], positions, cu)
        return ours.compute_logits(hidden[:, 0])

    def close(actual, expected):
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        one = torch.randint(0, 256, (13,), generator=gen)  # one document covering the sequence
        close(our_logits([one]), hf(one[None]).logits[0])

        batch = torch.randint(0, 256, (2, 9), generator=gen)  # an HF batch = two packed documents
        close(our_logits(list(batch)), hf(batch).logits.reshape(18, -1))

        a, b = torch.randint(0, 256, (11,), generator=gen), torch.randint(0, 256, (5,), generator=gen)
        close(our_logits([a, b]), torch.cat([hf(a[None]).logits[0], hf(b[None]).logits[0]]))


def test_hf_megatron_round_trip_is_bit_exact():
    cfg = llm_cfg(num_layers=2)
    hf = random_state(hf_shapes(cfg))
    full = hf_to_megatron(hf, cfg)
    assert {k: tuple(v.shape) for k, v in full.items()} == megatron_shapes(cfg)
    back = megatron_to_hf(full, cfg)
    assert back.keys() == hf.keys()
    for key in hf:
        assert torch.equal(back[key], hf[key]), key
    again = hf_to_megatron(back, cfg)  # and megatron -> HF -> megatron
    assert all(torch.equal(again[k], full[k]) for k in full)


def test_qkv_is_interleaved_per_query_group():
    cfg = llm_cfg(hidden_size=8, num_attention_heads=4, num_query_groups=2)
    d = cfg.head_dim  # rows tagged by origin: q heads 0..3, k groups 10..11, v groups 20..21

    def tagged(tags):
        return torch.tensor(tags).repeat_interleave(d)[:, None].float().expand(-1, 8)

    rows = pack_qkv(tagged([0, 1, 2, 3]), tagged([10, 11]), tagged([20, 21]), cfg)
    assert rows[::d, 0].tolist() == [0, 1, 10, 20, 2, 3, 11, 21]


@pytest.mark.parametrize("tp_size", [2, 4])
def test_shard_then_gather_is_identity(tp_size):
    cfg = llm_cfg()
    full = random_state(megatron_shapes(cfg))
    gathered = {}
    for numbers, pre, post in [([1, 2], True, False), ([3, 4], False, True)]:  # two pipeline stages
        shards = [shard_llm_state(full, cfg, r, tp_size, numbers, pre, post) for r in range(tp_size)]
        part = gather_llm_shards(shards, cfg, numbers, pre, post)
        assert not set(part) & set(gathered)
        gathered.update(part)
    assert gathered.keys() == full.keys()
    for key in full:
        assert torch.equal(gathered[key], full[key]), key


def test_shard_layout_matches_megatron():
    """Rank r holds whole query groups of qkv, [gate_r; up_r] of fc1, columns of the row-parallel
    matrices and rows of the vocabulary; local layer i is global layer layer_numbers[i]."""
    cfg = llm_cfg()
    hf = random_state(hf_shapes(cfg))
    tp, rank, d = 2, 1, cfg.head_dim
    full = hf_to_megatron(hf, cfg)
    local = shard_llm_state(full, cfg, rank, tp, [3, 4], pre_process=False, post_process=True)
    assert "embedding.weight" not in local and "decoder.layers.2.input_layernorm.weight" not in local
    p, m = "model.layers.3.", "decoder.layers.1."  # global layer 4 = local layer 1

    def rows(key, size):
        return hf[p + key][size * rank:size * (rank + 1)]

    # the rank's share is a model with half the heads and groups (same head dim)
    half = llm_cfg(hidden_size=16, num_attention_heads=4, num_query_groups=2)
    q, k, v = (rows(f"self_attn.{x}_proj.weight", n * d) for x, n in (("q", 4), ("k", 2), ("v", 2)))
    assert torch.equal(local[m + "self_attention.linear_qkv.weight"], pack_qkv(q, k, v, half))
    fc1 = torch.cat([rows("mlp.gate_proj.weight", 24), rows("mlp.up_proj.weight", 24)])
    assert torch.equal(local[m + "mlp.linear_fc1.weight"], fc1)
    assert torch.equal(local[m + "mlp.linear_fc2.weight"], hf[p + "mlp.down_proj.weight"][:, 24:])
    proj = hf[p + "self_attn.o_proj.weight"][:, 16:]
    assert torch.equal(local[m + "self_attention.linear_proj.weight"], proj)
    assert torch.equal(local["output_layer.weight"], hf["lm_head.weight"][32:])


def test_bad_hf_state_lists_every_problem():
    cfg = llm_cfg(num_layers=2)
    hf = random_state(hf_shapes(cfg))
    del hf["model.norm.weight"]
    hf["model.layers.0.mlp.up_proj.weight"] = torch.zeros(47, 32)
    hf["model.layers.9.mlp.up_proj.weight"] = torch.zeros(48, 32)
    hf["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(4)  # a buffer, ignored
    with pytest.raises(StateDictError) as info:
        hf_to_megatron(hf, cfg)
    err = info.value
    assert [k for k, _ in err.missing] == ["model.norm.weight"]
    assert [k for k, _ in err.unexpected] == ["model.layers.9.mlp.up_proj.weight"]
    assert err.mismatched == [("model.layers.0.mlp.up_proj.weight", (48, 32), (47, 32))]
    assert "model.norm.weight" in str(err) and "[48, 32], got [47, 32]" in str(err)


def test_config_round_trip_and_unsupported_features():
    cfg = llm_cfg()
    assert llm_config_from_hf(hf_config_dict(cfg)) == cfg
    # absent fields take LlamaConfig's defaults, as the official code builds them
    assert llm_config_from_hf({"hidden_size": 2048, "num_attention_heads": 16}).num_layers == 32
    with pytest.raises(ValueError, match="attention_bias=True.*tie_word_embeddings=True"):
        llm_config_from_hf({**hf_config_dict(cfg), "attention_bias": True, "tie_word_embeddings": True})


def test_cli_hf_llama_to_megatron(tmp_path):
    cfg = llm_cfg(num_layers=2)
    hf = random_state(hf_shapes(cfg))
    save_state(hf, tmp_path / "hf" / "model.safetensors")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config_dict(cfg)))
    out = tmp_path / "llm.safetensors"
    assert main(["hf-llama-to-megatron", "--checkpoint", str(tmp_path / "hf"), "--out", str(out)]) == 0
    expected = {"llm." + k: v for k, v in hf_to_megatron(hf, cfg).items()}
    got = load_state(out)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
