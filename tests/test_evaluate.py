"""Label-word scoring against plain unpadded forward passes, and the metrics built on it."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_opt
from data import SST2_TEMPLATES, ClassificationTemplate, LabeledText
from evaluate import LabelWordError, LabelWordScorer, accuracy, label_word_losses

# Token counts differ (2 to 12 prompt tokens), so one micro-batch needs left padding.
EXAMPLES = [
    LabeledText("a truly wonderful story , really wonderful and warm", 1),
    LabeledText("dull", 0),
    LabeledText("the plot is flat", 0),
    LabeledText("bold", 1),
]

# " mesmerizing" is 2 GPT-2 BPE tokens and " abysmal" 3, while " terrible" is one.
MULTI_TOKEN_WORDS = (" abysmal", " mesmerizing")


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_opt(tokenizer, seed=3)


def unpadded_log_probs(model, tokenizer, ids: list[int]) -> torch.Tensor:
    """Return the log-softmax over the vocabulary at every position of one sequence run alone."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def template_with(words: tuple[str, ...]) -> ClassificationTemplate:
    return ClassificationTemplate(name="test", format="{text} It was", label_words=words, description="")


def test_scores_single_token_padded(model, tokenizer):
    template = SST2_TEMPLATES["mezo"]
    scorer = LabelWordScorer(tokenizer, template)
    assert scorer.single_token
    encoded = scorer.encode(EXAMPLES, micro_batch_size=8)
    assert len(encoded.batches) == 1
    assert int(encoded.batches[0].attention_mask.sum(dim=1).min()) < encoded.batches[0].input_ids.shape[1]

    scores = scorer.scores(model, encoded)
    words = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in template.label_words]
    for row, example in enumerate(EXAMPLES):
        ids = tokenizer(template.prompt(example.text))["input_ids"]
        expected = unpadded_log_probs(model, tokenizer, ids)[-1, words]
        torch.testing.assert_close(scores[row], expected, rtol=0.0, atol=1e-5)


def test_scores_independent_of_batching(model, tokenizer):
    scorer = LabelWordScorer(tokenizer, SST2_TEMPLATES["mezo"])
    together = scorer.scores(model, scorer.encode(EXAMPLES, micro_batch_size=8))
    alone = scorer.scores(model, scorer.encode(EXAMPLES, micro_batch_size=1))
    torch.testing.assert_close(together, alone, rtol=0.0, atol=1e-5)


def test_scores_multi_token_mean(model, tokenizer):
    words = (" terrible",) + MULTI_TOKEN_WORDS
    template = template_with(words)
    scorer = LabelWordScorer(tokenizer, template)
    assert not scorer.single_token
    encoded = scorer.encode(EXAMPLES, micro_batch_size=16)
    assert encoded.max_word_tokens == 3

    scores = scorer.scores(model, encoded)
    for row, example in enumerate(EXAMPLES):
        prompt = tokenizer(template.prompt(example.text))["input_ids"]
        for column, word in enumerate(words):
            word_ids = tokenizer(word, add_special_tokens=False)["input_ids"]
            log_probs = unpadded_log_probs(model, tokenizer, prompt + word_ids)
            # Position k predicts token k + 1, so the word's tokens are read one position early.
            start = len(prompt) - 1
            picked = [float(log_probs[start + k, token]) for k, token in enumerate(word_ids)]
            expected = sum(picked) / len(picked)
            assert float(scores[row, column]) == pytest.approx(expected, abs=1e-5), (row, word)


def test_label_word_merging_rejected(tokenizer):
    # The template ends in a space and the words have none, so "was " + "bad" tokenizes as
    # "was", " bad": BPE folds the prompt's last token into the word.
    template = ClassificationTemplate(name="merge", format="{text} It was ", label_words=("bad", "great"),
                                      description="")
    scorer = LabelWordScorer(tokenizer, template)
    with pytest.raises(LabelWordError, match="merges with the prompt"):
        scorer.encode(EXAMPLES, micro_batch_size=4)


def test_label_words_sharing_token_rejected(tokenizer):
    with pytest.raises(LabelWordError):
        LabelWordScorer(tokenizer, template_with((" great", " great")))


def test_encode_over_max_length(tokenizer):
    scorer = LabelWordScorer(tokenizer, SST2_TEMPLATES["mezo"], max_length=5)
    with pytest.raises(ValueError, match="maximum length 5"):
        scorer.encode(EXAMPLES, micro_batch_size=4)


def test_encode_keeps_labels(tokenizer):
    scorer = LabelWordScorer(tokenizer, SST2_TEMPLATES["mezo"])
    encoded = scorer.encode(EXAMPLES, micro_batch_size=2)
    assert encoded.labels.tolist() == [e.label for e in EXAMPLES]
    assert len(encoded) == len(EXAMPLES)


def test_label_word_losses_hand_case():
    scores = torch.tensor([[math.log(0.2), math.log(0.8)], [0.0, 0.0], [-1.0, -3.0]])
    labels = torch.tensor([1, 0, 1])
    losses = label_word_losses(scores, labels)
    expected = [-math.log(0.8), math.log(2.0), 2.0 + math.log1p(math.exp(-2.0))]
    torch.testing.assert_close(losses, torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_accuracy_hand_case():
    scores = torch.tensor([[0.1, 0.9], [0.7, 0.3], [0.2, 0.4], [0.5, -0.5]])
    labels = torch.tensor([1, 0, 0, 1])
    assert accuracy(scores, labels) == 0.5
