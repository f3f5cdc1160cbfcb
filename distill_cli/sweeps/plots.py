"""The report's plots (matplotlib, Agg, PNG): learning curves of a run, test accuracy against a swept
number with error bars over seeds, and a heatmap over two swept numbers.

Each plot function returns a matplotlib Figure (tests read its axes back); `report_plots` saves them.
Figures are made without pyplot: no global state, no display needed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .results import FINISHED, Row, SweepReport


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl of a run, one dict per epoch; a line cut short (a run still writing) is skipped."""
    rows = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def learning_curves(metrics: list[dict], title: str, teacher_acc: float | None = None, alone_acc: float | None = None) -> Figure:
    """Accuracy (train, val; teacher and student-alone test accuracy as reference lines), each loss term
    and the learning rate, per epoch."""
    figure = Figure(figsize=(15, 4.5), layout="constrained")
    figure.suptitle(title)
    accuracy, losses, lr = figure.subplots(1, 3)
    epochs = [row["epoch"] for row in metrics]
    for key, label in (("train_acc", "train"), ("val_acc", "validation")):
        if any(row.get(key) is not None for row in metrics):
            accuracy.plot(epochs, [_pct(row.get(key)) for row in metrics], marker="o", label=label)
    for value, label, style in ((teacher_acc, "teacher (test)", "--"), (alone_acc, "student alone (test)", ":")):
        if value is not None:
            accuracy.axhline(100 * value, linestyle=style, color="gray" if style == "--" else "black", label=label)
    for key in [key for key in metrics[0] if key == "loss" or key.startswith("loss/")] if metrics else []:
        losses.plot(epochs, [row[key] for row in metrics], marker="o", label=key)
    lr.plot(epochs, [row["lr"] for row in metrics], marker="o")
    for axes, name, ylabel in ((accuracy, "accuracy", "accuracy (%)"), (losses, "loss terms (weighted)", "loss"), (lr, "learning rate", "learning rate")):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_title(name)
        axes.set_xlabel("epoch")
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
    accuracy.legend()
    losses.legend()
    return figure


def _pct(value: float | None) -> float | None:
    return None if value is None else 100 * value


def _label(config: dict) -> str:
    return " ".join(f"{key}={value}" for key, value in config.items()) or "all runs"


def accuracy_vs_setting(rows: list[Row], key: str, title: str) -> Figure:
    """Mean test accuracy (%) against the swept number `key`, error bars one sample std over seeds; one line
    per combination of the other settings. With a single line, the mean teacher and student-alone test
    accuracies are reference lines."""
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.subplots()
    lines: dict[str, list[Row]] = {}
    for row in rows:
        if row.stats["test_acc"].n:
            lines.setdefault(_label({k: v for k, v in row.config.items() if k != key}), []).append(row)
    for label, members in lines.items():
        members = sorted(members, key=lambda row: row.config[key])
        axes.errorbar(
            [row.config[key] for row in members],
            [100 * row.stats["test_acc"].mean for row in members],
            yerr=[100 * (row.stats["test_acc"].std or 0) for row in members],
            marker="o", capsize=4, label=label,
        )
    if len(lines) == 1:
        (members,) = lines.values()
        for name, label, style in (("teacher_acc", "teacher (test)", "--"), ("alone_acc", "student alone (test)", ":")):
            values = [v for row in members for v in row.stats[name].values]
            if values:
                axes.axhline(100 * sum(values) / len(values), linestyle=style, color="gray", label=label)
    axes.set_xticks(sorted({row.config[key] for members in lines.values() for row in members}))
    axes.set_title(title)
    axes.set_xlabel(key)
    axes.set_ylabel("test accuracy (%)")
    axes.grid(alpha=0.3)
    axes.legend()
    return figure


def accuracy_heatmap(rows: list[Row], x_key: str, y_key: str, title: str) -> Figure:
    """Mean test accuracy (%) over a grid of two swept numbers; each cell says mean ± std and n."""
    xs = sorted({row.config[x_key] for row in rows})
    ys = sorted({row.config[y_key] for row in rows})
    grid = [[float("nan")] * len(xs) for _ in ys]
    figure = Figure(figsize=(7, 5), layout="constrained")
    axes = figure.subplots()
    cells = []
    for row in rows:
        stat = row.stats["test_acc"]
        if stat.n:
            i, j = ys.index(row.config[y_key]), xs.index(row.config[x_key])
            grid[i][j] = 100 * stat.mean
            spread = f"\n± {100 * stat.std:.2f}" if stat.std is not None else ""
            cells.append((i, j, f"{100 * stat.mean:.2f}{spread}\nn={stat.n}"))
    image = axes.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
    for i, j, label in cells:  # white on the dark half of the colour map, black on the light half
        dark = image.norm(grid[i][j]) < 0.5
        axes.text(j, i, label, ha="center", va="center", fontsize=8, color="white" if dark else "black")
    figure.colorbar(image, ax=axes, label="test accuracy (%)")
    axes.set_xticks(range(len(xs)), [str(x) for x in xs])
    axes.set_yticks(range(len(ys)), [str(y) for y in ys])
    axes.set_title(title)
    axes.set_xlabel(x_key)
    axes.set_ylabel(y_key)
    return figure


def swept_numbers(report: SweepReport) -> list[str]:
    """The grouping settings whose values are numbers, with at least two of them."""
    def numeric(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    return [
        key for key in report.keys
        if all(numeric(row.config[key]) for row in report.rows) and len({row.config[key] for row in report.rows}) > 1
    ]


def _file_name(text: str) -> str:
    return re.sub(r"[^\w.=-]+", "_", text).strip("_")


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def report_figures(report: SweepReport) -> dict[str, Figure]:
    """The report's figures by file stem: accuracy against each swept number, a heatmap when exactly
    two numbers (and nothing else) are swept, and the learning curves of each configuration's first completed run."""
    subject = f"{', '.join(report.datasets)}: {', '.join(report.models)}"
    numbers = swept_numbers(report)
    figures = {
        f"accuracy_vs_{_file_name(key)}": accuracy_vs_setting(report.rows, key, f"{subject}\ntest accuracy vs {key} (mean ± std over seeds)")
        for key in numbers
    }
    if len(numbers) == 2 and len(report.keys) == 2:
        x_key, y_key = numbers
        figures[f"heatmap_{_file_name(x_key)}_{_file_name(y_key)}"] = accuracy_heatmap(
            report.rows, x_key, y_key, f"{subject}\nmean test accuracy (%) over {x_key} x {y_key}"
        )
    for index, row in enumerate(report.rows):
        job = next((job for job in row.jobs if job.status == FINISHED), None)
        if job is None or not (job.run_dir / "metrics.jsonl").is_file():
            continue
        name = f"{job.setting('dataset')}: {job.models}, {_label(row.config)}, seed {job.setting('seed')} (run {job.run_dir.name})"
        figures[f"curves_{index}_{_file_name(_label(row.config))}"] = learning_curves(
            read_metrics(job.run_dir), name, job.results["teacher_acc"], job.results["alone_acc"]
        )
    return figures


def report_plots(report: SweepReport, folder: Path) -> list[Path]:
    """Save the report's figures as PNGs in `folder`; the paths."""
    return [_save(figure, folder / f"{stem}.png") for stem, figure in report_figures(report).items()]
