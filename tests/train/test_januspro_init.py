"""Janus-Pro's starting weights: stage 1 from local HF folders (LLM, SigLIP), later runs from a
checkpoint in our names (init.januspro); another family's init key is refused by name."""

import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionModel

from pretrain.convert.state import full_model_state, save_state
from pretrain.model.config import ImageTokenConfig, LLMConfig, ModelConfig, UnderstandingEncoderConfig
from pretrain.model.januspro import JanusProModel
from pretrain.model.und_vision import build_siglip_config
from pretrain.recipe import InitConfig
from pretrain.train.init_weights import load_initial_weights

CFG = ModelConfig(
    family="januspro",
    llm=LLMConfig(vocab_size=64, hidden_size=32, ffn_hidden_size=48, num_layers=2, num_attention_heads=4),
    und_encoder=UnderstandingEncoderConfig(image_size=16, patch_size=4, hidden_size=16, intermediate_size=32,
                                           num_layers=1, num_attention_heads=2),
    image_tokens=ImageTokenConfig(codebook_size=16, embed_dim=8, downsample=4),
)


def test_stage_one_llm_and_siglip_from_local_hf_folders(runtime, tmp_path):
    torch.manual_seed(0)
    hf_llm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, rms_norm_eps=1e-6, tie_word_embeddings=False))
    hf_llm.save_pretrained(tmp_path / "llm")
    hf_siglip = SiglipVisionModel(build_siglip_config(CFG.und_encoder))
    hf_siglip.save_pretrained(tmp_path / "siglip")

    model = JanusProModel(CFG)
    fresh_head = model.gen_head[2].weight.detach().clone()
    log = load_initial_weights(model, InitConfig(llm=str(tmp_path / "llm"), siglip=str(tmp_path / "siglip")))
    assert len(log) == 2
    assert torch.equal(model.llm.embedding.weight, hf_llm.model.embed_tokens.weight)
    assert torch.equal(model.llm.output_layer.weight, hf_llm.lm_head.weight)
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model.und_encoder(pixels), hf_siglip(pixel_values=pixels).last_hidden_state,
                                   atol=1e-6, rtol=0)
    assert torch.equal(model.gen_head[2].weight, fresh_head)  # the new modules keep their initialisation


def test_a_januspro_checkpoint_in_our_names_initialises_everything(runtime, tmp_path):
    torch.manual_seed(1)
    source = full_model_state(JanusProModel(CFG))
    path = save_state(source, tmp_path / "start.safetensors")
    torch.manual_seed(2)
    model = JanusProModel(CFG)
    assert load_initial_weights(model, InitConfig(januspro=str(path))) == [f"Janus-Pro weights from {path}"]
    loaded = full_model_state(model)
    assert sorted(loaded) == sorted(source)
    assert all(torch.equal(loaded[k], source[k]) for k in source)


def test_the_other_familys_init_key_is_refused(runtime, tmp_path):
    model = JanusProModel(CFG)
    with pytest.raises(ValueError, match=r"init\.janusflow is set but model\.family is 'januspro': use init\.januspro"):
        load_initial_weights(model, InitConfig(janusflow=str(tmp_path / "x.safetensors")))
    smaller = dataclasses.replace(CFG, image_tokens=dataclasses.replace(CFG.image_tokens, codebook_size=8))
    path = save_state(full_model_state(JanusProModel(smaller)), tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="gen_head"):  # a checkpoint of another codebook: the key is named
        load_initial_weights(model, InitConfig(januspro=str(path)))


def test_a_checkpoint_in_the_released_layout_initialises_everything(runtime, tmp_path, monkeypatch):
    # init.januspro also takes DeepSeek's key names (language_model.*, gen_vision_model.* ...): read
    # through the release converter. The 72M-number VQ-16 part only needs its shapes (meta tensors),
    # so the file read is replaced by the released state in memory.
    from image_codecs.vq16 import vq16_shapes
    from pretrain.convert.januspro import ours_to_release
    from pretrain.train import init_weights

    torch.manual_seed(3)
    source = full_model_state(JanusProModel(CFG))
    vq = {k: torch.empty(s, device="meta") for k, s in vq16_shapes(CFG.image_tokens.codebook_size).items()}
    released = ours_to_release(source, vq, CFG)
    assert not any(k.startswith("llm.") for k in released) and "language_model.lm_head.weight" in released
    path = tmp_path / "janus-pro.safetensors"
    monkeypatch.setattr(init_weights, "load_state", lambda p: released if str(p) == str(path) else {})
    torch.manual_seed(4)
    model = JanusProModel(CFG)
    load_initial_weights(model, InitConfig(januspro=str(path)))
    loaded = full_model_state(model)
    assert sorted(loaded) == sorted(source)
    assert all(torch.equal(loaded[k], source[k]) for k in source)
