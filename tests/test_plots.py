"""`cli.py plot`: the PNG figures of run folders, drawn from three tiny real runs (MeZO, ZPL, MI)."""

from __future__ import annotations

import os

import matplotlib
import matplotlib.colors
import matplotlib.figure
import pytest
from typer.testing import CliRunner

import cli
import paczero
import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALL_FIGURES = ["dev_metric.png", "mi_spent.png", "unanimity.png", "metric_vs_privacy.png"]


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory, tiny_model_dir, sst2_dir) -> list[str]:
    root = tmp_path_factory.mktemp("plots")
    dirs = []
    # MeZO first: it has no MI curve, which must not shift the colours of the runs after it.
    for mode, budget in (("mezo", None), ("zpl", None), ("mi", 0.1)):
        cfg = paczero.TrainConfig(model=tiny_model_dir, data_dir=sst2_dir, mode=mode, mi_budget=budget, pool_size=16,
                                  dev_size=8, test_size=8, num_subsets=4, steps=6, eval_every=3, secret_seed=3,
                                  device="cpu", output_dir=str(root / f"run-{mode}"))
        paczero.train(cfg)
        dirs.append(cfg.output_dir)
    return dirs


def test_plot_writes_every_figure(run_dirs, tmp_path):
    paths = plots.plot_runs(run_dirs, str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ALL_FIGURES
    for path in paths:
        with open(path, "rb") as handle:
            assert handle.read(8) == PNG_MAGIC
        assert os.path.getsize(path) > 5_000  # a drawn figure, not an empty canvas


def test_plot_one_run_has_no_comparison(run_dirs, tmp_path):
    paths = plots.plot_runs(run_dirs[:1], str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ALL_FIGURES[:3]


def test_plot_run_keeps_its_colour(run_dirs, tmp_path, monkeypatch):
    # Record, as each figure is saved, the colour of every labelled line or marker.
    colours: dict[str, set[str]] = {}
    save = matplotlib.figure.Figure.savefig

    def recording_save(figure, *args, **kwargs):
        for axes in figure.axes:
            for artist in [*axes.lines, *axes.collections]:
                label = artist.get_label()
                if label.startswith("_"):  # unlabelled: budget line, zero-shot cross
                    continue
                colour = artist.get_color() if hasattr(artist, "get_xydata") else artist.get_facecolor()[0]
                colours.setdefault(label.removesuffix(" (non-private)"), set()).add(matplotlib.colors.to_hex(colour))
        return save(figure, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", recording_save)
    plots.plot_runs(run_dirs, str(tmp_path))
    assert set(colours) == {"run-mezo", "run-zpl", "run-mi"}
    assert all(len(seen) == 1 for seen in colours.values()), colours
    assert len({seen.pop() for seen in colours.values()}) == 3


def test_plot_read_run_mi_series(run_dirs):
    mi_run = plots.read_run(run_dirs[2])
    spent = [s["mi_spent"] for s in mi_run["steps"]]
    assert len(spent) == 6
    assert all(b >= a for a, b in zip(spent, spent[1:]))
    assert spent[-1] <= 0.1 + 1e-12
    assert [e["step"] for e in mi_run["evals"]] == [3, 6]


def test_cli_plot_missing_run(tmp_path):
    outcome = CliRunner().invoke(cli.app, ["plot", str(tmp_path / "nothing"), "--output-dir", str(tmp_path / "out")])
    assert outcome.exit_code == 2
    assert "no config.json" in outcome.stderr


def test_cli_plot_bad_window(run_dirs, tmp_path):
    outcome = CliRunner().invoke(cli.app, ["plot", run_dirs[0], "--window", "0", "--output-dir", str(tmp_path)])
    assert outcome.exit_code == 2
    assert "--window must be at least 1, got 0" in outcome.stderr
