"""A causal LM split into its body (tokens → final hidden states) and its LM head (hidden → logits).

Scoring a large vocabulary need not hold the (B, T, V) logits: run the body once, then apply the
head to a few positions at a time (`metrics.chunked_head`). That is only the same computation as
the model's own `forward` when the head is exactly what `forward` applies after the body, so the
split is offered only for `forward` methods read line by line (transformers 5.x):

    LlamaForCausalLM:   logits = lm_head(h)
    Gemma3ForCausalLM:  logits = lm_head(h);  if c = config.final_logit_softcapping is set:
                        logits = c · tanh(logits / c)

with `h = self.model(...).last_hidden_state` (Gemma's √d embedding scale and final norm sit in
the body). A subclass that overrides `forward`, any other architecture, or a peft wrapper other
than LoRA gets None, and callers fall back to the full forward. The LM head is found with
`get_output_embeddings()` (tied or not) and called as a module, so a LoRA-wrapped head works too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ortho_train.metrics.kv_cache import cache_kwargs, returned_cache


def _audited_forwards() -> dict:
    """{forward function: does it soft-cap?} of the classes whose logits step is checked above."""
    from transformers import Gemma3ForCausalLM, LlamaForCausalLM

    return {LlamaForCausalLM.forward: False, Gemma3ForCausalLM.forward: True}


@dataclass(frozen=True)
class SplitCausalLM:
    """Body and head of a causal LM whose `forward` is ``head(body(ids).last_hidden_state)``.

    Attributes:
        body: the decoder (embeddings, blocks, final norm): `body(input_ids, ...)` returns
            `last_hidden_state` (B, T, H).
        lm_head: the output embedding module (H → V).
        softcap: Gemma's `final_logit_softcapping` c, or None.
        vocab_size: V, the head's output width.
    """

    body: nn.Module
    lm_head: nn.Module
    softcap: float | None
    vocab_size: int

    def head(self, hidden: Tensor) -> Tensor:
        """Logits (..., V) in the model's dtype, as `forward` computes them from hidden (..., H)."""
        logits = self.lm_head(hidden)
        if self.softcap is not None:
            logits = logits / self.softcap
            logits = torch.tanh(logits)
            logits = logits * self.softcap
        return logits

    def hidden(self, input_ids: Tensor, attention_mask: Tensor | None = None, cache=None,
               use_cache: bool = False) -> tuple[Tensor, object]:
        """``(last_hidden_state (B, T, H), KV cache or None)`` of the body on `input_ids` (B, T)."""
        extra = cache_kwargs(self.body, cache) if cache is not None else {}
        out = self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache, **extra)
        return out.last_hidden_state, (returned_cache(out) if use_cache else None)

    def head_has_hooks(self) -> bool:
        """Hooks on the head (K-FAC, attribution) would see each chunk, and a recomputed one twice."""
        return any(bool(getattr(m, name)) for m in self.lm_head.modules()
                   for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                                "_backward_pre_hooks"))


def _unwrap_lora(model: nn.Module) -> nn.Module | None:
    """The transformers model inside a peft LoRA wrapper (its forward adds nothing); else itself."""
    configs = getattr(model, "peft_config", None)
    if configs is None or not hasattr(model, "get_base_model"):
        return model
    if all(str(getattr(c, "peft_type", "")).upper().endswith("LORA") for c in configs.values()):
        return model.get_base_model()
    return None  # prompt tuning and the like add tokens in forward


def split_causal_lm(model: nn.Module) -> SplitCausalLM | None:
    """The :class:`SplitCausalLM` of `model`, or None where its `forward` was not audited."""
    base = _unwrap_lora(model)
    if base is None:
        return None
    audited = _audited_forwards()
    forward = getattr(type(base), "forward", None)
    if forward not in audited or not isinstance(getattr(base, "model", None), nn.Module):
        return None
    head = base.get_output_embeddings()
    if head is None:
        return None
    softcap = getattr(base.config, "final_logit_softcapping", None) if audited[forward] else None
    width = getattr(head, "out_features", None)  # a sieved head (`OrthoLinear`) holds no `weight`
    return SplitCausalLM(body=base.model, lm_head=head, softcap=softcap,
                         vocab_size=int(width if width is not None else head.weight.shape[0]))

