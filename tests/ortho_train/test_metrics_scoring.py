"""Chunked LM-head scoring equals the plain forward (fp32 tolerance), values and gradients, on a tiny
Llama (untied head), a tiny Gemma 3 (tied head, logit soft-capping) and a LoRA-wrapped Llama; models
whose forward was not audited, or whose head carries hooks, fall back to the plain forward."""
import copy

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Qwen2Config, Qwen2ForCausalLM

from ortho_train.metrics import scoring
from ortho_train.metrics.exposure import secret_log_perplexity
from ortho_train.metrics.extraction import greedy_continuation
from ortho_train.metrics.lm_head import split_causal_lm
from ortho_train.metrics.logprobs import token_distribution_stats, token_logprobs
from ortho_train.metrics.perplexity import nll_sum_and_count
from tests.ortho_train.metric_helpers import one_thread, tiny_llama  # noqa: F401

pytestmark = pytest.mark.numerics  # fp32 tolerances: CI reruns them on the default kernels too
VOCAB = 64  # tiny_llama's


def tiny_gemma(seed: int = 0, softcap: float | None = 5.0) -> Gemma3ForCausalLM:
    """2-layer Gemma 3 text model (one sliding, one full attention layer), tied head, soft-capped."""
    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=64,
                              final_logit_softcapping=softcap, initializer_range=0.2, tie_word_embeddings=True)
    return Gemma3ForCausalLM(config).eval()


def lora_llama():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return model.eval()


MODELS = {"llama": tiny_llama, "gemma": tiny_gemma, "lora_llama": lora_llama}
FORCE = 3 * VOCAB * 4  # logit bytes of 3 rows: every batch is chunked, 3 positions at a time


def batch(seed: int = 1):
    """Ids (3, 9) with right padding on row 1 and the first 3 labels of row 2 ignored."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 9), generator=gen)  # (3, 9)
    attention = torch.ones_like(ids)
    attention[1, 6:] = 0
    labels = ids.masked_fill(attention == 0, -100)
    labels[2, :3] = -100
    return ids, labels, attention


@pytest.mark.parametrize("name", sorted(MODELS))
def test_split_reproduces_the_forward(name):
    model = MODELS[name]()
    split = split_causal_lm(model)
    assert split is not None
    ids, _, attention = batch()
    with torch.no_grad():
        hidden, _ = split.hidden(ids, attention)
        torch.testing.assert_close(split.head(hidden), model(ids, attention_mask=attention).logits,
                                   rtol=1e-5, atol=1e-5)
    if name == "gemma":
        assert split.softcap == 5.0 and split.lm_head.weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("name", sorted(MODELS))
def test_label_logprobs_and_gradients_match_the_plain_forward(name):
    model = MODELS[name]()
    ids, labels, attention = batch()

    def loss_and_grads(logit_bytes):
        model.zero_grad()
        logp, mask = scoring.label_logprobs(model, ids, labels, attention, logit_bytes=logit_bytes)
        (-logp.sum() / mask.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logp.detach(), mask, grads

    plain_logp, plain_mask, plain_grads = loss_and_grads(None)  # tiny V: the plain forward
    chunked_logp, chunked_mask, chunked_grads = loss_and_grads(FORCE)
    reference, _ = token_logprobs(model(ids, attention_mask=attention).logits, labels, attention_mask=attention)
    torch.testing.assert_close(plain_logp, reference.detach())
    assert torch.equal(plain_mask, chunked_mask)
    torch.testing.assert_close(chunked_logp, plain_logp, rtol=1e-5, atol=1e-5)
    assert plain_grads.keys() == chunked_grads.keys() and plain_grads
    for key, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[key], grad, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_distribution_stats_and_argmax_match(name):
    model = MODELS[name]()
    ids, labels, attention = batch()
    with torch.no_grad():
        stats, argmax = scoring.label_distribution_stats(model, ids, labels, attention, logit_bytes=FORCE)
        logits = model(ids, attention_mask=attention).logits  # (3, 9, V)
        reference = token_distribution_stats(logits, labels, attention_mask=attention)
    for field in ("logp", "mu", "sigma"):
        torch.testing.assert_close(getattr(stats, field), getattr(reference, field), rtol=1e-5, atol=1e-5)
    assert torch.equal(stats.mask, reference.mask)
    expected = logits[:, :-1].argmax(-1).masked_fill(~reference.mask, -1)  # (3, 8)
    assert torch.equal(argmax, expected)


@pytest.mark.parametrize("name", ["llama", "gemma"])
@pytest.mark.parametrize("reuse_cache", [True, False])
def test_secret_log_perplexity_chunked(name, reuse_cache, monkeypatch):
    model = MODELS[name]()
    gen = torch.Generator().manual_seed(2)
    prefix = torch.randint(0, VOCAB, (5,), generator=gen)
    candidates = torch.randint(0, 4, (40, 5), generator=gen)  # shared heads: the head pass runs
    plain = secret_log_perplexity(model, prefix, candidates, batch_size=16, reuse_prefix_cache=reuse_cache)
    monkeypatch.setattr(scoring, "DEFAULT_LOGIT_BYTES", FORCE)
    chunked = secret_log_perplexity(model, prefix, candidates, batch_size=16, reuse_prefix_cache=reuse_cache)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_perplexity_chunked(name, monkeypatch):
    model = MODELS[name]()
    ids, labels, attention = batch()
    batches = [{"input_ids": ids, "labels": labels, "attention_mask": attention}]
    plain = nll_sum_and_count(model, batches)
    monkeypatch.setattr(scoring, "DEFAULT_LOGIT_BYTES", FORCE)
    chunked = nll_sum_and_count(model, batches)
    assert chunked[1] == plain[1]
    assert chunked[0] == pytest.approx(plain[0], rel=1e-5)


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_greedy_continuation_keeps_only_the_last_logits(name):
    model = MODELS[name]()
    prefix = torch.randint(0, VOCAB, (4, 6), generator=torch.Generator().manual_seed(3))
    shapes = []
    handle = model.register_forward_hook(lambda m, args, out: shapes.append(tuple(out.logits.shape)))
    generated = greedy_continuation(model, prefix, 5)
    handle.remove()
    assert shapes[0] == (4, 1, VOCAB)  # the prompt's positions are never projected onto V
    ids = prefix
    with torch.no_grad():
        for _ in range(5):  # reference: full forward without a cache, argmax of the last position
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, ids[:, 6:])


def test_unaudited_models_and_hooked_heads_fall_back():
    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))
    assert split_causal_lm(qwen) is None and scoring.chunked_split(qwen, 10**6, FORCE) is None

    class Subclass(type(tiny_llama())):
        def forward(self, *args, **kwargs):  # a forward nobody audited
            return super().forward(*args, **kwargs)

    assert split_causal_lm(Subclass(copy.deepcopy(tiny_llama().config))) is None
    model = tiny_llama()
    assert scoring.chunked_split(model, 100, FORCE) is not None
    assert scoring.chunked_split(model, 2, FORCE) is None  # small enough for the plain forward
    handle = model.lm_head.register_forward_hook(lambda *args: None)
    assert scoring.chunked_split(model, 100, FORCE) is None
    handle.remove()
