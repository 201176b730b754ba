"""Task data: loading SST-2, the MeZO split, and prompt templates.

The project ships no dataset text. SST-2 comes from the Hugging Face Hub
(`stanfordnlp/sst2`) by default, or from a local folder of GLUE TSV files given with
`--data-dir` (`train.tsv` and `dev.tsv`, header `sentence<TAB>label`, labels 0/1).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np

TASKS = ("sst2",)


class DataError(ValueError):
    """Input data is missing or malformed; the message names the file and the fix."""


@dataclass(frozen=True)
class LabeledText:
    text: str
    label: int


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


def get_template(task: str, name: str) -> ClassificationTemplate:
    templates = {"sst2": SST2_TEMPLATES}.get(task, {})
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


def load_task(task: str, data_dir: str | None = None) -> TaskData:
    if task == "sst2":
        return load_sst2(data_dir)
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
