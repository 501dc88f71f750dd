"""Members and holdouts are exchangeable: a model that never saw a canary cannot tell them apart.

With members given the first ids (0000–0099) a tokenizer that splits numbers unevenly separates
them from holdouts by the id alone when the whole canary is scored; the MIA scores the secret's
tokens only, which no id assignment confounds (the contrast is checked in the test itself)."""
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


def _loss_auc(model, tokenizer, members, holdout, span="secret") -> float:
    def tokenised(canaries):
        return TokenisedCanaries.from_canaries(canaries, lambda text: encode_text(tokenizer, text))

    pad = tokenizer.pad_token_id
    m = sequence_mia_scores(model, tokenised(members), pad, span=span)["loss"]
    h = sequence_mia_scores(model, tokenised(holdout), pad, span=span)["loss"]
    return roc_auc(m, h)


def test_untrained_bpe_model_scores_chance_mia(bpe_tokenizer):
    model = build_tiny_llama(TinyLlamaConfig(64, 2, 2, 128), len(bpe_tokenizer), bpe_tokenizer.pad_token_id,
                             bpe_tokenizer.eos_token_id, seed=0).eval()
    canaries = make_canaries(SPEC)
    se = auc_null_se(SPEC.num_members, SPEC.num_holdout)
    auc = _loss_auc(model, bpe_tokenizer, canaries.members, canaries.holdout)
    assert abs(auc - 0.5) < 3 * se, f"LOSS AUC {auc:.3f} of a model that never saw a canary (±{se:.3f})"
    # the contrast: ids 0000–0099 as members, as a naive split would do, are told apart by the id
    # alone when the whole canary is scored, but not by the secret's tokens
    ordered = sorted(canaries.members + canaries.holdout, key=lambda c: c.canary_id)
    confounded = _loss_auc(model, bpe_tokenizer, ordered[:100], ordered[100:], span="sequence")
    assert abs(confounded - 0.5) > 3 * se, f"contrast lost: confounded split gives {confounded:.3f}"
    secret_only = _loss_auc(model, bpe_tokenizer, ordered[:100], ordered[100:])
    assert abs(secret_only - 0.5) < 3 * se, f"secret-span LOSS AUC {secret_only:.3f} on the id-ordered split"


def test_delong_standard_error_by_hand_and_under_the_null():
    from ortho_train.metrics import roc_auc_standard_error

    # members (3, 1), non-members (2, 0, 4): ψ rows (1, 1, 0) and (0, 1, 0); V = (2/3, 1/3),
    # W = (1/2, 1, 0); Var = s²(V)/2 + s²(W)/3 = (1/18)/2 + (1/4)/3 = 1/36 + 1/12 = 1/9
    assert roc_auc_standard_error([3.0, 1.0], [2.0, 0.0, 4.0]) == pytest.approx(1 / 3)
    assert roc_auc_standard_error([5.0, 6.0], [1.0, 2.0]) == 0.0  # perfect separation
    scores = torch.randn(2200, generator=torch.Generator().manual_seed(0)).double()
    assert roc_auc_standard_error(scores[:200], scores[200:]) == pytest.approx(auc_null_se(200, 2000), rel=0.15)


def test_span_labels_keep_the_secret_tokens_only():
    from ortho_train.datamodule import pad_collate
    from ortho_train.evaluation import span_labels

    canaries = TokenisedCanaries([torch.tensor([5, 6]), torch.tensor([7])], [torch.tensor([8, 9]), torch.tensor([10])],
                                 [torch.tensor([5, 6, 8, 9, 11]), torch.tensor([7, 10, 12])], ["a", "b"], ["s", "t"])
    labels = span_labels(pad_collate(canaries.full_ids, 0)["labels"], canaries, range(2))
    assert labels.tolist() == [[-100, -100, 8, 9, -100], [-100, 10, -100, -100, -100]]
