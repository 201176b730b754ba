"""SQuAD v1.1: answer metrics, local loading, greedy generation, truncation and the -F1 objective."""

from __future__ import annotations

import gzip
import json
import os

import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

import mechanisms
import paczero
import zo
from conftest import gpt2_tokenizer, tiny_opt
from data import SQUAD_TEMPLATES, DataError, QAExample, load_squad
from evaluate import (GenerationScorer, best_exact_match, best_f1, exact_match, normalize_answer,
                      token_f1)

TEMPLATE = SQUAD_TEMPLATES["squad"]
NEWLINE = 198  # GPT-2 BPE "\n"
DOUBLE_NEWLINE = 628  # GPT-2 BPE "\n\n"
SHORT_POSITIONS = 64  # max_position_embeddings of the models that force truncation

TEAMS = ["Denver Broncos", "Carolina Panthers", "Green Bay Packers", "New England Patriots",
         "Seattle Seahawks", "Dallas Cowboys", "Miami Dolphins", "Chicago Bears"]
CITIES = ["Santa Clara", "Houston", "Phoenix", "New Orleans", "Miami", "Atlanta", "Tampa", "Detroit"]


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


def squad_articles(count: int, offset: int) -> list[dict]:
    """Build `count` articles in the official SQuAD v1.1 schema, two questions each.

    The first question of each has three gold answers (two of them equal, as in the
    official dev set), so that loading must keep every answer, duplicates included.
    """
    articles = []
    for index in range(count):
        team = TEAMS[(index + offset) % len(TEAMS)]
        city = CITIES[(index + offset) % len(CITIES)]
        year = 1970 + index + offset
        context = f"The {team} won the final in {year} at {city}. The game drew a record crowd."
        articles.append({
            "title": f"Final_{year}",
            "paragraphs": [{
                "context": context,
                "qas": [
                    {"id": f"q{year}a", "question": f"Who won the final in {year}? ",
                     "answers": [{"answer_start": context.index(team), "text": team},
                                 {"answer_start": context.index(team) - 4, "text": f"The {team}"},
                                 {"answer_start": context.index(team), "text": team}]},
                    {"id": f"q{year}b", "question": f"Where was the final of {year} played?",
                     "answers": [{"answer_start": context.index(city), "text": city}]},
                ],
            }],
        })
    return articles


def write_squad_folder(path, train_articles: int = 8, dev_articles: int = 4, compress: bool = False) -> str:
    os.makedirs(path, exist_ok=True)
    suffix = ".json.gz" if compress else ".json"
    opener = gzip.open if compress else open
    for stem, count, offset in (("train-v1.1", train_articles, 0), ("dev-v1.1", dev_articles, 100)):
        payload = {"version": "1.1", "data": squad_articles(count, offset)}
        with opener(os.path.join(path, stem + suffix), "wt", encoding="utf-8") as handle:
            json.dump(payload, handle)
    return str(path)


def write_text(path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def make_example(context: str, question: str = "Who won the final?", title: str = "Super Bowl") -> QAExample:
    return QAExample(title=title, context=context, question=question, answers=("Denver Broncos",))


def token_id(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, f"{text!r} is {len(ids)} tokens; the test needs a single token"
    return ids[0]


def prompt_lengths(encoded) -> dict[int, int]:
    """Map each example index to its prompt length in tokens (padding excluded)."""
    lengths = {}
    for batch in encoded.batches:
        for row, length in zip(batch.rows.tolist(), batch.attention_mask.sum(dim=1).tolist()):
            lengths[row] = length
    return lengths


def prompt_ids(encoded) -> dict[int, list[int]]:
    """Map each example index to its prompt's token ids, left padding removed."""
    prompts = {}
    for batch in encoded.batches:
        for row, ids, mask in zip(batch.rows.tolist(), batch.input_ids, batch.attention_mask):
            prompts[row] = ids[mask.bool()].tolist()
    return prompts


def position_scripted_opt(tokenizer, script: dict[int, int], default_token: int, max_positions: int = 64):
    """Build a 1-layer OPT whose greedy next token depends only on the position it is read at.

    At 0-based position p the argmax is script.get(p, default_token), whatever the tokens.
    Every weight starts at zero, so attention and MLP add nothing to the residual stream,
    which is then the learned position embedding alone. Each distinct output token gets
    the zero-mean direction e_2k - e_2k+1: the position embedding points along the chosen
    token's direction and the untied LM head has that direction as the token's row. After
    the final layer norm the chosen token's logit is about 5.7 and every other logit is 0.
    """
    config = OPTConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                       num_attention_heads=2, max_position_embeddings=max_positions, word_embed_proj_dim=16,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, dropout=0.0, attention_dropout=0.0,
                       tie_word_embeddings=False)
    model = OPTForCausalLM(config)
    model.eval()
    tokens = sorted(set(script.values()) | {default_token})
    assert 2 * len(tokens) <= config.hidden_size
    direction = {}
    for k, token in enumerate(tokens):
        vector = torch.zeros(config.hidden_size)
        vector[2 * k] = 1.0
        vector[2 * k + 1] = -1.0
        direction[token] = vector

    decoder = model.model.decoder
    # OPT's learned position table is indexed by position + 2 (its first two rows are unused).
    offset = decoder.embed_positions.offset
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        decoder.final_layer_norm.weight.fill_(1.0)
        for position in range(max_positions):
            decoder.embed_positions.weight[position + offset] = direction[script.get(position, default_token)]
        for token, vector in direction.items():
            model.lm_head.weight[token] = vector
    return model


class RecordingModel:
    """Forward `generate` to a real model and keep each raw output, to see the padded tails."""

    def __init__(self, model):
        self.model = model
        self.outputs = []
        self.prompt_widths = []

    def generate(self, **kwargs):
        output = self.model.generate(**kwargs)
        self.outputs.append(output)
        self.prompt_widths.append(kwargs["input_ids"].shape[1])
        return output


def new_tokens_by_row(recorder: RecordingModel, encoded) -> dict[int, list[int]]:
    rows = {}
    for batch, output, width in zip(encoded.batches, recorder.outputs, recorder.prompt_widths):
        for row, tokens in zip(batch.rows.tolist(), output[:, width:]):
            rows[row] = tokens.tolist()
    return rows


@pytest.fixture(scope="module")
def bos_tokenizer():
    """The GPT-2 BPE tokenizer prepending </s> to every text, as OPT's tokenizer does."""
    tokenizer = gpt2_tokenizer()
    tokenizer.add_bos_token = True
    assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id
    return tokenizer


# ---------------------------------------------------------------------------------------
# Normalisation, F1 and exact match
# ---------------------------------------------------------------------------------------


def test_normalize_drops_case_punctuation_articles():
    assert normalize_answer("The  Eiffel, Tower!") == "eiffel tower"
    assert normalize_answer("An apple a day") == "apple day"
    # Articles are dropped as whole words only.
    assert normalize_answer("Theater and anthem") == "theater and anthem"
    assert normalize_answer("  in\t1976.\n") == "in 1976"


@pytest.mark.parametrize("prediction, gold, f1, em", [
    ("Denver Broncos", "Broncos", 2 / 3, 0.0),
    ("the Eiffel Tower", "Eiffel Tower", 1.0, 1.0),
    ("in 1976.", "1976", 2 / 3, 0.0),
    ("Broncos", "Denver Broncos", 2 / 3, 0.0),
    ("Carolina Panthers", "Denver Broncos", 0.0, 0.0),
])
def test_f1_em_reference_pairs(prediction, gold, f1, em):
    assert token_f1(prediction, gold) == pytest.approx(f1, abs=1e-4)
    assert exact_match(prediction, gold) == em


def test_f1_counts_repeated_tokens():
    # Bag of tokens: "new new york" shares "new" once and "york" once with "new york".
    assert token_f1("new new york", "new york") == pytest.approx(0.8)


def test_empty_prediction_scores_zero():
    assert token_f1("", "Denver Broncos") == 0.0
    assert exact_match("", "Denver Broncos") == 0.0
    assert best_f1("", ["Denver Broncos", "Broncos"]) == 0.0
    assert best_exact_match("", ["Denver Broncos", "Broncos"]) == 0.0


def test_several_golds_take_max():
    golds = ["Carolina Panthers", "Denver Broncos", "the Broncos"]
    # The best gold comes neither first nor last, so a first-gold or last-gold bug fails.
    assert best_f1("Denver", golds) == pytest.approx(2 / 3, abs=1e-4)
    assert best_f1("Broncos", golds) == 1.0
    assert best_exact_match("broncos.", golds) == 1.0
    assert best_exact_match("Denver", golds) == 0.0


def test_punctuation_only_answers():
    # The official SQuAD v1.1 script gives F1 0 when no token is shared, even when both
    # answers normalise to the empty string, yet counts them as an exact match.
    assert normalize_answer("?!") == ""
    assert token_f1("?!", "...") == 0.0
    assert token_f1(".", ".") == 0.0
    assert exact_match("?!", "...") == 1.0
    assert best_exact_match("?!", ["Broncos", "."]) == 1.0


# ---------------------------------------------------------------------------------------
# Loading local SQuAD files
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_load_squad_local(tmp_path, compress):
    folder = write_squad_folder(tmp_path / "squad", train_articles=5, dev_articles=3, compress=compress)
    loaded = load_squad(folder)

    assert len(loaded.train) == 10
    assert len(loaded.validation) == 6
    assert loaded.source == os.path.abspath(folder)
    first = loaded.train[0]
    assert first.title == "Final_1970"
    assert first.context.startswith("The Denver Broncos won the final in 1970")
    # The loader strips the trailing space of the question text.
    assert first.question == "Who won the final in 1970?"
    assert first.answers == ("Denver Broncos", "The Denver Broncos", "Denver Broncos")
    assert loaded.train[1].answers == ("Santa Clara",)
    assert loaded.validation[0].title == "Final_2070"
    assert loaded.validation[-1].question == "Where was the final of 2072 played?"


def test_load_squad_plain_equals_gzip(tmp_path):
    plain = load_squad(write_squad_folder(tmp_path / "plain"))
    packed = load_squad(write_squad_folder(tmp_path / "packed", compress=True))
    assert packed.train == plain.train
    assert packed.validation == plain.validation


def malformed_payloads() -> dict[str, str]:
    no_paragraphs = {"data": [{"title": "Final", "qas": []}]}
    no_answers = {"data": squad_articles(1, 0)}
    no_answers["data"][0]["paragraphs"][0]["qas"][0]["answers"] = []
    return {
        "missing_data": json.dumps({"version": "1.1"}),
        "data_not_list": json.dumps({"data": {"title": "Final"}}),
        "missing_paragraphs": json.dumps(no_paragraphs),
        "no_answers": json.dumps(no_answers),
        "no_questions": json.dumps({"data": []}),
        "not_json": "Title,Context\nFinal,The game\n",
    }


@pytest.mark.parametrize("case", sorted(malformed_payloads()))
def test_load_squad_malformed(tmp_path, case):
    folder = write_squad_folder(tmp_path / "squad")
    train_path = os.path.join(folder, "train-v1.1.json")
    write_text(train_path, malformed_payloads()[case])
    with pytest.raises(DataError) as error:
        load_squad(folder)
    assert train_path in str(error.value)


def test_load_squad_bad_gzip(tmp_path):
    folder = tmp_path / "squad"
    folder.mkdir()
    path = str(folder / "train-v1.1.json.gz")
    write_text(path, "{\"data\": []}")
    with pytest.raises(DataError) as error:
        load_squad(str(folder))
    assert path in str(error.value)


@pytest.mark.parametrize("stem", ["train-v1.1", "dev-v1.1"])
def test_load_squad_missing_file(tmp_path, stem):
    folder = write_squad_folder(tmp_path / "squad")
    os.remove(os.path.join(folder, stem + ".json"))
    with pytest.raises(DataError) as error:
        load_squad(folder)
    assert os.path.join(folder, stem) in str(error.value)


# ---------------------------------------------------------------------------------------
# Greedy generation
# ---------------------------------------------------------------------------------------


def test_generate_batch_equals_alone(tokenizer):
    model = tiny_opt(tokenizer, seed=5)
    scorer = GenerationScorer(tokenizer, TEMPLATE, max_length=128, max_new_tokens=6)
    examples = [
        make_example("The Denver Broncos won Super Bowl 50 at Levi's Stadium in Santa Clara, California."),
        make_example("Broncos."),
        make_example("The game was played on February 7, 2016.", question="When?"),
        make_example("Peyton Manning became the first quarterback to lead two teams to the title.",
                question="Which quarterback led two teams to a Super Bowl win?"),
        make_example("CBS aired it.", title="Broadcast"),
    ]

    batched = scorer.encode(examples, micro_batch_size=8)
    mask = batched.batches[0].attention_mask
    # The check means something only if the batch needs left padding.
    assert len(batched.batches) == 1
    assert int(mask.sum(dim=1).min()) < mask.shape[1]

    together = scorer.generate(model, batched)
    alone = scorer.generate(model, scorer.encode(examples, micro_batch_size=1))
    assert together == alone
    assert any(together)
    assert all("\n" not in answer for answer in together)


def test_stop_ids_cover_newlines(tokenizer):
    scorer = GenerationScorer(tokenizer, TEMPLATE, max_length=128)
    assert NEWLINE in scorer.stop_ids
    assert DOUBLE_NEWLINE in scorer.stop_ids
    assert tokenizer.eos_token_id in scorer.stop_ids
    assert token_id(tokenizer, " yes") not in scorer.stop_ids


@pytest.mark.parametrize("stop", ["\n", "\n\n", "eos"])
def test_generate_stops_per_row(tokenizer, stop):
    stop_id = tokenizer.eos_token_id if stop == "eos" else token_id(tokenizer, stop)
    yes = token_id(tokenizer, " yes")
    scorer = GenerationScorer(tokenizer, TEMPLATE, max_length=64, max_new_tokens=4)
    short = make_example("Broncos.")
    long = make_example("The Denver Broncos beat the Carolina Panthers in Santa Clara.")
    encoded = scorer.encode([short, long], micro_batch_size=2)
    lengths = prompt_lengths(encoded)
    # The long prompt must start generating past the short one's stop position, so that
    # the scripted stop only reaches the short row.
    assert lengths[1] >= lengths[0] + 3

    # The short row reads positions L-1, L, L+1 for its first three tokens: " yes",
    # " yes", then the stop token. Every other position yields " yes".
    model = position_scripted_opt(tokenizer, {lengths[0] + 1: stop_id}, default_token=yes)
    recorder = RecordingModel(model)
    answers = scorer.generate(recorder, encoded)

    assert answers == ["yes yes", "yes yes yes yes"]
    new_tokens = new_tokens_by_row(recorder, encoded)
    # The finished row is padded while the other one continues to max_new_tokens.
    assert new_tokens[0] == [yes, yes, stop_id, scorer.pad_id]
    assert new_tokens[1] == [yes, yes, yes, yes]


def test_generate_immediate_stop_gives_empty(tokenizer):
    scorer = GenerationScorer(tokenizer, TEMPLATE, max_length=64, max_new_tokens=4)
    encoded = scorer.encode([make_example("Broncos.")], micro_batch_size=1)
    length = prompt_lengths(encoded)[0]
    model = position_scripted_opt(tokenizer, {length - 1: NEWLINE}, default_token=token_id(tokenizer, " yes"))
    answers = scorer.generate(model, encoded)
    scores = scorer.f1_scores(model, encoded)
    assert answers == [""]
    assert scores[:, 0].tolist() == [0.0]


# ---------------------------------------------------------------------------------------
# Truncation of long contexts
# ---------------------------------------------------------------------------------------


def test_encode_truncates_context_left(bos_tokenizer):
    max_new_tokens = 8
    max_length = SHORT_POSITIONS
    scorer = GenerationScorer(bos_tokenizer, TEMPLATE, max_length, max_new_tokens)
    words = " ".join(f"word{i}" for i in range(80))
    long_context = f"Opening sentence that must be cut. {words} The Broncos won the final."
    examples = [make_example(long_context, question="Who won the final?", title="Super Bowl 50"),
                make_example("The Broncos won.", question="Who won?", title="Short")]

    encoded = scorer.encode(examples, micro_batch_size=2)
    assert encoded.truncated == 1

    prompts = prompt_ids(encoded)
    cut = prompts[0]
    text = bos_tokenizer.decode(cut[1:])
    assert cut[0] == bos_tokenizer.bos_token_id
    assert cut.count(bos_tokenizer.bos_token_id) == 1
    assert text.startswith("Title: Super Bowl 50\nContext: ")
    assert text.endswith("\nQuestion: Who won the final?\nAnswer:")
    assert len(cut) + max_new_tokens <= max_length
    # Re-tokenising at the cut can cost a token or two, but no more context than that
    # may be dropped.
    assert len(cut) + max_new_tokens >= max_length - 2

    kept = text.removeprefix("Title: Super Bowl 50\nContext: ").removesuffix("\nQuestion: Who won the final?\nAnswer:")
    assert "Opening sentence" not in kept
    assert long_context.endswith(kept.strip())
    assert kept.strip().endswith("The Broncos won the final.")

    short = bos_tokenizer.decode(prompts[1])
    assert short == "</s>" + TEMPLATE.prompt(examples[1])


def test_truncated_prompts_generate(bos_tokenizer):
    # Generating on a cut prompt must not index past the model's learned position table,
    # which has exactly SHORT_POSITIONS rows.
    max_new_tokens = 8
    model = position_scripted_opt(bos_tokenizer, {}, default_token=token_id(bos_tokenizer, " yes"),
                                  max_positions=SHORT_POSITIONS)
    scorer = GenerationScorer(bos_tokenizer, TEMPLATE, model.config.max_position_embeddings, max_new_tokens)
    context = " ".join(f"word{i}" for i in range(100))
    encoded = scorer.encode([make_example(context), make_example("Short.")], micro_batch_size=2)
    assert encoded.truncated == 1
    assert scorer.generate(model, encoded) == ["yes " * 7 + "yes"] * 2


def test_encode_rejects_no_room(bos_tokenizer):
    scorer = GenerationScorer(bos_tokenizer, TEMPLATE, max_length=64, max_new_tokens=50)
    question = "Which team won the final that was played in the stadium in the city by the bay?"
    with pytest.raises(ValueError, match="max-new-tokens"):
        scorer.encode([make_example("The Broncos won. " * 10, question=question)], micro_batch_size=1)


# ---------------------------------------------------------------------------------------
# The -F1 training objective
# ---------------------------------------------------------------------------------------


def test_projected_gradient_sign(tokenizer, monkeypatch):
    model = tiny_opt(tokenizer, seed=0)
    scorer = GenerationScorer(tokenizer, TEMPLATE, max_length=128, max_new_tokens=4)
    examples = [make_example("The Denver Broncos won."), make_example("The Broncos won.")]
    encoded = scorer.encode(examples, micro_batch_size=2)
    probe = model.model.decoder.final_layer_norm.bias
    start = probe.detach()[0].item()

    # The only replaced model call in this file: generation returns answers chosen by
    # which side of theta the probe weight is on, because a random model's greedy answers
    # rarely change under a 1e-3 perturbation. The test is about the sign convention
    # g_i = (l+ - l-) / (2 eps) with l = -F1, and that code runs unchanged.
    def scripted_generate(self, model, encoded):
        above = model.model.decoder.final_layer_norm.bias.detach()[0].item() > start
        return ["Denver Broncos" if above else "Broncos", "Denver"]

    monkeypatch.setattr(GenerationScorer, "generate", scripted_generate)

    eps = 1e-3
    seed = 7
    z = next(zo.directions([probe], seed))[1]
    estimate = zo.projected_gradients([probe], seed, eps, lambda: scorer.losses(model, encoded))

    assert estimate.grads.shape == (2,)
    assert estimate.grads.dtype == torch.float32
    # Moving along +z raises F1 from 2/3 to 1 exactly when z[0] > 0, so the loss -F1 falls
    # along +z and g_0 must have the opposite sign of z[0].
    direction = 1.0 if float(z[0]) > 0 else -1.0
    assert estimate.grads[0].item() == pytest.approx(-direction * (1 - 2 / 3) / (2 * eps), rel=1e-4)
    assert estimate.loss_plus[0].item() == pytest.approx(-1.0 if direction > 0 else -2 / 3, rel=1e-6)
    # Identical answers at both points give exactly zero, not a rounding residue.
    assert estimate.grads[1].item() == 0.0
    assert estimate.loss_plus[1].item() == estimate.loss_minus[1].item()


def test_zero_mean_signs_positive():
    signs = mechanisms.subset_signs(torch.tensor([0.0, -0.0, -1e-9, 2.5], dtype=torch.float64))
    assert signs.tolist() == [1, 1, -1, 1]

    membership = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    grads = torch.tensor([0.0, 0.0, -3.0, 1.0])
    means = mechanisms.subset_means(membership, grads)
    assert mechanisms.subset_signs(means).tolist() == [1, -1]


# ---------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------


def test_train_squad_end_to_end(tmp_path, tiny_model_dir):
    data_dir = write_squad_folder(tmp_path / "squad", train_articles=8, dev_articles=4)
    output_dir = str(tmp_path / "run")
    cfg = paczero.TrainConfig(model=tiny_model_dir, task="squad", data_dir=data_dir, pool_size=8, num_subsets=4,
                              steps=3, max_new_tokens=4, dev_size=4, test_size=6, eval_every=0, seed=0,
                              secret_seed=1, device="cpu", output_dir=output_dir)
    result = paczero.train(cfg)

    with open(os.path.join(output_dir, "result.json"), encoding="utf-8") as handle:
        saved = json.load(handle)
    assert saved["task"] == "squad"
    assert saved["metric_name"] == "f1"
    assert "f1" in saved["test_metrics"]
    assert "exact_match" in saved["test_metrics"]
    assert saved["test_metric"] == saved["test_metrics"]["f1"]
    assert 0.0 <= saved["test_metrics"]["exact_match"] <= 1.0
    assert 0.0 <= saved["zero_difference_rate"] <= 1.0
    assert saved["steps_run"] == 3
    assert saved["test_size"] == 6
    assert saved["pool_size"] == 8
    assert saved["zero_difference_rate"] == result["zero_difference_rate"]
