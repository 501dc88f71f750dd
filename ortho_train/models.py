"""Causal LMs: a tiny Llama built from `LlamaConfig`, or any local Hugging Face directory.

Nothing is downloaded: `from_pretrained` runs with `local_files_only=True`.

Model-level helpers shared across the toolkit: `set_submodule` (replace a module by its
dotted name), `eval_mode` (evaluate in eval mode, then restore the previous mode),
`requires_grad_as` (set the requires_grad flags of some parameters for a block, then restore
them), `linear_layers` (the `nn.Linear` layers the toolkit quantises, sieves or isolates) and
`head_is_tied`.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal, get_args

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from ortho_train.gguf_checkpoint import is_gguf_file, load_gguf_causal_lm
from ortho_train.loading import LOCAL_FILES_ONLY
from ortho_train.model_support import require_linear_only
from ortho_train.run_paths import resolve_latest
from ortho_train.settings import check_choices, check_settings

WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
# `dtype` settings of the modules: the dtype a model is loaded (or built) in. float32 is the default and
# the only one isolation, OGD, DP on the support and MANSU accept; float16 only LoRA unlearning
# takes (`ortho_train.model_support`).
# The same names are the compute dtypes of a deployed copy (`quantisation.spec.PTQConfig`).
DtypeName = Literal["float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = dict(zip(get_args(DtypeName), (torch.float32, torch.bfloat16, torch.float16)))


def model_dtype(name: str, setting: str = "model.dtype") -> torch.dtype:
    """The torch dtype of a dtype setting; an unknown name raises SettingError naming `setting`."""
    check_choices("", **{setting: (name, DtypeName)})
    return DTYPES[name]


@dataclass
class TinyLlamaConfig:
    """Size of a Llama built from scratch (the default: ~3.3M parameters with byte tokens).

    Args:
        hidden_size: model width d.
        num_layers: transformer blocks.
        num_heads: attention heads (also key/value heads: no GQA at this size).
        intermediate_size: SwiGLU hidden width.
        max_position_embeddings: longest sequence the RoPE cache is built for.
        tie_word_embeddings: share the input embedding with the LM head.
    """

    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 688
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        sizes = ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings")
        check_settings("model.init_args.tiny_llama", [
            *((name, getattr(self, name), getattr(self, name) >= 1, "must be ≥ 1") for name in sizes),
            ("hidden_size", self.hidden_size, self.num_heads < 1 or self.hidden_size % self.num_heads == 0,
             f"must be a multiple of num_heads={self.num_heads} (each head gets hidden_size / num_heads)"),
        ])


def build_tiny_llama(config: TinyLlamaConfig, vocab_size: int, pad_token_id: int, eos_token_id: int,
                     seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised `LlamaForCausalLM` (sdpa attention, fp32)."""
    if config.hidden_size % config.num_heads:
        raise ValueError(f"hidden_size {config.hidden_size} is not divisible by num_heads {config.num_heads}")
    llama_config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(llama_config)
    return model


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a local Hugging Face causal-LM directory (config.json + weights), offline, in `dtype`;
    or a `.gguf` file, dequantised (`ortho_train.gguf_checkpoint`).

    `runs/<name>/latest/...` names the newest run of `<name>` (`ortho_train.run_paths`).

    Raises:
        FileNotFoundError: the directory or its config.json is missing.
        ValueError: the directory holds no causal LM, or its weight file is truncated or corrupt.
    """
    if is_gguf_file(path):
        return load_gguf_causal_lm(path, dtype)
    path = resolve_latest(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model directory {str(path)!r} not found or has no config.json "
            "(expected a directory written by save_pretrained, e.g. <run>/hf_model)"
        )
    try:
        config = AutoConfig.from_pretrained(path, **LOCAL_FILES_ONLY)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path / 'config.json'} is not a readable Hugging Face config: "
                         f"{str(err).splitlines()[0]}") from err
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"model directory {str(path)!r} holds a {config.model_type!r} model "
                         f"({', '.join(config.architectures or ['no architecture'])}), not a causal LM: "
                         "ortho-train needs a decoder that AutoModelForCausalLM loads")
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **LOCAL_FILES_ONLY)
    except Exception as err:  # safetensors/torch raise their own types for damaged files
        files = sorted(str(f) for pattern in WEIGHT_PATTERNS for f in path.glob(pattern)) or [str(path)]
        raise ValueError(f"could not load the weights in {', '.join(files)} ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); the file is truncated, corrupt "
                         "or missing: save the model again") from err


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's state dict (tied weights once): about what `save_pretrained` writes."""
    tensors = {t.data_ptr(): t for t in model.state_dict().values() if isinstance(t, torch.Tensor)}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted `name` (e.g. "model.layers.0.mlp.up_proj") by `module`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`with eval_mode(model):` runs the block with `model.eval()` and restores the model's
    previous train/eval mode afterwards, also when the block raises."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextmanager
def requires_grad_as(parameters: Iterable[torch.Tensor], flag: bool) -> Iterator[None]:
    """Every tensor of `parameters` has `requires_grad = flag` inside the block; each one's own
    flag is restored afterwards, also when the block raises."""
    parameters = list(parameters)
    flags = [p.requires_grad for p in parameters]
    try:
        for p in parameters:
            p.requires_grad_(flag)
        yield
    finally:
        for p, old in zip(parameters, flags):
            p.requires_grad_(old)


def head_is_tied(model: nn.Module) -> bool:
    """True when the LM head's weight is the input embedding's (`tie_word_embeddings`)."""
    if not (hasattr(model, "get_output_embeddings") and hasattr(model, "get_input_embeddings")):
        return False
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embedding is not None and head.weight is embedding.weight


def linear_layers(model: nn.Module, include_lm_head: bool = False) -> dict[str, nn.Linear]:
    """The `nn.Linear` modules of a (Hugging Face) model by qualified name.

    The output embedding (`model.get_output_embeddings()`, Llama's `lm_head`) is left out
    unless `include_lm_head`: the sieve keeps it dense by default. A head *tied* to the input
    embedding is always left out (with a warning when it was asked for): quantising, sieving
    or training its support would change the input embedding too, which then sits outside
    the base/ortho split — the α = 0 model's embedding would carry what S learnt.

    A model with GPT-2-style `Conv1D` projections is refused by name
    (`ortho_train.model_support.UnsupportedLayerError`): returning its nn.Linear layers alone
    would skip them silently.
    """
    require_linear_only(model, "selecting the linear layers to quantise, sieve or isolate")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if include_lm_head and head is not None and head_is_tied(model):
        warnings.warn("the LM head is tied to the input embedding: it stays dense (not quantised, "
                      "sieved or isolated); untie it (tie_word_embeddings=False) to sieve it", stacklevel=2)
        include_lm_head = False
    return {
        name: module for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (include_lm_head or module is not head)
    }
