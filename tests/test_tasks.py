"""The commands called as plain functions (no Hydra): training, caching and teacher handling."""

import json
from dataclasses import replace

import pytest
import torch
from conftest import (
    metrics_without_timing,
    read_jsonl,
    small_kd_config,
    small_train_config,
    table_rows,
)

import distill_cli.kd.wiring as wiring
import distill_cli.models.checkpoints as model_checkpoints
import distill_cli.runs.common as common
import distill_cli.runs.student as student_mode
import distill_cli.runs.train as runs_train
import distill_cli.training.loop as loop
from distill_cli.core.checkpoint import load_checkpoint, save_atomic
from distill_cli.core.config import (
    DatasetConfig,
    DeviceConfig,
    ModelConfig,
    TeacherConfig,
)
from distill_cli.core.console import (
    CONSOLE,
    per_class_table,
    print_results,
    results_table,
)
from distill_cli.core.errors import DistillError
from distill_cli.data import load_dataset
from distill_cli.models import build_model
from distill_cli.runs.kd import run_kd
from distill_cli.runs.train import run_train
from distill_cli.training.metrics import evaluate
from distill_cli.training.setup import prepare_run

pytestmark = pytest.mark.usefixtures("quiet_results")


def test_training_is_deterministic_on_cpu(tmp_path):
    cfg = small_train_config(tmp_path)
    first = run_train(cfg, tmp_path / "a")
    second = run_train(cfg, tmp_path / "b")
    assert metrics_without_timing(tmp_path / "a") == metrics_without_timing(tmp_path / "b")
    assert first["teacher"]["test_acc_best"] == second["teacher"]["test_acc_best"]
    third = run_train(replace(cfg, seed=1), tmp_path / "c")
    assert metrics_without_timing(tmp_path / "c") != metrics_without_timing(tmp_path / "a")
    assert third["teacher"]["params"] == first["teacher"]["params"]


def _record_epoch_weights(monkeypatch) -> dict[int, dict]:
    """Every epoch's weights as `fit` saves them to last.pt, by epoch (copied: the saved tensors share
    the model's storage)."""
    weights = {}
    save_last = loop.save_last

    def recording_save_last(checkpoint: dict, run_dir) -> None:
        weights[checkpoint["epoch"]] = {name: value.clone() for name, value in checkpoint["state_dict"].items()}
        save_last(checkpoint, run_dir)

    monkeypatch.setattr(loop, "save_last", recording_save_last)
    return weights


def _same_weights(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)


def test_best_checkpoint_is_picked_on_validation_split(tmp_path, monkeypatch):
    """best.pt holds the epoch of highest validation accuracy, and test_acc_best is its test accuracy.

    The lr jumps 5x after epoch 2 (a step schedule with gamma 5): validation accuracy peaks at epoch 2
    and falls, while the running training accuracy climbs on to the last epoch, so picking best.pt on
    the last epoch, on training or on test accuracy, or testing the last weights, gives other numbers.
    """
    weights = _record_epoch_weights(monkeypatch)
    cfg = small_train_config(tmp_path, epochs=5)
    cfg = replace(cfg, optimizer=replace(cfg.optimizer, lr=0.1, schedule="step", milestones=[0.4], gamma=5.0))
    summary = run_train(cfg, tmp_path / "run")["teacher"]

    # every epoch's weights scored here on the validation and test splits, apart from the run
    compute, data, loaders = prepare_run(cfg)
    model = compute.place(build_model(cfg.teacher, data.info, "teacher"))

    def accuracy(epoch: int, split) -> float:
        model.load_state_dict(weights[epoch])
        return evaluate(model, loaders.eval_loader(split), compute, data.info.num_classes).overall

    epochs = range(1, cfg.epochs + 1)
    val, test = [accuracy(e, data.val) for e in epochs], [accuracy(e, data.test) for e in epochs]
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [row["val_acc"] for row in rows] == pytest.approx(val)
    best = 1 + val.index(max(val))
    train_acc = [row["train_acc"] for row in rows]
    # the scenario the assertions below need: each wrong choice gives another epoch or other numbers
    assert best < cfg.epochs and 1 + train_acc.index(max(train_acc)) != best
    assert test[best - 1] not in (test[-1], val[best - 1])

    assert (summary["best_epoch"], summary["val_acc_best"], summary["selection"]) == (best, val[best - 1], "val")
    best_checkpoint = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best_checkpoint["epoch"] == best and _same_weights(best_checkpoint["state_dict"], weights[best])
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == cfg.epochs
    assert summary["test_acc_best"] == pytest.approx(test[best - 1])
    assert summary["test_acc_last"] == pytest.approx(test[-1])


def test_without_validation_split_best_is_last(tmp_path):
    cfg = small_train_config(tmp_path)
    cfg = replace(cfg, dataset=replace(cfg.dataset, val_split=0.0))
    summary = run_train(cfg, tmp_path / "run")
    assert summary["teacher"]["selection"] == "last"
    assert summary["teacher"]["best_epoch"] == cfg.epochs
    assert summary["teacher"]["test_acc_best"] == summary["teacher"]["test_acc_last"]


def test_alpha_zero_builds_no_teacher(tmp_path, monkeypatch):
    built = []
    real_build = wiring.build_model
    monkeypatch.setattr(wiring, "build_model", lambda cfg, info, key: built.append(key) or real_build(cfg, info, key))
    monkeypatch.setattr(student_mode, "obtain_teacher", lambda *a: pytest.fail("alpha=0 must not look for a teacher"))
    summary = run_kd(small_kd_config(tmp_path, alpha=0.0), tmp_path / "run")
    assert set(built) == {"student"}  # checked before training, then built to train
    assert summary["teacher"] is None and "compression" not in summary
    assert not (tmp_path / "cache").exists()


def test_kd_trains_teacher_once_then_reuses_the_cache(tmp_path):
    cfg = small_kd_config(tmp_path)
    first = run_kd(cfg, tmp_path / "one")
    assert first["teacher"]["source"] == "trained"
    assert (tmp_path / "one" / "teacher" / "best.pt").is_file()  # the teacher's own run folder
    second = run_kd(replace(cfg, T=2.0, alpha=0.9), tmp_path / "two")
    assert second["teacher"]["source"] == "cache"
    assert second["teacher"]["checkpoint"] == first["teacher"]["checkpoint"]
    assert not (tmp_path / "two" / "teacher").exists()
    # a different teacher recipe is a different cache entry
    third = run_kd(replace(cfg, teacher_epochs=3), tmp_path / "three")
    assert third["teacher"]["source"] == "trained"
    assert third["teacher"]["checkpoint"] != first["teacher"]["checkpoint"]


def test_train_publishes_to_the_cache_kd_uses(tmp_path):
    train = run_train(small_train_config(tmp_path), tmp_path / "train")
    kd = run_kd(small_kd_config(tmp_path), tmp_path / "kd")
    assert kd["teacher"]["source"] == "cache"
    assert kd["teacher"]["test_acc"] == pytest.approx(train["teacher"]["test_acc_best"])


def test_kd_summary_records_what_was_used(tmp_path):
    cfg = small_kd_config(tmp_path, T=3.0, alpha=0.7)
    cfg = replace(cfg, teacher=replace(cfg.teacher, name="narrow_cnn"), student=replace(cfg.student, name="tiny_mlp"))
    summary = run_kd(cfg, tmp_path / "run")
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert (on_disk["T"], on_disk["alpha"], on_disk["status"]) == (3.0, 0.7, "completed")
    assert on_disk["compression"] == pytest.approx(on_disk["teacher"]["params"] / on_disk["student"]["params"])
    assert on_disk["compression"] > 1
    rates = (on_disk["teacher"]["inference_images_per_s"], on_disk["student"]["inference_images_per_s"])
    assert min(rates) > 0 and on_disk["speedup"] == pytest.approx(rates[1] / rates[0])
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert {"loss", "loss/ce", "loss/kd", "train_acc", "val_acc", "lr", "images_per_s", "seconds"} <= set(rows[0])
    # the data as loaded: digits' 1,797 8x8 grey images of 10 classes; 20% held out for test, 10% of the rest for validation
    assert on_disk["data"] == {
        "num_classes": 10, "channels": 1, "image_size": [8, 8], "train_images": 1294, "val_images": 144, "test_images": 359,
    }
    # the models by the names the user chose (teacher=<option>), beside their architectures, also in the table
    roles = ("teacher", "student", "baseline")
    names = [(on_disk[role]["name"], on_disk[role]["arch"]) for role in roles]
    assert names == [("narrow_cnn", "cnn"), ("tiny_mlp", "mlp"), ("tiny_mlp", "mlp")]
    assert json.loads((tmp_path / "run" / "baseline" / "summary.json").read_text())["teacher"]["name"] == "tiny_mlp"
    models = [row[:2] for row in table_rows(results_table(on_disk))]
    assert models == [["teacher", "narrow_cnn (cnn)"], ["student", "tiny_mlp (mlp)"], ["student alone", "tiny_mlp (mlp)"]]


def _record_classes(monkeypatch) -> dict:
    """The classes each training (by run folder name: run, teacher, baseline) saw in its steps and in its
    validation split, and those of every split tasks evaluate on."""
    seen = {"evaluated": []}

    def classes(loader) -> set[int]:
        return {label for batch in loader for label in batch.labels.tolist()}

    def recording_fit(model, step, train_loader, val_loader, **options):
        trained = seen[options["run_dir"].name] = {"train": set(), "val": classes(val_loader)}

        def recording_step(batch, epoch):
            trained["train"].update(batch.labels.tolist())
            return step(batch, epoch)

        return fit(model, recording_step, train_loader, val_loader, **options)

    def recording_evaluate(model, loader, *args):
        seen["evaluated"].append(classes(loader))
        return evaluate(model, loader, *args)

    fit, evaluate = common.fit, common.evaluate
    monkeypatch.setattr(common, "fit", recording_fit)
    monkeypatch.setattr(common, "evaluate", recording_evaluate)
    return seen


def test_excluded_classes_leave_the_transfer_set_only(tmp_path, monkeypatch):
    """dataset.exclude_classes=[3]: the teacher kd trains itself learns every class; the student and the
    student trained alone never see class 3; validation and test keep it, and the per-class results show it."""
    seen = _record_classes(monkeypatch)
    cfg = small_kd_config(tmp_path)
    cfg = replace(cfg, dataset=replace(cfg.dataset, exclude_classes=[3]))
    summary = run_kd(cfg, tmp_path / "run")
    assert summary["teacher"]["source"] == "trained"
    every, but_3 = set(range(10)), set(range(10)) - {3}
    assert seen.pop("teacher") == {"train": every, "val": every}
    assert seen.pop("baseline") == {"train": but_3, "val": every}
    assert seen.pop("run") == {"train": but_3, "val": every}
    assert len(seen["evaluated"]) >= 4 and all(classes == every for classes in seen["evaluated"])  # the test split
    # the splits by size: only the student's training (transfer) set lost class 3's images
    whole = load_dataset(replace(cfg.dataset, exclude_classes=[]))
    threes = int((whole.train.labels == 3).sum())
    assert summary["data"] | {"train_images": summary["data"]["train_images"] + threes} == json.loads(
        (tmp_path / "run" / "teacher" / "summary.json").read_text()
    )["data"]
    assert (summary["data"]["val_images"], summary["data"]["test_images"]) == (len(whole.val), len(whole.test))

    names = [str(label) for label in range(10)]
    for role in ("teacher", "student"):
        assert list(summary[role]["test_acc_per_class"]) == names
    assert summary["teacher"]["test_acc_per_class"]["3"] > 0  # the teacher learned class 3, and the test split has it
    with CONSOLE.capture() as printed:
        print_results(summary)
    assert "test accuracy per class" in printed.get()
    expected = [
        [f"{name} (not in transfer set)" if name == "3" else name]
        + [f"{summary[role]['test_acc_per_class'][name]:.2%}" for role in ("teacher", "student")]
        for name in names
    ]
    assert table_rows(per_class_table(summary)) == expected


def _assert_same_training(first, second, one_image: float) -> None:
    """Two runs' metrics.jsonl agree: losses up to float rounding, accuracies up to one image that may flip."""
    for row, other in zip(metrics_without_timing(first), metrics_without_timing(second), strict=True):
        assert row.keys() == other.keys()
        for key in row:
            tolerance = {"abs": one_image} if key.endswith("acc") else {"rel": 1e-4}
            assert row[key] == pytest.approx(other[key], **tolerance), (first, row["epoch"], key)


def test_channels_last_on_and_off_train_to_the_same_metrics(tmp_path, monkeypatch):
    """device.channels_last only changes memory layout: a conv teacher trained by kd, its BatchNorm-folded
    forward in the kd steps and a conv student reach the same losses and accuracies with it on and off.

    fp32 on the CPU: NHWC kernels add up in another order, so losses differ in the last bits (measured:
    at most 2e-7 relative after 2 epochs); 1e-4 relative leaves room for that to grow and still fails on
    a wrong layout, which moves the losses by percents. Two torch threads, whatever the environment says:
    with one (OMP_NUM_THREADS=1) oneDNN picks other kernels and the runs drift apart by 0.8% in 2 epochs. An accuracy may differ by one image whose top two
    logits tie within rounding (none did). Three-channel images: with one channel, NCHW and NHWC batches
    are the same memory and a batch laid out wrongly would not show.
    """
    layouts = []
    build_model = wiring.build_model

    def recording_build_model(cfg, info, key):
        model = build_model(cfg, info, key)
        if next(model.parameters()).is_meta:  # a shape reference (`recorded_layers`): no weights, sees no batch
            return model
        inputs = set()
        model.register_forward_pre_hook(
            lambda module, args: inputs.add(args[0].is_contiguous(memory_format=torch.channels_last))
        )
        layouts.append((model, inputs))
        return model

    for module in (runs_train, wiring, model_checkpoints):  # the teacher trained, the networks checked, the teacher loaded, the student
        monkeypatch.setattr(module, "build_model", recording_build_model)
    torch.set_num_threads(2)  # restored after the test (conftest)
    dataset = DatasetConfig(
        name="synthetic", num_classes=10, channels=3, image_size=8, train_size=1280, test_size=256, augment=True
    )
    summaries = {}
    for channels_last in (True, False):
        cfg = small_kd_config(
            tmp_path / str(channels_last),
            student=ModelConfig("cnn", {"width": 8, "blocks": 1}),
            dataset=dataset,
            batch_size=32,
            baseline=False,
            device=DeviceConfig(type="cpu", channels_last=channels_last),
        )
        summaries[channels_last] = run_kd(cfg, tmp_path / str(channels_last) / "run")
        # every model (teacher trained, teacher loaded for kd, student) and every batch it saw, laid out as asked
        assert len(layouts) == 5  # student and teacher checked before training, then as above
        for model, inputs in layouts:
            convs = [module for module in model.modules() if isinstance(module, torch.nn.Conv2d)]
            assert {conv.weight.is_contiguous(memory_format=torch.channels_last) for conv in convs} == {channels_last}
            assert inputs <= {channels_last}  # the models built only to check the config may see no batch
        assert sum(inputs == {channels_last} for _, inputs in layouts) >= 3  # the teacher trained, loaded, the student
        layouts.clear()

    on, off = summaries[True], summaries[False]
    one_image = 1 / min(on["data"][split] for split in ("train_images", "val_images", "test_images"))
    for folder in ("run/teacher", "run"):
        _assert_same_training(tmp_path / "True" / folder, tmp_path / "False" / folder, one_image)
    assert on["teacher"]["test_acc"] == pytest.approx(off["teacher"]["test_acc"], abs=one_image)
    for key in ("test_acc_best", "test_acc_last"):
        assert on["student"][key] == pytest.approx(off["student"][key], abs=one_image)
    assert on["teacher"]["test_acc"] > 0.5  # learned (chance is 0.1): the runs compared did train


def test_teacher_checkpoint_is_loaded_and_checked(tmp_path):
    run_train(small_train_config(tmp_path), tmp_path / "teacher")
    path = tmp_path / "teacher" / "best.pt"
    cfg = small_kd_config(tmp_path, teacher=TeacherConfig(arch="cnn", kwargs={"width": 8, "blocks": 2}, checkpoint=str(path)))
    summary = run_kd(cfg, tmp_path / "kd")
    assert summary["teacher"]["source"] == "checkpoint" and summary["teacher"]["checkpoint"] == str(path.resolve())

    wrong_arch = replace(cfg, teacher=TeacherConfig(arch="mlp", checkpoint=str(path)))
    with pytest.raises(DistillError, match=r"holds cnn\(blocks=2, width=8\) but teacher= is mlp\(\)"):
        run_kd(wrong_arch, tmp_path / "kd2")

    checkpoint = load_checkpoint(path)
    checkpoint["num_classes"] = 100
    save_atomic(checkpoint, tmp_path / "hundred.pt")
    wrong_classes = replace(cfg, teacher=replace(cfg.teacher, checkpoint=str(tmp_path / "hundred.pt")))
    with pytest.raises(DistillError, match="predicts 100 classes but dataset digits has 10"):
        run_kd(wrong_classes, tmp_path / "kd3")

    with pytest.raises(DistillError, match="checkpoint not found"):
        run_kd(replace(cfg, teacher=replace(cfg.teacher, checkpoint=str(tmp_path / "nope.pt"))), tmp_path / "kd4")


def test_unknown_model_argument_and_arch_are_named(tmp_path):
    with pytest.raises(DistillError, match=r"student.kwargs.depth: not an argument of model 'mlp'"):
        run_kd(small_kd_config(tmp_path, alpha=0.0, student=ModelConfig("mlp", {"depth": 3})), tmp_path / "a")
    with pytest.raises(DistillError, match=r"unknown model 'mpl': did you mean 'mlp'"):
        run_kd(small_kd_config(tmp_path, alpha=0.0, student=ModelConfig("mpl")), tmp_path / "b")


def test_batch_larger_than_training_set_is_refused(tmp_path):
    with pytest.raises(DistillError, match="larger than the training split"):
        run_train(small_train_config(tmp_path, batch_size=100_000), tmp_path / "run")


def test_fp16_on_cpu_is_refused(tmp_path):
    cfg = small_train_config(tmp_path)
    cfg = replace(cfg, device=replace(cfg.device, type="cpu", precision="fp16"))
    with pytest.raises(DistillError, match="fp16 needs CUDA"):
        run_train(cfg, tmp_path / "run")


def test_bf16_autocast_runs_on_cpu(tmp_path):
    cfg = small_train_config(tmp_path)
    cfg = replace(cfg, device=replace(cfg.device, type="cpu", precision="bf16"))
    summary = run_train(cfg, tmp_path / "run")
    assert summary["precision"] == "bf16" and summary["teacher"]["test_acc_best"] > 0.5  # chance is 0.1


def test_kd_reports_its_gain_over_the_same_student_trained_alone(tmp_path):
    cfg = small_kd_config(tmp_path)
    first = run_kd(cfg, tmp_path / "one")
    baseline = first["baseline"]
    assert baseline["source"] == "trained" and baseline["arch"] == cfg.student.arch
    assert first["kd_gain"] == pytest.approx(first["student"]["test_acc_best"] - baseline["test_acc_best"])
    # the baseline is `distill kd alpha=0` of the same recipe: same accuracy, computed independently
    alone = run_kd(replace(cfg, alpha=0.0), tmp_path / "alone")
    assert alone["student"]["test_acc_best"] == pytest.approx(baseline["test_acc_best"])
    assert "baseline" not in alone and "kd_gain" not in alone
    # another T/alpha reuses the cached baseline; baseline=false skips it
    second = run_kd(replace(cfg, T=2.0), tmp_path / "two")
    assert second["baseline"]["source"] == "cache" and second["baseline"]["checkpoint"] == baseline["checkpoint"]
    assert "baseline" not in run_kd(replace(cfg, baseline=False), tmp_path / "three")
