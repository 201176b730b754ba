"""Metrics and the batched scoring they rest on.

Each task has a scorer with the same three methods: `encode` (tokenise a set once),
`losses` (the per-example training objective l_i, fp32) and `evaluate` (the metrics).
- Classification (SST-2) is scored by label words: the prompt is followed by each class's
  label word, and the class whose word the model finds most likely wins. The same scores
  give the training loss, the cross-entropy over the label words.
- Question answering (SQuAD) is scored by greedy generation: the answer is the
  continuation up to its first newline, compared with the gold answers by token F1 and
  exact match. The training objective is l_i = -F1, which is not differentiable; SPSA
  only needs its values.

Batching. Examples are tokenised once, sorted by length and cut into micro-batches padded
on the left only to the longest sequence in each. Left padding puts every sequence's last
token in the last column, so the LM head runs on the final positions only
(`logits_to_keep`), and explicit position ids (counting real tokens only) make a padded
sequence's logits equal to those of the same sequence run alone.
"""

from __future__ import annotations

import collections
import re
import string
from dataclasses import dataclass

import torch

from data import ClassificationTemplate, QATemplate


class LabelWordError(ValueError):
    """A label word does not tokenize the way scoring needs; the message gives the fix."""


@dataclass
class MicroBatch:
    input_ids: torch.Tensor       # (B, L), left padded
    attention_mask: torch.Tensor  # (B, L)
    position_ids: torch.Tensor    # (B, L)
    rows: torch.Tensor            # (B,) which example each row belongs to
    candidates: torch.Tensor      # (B,) which label word each row scores; -1 = all at once
    word_ids: torch.Tensor        # (B, W) the candidate's tokens, right-aligned, -1 padded


@dataclass
class EncodedClassification:
    """A tokenised, length-sorted, padded classification set, reused on every pass."""

    batches: list[MicroBatch]
    labels: torch.Tensor  # (N,)
    num_classes: int
    single_token: bool
    max_word_tokens: int
    num_tokens: int  # real (unpadded) tokens per full pass, for throughput figures
    prompt_ids: list[list[int]]  # per example, kept so that a subset can be re-batched
    micro_batch_size: int
    device: torch.device = torch.device("cpu")

    def __len__(self) -> int:
        return int(self.labels.numel())

    def to(self, device: torch.device) -> "EncodedClassification":
        self.device = torch.device(device)
        for batch in self.batches:
            for name in ("input_ids", "attention_mask", "position_ids", "word_ids"):
                setattr(batch, name, getattr(batch, name).to(device))
        return self


def _pad_left(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids, mask, positions


class LabelWordScorer:
    """Scores label words after a prompt, one forward pass per example when every word is one token.

    Construction checks how each label word tokenizes. Scoring then uses one of two paths:
    - every word is a single token: run the prompt alone and read the words' log-probs
      from the last position's logits;
    - otherwise: run prompt + word for each word (one sequence per candidate) and score it
      by the mean log-prob of its tokens.
    """

    # Switches that the benchmark's re-creation of slower scoring turns off.
    sort_by_length = True     # micro-batches of similar lengths pad less
    keep_all_logits = False   # True: run the LM head on every position
    sharding = None           # a distributed.Sharding: run only this rank's micro-batches, then sum

    def __init__(self, tokenizer, template: ClassificationTemplate, max_length: int | None = None):
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.word_ids = []
        for word in template.label_words:
            ids = tokenizer(word, add_special_tokens=False)["input_ids"]
            if not ids:
                raise LabelWordError(f"label word {word!r} of template {template.name!r} tokenizes to nothing")
            self.word_ids.append(list(ids))
        self.single_token = all(len(ids) == 1 for ids in self.word_ids)
        if self.single_token and len({ids[0] for ids in self.word_ids}) < len(self.word_ids):
            raise LabelWordError(f"label words {template.label_words} of template {template.name!r} share a token")

    def _encode_prompts(self, texts: list[str]) -> list[list[int]]:
        prompts = [self.template.prompt(t) for t in texts]
        encoded = self.tokenizer(prompts)["input_ids"]
        eos = self.tokenizer.eos_token_id
        bos = self.tokenizer.bos_token_id
        if encoded and eos is not None and eos != bos and len(encoded[0]) > 1 and encoded[0][-1] == eos:
            raise LabelWordError(
                "the tokenizer appends an end-of-sequence token to every prompt, so the label word "
                "would be scored after EOS; load the tokenizer with add_eos_token=False"
            )
        self._check_word_boundaries(prompts, encoded)
        return [list(ids) for ids in encoded]

    def _check_word_boundaries(self, prompts: list[str], encoded: list[list[int]]) -> None:
        """Each label word must tokenize after the prompt exactly as it does alone.

        Otherwise the prompt's last token could merge with the word (a template ending in a
        space followed by a word with a leading space, say), and the score would be read for
        a token sequence that does not occur in ordinary text.
        """
        for word, ids in zip(self.template.label_words, self.word_ids):
            joined = self.tokenizer([p + word for p in prompts])["input_ids"]
            for prompt, prompt_ids, joined_ids in zip(prompts, encoded, joined):
                if list(joined_ids) != list(prompt_ids) + ids:
                    raise LabelWordError(
                        f"label word {word!r} tokenizes as {ids} alone but the prompt {prompt[-40:]!r} "
                        f"followed by it tokenizes as ...{list(joined_ids)[-len(ids) - 2:]}; "
                        "the word merges with the prompt's end. Give the word a leading space and "
                        "end the template without one."
                    )

    def encode(self, examples: list, micro_batch_size: int) -> EncodedClassification:
        """Tokenise `examples` (with .text and .label) into length-sorted micro-batches."""
        if micro_batch_size < 1:
            raise ValueError(f"micro-batch size must be at least 1, got {micro_batch_size}")
        prompt_ids = self._encode_prompts([e.text for e in examples])
        labels = torch.tensor([e.label for e in examples], dtype=torch.long)
        return self._batch(prompt_ids, labels, micro_batch_size)

    def subset(self, encoded: EncodedClassification, rows) -> EncodedClassification:
        """The examples at `rows` (in that order) re-batched from their cached token ids."""
        rows = [int(r) for r in rows]
        subset = self._batch([encoded.prompt_ids[r] for r in rows], encoded.labels[rows], encoded.micro_batch_size)
        return subset.to(encoded.device)

    def _batch(self, prompt_ids: list[list[int]], labels: torch.Tensor, micro_batch_size: int) -> EncodedClassification:
        if prompt_ids and self.max_length is not None:
            lengths = [len(p) for p in prompt_ids]
            longest = max(lengths) + max(len(w) for w in self.word_ids)
            if longest > self.max_length:
                too_long = sum(1 for n in lengths if n + max(len(w) for w in self.word_ids) > self.max_length)
                raise ValueError(
                    f"{too_long} prompt(s) with their label word exceed the model's maximum length "
                    f"{self.max_length} tokens (longest: {longest}); shorten those texts or the template"
                )
        rows = []  # (example index, candidate index or -1, token ids, word ids)
        for index, ids in enumerate(prompt_ids):
            if self.single_token:
                rows.append((index, -1, ids, []))
            else:
                for candidate, word in enumerate(self.word_ids):
                    rows.append((index, candidate, ids + word, word))
        if self.sort_by_length:
            rows.sort(key=lambda r: len(r[2]))
        max_word = max(len(w) for w in self.word_ids)
        batches = []
        for start in range(0, len(rows), micro_batch_size):
            chunk = rows[start:start + micro_batch_size]
            ids, mask, positions = _pad_left([r[2] for r in chunk], self.pad_id)
            word_ids = torch.full((len(chunk), max_word), -1, dtype=torch.long)
            for row, r in enumerate(chunk):
                if r[3]:
                    word_ids[row, max_word - len(r[3]):] = torch.tensor(r[3])
            batches.append(MicroBatch(
                input_ids=ids, attention_mask=mask, position_ids=positions,
                rows=torch.tensor([r[0] for r in chunk]), candidates=torch.tensor([r[1] for r in chunk]),
                word_ids=word_ids,
            ))
        return EncodedClassification(
            batches=batches, labels=labels, num_classes=len(self.word_ids), single_token=self.single_token,
            max_word_tokens=max_word, num_tokens=sum(len(r[2]) for r in rows), prompt_ids=prompt_ids,
            micro_batch_size=micro_batch_size,
        )

    @torch.inference_mode()
    def scores(self, model, encoded: EncodedClassification) -> torch.Tensor:
        """(N, C) fp32 log-probabilities of each label word (mean over its tokens) after each prompt.

        The scores stay on the model's device until the end, so a pass over the pool costs
        one device-to-host copy, not one per micro-batch.
        """
        out = torch.zeros((len(encoded), encoded.num_classes), dtype=torch.float32, device=encoded.device)
        if self.single_token:
            label_tokens = torch.tensor([ids[0] for ids in self.word_ids], device=encoded.device)
        for index, batch in enumerate(encoded.batches):
            if self.sharding is not None and not self.sharding.owns(index):
                continue
            rows = batch.rows.to(encoded.device)
            if self.single_token:
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               position_ids=batch.position_ids, logits_to_keep=1).logits[:, -1, :]
                log_probs = torch.log_softmax(logits.float(), dim=-1)
                out[rows] = log_probs[:, label_tokens]
            else:
                candidates = batch.candidates.to(encoded.device)
                out[rows, candidates] = self._score_candidates(model, batch, encoded.max_word_tokens)
        if self.sharding is not None:
            out = self.sharding.combine(out)
        return out.cpu()

    def _score_candidates(self, model, batch: MicroBatch, max_word: int) -> torch.Tensor:
        # Keep max_word + 1 final positions. Position k of those predicts the token at
        # position k + 1, so the first max_word of them predict the last max_word tokens,
        # where the (right-aligned) candidate word sits.
        keep = 0 if self.keep_all_logits else max_word + 1
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, logits_to_keep=keep).logits[:, -(max_word + 1):-1, :]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        present = batch.word_ids >= 0
        token_log_probs = log_probs.gather(-1, batch.word_ids.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        token_log_probs = torch.where(present, token_log_probs, torch.zeros_like(token_log_probs))
        return token_log_probs.sum(dim=1) / present.sum(dim=1)

    def losses(self, model, encoded: EncodedClassification) -> torch.Tensor:
        """l_i = cross-entropy over the label words, fp32, shape (N,)."""
        return label_word_losses(self.scores(model, encoded), encoded.labels)

    def evaluate(self, model, encoded: EncodedClassification) -> dict:
        acc = accuracy(self.scores(model, encoded), encoded.labels)
        return {"metric": acc, "accuracy": acc}


def owned_rows(encoded, sharding) -> list[int]:
    """Return the example rows of the micro-batches this process runs (all rows without sharding)."""
    return [row for index, batch in enumerate(encoded.batches)
            if sharding is None or sharding.owns(index) for row in batch.rows.tolist()]


def label_word_losses(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy over the label words: -log softmax(scores)[label], fp32, (N,)."""
    return torch.nn.functional.cross_entropy(scores, labels.to(scores.device), reduction="none")


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of examples whose highest-scoring label word is the gold one."""
    return float((scores.argmax(dim=1) == labels.to(scores.device)).float().mean())


# ---------------------------------------------------------------------------------------
# SQuAD v1.1: answer normalisation, F1 and exact match, greedy generation
# ---------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lowercase, drop punctuation, drop a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
    """Harmonic mean of token precision and recall after normalisation (bag of tokens).

    As in the official SQuAD v1.1 script, no shared token means F1 = 0, also when both
    answers normalise to nothing (punctuation only); exact match scores that case 1.
    """
    predicted = normalize_answer(prediction).split()
    expected = normalize_answer(gold).split()
    common = collections.Counter(predicted) & collections.Counter(expected)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(predicted)
    recall = overlap / len(expected)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def best_f1(prediction: str, golds) -> float:
    """F1 against the closest of several gold answers, as the official SQuAD script scores."""
    return max(token_f1(prediction, g) for g in golds)


def best_exact_match(prediction: str, golds) -> float:
    return max(exact_match(prediction, g) for g in golds)


@dataclass
class EncodedGeneration:
    """Tokenised, length-sorted, left-padded prompts with their gold answers."""

    batches: list[MicroBatch]
    answers: list[tuple[str, ...]]
    truncated: int  # prompts whose context was cut from the left to fit the model
    num_tokens: int
    prompt_ids: list[list[int]]
    micro_batch_size: int
    device: torch.device = torch.device("cpu")

    def __len__(self) -> int:
        return len(self.answers)

    def to(self, device: torch.device) -> "EncodedGeneration":
        self.device = torch.device(device)
        for batch in self.batches:
            for name in ("input_ids", "attention_mask", "position_ids"):
                setattr(batch, name, getattr(batch, name).to(device))
        return self


class GenerationScorer:
    """Greedy answers to QA prompts, with F1 / EM, and the SPSA objective l_i = -F1.

    Prompts too long for the model lose tokens from the left of the context only, so the
    title, the question and the `Answer:` cue are always kept.
    """

    sort_by_length = True  # the benchmark's re-creation of slower batching turns it off
    sharding = None  # a distributed.Sharding: run only this rank's micro-batches, then sum

    def __init__(self, tokenizer, template: QATemplate, max_length: int | None, max_new_tokens: int = 50):
        if max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        self.max_new_tokens = max_new_tokens
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        # Every vocabulary entry whose text contains a newline ends an answer. Byte-level
        # BPE vocabularies have only a few (GPT-2: "\n", "\n\n", "\n\n\n").
        vocabulary = tokenizer.get_vocab().values()
        self.stop_ids = sorted(i for i in vocabulary if "\n" in tokenizer.decode([i]))
        if tokenizer.eos_token_id is not None:
            self.stop_ids = sorted(set(self.stop_ids) | {tokenizer.eos_token_id})

    def _encode_prompt(self, example) -> tuple[list[int], bool]:
        ids = self.tokenizer(self.template.prompt(example))["input_ids"]
        if self.max_length is None or len(ids) + self.max_new_tokens <= self.max_length:
            return list(ids), False
        before, context, after = self.template.parts(example)
        # Drop context characters from the left at token boundaries until the prompt and
        # the longest answer fit. Tokenising the shortened prompt again can differ at the
        # cut by a token, hence the loop.
        offsets = self.tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        excess = len(ids) + self.max_new_tokens - self.max_length
        while True:
            if excess >= len(offsets):
                raise ValueError(
                    f"a prompt does not fit the model's maximum length {self.max_length} even with its "
                    f"context removed; lower --max-new-tokens (now {self.max_new_tokens})"
                )
            start = offsets[excess][0]
            ids = self.tokenizer(before + context[start:] + after)["input_ids"]
            if len(ids) + self.max_new_tokens <= self.max_length:
                return list(ids), True
            excess += 1

    def encode(self, examples: list, micro_batch_size: int) -> EncodedGeneration:
        if micro_batch_size < 1:
            raise ValueError(f"micro-batch size must be at least 1, got {micro_batch_size}")
        prompts = [self._encode_prompt(e) for e in examples]
        return self._batch([p for p, _ in prompts], [tuple(e.answers) for e in examples], micro_batch_size,
                           truncated=sum(t for _, t in prompts))

    def subset(self, encoded: EncodedGeneration, rows) -> EncodedGeneration:
        """The examples at `rows` (in that order) re-batched from their cached token ids."""
        rows = [int(r) for r in rows]
        subset = self._batch([encoded.prompt_ids[r] for r in rows], [encoded.answers[r] for r in rows],
                             encoded.micro_batch_size, truncated=0)
        return subset.to(encoded.device)

    def _batch(self, prompt_ids: list[list[int]], answers: list, micro_batch_size: int,
               truncated: int) -> EncodedGeneration:
        order = list(range(len(prompt_ids)))
        if self.sort_by_length:
            order.sort(key=lambda i: len(prompt_ids[i]))
        batches = []
        for start in range(0, len(order), micro_batch_size):
            rows = order[start:start + micro_batch_size]
            ids, mask, positions = _pad_left([prompt_ids[i] for i in rows], self.pad_id)
            batches.append(MicroBatch(input_ids=ids, attention_mask=mask, position_ids=positions,
                                      rows=torch.tensor(rows), candidates=torch.full((len(rows),), -1),
                                      word_ids=torch.empty((len(rows), 0), dtype=torch.long)))
        return EncodedGeneration(batches=batches, answers=answers, truncated=truncated,
                                 num_tokens=sum(len(p) for p in prompt_ids), prompt_ids=prompt_ids,
                                 micro_batch_size=micro_batch_size)

    @torch.inference_mode()
    def generate(self, model, encoded: EncodedGeneration) -> list[str]:
        """Greedy answers, each cut at its first newline; a finished row waits while the batch goes on.

        transformers' `generate` keeps the KV cache, derives position ids from the left-padded
        attention mask, and marks a row finished at its first stop token (a newline token or
        EOS), padding it from then on while the other rows continue.
        """
        answers = [""] * len(encoded)
        for index, batch in enumerate(encoded.batches):
            if self.sharding is not None and not self.sharding.owns(index):
                continue
            output = model.generate(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1,
                eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
                temperature=None, top_p=None, top_k=None,
            )
            new_tokens = output[:, batch.input_ids.shape[1]:].cpu()
            for row, tokens in zip(batch.rows.tolist(), new_tokens):
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                answers[row] = text.split("\n", 1)[0].strip()
        return answers

    def f1_scores(self, model, encoded: EncodedGeneration) -> torch.Tensor:
        """(N, 2) fp32: per example the F1 and the exact match of its greedy answer, max over golds."""
        answers = self.generate(model, encoded)
        scores = torch.zeros((len(encoded), 2), dtype=torch.float32)
        for row in owned_rows(encoded, self.sharding):
            scores[row, 0] = best_f1(answers[row], encoded.answers[row])
            scores[row, 1] = best_exact_match(answers[row], encoded.answers[row])
        return scores if self.sharding is None else self.sharding.combine(scores)

    def losses(self, model, encoded: EncodedGeneration) -> torch.Tensor:
        """l_i = -F1 of example i's greedy answer, fp32, shape (N,)."""
        return -self.f1_scores(model, encoded)[:, 0]

    def evaluate(self, model, encoded: EncodedGeneration) -> dict:
        scores = self.f1_scores(model, encoded)
        f1, em = (float(scores[:, 0].mean()), float(scores[:, 1].mean())) if len(encoded) else (0.0, 0.0)
        return {"metric": f1, "f1": f1, "exact_match": em}
