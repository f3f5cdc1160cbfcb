import json

import pytest
from conftest import run_distill_in_process, write_image_tree

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("augment", [True, False])
def test_bench_on_synthetic_prints_ratios_and_writes_json(tmp_path, augment):
    result = run_distill_in_process(
        "bench", f"dataset.augment={augment}", f"dataset.color_jitter={0.3 if augment else 0}", "dataset.train_size=600", "dataset.test_size=100", "dataset.image_size=16",
        "teacher.kwargs.width=8", "student=mlp", "student.kwargs.hidden=[16]", "batch_size=32",
        "warmup_steps=1", "steps=3", "repeats=2", "reference_workers=0", cwd=tmp_path,
    )
    (path,) = (tmp_path / "outputs").glob("*/*_bench/bench.json")
    bench = json.loads(path.read_text())
    assert set(bench["results"]) == {"train", "kd"}
    for row in bench["results"].values():
        assert len(row["distill_repeats"]) == len(row["reference_repeats"]) == 2
        assert row["distill_images_per_s"] > 0 and row["reference_images_per_s"] > 0
        assert row["speedup"] == pytest.approx(row["distill_images_per_s"] / row["reference_images_per_s"])
        assert f"{row['speedup']:.2f}x" in result.stdout
    assert bench["device_name"] and bench["threads"] >= 1
    # without augmentation kd looks the teacher's logits up, as a kd run would
    assert bench["pipeline"] == "device" and bench["teacher_logits_cached"] is not augment
    assert ("kd (teacher logits cached)" in result.stdout) is not augment
    assert "reference: fp32, DataLoader with 0 workers" in result.stdout and "machine: cpu" in result.stdout
    assert bench["reference_data"] == "PIL images from decoded arrays in memory"
    expected = "crop with padding 2, flip, colour jitter 0.3" if augment else "off"
    assert f"augmentation (both): {expected}" in result.stdout


@pytest.mark.parametrize(
    "from_files, reads",
    [(True, "torchvision ImageFolder, 60 files decoded per sample"), (False, "PIL images from decoded arrays in memory")],
)
def test_bench_reference_reads_an_image_folder_file_by_file(tmp_path, from_files, reads):
    """On an image folder the reference loop decodes every file per sample, as torchvision's ImageFolder does
    (here also resizing, 10 -> 8 pixels, as the run's `dataset.image_size` asks), unless told to read memory."""
    write_image_tree(tmp_path / "tree", "train", 20)
    write_image_tree(tmp_path / "tree", "test", 4)
    result = run_distill_in_process(
        "bench", "dataset=imagefolder", f"dataset.root={tmp_path / 'tree'}", "dataset.image_size=8",
        f"dataset.cache_dir={tmp_path / 'cache'}", "teacher.kwargs.width=4", "student=mlp", "student.kwargs.hidden=[8]",
        "batch_size=8", "warmup_steps=1", "steps=2", "repeats=1", "reference_workers=0",
        f"reference_from_files={from_files}", cwd=tmp_path,
    )
    (path,) = (tmp_path / "outputs").glob("*/*_bench/bench.json")
    bench = json.loads(path.read_text())
    assert bench["reference_data"] == reads
    assert f"reads {reads}" in " ".join(result.stdout.split())
    assert all(row["reference_images_per_s"] > 0 for row in bench["results"].values())


def test_bench_times_any_method_through_the_kd_wiring(tmp_path):
    """`distill bench loss=fitnet` times the method's kd step (student features, a trainable connector,
    teacher features of the folded teacher) in both loops, as `distill kd` would run it."""
    run_distill_in_process(
        "bench", "loss=fitnet", "student=cnn", "student.kwargs.width=4", "teacher.kwargs.width=8",
        "dataset.train_size=300", "dataset.test_size=50", "dataset.image_size=16", "batch_size=32",
        "warmup_steps=1", "steps=3", "repeats=2", "reference_workers=0", cwd=tmp_path,
    )
    (path,) = (tmp_path / "outputs").glob("*/*_bench/bench.json")
    bench = json.loads(path.read_text())
    assert bench["loss"] == {"name": "fitnet", "ce_weight": 1.0, "weight": 100.0, "hint": "stage2", "logit_standardization": False} and bench["alpha"] == 0.0
    assert bench["student"]["name"] == "cnn" and not bench["teacher_logits_cached"]
    assert all(row["distill_images_per_s"] > 0 and row["reference_images_per_s"] > 0 for row in bench["results"].values())


@pytest.mark.parametrize(
    "student, graphs, ways",
    [("cnn", False, {"serial", "fused", "stacked"}), ("mlp", False, {"serial", "fused"}), ("cnn", True, {"serial", "fused", "streams", "stacked"})],
)
def test_bench_fused_times_a_sweep_with_one_teacher_forward_per_batch(tmp_path, monkeypatch, student, graphs, ways):
    """`distill bench fused=K`: K jobs one after another run the teacher K times per step, fused jobs once; a
    student with dropout is not stacked (and the table says why). With CUDA graphs (forced here: on the CPU the
    graph path runs eagerly) the students on their own streams are timed too."""
    import distill_cli.kd.wiring as wiring
    from distill_cli.training import graphs as cuda_graphs

    if graphs:
        monkeypatch.setattr(cuda_graphs, "why_not_captured", lambda compute, optimizer: None)

    teacher_runs = []
    build_objective = wiring.build_objective

    def counting_build_objective(*args):
        objective, student_forward, teacher_forward = build_objective(*args)
        return objective, student_forward, lambda images: teacher_runs.append(1) or teacher_forward(images)

    monkeypatch.setattr(wiring, "build_objective", counting_build_objective)
    kwargs = "student.kwargs.width=4" if student == "cnn" else "student.kwargs.dropout=0.1"
    result = run_distill_in_process(
        "bench", "fused=3", f"student={student}", kwargs, "teacher.kwargs.width=4", "dataset.train_size=300",
        "dataset.test_size=50", "dataset.image_size=16", "batch_size=32", "warmup_steps=1", "steps=2", "repeats=2", cwd=tmp_path,
    )
    (path,) = (tmp_path / "outputs").glob("*/*_bench/bench.json")
    bench_json = json.loads(path.read_text())
    assert set(bench_json["results"]) == ways and bench_json["jobs"][:2] == [{"T": 2.0, "alpha": 0.5}, {"T": 4.0, "alpha": 0.5}]
    runs_per_step = 3 + (len(ways) - 1)  # serial: every job; fused (streams, stacked): once for all
    assert len(teacher_runs) == (1 + 2 * 2) * runs_per_step
    serial = bench_json["results"]["serial"]["images_per_s"]
    for row in bench_json["results"].values():
        assert len(row["repeats"]) == 2 and row["time_vs_serial"] == pytest.approx(serial / row["images_per_s"])
        assert f"{row['time_vs_serial']:.2f}x" in result.stdout
    assert ("not stacked: the student has dropout" in result.stdout) is (student == "mlp")
    assert ("fused, students on their own CUDA streams" in result.stdout) is graphs


def test_bench_fused_needs_two_jobs(tmp_path):
    result = run_distill_in_process("bench", "fused=1", cwd=tmp_path, check=False)
    assert result.returncode == 1 and "fused: the students of a fused sweep to time: 0 (off) or >= 2, got 1" in result.stderr


def test_bench_times_the_kd_step_reading_the_teacher_view_store(tmp_path):
    """With crop and flip (views that can be stored) the kd step is also timed reading the teacher-view store,
    beside the kd step that runs the teacher, against the same reference loop."""
    result = run_distill_in_process(
        "bench", "dataset.augment=true", "dataset.train_size=300", "dataset.test_size=50", "dataset.image_size=16",
        "teacher.kwargs.width=8", "student=mlp", "student.kwargs.hidden=[16]", "batch_size=32",
        "warmup_steps=1", "steps=2", "repeats=1", "reference_workers=0", cwd=tmp_path,
    )
    (path,) = (tmp_path / "outputs").glob("*/*_bench/bench.json")
    bench = json.loads(path.read_text())
    assert list(bench["results"]) == ["train", "kd", "kd (teacher views)", "train (student)"]
    views, live = bench["results"]["kd (teacher views)"], bench["results"]["kd"]
    assert views["reference_images_per_s"] > 0 and views["distill_images_per_s"] > 0 and live["distill_images_per_s"] > 0
    assert "kd (teacher views)" in result.stdout
