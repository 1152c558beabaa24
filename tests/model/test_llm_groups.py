"""megatron-core is handed the layout's process groups instead of reading its global state."""

from pretrain.model.config import LLMConfig
from pretrain.model.llm import LanguageModel
from pretrain.runtime.layout import ParallelLayout
from pretrain.runtime.mpu import megatron_process_groups


def test_the_llm_uses_the_groups_it_is_given(runtime):
    groups = megatron_process_groups(runtime)
    assert groups.tp is runtime.tp_group and groups.pp is runtime.pp_group and groups.cp is runtime.cp_group
    llm = LanguageModel(LLMConfig(vocab_size=64, hidden_size=32, ffn_hidden_size=32, num_layers=2,
                                  num_attention_heads=2), True, True, process_groups=groups)
    assert llm.decoder.pg_collection is groups
    assert llm.embedding.tp_group is groups.tp and llm.output_layer.tp_group is groups.tp
    assert all(layer.self_attention.pg_collection.tp is groups.tp for layer in llm.decoder.layers)


def test_a_layout_without_groups_leaves_megatron_its_defaults():
    assert megatron_process_groups(ParallelLayout.single()) is None
