"""`distill report`: the sweep report on a real multirun (made once), and its aggregation on hand-made summaries."""

import csv
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_distill_in_process, table_rows
from PIL import Image

from distill_cli.cli import main as cli
from distill_cli.sweeps.plots import accuracy_heatmap, report_figures
from distill_cli.sweeps.report import table_cells
from distill_cli.sweeps.results import (
    Job,
    SweepReport,
    aggregate,
    build_report,
    grouping_keys,
    job_results,
    summarize,
)

FAST = ["epochs=2", "teacher_epochs=2", "teacher.kwargs.width=8", "student.kwargs.hidden=[8]", "device=cpu"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A real multirun over T and seed; its callback writes the report into the sweep folder."""
    root = tmp_path_factory.mktemp("sweep")
    run_distill_in_process("kd", "-m", "T=2,4", "seed=0,1", *FAST, f"hydra.sweep.dir={root / 'sweep'}", cwd=root)
    return root / "sweep"


def _summaries(sweep: Path) -> dict[float, list[dict]]:
    """The completed summaries of the sweep by T, read directly."""
    by_t = {}
    for path in sorted(sweep.glob("*/summary.json")):
        summary = json.loads(path.read_text())
        by_t.setdefault(summary["T"], []).append(summary)
    return by_t


def _expected(summaries: list[dict]) -> dict[str, tuple[float, float]]:
    """mean and sample std of each accuracy column, computed independently of the report code."""
    columns = {
        "test_acc": [s["student"]["test_acc_best"] for s in summaries],
        "alone_acc": [s["baseline"]["test_acc_best"] for s in summaries],
        "kd_gain": [s["kd_gain"] for s in summaries],
        "teacher_acc": [s["teacher"]["test_acc"] for s in summaries],
    }
    return {name: (statistics.mean(values), statistics.stdev(values)) for name, values in columns.items()}


def test_means_and_stds_over_seeds_match_the_summaries(sweep):
    report = build_report([sweep])
    assert report.keys == ["T"]  # seed is folded, epochs etc. do not vary
    assert [row.config["T"] for row in report.rows] == [2.0, 4.0]
    for row in report.rows:
        assert len(row.completed) == 2 and not row.unfinished
        for name, (mean, std) in _expected(_summaries(sweep)[row.config["T"]]).items():
            assert row.stats[name].n == 2
            assert row.stats[name].mean == pytest.approx(mean, abs=1e-12), name
            assert row.stats[name].std == pytest.approx(std, abs=1e-12), name
    assert report.datasets == ["digits"] and report.models == ["cnn -> mlp_small"]


def test_table_shows_mean_std_and_n(sweep):
    from distill_cli.sweeps.report import rich_table

    report = build_report([sweep])
    rows = table_rows(rich_table(report))
    expected = _expected(_summaries(sweep)[2.0])
    mean, std = expected["test_acc"]
    gain, gain_std = expected["kd_gain"]
    assert rows[0][:3] == ["2.0", "2", f"{100 * mean:.2f}±{100 * std:.2f}"]
    assert f"{100 * gain:+.2f}±{100 * gain_std:.2f}" in rows[0]


def test_multirun_callback_wrote_the_report_files(sweep):
    expected = {t: _expected(s) for t, s in _summaries(sweep).items()}
    records = list(csv.DictReader((sweep / "report.csv").open()))
    assert [float(r["T"]) for r in records] == [2.0, 4.0]
    for record in records:
        mean, std = expected[float(record["T"])]["test_acc"]
        assert float(record["test_acc_mean"]) == pytest.approx(mean) and float(record["test_acc_std"]) == pytest.approx(std)
        assert record["n"] == "2"
    data = json.loads((sweep / "report.json").read_text())
    assert data["group_by"] == ["T"]
    for row in data["rows"]:
        mean, std = expected[row["config"]["T"]]["kd_gain"]
        assert row["results"]["kd_gain"]["mean"] == pytest.approx(mean) and row["results"]["kd_gain"]["std"] == pytest.approx(std)
        assert row["n"] == 2 and len(row["runs"]) == 2
    markdown = (sweep / "report.md").read_text()
    assert "| T | n | test acc % |" in markdown
    # the speed-up, timed by each job at its own moment, stays out of the table; the files keep it
    assert "speed-up" not in markdown and all(float(record["speedup_mean"]) > 0 for record in records)
    links = [line[line.index("(") + 1 : -1] for line in markdown.splitlines() if line.startswith("![")]
    assert "plots/accuracy_vs_T.png" in links and len(links) == 3  # accuracy vs T, curves of T=2 and T=4
    for link in links:
        with Image.open(sweep / link) as image:
            assert image.format == "PNG" and image.size[0] > 300


def test_accuracy_plot_has_error_bars_over_seeds(sweep):
    report = build_report([sweep])
    figures = report_figures(report)
    assert sorted(figures) == ["accuracy_vs_T", "curves_0_T=2.0", "curves_1_T=4.0"]  # no heatmap: one number swept
    (axes,) = figures["accuracy_vs_T"].axes
    assert "digits" in axes.get_title() and "cnn -> mlp_small" in axes.get_title() and "T" in axes.get_title()
    assert (axes.get_xlabel(), axes.get_ylabel()) == ("T", "test accuracy (%)")
    (bars,) = axes.containers
    line, _, (vertical,) = bars.lines
    expected = [_expected(_summaries(sweep)[t])["test_acc"] for t in (2.0, 4.0)]
    assert list(line.get_xdata()) == [2.0, 4.0]
    assert list(line.get_ydata()) == pytest.approx([100 * mean for mean, _ in expected])
    spans = [segment[1][1] - segment[0][1] for segment in vertical.get_segments()]
    assert spans == pytest.approx([2 * 100 * std for _, std in expected])  # mean ± one std
    references = {text.get_text() for text in axes.get_legend().get_texts()}
    assert {"teacher (test)", "student alone (test)"} <= references


def test_learning_curves_show_accuracy_losses_and_lr_per_epoch(sweep):
    figure = report_figures(build_report([sweep]))["curves_0_T=2.0"]
    accuracy, losses, lr = figure.axes[:3]
    assert "digits" in figure.get_suptitle() and "cnn -> mlp_small" in figure.get_suptitle()
    assert [axes.get_xlabel() for axes in (accuracy, losses, lr)] == ["epoch"] * 3
    assert accuracy.get_ylabel() == "accuracy (%)"
    summary = json.loads((sweep / "0" / "summary.json").read_text())
    train, val, teacher, alone = accuracy.get_lines()
    assert list(train.get_xdata()) == [1, 2]
    assert teacher.get_ydata()[0] == pytest.approx(100 * summary["teacher"]["test_acc"])
    assert alone.get_ydata()[0] == pytest.approx(100 * summary["baseline"]["test_acc_best"])
    assert [text.get_text() for text in losses.get_legend().get_texts()] == ["loss", "loss/ce", "loss/kd"]
    assert list(lr.get_lines()[0].get_ydata()) == [row["lr"] for row in map(json.loads, (sweep / "0" / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture
def damaged_sweep(sweep, tmp_path) -> Path:
    """A copy of the sweep with job 3 (T=4) failed, job 1 (T=2) still running, and a job 4 (T=2) whose
    summary.json was cut off mid-write."""
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    failed = json.loads((copy / "3" / "summary.json").read_text())
    (copy / "3" / "summary.json").write_text(json.dumps({**failed, "status": "failed", "error": "boom"}))
    (copy / "1" / "summary.json").unlink()
    shutil.copytree(copy / "0", copy / "4")
    text = (copy / "4" / "summary.json").read_text()
    (copy / "4" / "summary.json").write_text(text[: len(text) // 2])
    return copy


def test_unfinished_and_damaged_runs_are_shown_and_left_out(damaged_sweep, capsys):
    report = build_report([damaged_sweep])
    by_t = {row.config["T"]: row for row in report.rows}
    assert [len(row.completed) for row in report.rows] == [1, 1]
    assert dict(by_t[2.0].unfinished) == {"running": 1, "damaged": 1}
    assert dict(by_t[4.0].unfinished) == {"failed": 1}
    only = {2.0: "0", 4.0: "2"}
    for t, row in by_t.items():
        summary = json.loads((damaged_sweep / only[t] / "summary.json").read_text())
        assert row.stats["test_acc"].n == 1 and row.stats["test_acc"].std is None
        assert row.stats["test_acc"].mean == summary["student"]["test_acc_best"]
    assert cli.main(["report", str(damaged_sweep), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "1 damaged, 1 running" in out and "1 failed" in out
    assert f"failed: {damaged_sweep / '3'}" in out and "boom" in out
    assert f"damaged: {damaged_sweep / '4'}" in out and "summary.json unreadable" in out
    assert f"running: {damaged_sweep / '1'}" in out
    assert "Traceback" not in out


def test_mixed_datasets_are_never_averaged_together(sweep, tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    hydra = copy / "3" / ".hydra" / "hydra.yaml"
    hydra.write_text(hydra.read_text().replace("dataset: digits", "dataset: mnist"))
    report = build_report([copy])
    assert report.keys == ["dataset", "T"]
    assert [(row.config["dataset"], row.config["T"], len(row.completed)) for row in report.rows] == [
        ("digits", 2.0, 2), ("digits", 4.0, 1), ("mnist", 4.0, 1)
    ]
    assert "runs of 2 datasets (digits, mnist)" in report.notes[0]
    assert cli.main(["report", str(copy), "--by", "T", "--no-plots"]) == 0  # --by cannot merge them
    assert build_report([copy], by=["T"]).keys == ["dataset", "T"]


def test_overlapping_folders_count_each_run_once(sweep):
    report = build_report([sweep.parent, sweep])  # the sweep is inside the first folder
    assert [len(row.completed) for row in report.rows] == [2, 2]


def test_report_imports_neither_torch_nor_matplotlib_without_plots(sweep, tmp_path):
    code = (
        "import sys; from distill_cli.cli import main as cli; "
        f"assert cli.main(['report', {str(sweep)!r}, '--no-plots', '--out', {str(tmp_path)!r}]) == 0; "
        "assert not {'torch', 'matplotlib'} & set(sys.modules), sorted({'torch', 'matplotlib'} & set(sys.modules))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=60)


def test_cli_sort_by_and_out(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["report", str(sweep), "--sort", "kd_gain", "--out", str(out)]) == 0
    records = list(csv.DictReader((out / "report.csv").open()))
    gains = [float(r["kd_gain_mean"]) for r in records]
    assert gains == sorted(gains, reverse=True)
    assert (out / "report.md").is_file() and (out / "plots" / "accuracy_vs_T.png").is_file()
    assert cli.main(["report", str(sweep), "--by", "seed", "--out", str(out), "--no-plots"]) == 0
    records = list(csv.DictReader((out / "report.csv").open()))
    assert [(r["seed"], r["n"]) for r in records] == [("0", "2"), ("1", "2")]


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--bogus", "{tmp}"], 2, "unrecognized arguments: --bogus"),
        (["{tmp}/missing"], 2, "no such folder"),
        ([], 2, "the following arguments are required: folders"),
        (["{tmp}/empty"], 1, "no distill train/kd runs in"),
        (["{sweep}", "--sort", "accuracy"], 1, "--sort accuracy: no such column"),
        (["{sweep}", "--by", "temperature"], 1, "--by temperature: no run has this setting"),
    ],
)
def test_bad_command_lines_get_one_line(sweep, tmp_path, capsys, args, code, message):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    args = [a.format(tmp=tmp_path, sweep=sweep) for a in args]
    assert cli.main(["report", *args, "--out", str(tmp_path)]) == code
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("distill report: error:") and message in line


def test_no_completed_run_exits_non_zero(sweep, tmp_path, capsys):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    for summary in copy.glob("*/summary.json"):
        summary.unlink()
    assert cli.main(["report", str(copy), "--no-plots"]) == 1
    assert capsys.readouterr().err.strip() == "distill report: error: no completed runs to report"


def test_train_run_reports_the_model_it_trained(sweep, tmp_path, capsys):
    run = tmp_path / "train"
    run_distill_in_process("train", "epochs=1", "teacher.kwargs.width=8", "device=cpu", f"hydra.run.dir={run}", cwd=tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    (row,) = build_report([run]).rows
    assert row.stats["test_acc"].mean == summary["teacher"]["test_acc_best"]
    assert row.stats["params"].mean == summary["teacher"]["params"] and row.stats["kd_gain"].n == 0
    both = build_report([sweep, run])
    assert both.keys[:2] == ["command", "T"]  # train and kd runs are separate rows (so are their other settings)
    assert [(row.config["command"], row.config["T"], len(row.completed)) for row in both.rows] == [
        ("kd", 2.0, 2), ("kd", 4.0, 2), ("train", None, 1)
    ]


# hand-made summaries: the aggregation alone, no training

def _job(t: float, alpha: float, seed: int, acc: float | None, status: str = "completed") -> Job:
    summary = {
        "command": "kd", "status": status, "dataset": "digits", "wall_time_s": 10.0 + seed,
        "teacher": {"name": "cnn", "test_acc": 0.95}, "baseline": {"test_acc_best": 0.9}, "kd_gain": None,
        "student": {"name": "mlp", "test_acc_best": acc, "params": 100},
    }
    config = {"T": t, "alpha": alpha, "seed": seed, "epochs": 5}
    overrides = {"T": str(t), "alpha": str(alpha), "seed": str(seed), "epochs": "5"}
    results = job_results(summary) if status == "completed" else {}
    return Job(Path(f"/nowhere/{t}-{alpha}-{seed}"), "kd", overrides, {"dataset": "digits"}, config, status, summary, None, results, "cnn -> mlp")


def test_summarize_is_mean_and_sample_std_of_the_values_present():
    values = [0.91, 0.93, 0.96]
    stat = summarize([*values, None])
    assert (stat.mean, stat.std, stat.n) == (statistics.mean(values), statistics.stdev(values), 3)
    assert summarize([0.5]).std is None and summarize([]).mean is None


def test_grouping_folds_seeds_and_skips_unfinished_runs():
    jobs = [_job(2.0, 0.5, 0, 0.90), _job(2.0, 0.5, 1, 0.92), _job(2.0, 0.5, 2, None, "failed"), _job(4.0, 0.5, 0, 0.80)]
    keys = grouping_keys(jobs)
    assert keys == ["T"]  # alpha and epochs are the same everywhere
    first, second = aggregate(jobs, keys)
    assert first.stats["test_acc"].mean == statistics.mean([0.90, 0.92]) and first.stats["test_acc"].n == 2
    assert dict(first.unfinished) == {"failed": 1}
    assert second.stats["test_acc"].n == 1 and second.stats["wall_time_s"].mean == 10.0


def test_damaged_result_values_are_refused():
    with pytest.raises(ValueError, match="test_acc"):
        job_results({"command": "train", "wall_time_s": 1.0, "teacher": {"test_acc_best": "NaN", "params": 3}})
    with pytest.raises(KeyError):
        job_results({"command": "kd", "wall_time_s": 1.0, "student": {"params": 3}})


def test_heatmap_over_two_swept_numbers():
    jobs = [_job(t, a, s, 0.8 + 0.01 * i + 0.001 * s) for i, (t, a) in enumerate([(2.0, 0.5), (2.0, 0.9), (4.0, 0.5), (4.0, 0.9)]) for s in (0, 1)]
    rows = aggregate(jobs, ["T", "alpha"])
    figure = accuracy_heatmap(rows, "T", "alpha", "digits: cnn -> mlp")
    axes = figure.axes[0]
    assert (axes.get_xlabel(), axes.get_ylabel(), axes.get_title()) == ("T", "alpha", "digits: cnn -> mlp")
    grid = axes.images[0].get_array()
    assert grid[0][0] == pytest.approx(100 * statistics.mean([0.80, 0.801]))  # alpha=0.5 (row), T=2 (column)
    assert grid[1][0] == pytest.approx(100 * statistics.mean([0.81, 0.811]))  # alpha=0.9, T=2
    assert grid[0][1] == pytest.approx(100 * statistics.mean([0.82, 0.821]))  # alpha=0.5, T=4
    assert figure.axes[1].get_ylabel() == "test accuracy (%)"  # the colour bar
    report = SweepReport([], jobs, ["T", "alpha"], rows, ["digits"], ["cnn -> mlp"], [])
    assert sorted(report_figures(report)) == ["accuracy_vs_T", "accuracy_vs_alpha", "heatmap_T_alpha"]
    (axes,) = report_figures(report)["accuracy_vs_T"].axes
    assert len(axes.containers) == 2  # one line per alpha


def test_the_published_number_of_each_runs_model_is_a_column_beside_its_own():
    """`published %`: a train run's network (`published.teacher`), a kd student by its method (`published.kd`), a
    student trained alone (`published.student`); one number over the seeds, no spread; absent without a preset's."""
    published = {"teacher": 79.42, "student": 72.5, "method": "dkd", "kd": 76.32}
    kd = [_job(4.0, 0.5, seed, acc) for seed, acc in ((0, 0.76), (1, 0.75))]
    for job in kd:
        job.summary.update(published=published, mode="single")
        job.results = job_results(job.summary)
    [row] = aggregate(kd, grouping_keys(kd))
    assert row.stats["published_acc"].mean == pytest.approx(0.7632)
    headers, [cells] = table_cells(SweepReport(folders=[], jobs=kd, keys=[], rows=[row], datasets=[], models=[], notes=[]))
    assert cells[headers.index("published %")] == "76.32" and cells[headers.index("test acc %")] == "75.50±0.71"
    alone = {**kd[0].summary, "published": {**published, "method": None, "kd": None}}
    train = {"command": "train", "wall_time_s": 1.0, "teacher": {"test_acc_best": 0.79, "params": 3}, "published": {"teacher": 79.42}}
    assert (job_results(alone)["published_acc"], job_results(train)["published_acc"]) == (pytest.approx(0.725), pytest.approx(0.7942))
    assert job_results({**kd[0].summary, "published": None})["published_acc"] is None
    plain = [_job(4.0, 0.5, 0, 0.7)]
    assert "published %" not in table_cells(SweepReport(folders=[], jobs=plain, keys=[], rows=aggregate(plain, []), datasets=[], models=[], notes=[]))[0]
