"""A tiny fp32 JanusFlow shared by the sampler tests (CPU, random weights, eval mode)."""

import pytest
import torch

from tests.conftest import _tiny_model_config
from tests.data_fixtures import tokenizer_dir  # noqa: F401  (the 400-token test tokenizer)

TINY_VOCAB = 512  # room for the 400-token test tokenizer of data_tools.synthetic


def tiny_sampling_config():
    from pretrain.model.config import LLMConfig

    llm = LLMConfig(vocab_size=TINY_VOCAB, hidden_size=64, ffn_hidden_size=128, num_layers=2,
                    num_attention_heads=4, num_query_groups=2)
    return _tiny_model_config(llm=llm)


@pytest.fixture(scope="session")
def tiny_model(runtime):
    from pretrain.model.janusflow import JanusFlowModel

    torch.manual_seed(0)
    return JanusFlowModel(tiny_sampling_config()).eval()
