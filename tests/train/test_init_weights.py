"""Stage-1 starting weights from local HF folders, and a released JanusFlow checkpoint."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionModel

from pretrain.convert.release import ours_to_release
from pretrain.convert.state import full_model_state
from pretrain.model.config import GenerationVisionConfig, LLMConfig, ModelConfig, RepaConfig, UnderstandingEncoderConfig
from pretrain.model.janusflow import JanusFlowModel
from pretrain.model.und_vision import build_siglip_config
from pretrain.recipe import InitConfig
from pretrain.train.init_weights import load_initial_weights

CFG = ModelConfig(
    llm=LLMConfig(vocab_size=64, hidden_size=32, ffn_hidden_size=48, num_layers=2, num_attention_heads=4),
    und_encoder=UnderstandingEncoderConfig(image_size=16, patch_size=4, hidden_size=16, intermediate_size=32,
                                           num_layers=1, num_attention_heads=2),
    gen_vision=GenerationVisionConfig(latent_size=8, patch_size=2, channels=8, num_blocks=1, time_embed_dim=8),
    repa=RepaConfig(layer=1, projector_hidden_size=8),
)


def test_llm_and_siglip_from_local_hf_folders(runtime, tmp_path):
    torch.manual_seed(0)
    hf_llm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, rms_norm_eps=1e-6, tie_word_embeddings=False))
    hf_llm.save_pretrained(tmp_path / "llm")
    hf_siglip = SiglipVisionModel(build_siglip_config(CFG.und_encoder))
    hf_siglip.save_pretrained(tmp_path / "siglip")

    model = JanusFlowModel(CFG)
    log = load_initial_weights(model, InitConfig(llm=str(tmp_path / "llm"), siglip=str(tmp_path / "siglip")))
    assert len(log) == 2
    torch.testing.assert_close(model.llm.embedding.weight, hf_llm.model.embed_tokens.weight, atol=0, rtol=0)
    torch.testing.assert_close(model.llm.output_layer.weight, hf_llm.lm_head.weight, atol=0, rtol=0)
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model.und_encoder(pixels), hf_siglip(pixel_values=pixels).last_hidden_state,
                                   atol=1e-6, rtol=0)


def test_released_checkpoint_initialises_everything_but_repa(runtime, tmp_path):
    torch.manual_seed(1)
    source = JanusFlowModel(CFG)
    save_file({k: v.contiguous() for k, v in ours_to_release(full_model_state(source), CFG).items()},
              tmp_path / "janusflow.safetensors")
    torch.manual_seed(2)
    model = JanusFlowModel(CFG)
    load_initial_weights(model, InitConfig(janusflow=str(tmp_path / "janusflow.safetensors")))
    got, want = full_model_state(model), full_model_state(source)
    for key in want:
        same = torch.equal(got[key], want[key])
        assert same != key.startswith("repa_projector"), key


def _tiny_llama(**changes) -> LlamaForCausalLM:
    config = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  rms_norm_eps=1e-6, tie_word_embeddings=False)
    return LlamaForCausalLM(LlamaConfig(**{**config, **changes}))


def test_llm_folder_of_another_llm_with_the_same_shapes_is_refused(runtime, tmp_path):
    """Another head count (same hidden size: every tensor keeps its shape) or RoPE base would load
    without a word; config.json says so, and the error names every difference."""
    _tiny_llama(num_attention_heads=8, rope_theta=500000.0).save_pretrained(tmp_path / "llm")
    model = JanusFlowModel(CFG)
    with pytest.raises(ValueError, match="describes another LLM than model.llm") as err:
        load_initial_weights(model, InitConfig(llm=str(tmp_path / "llm")))
    assert "num_attention_heads: checkpoint 8, recipe 4" in str(err.value)
    assert "rope_theta: checkpoint 500000.0, recipe 10000.0" in str(err.value)
    assert str(tmp_path / "llm") in str(err.value)


@pytest.mark.parametrize("damage,message", [
    ("nan", "tensor 'model.norm.weight' holds NaN or inf"),
    ("int8", r"tensor\(s\) are not floating point, e.g. .* \(torch.int8\)"),
    ("missing shard", "^init.llm=.*: .*names 1 shard\\(s\\) not in .*model-00002-of-00002.safetensors"),
], ids=["nan", "int8", "missing-shard"])
def test_damaged_llm_weights_are_refused_not_loaded(runtime, tmp_path, damage, message):
    """NaN and integer tensors used to be copied (cast) into the run silently; a shard the index names
    but the folder lacks was reported only as a list of missing tensors."""
    _tiny_llama().save_pretrained(tmp_path / "llm")
    weights = tmp_path / "llm" / "model.safetensors"
    state = load_file(str(weights))
    if damage == "nan":
        state["model.norm.weight"] = torch.full_like(state["model.norm.weight"], float("nan"))
    elif damage == "int8":
        state = {k: (v * 100).to(torch.int8) for k, v in state.items()}
    else:
        keys = sorted(state)
        weights.unlink()
        save_file({k: state[k] for k in keys[:5]}, str(tmp_path / "llm" / "model-00001-of-00002.safetensors"))
        shard = {k: f"model-0000{1 + (i >= 5)}-of-00002.safetensors" for i, k in enumerate(keys)}
        (tmp_path / "llm" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shard}))
        state = None
    if state is not None:
        save_file(state, str(weights))
    model = JanusFlowModel(CFG)
    before = model.llm.decoder.final_layernorm.weight.detach().clone()
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_initial_weights(model, InitConfig(llm=str(tmp_path / "llm")))
    assert torch.equal(model.llm.decoder.final_layernorm.weight, before)


def test_half_precision_llm_weights_are_accepted_and_cast(runtime, tmp_path):
    hf = _tiny_llama()
    hf.save_pretrained(tmp_path / "llm")
    weights = tmp_path / "llm" / "model.safetensors"
    save_file({k: v.bfloat16() for k, v in load_file(str(weights)).items()}, str(weights))
    model = JanusFlowModel(CFG)
    load_initial_weights(model, InitConfig(llm=str(tmp_path / "llm")))
    assert model.llm.embedding.weight.dtype == torch.float32
    torch.testing.assert_close(model.llm.embedding.weight, hf.model.embed_tokens.weight.bfloat16().float(), atol=0, rtol=0)


def test_nan_in_siglip_or_janusflow_weights_is_refused(runtime, tmp_path):
    SiglipVisionModel(build_siglip_config(CFG.und_encoder)).save_pretrained(tmp_path / "siglip")
    weights = tmp_path / "siglip" / "model.safetensors"
    state = load_file(str(weights))
    key = sorted(state)[0]
    state[key] = torch.full_like(state[key], float("inf"))
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=f"tensor '{key}' holds NaN or inf"):
        load_initial_weights(JanusFlowModel(CFG), InitConfig(siglip=str(tmp_path / "siglip")))
    release = {k: v.contiguous() for k, v in ours_to_release(full_model_state(JanusFlowModel(CFG)), CFG).items()}
    release = {k: v.to(torch.int16) if k == "beg_of_und_embed" else v for k, v in release.items()}
    save_file(release, str(tmp_path / "janusflow.safetensors"))
    with pytest.raises(ValueError, match=r"init.janusflow=.*beg_of_und_embed \(torch.int16\)"):
        load_initial_weights(JanusFlowModel(CFG), InitConfig(janusflow=str(tmp_path / "janusflow.safetensors")))


def test_siglip_folder_of_another_tower_with_the_same_shapes_is_refused(runtime, tmp_path):
    cfg = build_siglip_config(CFG.und_encoder)
    cfg.num_attention_heads, cfg.layer_norm_eps = 4, 1e-5  # same shapes: hidden 16 splits into 2 or 4 heads
    SiglipVisionModel(cfg).save_pretrained(tmp_path / "siglip")
    with pytest.raises(ValueError, match="describes another SigLIP than model.und_encoder") as err:
        load_initial_weights(JanusFlowModel(CFG), InitConfig(siglip=str(tmp_path / "siglip")))
    assert "num_attention_heads: checkpoint 4, recipe 2" in str(err.value)
    assert "layer_norm_eps: checkpoint 1e-05, recipe 1e-06" in str(err.value)
