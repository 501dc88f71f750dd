"""A few rows of TOFU and MUSE in their published schemas, written into a test's own directory, and
a tiny byte-level model directory to evaluate on them."""
import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ortho_train.tokenization import build_byte_tokenizer


def _tofu_row(i: int, perturbed: bool) -> dict:
    row = {"question": f"Where was author {i} born?", "answer": f"Author {i} was born in Town {i}."}
    if perturbed:
        row.update(paraphrased_answer=f"Town {i} is where author {i} was born.",
                   paraphrased_question=f"What is the birthplace of author {i}?",
                   perturbed_answer=[f"Author {i} was born in City {j}." for j in range(3)])
    return row


def _fact_row(i: int) -> dict:  # real_authors_perturbed / world_facts_perturbed: no paraphrase
    return {"question": f"Who wrote book {i}?", "answer": f"Writer {i}",
            "perturbed_answer": [f"Writer {i + j}" for j in range(1, 4)]}


def write_tofu(directory: Path, rows: int = 3, json_lines: bool = True) -> Path:
    """`<dir>/<config>.json` for forget10(_perturbed), retain90, retain_perturbed, real_authors_perturbed,
    world_facts_perturbed: JSON Lines as on the hub, or one JSON array."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {"forget10": [_tofu_row(i, False) for i in range(rows)],
             "retain90": [_tofu_row(100 + i, False) for i in range(rows)],
             "forget10_perturbed": [_tofu_row(i, True) for i in range(rows)],
             "retain_perturbed": [_tofu_row(100 + i, True) for i in range(rows)],
             "real_authors_perturbed": [_fact_row(i) for i in range(rows)],
             "world_facts_perturbed": [_fact_row(50 + i) for i in range(rows)]}
    for config, content in files.items():
        text = "\n".join(json.dumps(r) for r in content) + "\n" if json_lines else json.dumps(content)
        (directory / f"{config}.json").write_text(text)
    return directory


def write_muse(directory: Path, rows: int = 3) -> Path:
    """`<dir>/<config>/<split>.json` as MUSE's download script writes it (JSON arrays; privleak and
    raw as bare strings)."""
    content = {
        "verbmem/forget": [{"prompt": f"The match on day {i} ended", "gt": f" with a draw at {i} all."}
                           for i in range(rows)],
        "knowmem/forget_qa": [{"question": f"Who scored on day {i}?", "answer": f"Player {i}"} for i in range(rows)],
        "knowmem/retain_qa": [{"question": f"Who won cup {i}?", "answer": f"Club {i}"} for i in range(rows)],
        "knowmem/forget_qa_icl": [{"question": "Who refereed?", "answer": "Smith"}],
        "knowmem/retain_qa_icl": [{"question": "Who coached?", "answer": "Jones"}],
        "privleak/forget": [f"Forget article {i}: the council met and voted {i} times." for i in range(rows)],
        "privleak/holdout": [f"Holdout article {i}: a storm closed {i} roads overnight." for i in range(rows)],
        "privleak/retain": [f"Retain article {i}: prices rose {i} percent." for i in range(rows)],
    }
    for name, rows_ in content.items():
        path = directory / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows_))
    return directory


def tiny_byte_model(directory: Path, seed: int) -> Path:
    """A 2-layer, 32-wide random Llama over the byte tokenizer, saved with its tokenizer."""
    tokenizer = build_byte_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, initializer_range=0.2,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
