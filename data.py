"""Task data: loading SST-2 and SQuAD v1.1, the MeZO split, and prompt templates.

The project ships no dataset text. Both tasks come from the Hugging Face Hub by default
(`stanfordnlp/sst2`, `rajpurkar/squad`), or from a local folder given with `--data-dir`:
- SST-2: GLUE TSV files `train.tsv` and `dev.tsv`, header `sentence<TAB>label`, labels 0/1;
- SQuAD v1.1: the official JSON files `train-v1.1.json` and `dev-v1.1.json`, plain or
  gzip (`.json.gz`).
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
from dataclasses import dataclass

import numpy as np

TASKS = ("sst2", "squad", "classification", "generation")


class DataError(ValueError):
    """Input data is missing or malformed; the message names the file and the fix."""


@dataclass(frozen=True)
class LabeledText:
    text: str
    label: int


@dataclass(frozen=True)
class QAExample:
    """A SQuAD question; `answers` contains every gold answer text (the first one is the target)."""

    title: str
    context: str
    question: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class TaskData:
    """A task's raw splits: `train` feeds the pool and dev, `validation` feeds the test set."""

    train: list
    validation: list
    source: str


# ---------------------------------------------------------------------------------------
# Prompt templates
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassificationTemplate:
    """A prompt with a `{text}` slot, and one label word per class, index = label.

    The model predicts the class whose label word is most likely right after the prompt.
    Label words carry their leading space, because BPE vocabularies (GPT-2, OPT, Llama)
    store " great" and "great" as different tokens and the word follows a space.
    """

    name: str
    format: str
    label_words: tuple[str, ...]
    description: str

    def prompt(self, text: str) -> str:
        return self.format.format(text=text)


SST2_TEMPLATES = {
    "mezo": ClassificationTemplate(
        name="mezo",
        format="{text} It was",
        label_words=(" terrible", " great"),
        description="MeZO's SST-2 prompt (Malladi et al. 2023), used by the PACZero paper with OPT.",
    ),
    "instruct": ClassificationTemplate(
        name="instruct",
        format="Review: {text}\nSentiment (positive or negative):",
        label_words=(" negative", " positive"),
        description=(
            "For small instruction-tuned models: SmolLM2-135M-Instruct scores 71.2 % zero-shot "
            "on SST-2 dev with it, against 51.6 % with the MeZO prompt."
        ),
    ),
}


@dataclass(frozen=True)
class QATemplate:
    """A question-answering prompt in three parts, so that the context can be cut alone.

    The prompt is `before_context + context + after_context`; the model's greedy
    continuation, cut at its first newline, is the answer.
    """

    name: str
    before_context: str
    after_context: str
    description: str

    def parts(self, example: QAExample) -> tuple[str, str, str]:
        return (self.before_context.format(title=example.title), example.context,
                self.after_context.format(question=example.question))

    def prompt(self, example: QAExample) -> str:
        return "".join(self.parts(example))


SQUAD_TEMPLATES = {
    "squad": QATemplate(
        name="squad",
        before_context="Title: {title}\nContext: ",
        after_context="\nQuestion: {question}\nAnswer:",
        description="MeZO's SQuAD prompt, used by the PACZero paper; the target is ' <answer>\\n'.",
    ),
}


def read_escapes(text: str) -> str:
    r"""Turn the two-character escapes \n, \t and \\ of a command-line template into the characters.

    A shell passes `--template "Review: {text}\nVerdict:"` with a backslash and an n, not a
    newline. Prompts with a line break are the usual case, so the pair is read as one.
    """
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def custom_classification_template(text: str, label_words: str | None) -> ClassificationTemplate:
    """A user template with a `{text}` slot and comma-separated label words (class 0 first).

    Each label word is stripped and given one leading space, because it follows the
    prompt as a new word.
    """
    if "{text}" not in text:
        raise DataError(f"--template {text!r} has no {{text}} placeholder; write for example 'Review: {{text}}\\nSentiment:'")
    if not label_words:
        raise DataError("--task classification needs --label-words, for example 'negative,positive' (class 0 first)")
    words = tuple(" " + w.strip() for w in label_words.split(",") if w.strip())
    if len(words) < 2:
        raise DataError(f"--label-words needs at least two comma-separated words, got {label_words!r}")
    text = read_escapes(text)
    escaped = text.replace("{text}", "\0").replace("{", "{{").replace("}", "}}").replace("\0", "{text}")
    return ClassificationTemplate(name="custom", format=escaped, label_words=words, description="from the command line")


def custom_generation_template(text: str | None) -> QATemplate:
    """A prompt template for --task generation: `{prompt}` marks where each example's prompt goes.

    Without a template the prompt is used as it is. Long prompts are cut from their left.
    """
    text = read_escapes(text or "{prompt}")
    if text.count("{prompt}") != 1:
        raise DataError(f"--template {text!r} must contain {{prompt}} exactly once")
    before, after = text.split("{prompt}")
    escape = lambda part: part.replace("{", "{{").replace("}", "}}")  # noqa: E731
    return QATemplate(name="custom", before_context=escape(before), after_context=escape(after),
                      description="from the command line")


def get_template(task: str, name: str | None, label_words: str | None = None):
    if task == "classification":
        return custom_classification_template(name or "", label_words)
    if task == "generation":
        return custom_generation_template(name)
    templates = {"sst2": SST2_TEMPLATES, "squad": SQUAD_TEMPLATES}.get(task, {})
    if name not in templates:
        raise DataError(
            f"unknown template {name!r} for task {task!r}; choose one of {', '.join(templates) or '(none)'}"
        )
    return templates[name]


# ---------------------------------------------------------------------------------------
# SST-2
# ---------------------------------------------------------------------------------------


def _read_sst2_tsv(path: str) -> list[LabeledText]:
    if not os.path.isfile(path):
        raise DataError(f"SST-2 file not found: {path}; --data-dir must hold train.tsv and dev.tsv (GLUE format)")
    try:
        return _parse_sst2_tsv(path)
    except UnicodeDecodeError as error:
        raise DataError(f"SST-2 file {path} is not UTF-8 text ({error.reason} at byte {error.start})") from error


def _parse_sst2_tsv(path: str) -> list[LabeledText]:
    rows = []
    with open(path, encoding="utf-8", newline="") as handle:
        # GLUE's SST-2 has quote characters inside sentences, so quoting must be off.
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise DataError(f"SST-2 file is empty: {path}")
        columns = [c.strip() for c in header]
        if "sentence" not in columns or "label" not in columns:
            raise DataError(
                f"SST-2 file {path} has columns {columns}; expected a header with 'sentence' and 'label'"
            )
        text_col, label_col = columns.index("sentence"), columns.index("label")
        for line_number, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) <= max(text_col, label_col):
                raise DataError(f"{path}:{line_number}: expected {len(columns)} tab-separated fields, got {len(row)}")
            label = row[label_col].strip()
            if label not in ("0", "1"):
                raise DataError(f"{path}:{line_number}: label {label!r} is not 0 or 1")
            rows.append(LabeledText(text=row[text_col].strip(), label=int(label)))
    if not rows:
        raise DataError(f"SST-2 file has a header but no rows: {path}")
    return rows


def load_sst2(data_dir: str | None = None) -> TaskData:
    """SST-2 train and validation splits, from `data_dir` (GLUE TSVs) or from the Hub."""
    if data_dir is not None:
        train = _read_sst2_tsv(os.path.join(data_dir, "train.tsv"))
        validation = _read_sst2_tsv(os.path.join(data_dir, "dev.tsv"))
        return TaskData(train=train, validation=validation, source=os.path.abspath(data_dir))

    import datasets  # imported here: loading from a local folder must not need it

    try:
        hub = datasets.load_dataset("stanfordnlp/sst2")
    except Exception as error:  # network, cache and hub errors come in many types
        raise DataError(
            f"could not load SST-2 from the Hugging Face Hub ({type(error).__name__}: {error}); "
            "without network access pass --data-dir with GLUE's train.tsv and dev.tsv"
        ) from error
    train = [LabeledText(r["sentence"].strip(), int(r["label"])) for r in hub["train"]]
    validation = [LabeledText(r["sentence"].strip(), int(r["label"])) for r in hub["validation"]]
    return TaskData(train=train, validation=validation, source="hub:stanfordnlp/sst2")


# ---------------------------------------------------------------------------------------
# SQuAD v1.1
# ---------------------------------------------------------------------------------------


def _find_squad_file(data_dir: str, stem: str) -> str:
    for name in (f"{stem}.json", f"{stem}.json.gz"):
        path = os.path.join(data_dir, name)
        if os.path.isfile(path):
            return path
    raise DataError(
        f"SQuAD file not found: {os.path.join(data_dir, stem)}.json or .json.gz; --data-dir must hold "
        "train-v1.1.json and dev-v1.1.json (official SQuAD v1.1 schema, plain or gzip)"
    )


def _read_squad_json(path: str) -> list[QAExample]:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            payload = json.load(handle)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"could not read SQuAD JSON {path}: {error}") from error
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        raise DataError(f"{path} is not SQuAD v1.1 JSON: expected an object with a 'data' list of articles")
    examples = []
    try:
        for article in payload["data"]:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    answers = tuple(a["text"] for a in qa["answers"])
                    if not answers:
                        raise DataError(f"{path}: question {qa.get('id')!r} has no answers")
                    examples.append(QAExample(title=article["title"],
                                              context=paragraph["context"], question=qa["question"].strip(),
                                              answers=answers))
    except (KeyError, TypeError) as error:
        raise DataError(f"{path} does not follow the SQuAD v1.1 schema (missing or malformed field {error})") from error
    if not examples:
        raise DataError(f"SQuAD file contains no questions: {path}")
    return examples


def load_squad(data_dir: str | None = None) -> TaskData:
    """SQuAD v1.1 train and validation, from `data_dir` (official JSON, plain or gzip) or from the Hub."""
    if data_dir is not None:
        train = _read_squad_json(_find_squad_file(data_dir, "train-v1.1"))
        validation = _read_squad_json(_find_squad_file(data_dir, "dev-v1.1"))
        return TaskData(train=train, validation=validation, source=os.path.abspath(data_dir))

    import datasets

    try:
        hub = datasets.load_dataset("rajpurkar/squad")
    except Exception as error:  # network, cache and hub errors come in many types
        raise DataError(
            f"could not load SQuAD from the Hugging Face Hub ({type(error).__name__}: {error}); "
            "without network access pass --data-dir with train-v1.1.json(.gz) and dev-v1.1.json(.gz)"
        ) from error

    def convert(rows) -> list[QAExample]:
        return [QAExample(title=r["title"], context=r["context"], question=r["question"].strip(),
                          answers=tuple(r["answers"]["text"])) for r in rows]

    return TaskData(train=convert(hub["train"]), validation=convert(hub["validation"]), source="hub:rajpurkar/squad")


# ---------------------------------------------------------------------------------------
# Bring your own data: CSV or JSONL files
# ---------------------------------------------------------------------------------------


def _read_records(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    try:
        return _parse_records(path)
    except UnicodeDecodeError as error:
        raise DataError(f"data file {path} is not UTF-8 text ({error.reason} at byte {error.start})") from error


def _parse_records(path: str) -> list[dict]:
    records = []
    if path.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{line_number}: not a JSON object per line ({error.msg})") from error
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
                records.append(record)
    elif path.endswith((".csv", ".tsv")):
        with open(path, encoding="utf-8", newline="") as handle:
            records = list(csv.DictReader(handle, delimiter="\t" if path.endswith(".tsv") else ","))
    else:
        raise DataError(f"unknown data file type: {path}; use .csv, .tsv or .jsonl")
    if not records:
        raise DataError(f"data file has no rows: {path}")
    return records


def _require_columns(record: dict, columns: tuple[str, ...], path: str, row: int, options: str) -> None:
    for column in columns:
        if column not in record:
            raise DataError(f"{path}: row {row} has no column {column!r} (columns: {', '.join(map(str, record))}); "
                            f"set {options}")


def load_classification_file(path: str, text_column: str, label_column: str, num_labels: int) -> list[LabeledText]:
    """Rows of (text, integer label in 0..num_labels-1) from a CSV/TSV/JSONL file."""
    examples = []
    for row, record in enumerate(_read_records(path), start=1):
        _require_columns(record, (text_column, label_column), path, row, "--text-column and --label-column")
        raw = str(record[label_column]).strip()
        if not raw.lstrip("-").isdigit() or not 0 <= int(raw) < num_labels:
            raise DataError(f"{path}: row {row}: label {raw!r} is not an integer in 0..{num_labels - 1} "
                            f"(one per label word)")
        examples.append(LabeledText(text=str(record[text_column]).strip(), label=int(raw)))
    return examples


def load_generation_file(path: str, prompt_column: str, answers_column: str) -> list[QAExample]:
    """Rows of (prompt, gold answers) from a JSONL/CSV file; answers are a list or one string."""
    examples = []
    for row, record in enumerate(_read_records(path), start=1):
        _require_columns(record, (prompt_column, answers_column), path, row, "--prompt-column and --answers-column")
        answers = record[answers_column]
        answers = [answers] if isinstance(answers, str) else answers
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise DataError(f"{path}: row {row}: {answers_column!r} must be a non-empty string or list of strings")
        examples.append(QAExample(title="", context=str(record[prompt_column]), question="", answers=tuple(answers)))
    return examples


def hold_out(examples: list, test_size: int, seed: int, source: str) -> TaskData:
    """Split one file into train and a held-out validation part (at most a fifth of it, at most test_size)."""
    if len(examples) < 3:
        raise DataError(f"{source} has {len(examples)} rows; at least 3 are needed for pool, dev and test")
    held = max(1, min(test_size, len(examples) // 5))
    order = np.random.default_rng([seed, 2]).permutation(len(examples))
    return TaskData(train=[examples[i] for i in order[held:]], validation=[examples[i] for i in order[:held]],
                    source=os.path.abspath(source))


def load_task(task: str, data_dir: str | None = None, data_file: str | None = None, *, text_column: str = "text",
              label_column: str = "label", num_labels: int = 2, prompt_column: str = "prompt",
              answers_column: str = "answers", test_size: int = 1000, seed: int = 0) -> TaskData:
    if task in ("classification", "generation"):
        if data_file is None:
            raise DataError(f"--task {task} needs --data FILE (CSV, TSV or JSONL)")
        if task == "classification":
            examples = load_classification_file(data_file, text_column, label_column, num_labels)
        else:
            examples = load_generation_file(data_file, prompt_column, answers_column)
        return hold_out(examples, test_size, seed, data_file)
    if data_file is not None:
        raise DataError(f"--data applies to --task classification or generation; for {task} use --data-dir")
    if task == "sst2":
        return load_sst2(data_dir)
    if task == "squad":
        return load_squad(data_dir)
    raise DataError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


# ---------------------------------------------------------------------------------------
# The MeZO split
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    pool: list
    dev: list
    test: list


def mezo_split(data: TaskData, pool_size: int, dev_size: int, test_size: int, seed: int) -> Split:
    """Draw pool and dev (disjoint) from train and the test set from validation, with `seed`.

    MeZO's protocol (Malladi et al. 2023): 1000 / 500 / 1000. When `test_size` is at least
    the validation split's size (SST-2 has 872 sentences), the whole split is the test set,
    in its original order.
    """
    for name, value in (("pool size", pool_size), ("dev size", dev_size), ("test size", test_size)):
        if value < 1:
            raise DataError(f"{name} must be at least 1, got {value}")
    if pool_size + dev_size > len(data.train):
        raise DataError(
            f"pool size {pool_size} + dev size {dev_size} exceeds the {len(data.train)} training "
            "examples; lower --pool-size or --dev-size"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data.train))
    pool = [data.train[i] for i in order[:pool_size]]
    dev = [data.train[i] for i in order[pool_size:pool_size + dev_size]]
    if test_size >= len(data.validation):
        test = list(data.validation)
    else:
        picked = np.sort(rng.choice(len(data.validation), size=test_size, replace=False))
        test = [data.validation[i] for i in picked]
    return Split(pool=pool, dev=dev, test=test)
