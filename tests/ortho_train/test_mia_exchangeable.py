"""Members and holdouts are exchangeable: a model that never saw a canary cannot tell them apart.

With members given the first ids (0000–0099) a tokenizer that splits numbers unevenly separates
them from holdouts by the id alone; these tests fail under that assignment (the contrast is
checked in the test itself)."""
import math
from dataclasses import replace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ortho_train.canaries import CanaryConfig, make_canaries
from ortho_train.corpus import read_corpus_text
from ortho_train.datamodule import TokenisedCanaries
from ortho_train.evaluation import sequence_mia_scores
from ortho_train.metrics import roc_auc
from ortho_train.models import TinyLlamaConfig, build_tiny_llama
from ortho_train.tokenization import encode_text
from tests.ortho_train.unlearn_helpers import single_thread  # noqa: F401

SPEC = CanaryConfig(num_members=100, num_holdout=400, secret_length=6, seed=3)


def auc_null_se(n_members: int, n_holdout: int) -> float:
    """Standard error of the ROC-AUC of an uninformative score (Mann–Whitney U under H0)."""
    return math.sqrt((n_members + n_holdout + 1) / (12 * n_members * n_holdout))


def test_members_are_a_seeded_random_choice_among_all_canaries():
    canaries = make_canaries(SPEC)
    member_ids = torch.tensor([float(c.canary_id) for c in canaries.members])
    holdout_ids = torch.tensor([float(c.canary_id) for c in canaries.holdout])
    se = auc_null_se(len(member_ids), len(holdout_ids))
    # a score that knows only the id number cannot separate the two sets
    assert abs(roc_auc(member_ids, holdout_ids) - 0.5) < 3 * se
    assert make_canaries(SPEC).members == canaries.members  # seeded
    assert make_canaries(replace(SPEC, seed=4)).members != canaries.members
    all_ids = sorted(c.canary_id for c in canaries.members + canaries.holdout)
    assert all_ids == [f"{i:04d}" for i in range(500)]  # ids and secrets drawn alike for every canary


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A 600-token BPE tokenizer trained on public text (numbers split into learnt pieces)."""
    text = read_corpus_text("shakespeare")[:300_000]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "<unk>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([text[i:i + 1000] for i in range(0, len(text), 1000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="</s>")


def _loss_auc(model, tokenizer, members, holdout) -> float:
    def tokenised(canaries):
        return TokenisedCanaries.from_canaries(canaries, lambda text: encode_text(tokenizer, text))

    pad = tokenizer.pad_token_id
    m = sequence_mia_scores(model, tokenised(members), pad)["loss"]
    h = sequence_mia_scores(model, tokenised(holdout), pad)["loss"]
    return roc_auc(m, h)


def test_untrained_bpe_model_scores_chance_mia(bpe_tokenizer):
    model = build_tiny_llama(TinyLlamaConfig(64, 2, 2, 128), len(bpe_tokenizer), bpe_tokenizer.pad_token_id,
                             bpe_tokenizer.eos_token_id, seed=0).eval()
    canaries = make_canaries(SPEC)
    se = auc_null_se(SPEC.num_members, SPEC.num_holdout)
    auc = _loss_auc(model, bpe_tokenizer, canaries.members, canaries.holdout)
    assert abs(auc - 0.5) < 3 * se, f"LOSS AUC {auc:.3f} of a model that never saw a canary (±{se:.3f})"
    # the contrast: ids 0000–0099 as members, as a naive split would do, are told apart by the id alone
    ordered = sorted(canaries.members + canaries.holdout, key=lambda c: c.canary_id)
    confounded = _loss_auc(model, bpe_tokenizer, ordered[:100], ordered[100:])
    assert abs(confounded - 0.5) > 3 * se, f"contrast lost: confounded split gives {confounded:.3f}"
