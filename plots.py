"""Figures of finished (or running) runs, drawn from their run folders with matplotlib.

- dev metric over steps (evals.jsonl);
- MI spent over steps (steps.jsonl);
- unanimity rate over steps, a moving average over `window` steps (steps.jsonl);
- with several runs: test metric against the MI spent, with the matched DP epsilon on a
  second axis (result.json). Non-private runs have no MI and are drawn as horizontal
  reference lines; DP runs are placed at the MI whose MIA bound matches their epsilon.
"""

from __future__ import annotations

import json
import os

import numpy as np

import mechanisms


def read_run(run_dir: str) -> dict:
    """The config, per-step records, dev evaluations and result (if finished) of a run folder."""
    config_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in {run_dir}; give run folders written by train")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    steps = []
    steps_path = os.path.join(run_dir, "steps.jsonl")
    if os.path.isfile(steps_path):
        with open(steps_path, encoding="utf-8") as handle:
            steps = [json.loads(line) for line in handle if line.strip()]
    result = None
    if os.path.isfile(os.path.join(run_dir, "result.json")):
        with open(os.path.join(run_dir, "result.json"), encoding="utf-8") as handle:
            result = json.load(handle)
    evals = []
    evals_path = os.path.join(run_dir, "evals.jsonl")
    if os.path.isfile(evals_path):
        with open(evals_path, encoding="utf-8") as handle:
            evals = [json.loads(line) for line in handle if line.strip()]
    elif result is not None:
        evals = result.get("dev_history", [])
    options = config["options"]
    label = os.path.basename(os.path.normpath(run_dir)) or run_dir
    return {"dir": run_dir, "label": label, "options": options, "steps": steps, "evals": evals, "result": result}


def _unanimity(step: dict) -> float | None:
    value = step.get("unanimous")
    if value is None:
        return None
    return float(np.mean(value))


def _moving_average(values: list[float], window: int) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return values
    kernel = np.ones(min(window, len(values)))
    return np.convolve(values, kernel, mode="valid") / len(kernel)


def _legend(axes) -> None:
    if axes.get_legend_handles_labels()[0]:  # a figure with no run to name (e.g. no MI curve) gets none
        axes.legend(fontsize="small")


def plot_runs(run_dirs: list[str], output_dir: str, window: int = 20) -> list[str]:
    """Write the figures as PNG files into `output_dir`; return their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    runs = [read_run(d) for d in run_dirs]
    for index, run in enumerate(runs):
        run["color"] = f"C{index % 10}"  # a run keeps its colour in every figure
    os.makedirs(output_dir, exist_ok=True)
    paths = []

    def save(figure, name: str) -> None:
        path = os.path.join(output_dir, name)
        figure.tight_layout()
        figure.savefig(path, dpi=120)
        plt.close(figure)
        paths.append(path)

    metric_name = {"sst2": "accuracy", "classification": "accuracy"}.get(runs[0]["options"]["task"], "F1")

    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    for run in runs:
        if run["evals"]:
            axes.plot([e["step"] for e in run["evals"]], [e["dev_metric"] for e in run["evals"]], marker="o",
                      label=run["label"], color=run["color"])
        if run["result"] and run["result"].get("zero_shot_dev_metric") is not None:
            axes.scatter([0], [run["result"]["zero_shot_dev_metric"]], marker="x", color="gray")
    axes.set_xlabel("step")
    axes.set_ylabel(f"dev {metric_name}")
    axes.set_title(f"Dev {metric_name} over training (x: zero-shot)")
    _legend(axes)
    save(figure, "dev_metric.png")

    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    for run in runs:
        points = [(s["step"] + 1, s["mi_spent"]) for s in run["steps"] if s.get("mi_spent") is not None]
        if points:
            axes.plot(*zip(*points), label=run["label"], color=run["color"])
            budget = run["options"].get("mi_budget")
            if budget:
                axes.axhline(budget, linestyle=":", color="gray")
    axes.set_xlabel("step")
    axes.set_ylabel("MI spent (nats)")
    axes.set_title("Mutual information spent (dotted: budget)")
    _legend(axes)
    save(figure, "mi_spent.png")

    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    for run in runs:
        rates = [_unanimity(s) for s in run["steps"]]
        rates = [r for r in rates if r is not None]
        if rates:
            smooth = _moving_average(rates, window)
            axes.plot(np.arange(len(smooth)) + len(rates) - len(smooth) + 1, smooth, label=run["label"], color=run["color"])
    axes.set_xlabel("step")
    axes.set_ylabel(f"unanimity rate ({window}-step moving average)")
    axes.set_ylim(0, 1)
    axes.set_title("Share of steps where all subsets agree")
    _legend(axes)
    save(figure, "unanimity.png")

    finished = [r for r in runs if r["result"] is not None]
    if len(finished) >= 2:
        figure, axes = plt.subplots(figsize=(6.4, 4.2))
        for run in finished:
            color = run["color"]
            result = run["result"]
            value = 100 * result["test_metric"]
            if result.get("mi_spent_nats") is not None:
                axes.scatter(result["mi_spent_nats"], value, color=color, label=run["label"])
            elif result.get("dp_epsilon") is not None:
                axes.scatter(mechanisms.epsilon_to_mi(result["dp_epsilon"]), value, marker="s", color=color, label=run["label"])
            else:
                axes.axhline(value, linestyle="--", linewidth=1, color=color, label=f"{run['label']} (non-private)")
        axes.set_xlabel("MI spent (nats); DP runs at their MIA-matched MI")
        axes.set_ylabel(f"test {metric_name} (%)")
        to_epsilon = np.vectorize(lambda mi: mechanisms.matched_epsilon(mechanisms.mia_success_bound(min(max(mi, 0.0), 0.69))))
        to_mi = np.vectorize(lambda eps: mechanisms.epsilon_to_mi(min(max(eps, 0.0), 30.0)))
        top = axes.secondary_xaxis("top", functions=(to_epsilon, to_mi))
        top.set_xticks([0.25, 0.5, 1, 2, 3, 4, 6])
        top.set_xlabel("matched epsilon")
        axes.set_title(f"Test {metric_name} against privacy")
        _legend(axes)
        save(figure, "metric_vs_privacy.png")
    return paths
