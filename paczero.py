"""The PACZero training loop: split, subsets, zero-shot eval, T private steps, dev-best, test.

One step (`paczero_step`) is the whole algorithm:
  1. draw the step's public randomness: a perturbation seed and a coin;
  2. two forward passes over the pool give each example's projected gradient g_i (zo.py);
  3. clip each g_i to [-clip, clip], which bounds any one example's pull on a subset mean;
  4. average g_i within each of the M public subsets and take the signs;
  5. release one number by the mode's rule (mechanisms.py);
  6. move the weights by -lr_t * release * z, regenerating z from the seed.
Everything else here (loading, evaluation, logging, saving) is bookkeeping around it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

import data as data_lib
import distributed
import mechanisms
import zo
from evaluate import GenerationScorer, LabelWordScorer
from models import (SMOLLM2_NAME, ConfigError, apply_tuning, auto_micro_batch_size, load_model_and_tokenizer,
                    resolve_device, resolve_dtype)

log = logging.getLogger("paczero")

LR_END = 1e-7  # the linear schedule's last value
METRIC_NAMES = {"sst2": "accuracy", "squad": "f1", "classification": "accuracy", "generation": "f1"}
GENERATION_TASKS = ("squad", "generation")


# ---------------------------------------------------------------------------------------
# Options: one dataclass, one line of help per field. `None` means "resolved from the
# paper's recipe for this mode and tuning" (see resolve_defaults).
# ---------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    model: str = field(default=SMOLLM2_NAME, metadata={"help": "Hugging Face causal LM id or local path, or 'smollm2-135m' (offline package)"})
    task: str = field(default="sst2", metadata={"help": "task: sst2 (accuracy), squad (F1, EM), or your own file: classification (accuracy), generation (F1, EM)"})
    data: str | None = field(default=None, metadata={"help": "classification / generation: a CSV, TSV or JSONL file; the test set is held out of it"})
    label_words: str | None = field(default=None, metadata={"help": "classification: comma-separated label words, class 0 first (each gets a leading space)"})
    text_column: str = field(default="text", metadata={"help": "classification: column with the text"})
    label_column: str = field(default="label", metadata={"help": "classification: column with the integer label 0..C-1"})
    prompt_column: str = field(default="prompt", metadata={"help": "generation: column with the prompt"})
    answers_column: str = field(default="answers", metadata={"help": "generation: column with the gold answer (a string or a list)"})
    mode: str = field(default="zpl", metadata={"help": "release rule: zpl (zero MI), mi (MI budget), mezo (non-private), dpzero / dpaggzo (DP baselines), raw_full / quant_full / raw_half / quant_half / random_sign (ablations, not private)"})
    mi_budget: float | None = field(default=None, metadata={"help": "total MI budget in nats for --mode mi (0.33 nats matches eps = 2)"})
    directions: int = field(default=1, metadata={"help": "SPSA directions K per step, each released separately (2K forward passes per step) [dpaggzo paper recipe: 64]"})
    batch_size: int | None = field(default=None, metadata={"help": "mezo: minibatch size drawn from the pool each step [default: the whole pool]"})
    dp_epsilon: float | None = field(default=None, metadata={"help": "dpzero / dpaggzo: target epsilon over the whole run"})
    dp_delta: float = field(default=1e-5, metadata={"help": "dpzero / dpaggzo: target delta"})
    sampling_rate: float = field(default=0.064, metadata={"help": "dpzero / dpaggzo: Poisson sampling probability q per example per step"})
    tuning: str = field(default="lora", metadata={"help": "lora (adapters only) or ft (all weights)"})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scale alpha / r)"})
    lora_targets: str | None = field(default=None, metadata={"help": "comma-separated module names for LoRA [default: q_proj,v_proj]"})
    lr: float | None = field(default=None, metadata={"help": "base learning rate, decays linearly to 1e-7 [default: zpl/mi LoRA 1e-3/5e-4, FT 1e-4; mezo LoRA 1e-4, FT 1e-6]"})
    zo_eps: float = field(default=1e-3, metadata={"help": "SPSA perturbation scale eps (weight units)"})
    clip: float | None = field(default=None, metadata={"help": "clip each projected gradient to [-clip, clip] [default: LoRA 25, FT 1000]; mezo does not clip"})
    steps: int = field(default=1000, metadata={"help": "number of steps T"})
    pool_size: int = field(default=1000, metadata={"help": "training pool size N (examples)"})
    num_subsets: int | None = field(default=None, metadata={"help": "number of candidate subsets M, even [default: 126 for zpl, 128 otherwise]"})
    dev_size: int = field(default=500, metadata={"help": "dev examples drawn from train, for dev-best selection"})
    test_size: int = field(default=1000, metadata={"help": "test examples drawn from validation (all of it if fewer; SST-2 has 872)"})
    eval_every: int = field(default=100, metadata={"help": "evaluate on dev every this many steps (and at the last step)"})
    seed: int = field(default=0, metadata={"help": "public seed: perturbations, subsets, coin flips"})
    secret_seed: int | None = field(default=None, metadata={"help": "secret seed: secret subset index, MI noise [default: drawn from the OS, recorded in config.json]"})
    data_seed: int | None = field(default=None, metadata={"help": "seed of the pool/dev/test split [default: --seed]"})
    data_dir: str | None = field(default=None, metadata={"help": "local folder with the task's files (SST-2: GLUE train.tsv, dev.tsv) [default: Hugging Face Hub]"})
    output_dir: str | None = field(default=None, metadata={"help": "run folder for config, logs, results, weights [default: runs/<task>-<mode>-<tuning>-seed<seed>]"})
    dtype: str = field(default="auto", metadata={"help": "weight dtype: fp32, fp16, bf16, auto (fp16 on CUDA, fp32 on CPU)"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto"})
    device_map: str | None = field(default=None, metadata={"help": "'auto' shards a model too large for one GPU across all GPUs (accelerate); --device then only sets the default"})
    template: str | None = field(default=None, metadata={"help": "prompt template; sst2: mezo ('<s> It was' terrible/great) or instruct (for chat models); squad: squad; classification: text with {text}; generation: text with {prompt} (\\n and \\t in these two are a newline and a tab) [default: mezo, squad, -, {prompt}]"})
    max_new_tokens: int = field(default=50, metadata={"help": "squad: maximum answer length in tokens (generation stops earlier at a newline)"})
    micro_batch_size: int | None = field(default=None, metadata={"help": "sequences per forward pass [default: 32 on CPU; on CUDA the largest power of two up to 512 that fits in memory]"})
    zero_shot: bool = field(default=True, metadata={"help": "evaluate the model before training on dev and test (--no-zero-shot skips it)"})
    save_every: int = field(default=100, metadata={"help": "write a checkpoint every this many steps (0: never); --resume continues from the last one"})


def resolve_defaults(cfg: TrainConfig) -> TrainConfig:
    """Fill the options left at None from the PACZero paper's recipes (arXiv 2605.06505) and validate all options."""
    cfg = dataclasses.replace(cfg)
    choices = {"mode": mechanisms.MODES, "tuning": ("lora", "ft"), "task": data_lib.TASKS,
               "dtype": ("auto", "fp32", "fp16", "bf16")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"invalid --{name.replace('_', '-')} {getattr(cfg, name)!r}; choose one of {', '.join(allowed)}")
    if cfg.data is not None and cfg.task not in ("classification", "generation"):
        raise ConfigError(f"--data applies to --task classification or generation; for {cfg.task} use --data-dir")
    if cfg.template is None and cfg.task in ("sst2", "squad"):
        cfg.template = {"sst2": "mezo", "squad": "squad"}[cfg.task]
    if cfg.task == "classification" and cfg.template is None:
        raise ConfigError("--task classification needs --template with a {text} placeholder, for example 'Review: {text}\\nSentiment:'")
    try:
        data_lib.get_template(cfg.task, cfg.template, cfg.label_words)
    except data_lib.DataError as error:
        raise ConfigError(str(error)) from error
    if cfg.lr is None:
        table = {("mezo", "lora"): 1e-4, ("mezo", "ft"): 1e-6, ("zpl", "lora"): 1e-3, ("mi", "lora"): 5e-4,
                 ("dpzero", "ft"): 5e-6, ("dpaggzo", "ft"): 5e-6}
        cfg.lr = table.get((cfg.mode, cfg.tuning), 1e-4)
    if cfg.mode == "mezo" and cfg.clip is not None:
        raise ConfigError("--clip applies to the private modes and ablations; --mode mezo uses the raw projected gradients")
    if cfg.clip is None and cfg.mode != "mezo":
        cfg.clip = 25.0 if cfg.tuning == "lora" else 1000.0
    if cfg.num_subsets is None:
        cfg.num_subsets = 126 if cfg.mode == "zpl" else 128
    if cfg.data_seed is None:
        cfg.data_seed = cfg.seed
    if cfg.secret_seed is None:
        # The secret must be unpredictable: a fixed default would tell every adversary S*.
        cfg.secret_seed = secrets.randbits(63)
    if cfg.output_dir is None:
        cfg.output_dir = os.path.join("runs", f"{cfg.task}-{cfg.mode}-{cfg.tuning}-seed{cfg.seed}")

    for name in ("seed", "secret_seed", "data_seed"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be a non-negative integer, got {getattr(cfg, name)}")
    positive = {"lr": cfg.lr, "zo_eps": cfg.zo_eps, "clip": 1.0 if cfg.clip is None else cfg.clip, "steps": cfg.steps,
                "pool_size": cfg.pool_size, "dev_size": cfg.dev_size, "test_size": cfg.test_size,
                "lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha,
                "max_new_tokens": cfg.max_new_tokens}
    for name, value in positive.items():
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    if cfg.micro_batch_size is not None and cfg.micro_batch_size < 1:
        raise ConfigError(f"--micro-batch-size must be at least 1, got {cfg.micro_batch_size}")
    if cfg.save_every < 0:
        raise ConfigError(f"--save-every must be 0 (never) or positive, got {cfg.save_every}")
    if cfg.eval_every < 0:
        raise ConfigError(f"--eval-every must be 0 (only at the end) or positive, got {cfg.eval_every}")
    if cfg.directions < 1:
        raise ConfigError(f"--directions must be at least 1, got {cfg.directions}")
    if cfg.mode == "dpzero" and cfg.directions != 1:
        raise ConfigError(f"--mode dpzero uses one direction; for {cfg.directions} use --mode dpaggzo")
    if cfg.mode in ("dpzero", "dpaggzo"):
        if cfg.dp_epsilon is None or not (cfg.dp_epsilon > 0 and math.isfinite(cfg.dp_epsilon)):
            raise ConfigError(f"--mode {cfg.mode} needs --dp-epsilon, a positive number (for example 2), got {cfg.dp_epsilon}")
        if not 0 < cfg.dp_delta < 1:
            raise ConfigError(f"--dp-delta must be in (0, 1), got {cfg.dp_delta}")
        if not 0 < cfg.sampling_rate <= 1:
            raise ConfigError(f"--sampling-rate must be in (0, 1], got {cfg.sampling_rate}")
    elif cfg.dp_epsilon is not None:
        raise ConfigError(f"--dp-epsilon applies to --mode dpzero and dpaggzo only, not --mode {cfg.mode}")
    if cfg.batch_size is not None:
        if cfg.mode != "mezo":
            raise ConfigError(f"--batch-size applies to --mode mezo only; --mode {cfg.mode} uses the whole pool")
        if cfg.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.num_subsets < 2 or cfg.num_subsets % 2:
        raise ConfigError(f"--num-subsets must be an even integer >= 2 (each example joins exactly half), got {cfg.num_subsets}")
    if cfg.mode == "mi":
        if cfg.mi_budget is None or not (cfg.mi_budget > 0 and math.isfinite(cfg.mi_budget)):
            raise ConfigError(f"--mode mi needs --mi-budget, a positive number of nats (for example 0.33), got {cfg.mi_budget}")
    elif cfg.mi_budget is not None:
        raise ConfigError(f"--mi-budget applies to --mode mi only, not --mode {cfg.mode}")
    return cfg


# ---------------------------------------------------------------------------------------
# Helpers of the loop
# ---------------------------------------------------------------------------------------


def learning_rate(base: float, step: int, total_steps: int) -> float:
    """Linear decay from `base` at step 0 to LR_END at the last step."""
    if total_steps <= 1:
        return base
    return base - (base - LR_END) * step / (total_steps - 1)


def params_sha256(params: list[tuple[str, torch.Tensor]]) -> str:
    """sha256 over the raw bytes of the given tensors, in order; equal hashes = bit-identical weights."""
    digest = hashlib.sha256()
    for name, p in params:
        digest.update(name.encode())
        digest.update(p.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def library_versions() -> dict:
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "numpy": np.__version__}


def hardware_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def _json_number(value):
    """JSON has no infinity or NaN: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything a step needs, built once by `train`."""

    cfg: TrainConfig
    model: torch.nn.Module
    named_params: list[tuple[str, torch.Tensor]]
    pool_losses: Callable[[np.ndarray | None], torch.Tensor]  # (rows) -> l_i of those rows, fp32
    pool_size: int
    membership: torch.Tensor
    rule: mechanisms.ReleaseRule
    public_rng: np.random.Generator
    log_release: Callable[[dict], None] = lambda record: None

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for _, p in self.named_params]


def paczero_step(run: Run, step: int) -> dict:
    """One PACZero step; returns its record for steps.jsonl."""
    cfg, directions = run.cfg, run.cfg.directions

    # 1. Public randomness: a perturbation seed and a coin per direction, drawn every step
    #    in the same order whatever happens, so the stream is the same for every mode,
    #    secret and data. Then the rows that enter the step: the whole pool for PACZero, a
    #    minibatch for MeZO, a Poisson sample drawn from the secret generator for DP.
    draws = [(int(run.public_rng.integers(2**63 - 1)), 1 if run.public_rng.random() < 0.5 else -1)
             for _ in range(directions)]
    rows = run.rule.sample_rows(run.pool_size)

    # 2. g_i = (l_i(theta + eps z) - l_i(theta - eps z)) / (2 eps) for every example in the
    #    step, from two forward passes per direction. M does not enter the cost. Every
    #    direction is measured at the same theta.
    estimates = []
    for k, (seed, _) in enumerate(draws):
        estimates.append(zo.projected_gradients(run.params, seed, cfg.zo_eps, lambda: run.pool_losses(rows)))
        if k < directions - 1:
            zo.perturb_(run.params, seed, cfg.zo_eps)  # back to theta for the next direction
    check_finite(run, step, estimates)
    grads = torch.stack([e.grads for e in estimates])  # (K, n)

    # 3. Clipping bounds how far one example can move what is released: each g_i to
    #    [-c, c] for PACZero (a subset mean then moves by at most 2c / |S_m|), each example's
    #    K-vector to L2 norm C for DP. MeZO uses the raw values.
    grads = run.rule.clip(grads)

    # 4. ghat_m = mean of g_i over subset m (one (M x N) matrix-vector product), s_m = sign.
    #    A mean of exactly 0 counts as +1. With SQuAD's -F1 objective that is common: if no
    #    member's answer changed between theta + eps z and theta - eps z, g_i = 0 for all
    #    of them. When it holds for every subset the step is unanimous at +1 and moves by
    #    -lr z, a step along a random direction that carries no signal from the data and
    #    costs nothing (ZPL releases the common sign; MI finds q+ = 1).
    membership = run.membership if run.rule.uses_subsets else None
    inputs = [mechanisms.StepInput.build(grads[k], coin, membership) for k, (_, coin) in enumerate(draws)]

    # 5. Release, one number per direction. ZPL: the unanimous sign, else a public coin
    #    (0 nats). MI: the secret subset's sign plus calibrated Gaussian noise (charged in
    #    nats). MeZO: the raw mean. DP: the noisy clipped mean.
    releases = run.rule.release_step(inputs)
    lr = learning_rate(cfg.lr, step, cfg.steps)
    record = step_record(step, draws, rows, estimates, inputs, releases, run.rule, lr)

    # The release and the MI it spent reach the disk before the weights move, so a crash
    # at any later point cannot lose the ledger.
    run.log_release(record)

    # 6. theta <- theta - (lr_t / K) * sum_k release_k * z_k. The last direction's update
    #    shares one regeneration of z with the restore from theta - eps z.
    for k, ((seed, _), release) in enumerate(zip(draws, releases)):
        step_size = lr * release.value / directions
        if k == directions - 1:
            zo.restore_and_update_(run.params, seed, cfg.zo_eps, step_size)
        else:
            zo.perturb_(run.params, seed, -step_size)
    return record


def step_record(step, draws, rows, estimates, inputs, releases, rule, lr) -> dict:
    """Build the steps.jsonl line: scalars for one direction, lists of K values for K directions."""
    def per_direction(values: list):
        if all(v is None for v in values):
            return None
        return values[0] if len(values) == 1 else values

    return {
        "step": step, "seed": per_direction([seed for seed, _ in draws]),
        "unanimous": per_direction([i.unanimous for i in inputs]),
        "zero_differences": sum(int((e.loss_plus == e.loss_minus).sum()) for e in estimates),
        "positive_subsets": per_direction([i.positive_subsets for i in inputs]),
        "release": per_direction([r.value for r in releases]),
        "release_kind": per_direction([r.kind for r in releases]),
        "raw_release": per_direction([r.raw for r in releases]),
        "sigma": per_direction([r.sigma for r in releases]),
        "mi_step": sum(r.mi_nats for r in releases), "mi_spent": rule.mi_spent, "lr": lr,
        "loss": float(np.mean([e.mean_loss for e in estimates])) if len(estimates[0].grads) else None,
        "rows": None if rows is None else len(rows),
        # Every subset's sign, so the adversary's posterior can be recomputed from the log.
        "subset_signs": per_direction([None if i.signs is None else i.signs.tolist() for i in inputs]),
    }


def check_output_dir(path: str) -> None:
    """Reject a non-empty output folder before anything is loaded or written."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"output folder {path} exists and is a file; pass another --output-dir")
    if os.path.isdir(path) and os.listdir(path):
        raise ConfigError(
            f"output folder {path} is not empty; pass another --output-dir, remove it, or continue it with --resume {path}"
        )


def check_not_finished(path: str) -> None:
    if os.path.isfile(os.path.join(path, "result.json")):
        raise ConfigError(f"run {path} already finished (result.json exists); nothing to resume")


def check_writable(path: str) -> None:
    """Check that the run folder accepts a new file, so that a read-only folder fails now and not at the first write."""
    probe = os.path.join(path, ".paczero-write-test")
    try:
        with open(probe, "w", encoding="utf-8"):
            pass
        os.remove(probe)
    except OSError as error:
        raise ConfigError(f"output folder {path} is not writable ({error.strerror}); pass a writable --output-dir") from error


def lock_output_dir(path: str):
    """Hold an exclusive lock on the run folder for as long as the returned handle is open.

    Two processes writing one run folder would interleave their release logs and checkpoints
    into a run that neither made. The lock is an flock on the folder itself, so it leaves no
    file behind and the kernel drops it when the process dies, even on SIGKILL. (On systems
    without fcntl, such as Windows, there is no lock.)
    """
    try:
        import fcntl
    except ImportError:
        return None
    handle = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(handle)
        raise ConfigError(f"output folder {path} is in use by another paczero process; "
                          "wait for it to finish or pass another --output-dir") from None
    return handle


def write_json(path: str, payload: dict) -> None:
    """Write JSON atomically: a crash leaves either the old file or the new one, never half."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, default=_json_number)
        handle.write("\n")
    os.replace(tmp, path)


def snapshot(named_params: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: p.detach().to("cpu", copy=True) for name, p in named_params}


@torch.no_grad()
def load_snapshot(named_params: list[tuple[str, torch.Tensor]], saved: dict[str, torch.Tensor]) -> None:
    for name, p in named_params:
        p.copy_(saved[name].to(p.device))


def save_best_weights(model, tokenizer, cfg: TrainConfig, out_dir: str) -> str:
    """Save the dev-best model (already loaded into `model`) in formats transformers and peft read.

    LoRA: a peft adapter folder whose base_model_name_or_path is the --model value.
    Full fine-tuning: a save_pretrained folder with the tokenizer, a complete model that
    AutoModelForCausalLM.from_pretrained loads with no paczero code.
    """
    if cfg.tuning == "lora":
        path = os.path.join(out_dir, "best_adapter")
        model.save_pretrained(path)
        config_path = os.path.join(path, "adapter_config.json")
        with open(config_path, encoding="utf-8") as handle:
            adapter_config = json.load(handle)
        adapter_config["base_model_name_or_path"] = cfg.model
        with open(config_path, "w", encoding="utf-8") as handle:
            json.dump(adapter_config, handle, indent=2)
    else:
        path = os.path.join(out_dir, "best_model")
        model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@dataclass
class Prepared:
    """The split, the model with its trainable set, and the tokenised pool, dev and test sets."""

    task_data: data_lib.TaskData
    split: data_lib.Split
    device: torch.device
    model: torch.nn.Module
    scorer: LabelWordScorer | GenerationScorer
    pool: object
    dev: object
    test: object
    micro_batch_size: int


def prepare(cfg: TrainConfig, sharding=None) -> Prepared:
    """Load data and model, make the trainable set and tokenise the three sets, checking input first.

    With `sharding` (data parallelism) on CUDA, each process uses the GPU cuda:LOCAL_RANK.
    """
    device = resolve_device(cfg.device)
    if sharding is not None and device.type == "cuda":
        device = torch.device("cuda", sharding.local_rank)
    dtype = resolve_dtype(cfg.dtype, device)
    template = data_lib.get_template(cfg.task, cfg.template, cfg.label_words)
    num_labels = len(template.label_words) if cfg.task == "classification" else 2
    task_data = data_lib.load_task(cfg.task, cfg.data_dir, cfg.data, text_column=cfg.text_column,
                                   label_column=cfg.label_column, num_labels=num_labels,
                                   prompt_column=cfg.prompt_column, answers_column=cfg.answers_column,
                                   test_size=cfg.test_size, seed=cfg.data_seed)
    split = data_lib.mezo_split(task_data, cfg.pool_size, cfg.dev_size, cfg.test_size, cfg.data_seed)

    log.info("loading %s (%s on %s)", cfg.model, str(dtype).removeprefix("torch."), device)
    model, tokenizer = load_model_and_tokenizer(cfg.model, dtype, device, cfg.device_map)
    if cfg.device_map is not None:
        device = model.get_input_embeddings().weight.device  # inputs enter where the embeddings are
    model = apply_tuning(model, cfg)
    max_length = getattr(model.config, "max_position_embeddings", None)
    if cfg.task in GENERATION_TASKS:
        scorer = GenerationScorer(tokenizer, template, max_length, cfg.max_new_tokens)
    else:
        scorer = LabelWordScorer(tokenizer, template, max_length)
    scorer.sharding = sharding
    micro_batch_size = cfg.micro_batch_size or auto_micro_batch_size(model, scorer, split.pool, device)
    try:
        encoded = {name: scorer.encode(getattr(split, name), micro_batch_size).to(device) for name in ("pool", "dev", "test")}
    except ValueError as error:  # a prompt longer than the model can take
        raise ConfigError(str(error)) from error
    return Prepared(task_data=task_data, split=split, device=device, model=model, scorer=scorer,
                    micro_batch_size=micro_batch_size, **encoded)


def load_run_weights(model, cfg: TrainConfig, run_dir: str, which: str = "best") -> None:
    """Load a finished run's dev-best (`which="best"`) or last-step (`"final"`) trainable weights."""
    from safetensors.torch import load_file

    if which not in ("best", "final"):
        raise ValueError(f"which must be 'best' or 'final', got {which!r}")
    if cfg.tuning == "lora":
        from peft import set_peft_model_state_dict

        path = os.path.join(run_dir, f"{which}_adapter", "adapter_model.safetensors")
        if not os.path.isfile(path):
            raise ConfigError(f"adapter weights not found: {path}; was the run finished?")
        set_peft_model_state_dict(model, load_file(path))
        return
    if which == "final":
        path = os.path.join(run_dir, "final_weights.safetensors")
        if not os.path.isfile(path):
            raise ConfigError(f"weights not found: {path}; was the run finished?")
        load_snapshot(zo.trainable_parameters(model), load_file(path))
        return
    folder = os.path.join(run_dir, "best_model")
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")) if os.path.isdir(folder) else []
    if not files:
        raise ConfigError(f"no safetensors weights in {folder}; was the run finished?")
    saved = {}
    for name in files:
        saved.update(load_file(os.path.join(folder, name)))
    load_snapshot(zo.trainable_parameters(model), saved)


def evaluate_model(cfg: TrainConfig, run_dir: str | None = None) -> dict:
    """Test metric of a model zero-shot, or of a finished run's dev-best weights."""
    cfg = dataclasses.replace(cfg, pool_size=1, dev_size=1) if run_dir is None else cfg
    cfg = resolve_defaults(dataclasses.replace(cfg, output_dir=cfg.output_dir or "-"))
    prepared = prepare(cfg)
    if run_dir is not None:
        load_run_weights(prepared.model, cfg, run_dir)
    started = time.perf_counter()
    metrics = prepared.scorer.evaluate(prepared.model, prepared.test)
    return {"task": cfg.task, "model": cfg.model, "metric_name": METRIC_NAMES[cfg.task], "examples": len(prepared.test),
            "metrics": metrics, "metric": metrics["metric"], "seconds": time.perf_counter() - started}


@dataclass
class LoopState:
    """The loop's counters and records, saved in every checkpoint."""

    next_step: int = 0
    unanimous_steps: int = 0
    zero_differences: int = 0
    examples_evaluated: int = 0
    step_seconds: list = field(default_factory=list)
    dev_history: list = field(default_factory=list)
    best_dev: float = -math.inf
    best_step: int | None = None
    zero_shot: dict = field(default_factory=dict)
    stop_reason: str = "completed"


class TrainingError(RuntimeError):
    """Training stopped on a numerical problem; the message names the step and what to do."""


CHECKPOINT = "checkpoint.pt"


def save_checkpoint(out_dir: str, run: Run, loop: LoopState, best_params: dict | None,
                    rngs: dict[str, np.random.Generator]) -> None:
    """Write everything a resumed run needs, atomically (a temporary file, then a rename)."""
    payload = {
        "loop": dataclasses.asdict(loop), "params": snapshot(run.named_params), "best_params": best_params,
        "rng_states": {name: rng.bit_generator.state for name, rng in rngs.items()},
        "rule": run.rule.state_dict(),
    }
    path = os.path.join(out_dir, CHECKPOINT)
    torch.save(payload, path + ".tmp")
    with open(path + ".tmp", "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(path + ".tmp", path)


def load_checkpoint(out_dir: str, run: Run, rngs: dict[str, np.random.Generator]) -> tuple[LoopState, dict | None]:
    """Restore weights, generators, the release rule's state and the loop from a checkpoint."""
    # The checkpoint contains numpy generator states, so it is a full pickle: load only run
    # folders you wrote yourself.
    path = os.path.join(out_dir, CHECKPOINT)
    try:
        payload = torch.load(path, weights_only=False)
    except Exception as error:  # torch.load raises pickle, zip and OS errors of many types
        raise ConfigError(f"checkpoint {path} is unreadable ({type(error).__name__}: {error}); "
                          "delete it to restart the run from step 0") from error
    load_snapshot(run.named_params, payload["params"])
    for name, rng in rngs.items():
        rng.bit_generator.state = payload["rng_states"][name]
    run.rule.load_state_dict(payload["rule"])
    return LoopState(**payload["loop"]), payload["best_params"]


class ReleaseLog:
    """steps.jsonl, written one line per step and flushed to disk before the weights move.

    The line carries the step's release and the MI spent so far, so the MI ledger on disk
    is never behind the weights. A resumed run first cuts the file back to the checkpoint's
    step; replaying the later steps then writes the same lines again, so nothing is counted
    twice.
    """

    def __init__(self, path: str, keep_lines: int):
        lines = []
        if keep_lines and os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                lines = handle.readlines()[:keep_lines]
        if len(lines) != keep_lines:
            raise TrainingError(f"{path} has {len(lines)} complete lines but the checkpoint is at step {keep_lines}")
        # Cut the file back through a temporary copy and a rename, so a crash here leaves
        # either the old log or the cut one, never an empty file.
        with open(path + ".tmp", "w", encoding="utf-8") as handle:
            handle.writelines(lines)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(path + ".tmp", path)
        self.handle = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.handle.write(json.dumps(record, default=_json_number) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


def check_finite(run: Run, step: int, estimates: list) -> None:
    """Stop on a NaN or infinite loss before anything is released or charged."""
    for k, estimate in enumerate(estimates):
        if not bool(torch.isfinite(estimate.grads).all()):
            bad = int((~torch.isfinite(estimate.grads)).sum())
            fix = "a lower --lr or --zo-eps"
            if any(p.dtype != torch.float32 for p in run.params):
                fix += ", or --dtype fp32"
            raise TrainingError(
                f"non-finite projected gradient at step {step} (direction {k}, {bad} of {estimate.grads.numel()} "
                f"examples); nothing was released for this step. These options cannot go on: start a new run "
                f"(another --output-dir) with {fix}"
            )


def write_config(cfg: TrainConfig, prepared: Prepared, trainable: int) -> None:
    write_json(os.path.join(cfg.output_dir, "config.json"), {
        "options": dataclasses.asdict(cfg), "versions": library_versions(),
        "hardware": hardware_description(prepared.device), "data_source": prepared.task_data.source,
        "split_sizes": {"pool": len(prepared.split.pool), "dev": len(prepared.split.dev),
                        "test": len(prepared.split.test)},
        "trainable_params": trainable, "label_words_single_token": getattr(prepared.scorer, "single_token", None),
        "micro_batch_size_used": prepared.micro_batch_size,
    })


def save_final_weights(model, cfg: TrainConfig, named_params, out_dir: str) -> str:
    """Save the weights after the last step (what the audit attacks), beside the dev-best ones."""
    if cfg.tuning == "lora":
        path = os.path.join(out_dir, "final_adapter")
        model.save_pretrained(path)
        return path
    from safetensors.torch import save_file

    path = os.path.join(out_dir, "final_weights.safetensors")
    save_file({name: t.contiguous() for name, t in snapshot(named_params).items()}, path)
    return path


def train(cfg: TrainConfig, on_step: Callable[[dict], None] | None = None, resume: bool = False) -> dict:
    """Run PACZero (or a baseline) end to end and write the run folder; return result.json's content.

    With `resume`, `cfg.output_dir` must hold an unfinished run with the same options: the
    run continues from its last checkpoint and ends exactly as an uninterrupted run would.
    """
    cfg = resolve_defaults(cfg)
    with contextlib.ExitStack() as hold:  # releases the run folder's lock however the run ends
        return _train(cfg, on_step, resume, hold)


def _train(cfg: TrainConfig, on_step, resume: bool, hold: contextlib.ExitStack) -> dict:
    sharding = distributed.setup()  # None unless launched by torchrun with several processes
    main = sharding is None or sharding.is_main  # only rank 0 writes the run folder
    if resume:
        check_not_finished(cfg.output_dir)
    else:
        check_output_dir(cfg.output_dir)
    prepared = prepare(cfg, sharding)
    model, scorer, split = prepared.model, prepared.scorer, prepared.split
    pool, dev, test = prepared.pool, prepared.dev, prepared.test
    named_params = zo.trainable_parameters(model)
    trainable = sum(p.numel() for _, p in named_params)
    zo.warn_if_rounded_away([p for _, p in named_params], cfg.zo_eps)

    def pool_losses(rows: np.ndarray | None) -> torch.Tensor:
        if rows is None:
            return scorer.losses(model, pool)
        if len(rows) == 0:  # an empty Poisson sample: no forward pass, no examples
            return torch.empty(0)
        return scorer.losses(model, scorer.subset(pool, rows))

    def metric(encoded) -> float:
        return scorer.evaluate(model, encoded)["metric"]

    # Public randomness: the subsets, then per step the perturbation seeds and coins.
    # MeZO's minibatches come from their own generator so that the public stream is the
    # same in every mode. Secret randomness: the secret subset index first, then the MI
    # noise or the DP sampling and noise.
    public_rng = np.random.default_rng(cfg.seed)
    secret_rng = np.random.default_rng(cfg.secret_seed)
    batch_rng = np.random.default_rng([cfg.seed, 1])
    rngs = {"public": public_rng, "secret": secret_rng, "batch": batch_rng}
    membership = mechanisms.membership_matrix(len(split.pool), cfg.num_subsets, public_rng)
    secret_index = mechanisms.draw_secret_index(secret_rng, cfg.num_subsets)
    try:
        rule = mechanisms.make_release_rule(
            cfg.mode, cfg.num_subsets, cfg.steps, cfg.mi_budget, secret_rng, secret_index=secret_index, clip=cfg.clip,
            directions=cfg.directions, pool_size=len(split.pool), batch_size=cfg.batch_size, batch_rng=batch_rng,
            dp_epsilon=cfg.dp_epsilon, dp_delta=cfg.dp_delta, sampling_rate=cfg.sampling_rate)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    if sharding is not None:
        rule = distributed.RankZeroRule(rule, sharding)
    run = Run(cfg=cfg, model=model, named_params=named_params, pool_losses=pool_losses, pool_size=len(split.pool),
              membership=membership, rule=rule, public_rng=public_rng)

    if main:
        try:
            os.makedirs(cfg.output_dir, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"cannot create the output folder {cfg.output_dir!r} ({error.strerror}); "
                              "pass a writable --output-dir") from error
        lock = lock_output_dir(cfg.output_dir)
        if lock is not None:
            hold.callback(os.close, lock)
        # Another process may have started or finished this run since the first check.
        if resume:
            check_not_finished(cfg.output_dir)
        else:
            check_output_dir(cfg.output_dir)
        check_writable(cfg.output_dir)
    best_params = None
    checkpoint_path = os.path.join(cfg.output_dir, CHECKPOINT)
    if resume and os.path.isfile(checkpoint_path):
        loop, best_params = load_checkpoint(cfg.output_dir, run, rngs)
        if main:
            write_config(cfg, prepared, trainable)  # records a changed --eval-every or --save-every
        log.info("resuming %s at step %d of %d", cfg.output_dir, loop.next_step, cfg.steps)
    else:
        if resume:
            log.info("no checkpoint in %s: starting it again from step 0", cfg.output_dir)
        if main:
            write_config(cfg, prepared, trainable)
        loop = LoopState()
        for name, encoded in (("pool", pool), ("dev", dev), ("test", test)):
            if getattr(encoded, "truncated", 0):
                log.info("%s: %d of %d contexts cut from the left to fit the model", name, encoded.truncated, len(encoded))
        if cfg.zero_shot:
            log.info("zero-shot evaluation on %d dev and %d test examples", len(dev), len(test))
            loop.zero_shot = {"dev": metric(dev), "test": scorer.evaluate(model, test)}
            log.info("zero-shot: dev %.4f, test %.4f", loop.zero_shot["dev"], loop.zero_shot["test"]["metric"])

    release_log = ReleaseLog(os.path.join(cfg.output_dir, "steps.jsonl"), keep_lines=loop.next_step) if main else None
    run.log_release = release_log.write if main else (lambda record: None)
    evals_path = os.path.join(cfg.output_dir, "evals.jsonl") if main else os.devnull
    with open(evals_path, "w", encoding="utf-8") as handle:  # back to the checkpoint's evaluations
        handle.writelines(json.dumps(entry) + "\n" for entry in loop.dev_history)
    try:
        for step in range(loop.next_step, cfg.steps):
            if rule.exhausted():
                loop.stop_reason = "mi_budget_spent"
                log.info("MI budget spent after %d steps; stopping early", step)
                break
            started = time.perf_counter()
            record = paczero_step(run, step)
            loop.step_seconds.append(time.perf_counter() - started)
            loop.next_step = step + 1
            if record["unanimous"] is not None:
                loop.unanimous_steps += int(np.sum(record["unanimous"]))
            loop.zero_differences += record["zero_differences"]
            loop.examples_evaluated += cfg.directions * (len(pool) if record["rows"] is None else record["rows"])

            if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step == cfg.steps - 1:
                record["dev_metric"] = metric(dev)
                loop.dev_history.append({"step": step + 1, "dev_metric": record["dev_metric"]})
                with open(evals_path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(loop.dev_history[-1]) + "\n")
                if record["dev_metric"] > loop.best_dev:
                    loop.best_dev, loop.best_step = record["dev_metric"], step + 1
                    best_params = snapshot(named_params)
            if main and cfg.save_every and (step + 1) % cfg.save_every == 0:
                save_checkpoint(cfg.output_dir, run, loop, best_params, rngs)
            if on_step is not None:
                on_step({**record, "unanimous_steps": loop.unanimous_steps, "steps_run": loop.next_step,
                         "releases": loop.next_step * cfg.directions})
    finally:
        if release_log is not None:
            release_log.close()
    steps_run = loop.next_step

    if not loop.dev_history or loop.dev_history[-1]["step"] != steps_run:
        # An early stop (MI budget spent) skipped the last scheduled evaluation.
        dev_metric = metric(dev)
        loop.dev_history.append({"step": steps_run, "dev_metric": dev_metric})
        if dev_metric > loop.best_dev:
            loop.best_dev, loop.best_step, best_params = dev_metric, steps_run, snapshot(named_params)

    final_sha = params_sha256(named_params)
    if main:
        save_final_weights(model, cfg, named_params, cfg.output_dir)
    load_snapshot(named_params, best_params)
    test_metrics = scorer.evaluate(model, test)
    weights_path = os.path.join(cfg.output_dir, "best_adapter" if cfg.tuning == "lora" else "best_model")
    if main:
        save_best_weights(model, scorer.tokenizer, cfg, cfg.output_dir)

    zero_shot_test = loop.zero_shot.get("test")
    result = {
        "task": cfg.task, "metric_name": METRIC_NAMES[cfg.task], "mode": cfg.mode, "model": cfg.model,
        "tuning": cfg.tuning, "test_metric": test_metrics["metric"],
        "zero_shot_test_metric": None if zero_shot_test is None else zero_shot_test["metric"],
        "test_metrics": test_metrics, "zero_shot_test_metrics": zero_shot_test,
        "zero_shot_dev_metric": loop.zero_shot.get("dev"),
        "best_dev_metric": loop.best_dev, "best_step": loop.best_step, "steps_run": steps_run,
        "stop_reason": loop.stop_reason, **rule.privacy(), "mi_budget_nats": cfg.mi_budget,
        # With K directions these count releases (K per step), not steps.
        "unanimous_steps": loop.unanimous_steps,
        "unanimity_rate": loop.unanimous_steps / max(steps_run * cfg.directions, 1),
        "zero_difference_rate": loop.zero_differences / max(loop.examples_evaluated, 1),
        "trainable_params": trainable, "final_params_sha256": final_sha,
        "seconds_per_step": float(np.mean(loop.step_seconds)) if loop.step_seconds else None,
        "pool_size": len(split.pool), "test_size": len(split.test), "dev_history": loop.dev_history,
        "best_weights": os.path.relpath(weights_path, cfg.output_dir),
    }
    if sharding is not None:
        result["processes"] = sharding.world
    if cfg.mode == "mi":
        result["posterior_entropy_nats"] = rule.posterior_entropy()
    if main:
        write_json(os.path.join(cfg.output_dir, "result.json"), result)
    return result
