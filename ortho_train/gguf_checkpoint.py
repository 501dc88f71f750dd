"""A GGUF file as `model_path`: the causal LM and tokenizer it holds, as a plain float model.

transformers reads GGUF files (`from_pretrained(folder, gguf_file=name)`, package `gguf`). Asked
to, it unpacks every tensor into the requested dtype at load time
(`GgufConfig(dequantize=True)`): the result is an ordinary dense model, with no quantisation
config, that `save_pretrained` writes like any other (without that flag transformers keeps the
GGUF blocks, refuses to save the model, and on a GPU asks the hub for a matmul kernel — code
downloaded at run time, which the toolkit never runs). ortho-train treats the dequantised weights
as "the pretrained model": their 4-bit origin is part of their history, like any checkpoint's.
A Q4_K_M file's weights lie on 4-bit grids of 32-weight sub-blocks, which flatters every later
4-bit quantisation of them: results on such a model say so.

The tokenizer is rebuilt from the file's vocabulary (`AutoTokenizer.from_pretrained(folder,
gguf_file=name)`); a run saves it beside `hf_model/` as usual, so later stages read the saved
directory, not the GGUF file.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from ortho_train.loading import LOCAL_FILES_ONLY

SUFFIX = ".gguf"


def is_gguf_file(path: str | Path) -> bool:
    """`path` names a GGUF file (by its suffix; whether it exists is checked on loading)."""
    return Path(path).suffix.lower() == SUFFIX


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} not found")
    return path


def load_gguf_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The causal LM of a GGUF file, every tensor dequantised to `dtype`, offline.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a GGUF model transformers can read (damaged, or an
            architecture it does not support).
    """
    path = _existing(path)
    try:
        return AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype, **LOCAL_FILES_ONLY,
            quantization_config=GgufConfig(gguf_file=path.name, dequantize=True))
    except Exception as err:  # gguf/transformers raise many types for a damaged or foreign file
        raise ValueError(f"could not load the GGUF model {str(path)!r} ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}): the file is damaged or its "
                         "architecture is not one transformers reads from GGUF") from err


@functools.lru_cache(maxsize=2)
def load_gguf_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a GGUF file (cached: the module and the data module both ask for it, and
    rebuilding a 262k vocabulary takes tens of seconds)."""
    path = _existing(path)
    try:
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, **LOCAL_FILES_ONLY)
    except Exception as err:
        raise ValueError(f"could not read the tokenizer of the GGUF file {str(path)!r} "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err
