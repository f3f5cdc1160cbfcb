"""`distill report <folder>...`: the table of `results.build_report`, printed and written as report.md
(with the plots of `plots.py`), report.csv and report.json. matplotlib only once plots are drawn.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from ..core.console import CONSOLE
from ..core.files import write_json_atomic, write_text_atomic
from .results import RESULTS, Row, Stat, SweepReport


def _cell(name: str, stat: Stat) -> str:
    """Accuracies and the gain in percent (points) with their std over seeds; costs as a mean."""
    if stat.mean is None:
        return "-"
    if name == "published_acc":  # one number for every seed
        return f"{100 * stat.mean:.2f}"
    if name in ("test_acc", "alone_acc", "teacher_acc", "kd_gain"):
        text = f"{100 * stat.mean:{'+' if name == 'kd_gain' else ''}.2f}"
        return text if stat.std is None else f"{text}±{100 * stat.std:.2f}"
    if name == "compression":
        return f"{stat.mean:.1f}x"
    return f"{stat.mean:,.0f}"


def _unfinished(row: Row) -> str:
    return ", ".join(f"{count} {status}" for status, count in sorted(row.unfinished.items())) or "-"


# result columns kept out of the table (report.csv and report.json keep them): each job times its speed-up at
# its own moment, so on a shared machine it moves with the load (docs/shipping.md, "The kd summary's speed-up")
NOT_IN_TABLE = ("speedup",)


def table_cells(report: SweepReport) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the report table (shared by the console and report.md); result columns
    that no run has (a train-only report has no KD gain) are left out, and "not finished" when all finished."""
    shown = [name for name in RESULTS if name not in NOT_IN_TABLE and any(row.stats[name].n for row in report.rows)]
    unfinished = any(row.unfinished for row in report.rows)
    headers = [*report.keys, "n", *(RESULTS[name] for name in shown), *(["not finished"] if unfinished else [])]
    cells = [
        [*(str(row.config[key]) for key in report.keys), str(len(row.completed)),
         *(_cell(name, row.stats[name]) for name in shown), *([_unfinished(row)] if unfinished else [])]
        for row in report.rows
    ]
    return headers, cells


CAPTION = "mean±sample std over seeds (n: completed runs in the mean); test split, best.pt; KD gain in points"


def rich_table(report: SweepReport) -> Table:
    headers, cells = table_cells(report)
    table = Table()
    for index, header in enumerate(headers):
        widest = max([len(header), *(len(row[index]) for row in cells)])  # never cut
        table.add_column(header, justify="left" if index < len(report.keys) else "right", min_width=widest)
    for row in cells:
        table.add_row(*row)
    return table


def print_report(report: SweepReport) -> None:
    """The title, the table, and a line per note (unfinished runs, mixed datasets)."""
    CONSOLE.print(report.title, style="bold", highlight=False)
    table = rich_table(report)
    # wider than the console: printed whole (the terminal wraps the lines) rather than cut
    width = max(CONSOLE.width, Measurement.get(CONSOLE, CONSOLE.options.update(width=1000), table).maximum)
    CONSOLE.print(table, width=width, crop=False)
    CONSOLE.print(CAPTION, style="dim", highlight=False)
    for note in report.notes:
        CONSOLE.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)


def markdown(report: SweepReport, images: list[Path], out: Path) -> str:
    """report.md: the title, the table, the notes, and the plots as relative image links."""
    headers, cells = table_cells(report)
    lines = [f"# {report.title}", "", f"Runs from: {', '.join(str(f) for f in report.folders)}", "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    lines += ["", CAPTION]
    if report.notes:
        lines += ["", "## Notes", "", *(f"- {note}" for note in report.notes)]
    if images:
        lines += ["", "## Plots", ""]
        lines += [f"![{image.stem}]({image.relative_to(out).as_posix()})\n" for image in images]
    return "\n".join(lines) + "\n"


def report_records(report: SweepReport) -> list[dict]:
    """The rows as flat records: settings, n, unfinished runs, and mean/std/n of every result (raw values, accuracies as fractions)."""
    records = []
    for row in report.rows:
        record = {**row.config, "n": len(row.completed), "not_finished": _unfinished(row)}
        for name, stat in row.stats.items():
            record.update({f"{name}_mean": stat.mean, f"{name}_std": stat.std, f"{name}_n": stat.n})
        records.append(record)
    return records


def report_json(report: SweepReport) -> dict:
    return {
        "title": report.title,
        "folders": [str(f) for f in report.folders],
        "group_by": report.keys,
        "datasets": report.datasets,
        "models": report.models,
        "notes": report.notes,
        "rows": [
            {"config": row.config, "n": len(row.completed), "not_finished": dict(row.unfinished),
             "results": {name: vars(stat) for name, stat in row.stats.items()},
             "runs": [str(job.run_dir) for job in row.jobs]}
            for row in report.rows
        ],
        "jobs": [
            {"run_dir": str(job.run_dir), "status": job.status, "seed": job.setting("seed"), "error": job.error,
             "config": {key: job.setting(key) for key in report.keys}}
            for job in report.jobs
        ],
    }


def _csv_text(records: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(records[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue()


def write_report(report: SweepReport, out: Path, plots: bool = True) -> list[Path]:
    """Write report.md, report.csv, report.json and the plots (plots/*.png) into `out`; the paths written."""
    out = Path(out)
    images = []
    if plots:
        from .plots import report_plots

        images = report_plots(report, out / "plots")
    files = [out / "report.md", out / "report.csv", out / "report.json"]
    write_text_atomic(markdown(report, images, out), files[0])
    write_text_atomic(_csv_text(report_records(report)), files[1])
    write_json_atomic(report_json(report), files[2])
    return [*files, *images]
