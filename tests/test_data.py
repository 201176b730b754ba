"""SST-2 loading from GLUE TSV files, the MeZO split and the prompt templates."""

from __future__ import annotations

import os
import re

import pytest

import data
from conftest import write_sst2_folder
from data import DataError, LabeledText, TaskData, mezo_split


def task_data(train_rows: int = 2000, validation_rows: int = 872) -> TaskData:
    # Unique texts, so membership in a split can be checked by value.
    train = [LabeledText(f"train {i}", i % 2) for i in range(train_rows)]
    validation = [LabeledText(f"validation {i}", i % 2) for i in range(validation_rows)]
    return TaskData(train=train, validation=validation, source="test")


def texts(rows: list) -> list[str]:
    return [row.text for row in rows]


# ---------------------------------------------------------------------------------------
# MeZO split
# ---------------------------------------------------------------------------------------


def test_mezo_split_sizes():
    split = mezo_split(task_data(), pool_size=1000, dev_size=500, test_size=1000, seed=0)
    assert len(split.pool) == 1000
    assert len(split.dev) == 500
    assert len(split.test) == 872


def test_mezo_split_whole_validation_in_order():
    source = task_data()
    split = mezo_split(source, pool_size=10, dev_size=10, test_size=872, seed=3)
    assert split.test == source.validation


def test_mezo_split_test_subset():
    source = task_data()
    split = mezo_split(source, pool_size=10, dev_size=10, test_size=100, seed=3)
    assert len(split.test) == 100
    assert len(set(texts(split.test))) == 100
    assert set(texts(split.test)) <= set(texts(source.validation))
    positions = [source.validation.index(row) for row in split.test]
    assert positions == sorted(positions)


def test_mezo_split_pool_dev_disjoint():
    split = mezo_split(task_data(), pool_size=1000, dev_size=500, test_size=1000, seed=0)
    pool, dev = set(texts(split.pool)), set(texts(split.dev))
    assert len(pool) == 1000
    assert len(dev) == 500
    assert not pool & dev
    assert all(text.startswith("train") for text in pool | dev)


def test_mezo_split_deterministic():
    first = mezo_split(task_data(), pool_size=100, dev_size=50, test_size=200, seed=7)
    again = mezo_split(task_data(), pool_size=100, dev_size=50, test_size=200, seed=7)
    assert first == again


def test_mezo_split_other_seed_differs():
    first = mezo_split(task_data(), pool_size=100, dev_size=50, test_size=200, seed=7)
    other = mezo_split(task_data(), pool_size=100, dev_size=50, test_size=200, seed=8)
    assert first.pool != other.pool
    assert first.dev != other.dev
    assert first.test != other.test


def test_mezo_split_too_large():
    with pytest.raises(DataError, match="exceeds the 2000 training examples"):
        mezo_split(task_data(), pool_size=1600, dev_size=500, test_size=10, seed=0)


@pytest.mark.parametrize("sizes", [(0, 10, 10), (10, 0, 10), (10, 10, 0)])
def test_mezo_split_empty_part(sizes):
    pool_size, dev_size, test_size = sizes
    with pytest.raises(DataError):
        mezo_split(task_data(), pool_size=pool_size, dev_size=dev_size, test_size=test_size, seed=0)


# ---------------------------------------------------------------------------------------
# SST-2 TSV files
# ---------------------------------------------------------------------------------------


def test_load_sst2_folder(tmp_path):
    folder = write_sst2_folder(tmp_path / "sst2", train_rows=30, dev_rows=12)
    loaded = data.load_sst2(folder)
    assert len(loaded.train) == 30
    assert len(loaded.validation) == 12
    assert all(row.label in (0, 1) for row in loaded.train)
    assert loaded.train[0].text == loaded.train[0].text.strip()
    assert loaded.source == os.path.abspath(folder)


def test_load_sst2_quotes_kept(tmp_path):
    folder = write_sst2_folder(tmp_path / "sst2", train_rows=5, dev_rows=5)
    with open(os.path.join(folder, "train.tsv"), "a", encoding="utf-8") as handle:
        handle.write('the " director \'s cut " is long \t0\n')
    loaded = data.load_sst2(folder)
    assert loaded.train[-1].text == 'the " director \'s cut " is long'


def write_bad_train(tmp_path, content: str | None) -> tuple[str, str]:
    """Write an SST-2 folder whose train.tsv contains `content`, or has no train.tsv when it is None."""
    folder = write_sst2_folder(tmp_path / "sst2", train_rows=5, dev_rows=5)
    path = os.path.join(folder, "train.tsv")
    if content is None:
        os.remove(path)
    else:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(content)
    return folder, path


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ("", "empty"),
    ("text\tpolarity\ngood\t1\n", "expected a header"),
    ("sentence\tlabel\ngood\t1\nodd\t2\n", "is not 0 or 1"),
    ("sentence\tlabel\ngood\n", "tab-separated fields"),
    ("sentence\tlabel\n", "no rows"),
])
def test_load_sst2_malformed(tmp_path, content, message):
    folder, path = write_bad_train(tmp_path, content)
    with pytest.raises(DataError, match=message) as caught:
        data.load_sst2(folder)
    assert path in str(caught.value)


def test_load_sst2_line_number(tmp_path):
    folder, path = write_bad_train(tmp_path, "sentence\tlabel\ngood\t1\nodd\t2\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:3:")):
        data.load_sst2(folder)


def test_load_task_unknown():
    with pytest.raises(DataError, match="unknown task"):
        data.load_task("mnli", "/nonexistent")


# ---------------------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------------------


def test_mezo_template_prompt():
    template = data.get_template("sst2", "mezo")
    assert template.prompt("a fine film") == "a fine film It was"
    assert template.label_words == (" terrible", " great")


def test_get_template_unknown():
    with pytest.raises(DataError, match="choose one of mezo, instruct"):
        data.get_template("sst2", "nope")


# ---------------------------------------------------------------------------------------
# Command-line templates: escapes
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("typed, meant", [
    (r"Review: {text}\nVerdict:", "Review: {text}\nVerdict:"),
    (r"a\tb", "a\tb"),
    (r"keep \\n as typed", "keep \\n as typed"),
    (r"C:\path\x", r"C:\path\x"),  # other backslashes are left alone
    ("already\nreal", "already\nreal"),
])
def test_read_escapes(typed, meant):
    assert data.read_escapes(typed) == meant


def test_custom_templates_read_newline():
    # What a shell passes for --template "Review: {text}\nVerdict:" is a backslash and an n.
    classification = data.custom_classification_template(r"Review: {text}\nVerdict:", "bad,good")
    assert classification.format == "Review: {text}\nVerdict:"
    generation = data.custom_generation_template(r"{prompt}\nAnswer:")
    assert generation.after_context == "\nAnswer:"
