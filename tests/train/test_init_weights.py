"""Stage-1 starting weights from local HF folders, and a released JanusFlow checkpoint."""

import torch
from safetensors.torch import save_file
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
