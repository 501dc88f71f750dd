"""Shared by the metric tests: a tiny random Llama and a one-thread fixture."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are all OpenMP synchronisation: on a busy 2-core box one thread is 10x faster."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer, 32-wide Llama over a 64-token vocabulary with large random weights, eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, initializer_range=0.2)
    return LlamaForCausalLM(config).eval()
