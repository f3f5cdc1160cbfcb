"""The training modes of `distill kd` (distill_cli/runs/modes/), called as plain functions: a teacher ensemble,
deep mutual learning, born-again generations and a teacher-assistant chain; their bad input."""

import json
import os
import shutil
import signal
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    compose_config,
    metrics_without_timing,
    on_training_step,
    read_jsonl,
    small_kd_config,
    table_rows,
)

import distill_cli.kd.wiring as wiring
import distill_cli.runs.common as common
import distill_cli.runs.modes.mutual as mutual
from distill_cli.core.checkpoint import (
    BEST,
    LAST,
    load_checkpoint,
    model_checkpoint,
    save_atomic,
)
from distill_cli.core.config import ModelConfig, TeacherConfig, validate_config
from distill_cli.core.console import results_table
from distill_cli.core.errors import DistillError, Interrupted, one_line
from distill_cli.data import DatasetInfo
from distill_cli.models import build_model
from distill_cli.models.checkpoints import model_from_checkpoint
from distill_cli.runs.kd import run_kd
from distill_cli.runs.modes.assistants import chain_teacher_recipe
from distill_cli.runs.teacher_cache import recipe_key
from distill_cli.sweeps.results import job_results, models_of
from distill_cli.training.setup import prepare_run

pytestmark = pytest.mark.usefixtures("quiet_results")


def _record_fits(monkeypatch) -> list[str]:
    """The run folders `fit` trains into, in order (folder names relative to the test's tmp_path)."""
    trained = []
    fit = common.fit

    def recording_fit(*args, **options):
        trained.append(options["run_dir"])
        return fit(*args, **options)

    monkeypatch.setattr(common, "fit", recording_fit)
    return trained


def _probabilities(checkpoints: list[str], loader, info, T: float = 1.0, weights=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's weighted average of the models' softmax(logits / T), by position, computed apart from
    the run (the models loaded from their checkpoints, fp32, no BatchNorm folding); and the labels."""
    models = [model_from_checkpoint(path, info)[0] for path in checkpoints]
    weights = weights or [1.0] * len(models)
    average = torch.zeros(loader.num_images, info.num_classes)
    labels = torch.zeros(loader.num_images, dtype=torch.long)
    with torch.no_grad():
        for batch in loader:
            probs = sum(w * F.softmax(model(batch.images) / T, dim=1) for w, model in zip(weights, models))
            average[batch.index] = probs / sum(weights)
            labels[batch.index] = batch.labels
    return average, labels


# --- multi-teacher ensemble -----------------------------------------------------------------------


def test_an_ensemble_teacher_on_augmented_data_learns_from_its_view_store(tmp_path):
    """teacher=ensemble with crop + flip: the store of the ensemble's logits for every view is built (its key from the
    transfer set, which the ensemble's recipe-less teacher config once broke: "an empty ensemble"), and the student
    learns from it as from the ensemble run live."""
    teacher = TeacherConfig(arch="ensemble", name="ensemble", members=["mlp_small", "mlp_small"], weights=[1.0, 2.0])
    cfg = small_kd_config(tmp_path, teacher=teacher, baseline=False)
    cfg = replace(cfg, dataset=replace(cfg.dataset, augment=True))
    runs = {supply: run_kd(replace(cfg, cache_teacher=supply), tmp_path / supply) for supply in ("views", "false")}
    assert (runs["views"]["teacher_supply"], runs["false"]["teacher_supply"]) == ("teacher views", "live")
    for row_views, row_live in zip(metrics_without_timing(tmp_path / "views"), metrics_without_timing(tmp_path / "false"), strict=True):
        assert row_views["loss/kd"] == pytest.approx(row_live["loss/kd"], rel=1e-4)


def test_ensemble_target_is_the_weighted_average_of_the_members_softened_probabilities(tmp_path, monkeypatch):
    """teacher=ensemble: each member trained once (and cached); the student learns, from the cached teacher
    logits, softmax(logits / T) = w1 softmax(z1 / T) + w2 softmax(z2 / T); the summary gives each member's
    test accuracy and the ensemble's; dkd works on the cached members."""
    members = ["mlp_small", {"name": "cnn", "kwargs": {"width": 4}}]
    teacher = TeacherConfig(arch="ensemble", name="ensemble", members=members, weights=[1.0, 3.0])
    cfg = small_kd_config(tmp_path, teacher=teacher, T=3.0)
    tables = []
    teacher_logits = wiring.teacher_logits
    monkeypatch.setattr(wiring, "teacher_logits", lambda *args: tables.append(teacher_logits(*args)) or tables[-1])
    summary = run_kd(cfg, tmp_path / "run")

    ensemble = summary["teacher"]
    assert [m["source"] for m in ensemble["members"]] == ["trained", "trained"]
    assert [m["weight"] for m in ensemble["members"]] == [0.25, 0.75]
    assert (tmp_path / "run" / "teacher1" / BEST).is_file() and (tmp_path / "run" / "teacher2" / BEST).is_file()
    checkpoints = [m["checkpoint"] for m in ensemble["members"]]
    _, data, loaders = prepare_run(cfg)
    expected, _ = _probabilities(checkpoints, loaders.eval_loader(data.train), data.info, cfg.T, [1.0, 3.0])
    (table,) = tables  # the teacher logits of every transfer image, cached: what the student learns from
    assert summary["teacher_logits_cached"]
    assert torch.allclose(F.softmax(table / cfg.T, dim=1), expected, atol=1e-5)
    # the summary's accuracies: each member's and the ensemble target's (its argmax) on the test split
    for member in ensemble["members"]:
        alone, labels = _probabilities([member["checkpoint"]], loaders.test, data.info)
        assert member["test_acc"] == pytest.approx((alone.argmax(1) == labels).float().mean().item())
    together, labels = _probabilities(checkpoints, loaders.test, data.info, cfg.T, [1.0, 3.0])
    assert ensemble["test_acc"] == pytest.approx((together.argmax(1) == labels).float().mean().item())
    assert ensemble["test_acc"] != pytest.approx(ensemble["members"][0]["test_acc"])  # not just a member's
    roles = [row[0] for row in table_rows(results_table(summary))]
    assert roles == ["teacher", "member 1 (weight 0.25)", "member 2 (weight 0.75)", "student", "student alone"]
    assert models_of(summary) == "ensemble of mlp_small + cnn -> mlp"

    dkd = run_kd(replace(cfg, loss={"name": "dkd", "warmup": 1}, alpha=0.0), tmp_path / "dkd")
    assert [m["source"] for m in dkd["teacher"]["members"]] == ["cache", "cache"]
    assert "loss/dkd_nckd" in read_jsonl(tmp_path / "dkd" / "metrics.jsonl")[0]


# --- deep mutual learning -------------------------------------------------------------------------


def _mutual_config(tmp_path):
    """Two different peers, one with dropout, on augmented data: steps draw from both RNGs. The lr jumps 5x
    from epoch 3 (a step schedule with gamma 5): each peer peaks on the validation split in an epoch of
    its own, before the last."""
    peers = [{"name": "mlp_small", "kwargs": {"dropout": 0.2}}, {"name": "mlp", "kwargs": {"hidden": [16]}}]
    cfg = small_kd_config(tmp_path, peers=peers, T=2.0, alpha=0.5, epochs=4, baseline=False)
    optimizer = replace(cfg.optimizer, lr=0.1, schedule="step", milestones=[0.4], gamma=5.0)
    return replace(cfg, optimizer=optimizer, dataset=replace(cfg.dataset, augment=True))


def _record_trained_weights(monkeypatch) -> dict[int, list[torch.Tensor]]:
    """Per network the mutual mode builds (by id): its weights at each training-mode forward pass."""
    seen = {}
    build = wiring.build_model

    def recording_build(*args):
        model = build(*args)
        weights = seen.setdefault(id(model), [])
        model.register_forward_pre_hook(
            lambda module, inputs: weights.append(torch.cat([p.detach().flatten() for p in module.parameters()]).clone())
            if module.training else None
        )
        return model

    monkeypatch.setattr(wiring, "build_model", recording_build)
    return seen


def test_mutual_learning_updates_every_peer_every_step_and_resumes_exactly(tmp_path, monkeypatch):
    cfg = _mutual_config(tmp_path)
    seen = _record_trained_weights(monkeypatch)
    reference = run_kd(cfg, tmp_path / "reference")
    steps = cfg.epochs * (reference["data"]["train_images"] // cfg.batch_size)
    trained = [weights for weights in seen.values() if weights]
    assert len(trained) == 2 and [len(weights) for weights in trained] == [steps, steps]
    for weights in trained:  # each step changed both networks
        assert all(not torch.equal(before, after) for before, after in zip(weights, weights[1:]))
    rows = read_jsonl(tmp_path / "reference" / "metrics.jsonl")
    terms = [f"loss/{peer}/{term}" for peer in ("peer1", "peer2") for term in ("ce", "kd")]
    assert all(row["loss"] == pytest.approx(sum(row[term] for term in terms)) for row in rows)
    # each peer's best.pt: the epoch of its own best validation accuracy (the first best), its own summary row
    for row in reference["peers"]:
        accuracy = [r[f"val_acc/{row['peer']}"] for r in rows]
        best = load_checkpoint(tmp_path / "reference" / row["peer"] / BEST)
        assert best["epoch"] == row["best_epoch"] == 1 + accuracy.index(max(accuracy))
        assert (best["arch"], row["params"]) == ("mlp", sum(v.numel() for k, v in best["state_dict"].items()))
    best_epochs = [row["best_epoch"] for row in reference["peers"]]
    assert len(set(best_epochs)) == 2 and cfg.epochs not in best_epochs  # the scenario the checks above need
    assert not (tmp_path / "reference" / BEST).exists()  # the peers' own best.pt only
    assert reference["student"] == reference["peers"][0]
    assert models_of(reference) == "mlp_small <-> mlp" and job_results(reference)["test_acc"] == reference["student"]["test_acc_best"]

    def interrupt(parts):  # 20 steps per epoch: epoch 2, step 5
        os.kill(os.getpid(), signal.SIGINT)
        return parts

    on_training_step(monkeypatch, 25, interrupt, factory="mutual_step", module=mutual)
    with pytest.raises(Interrupted, match="peers epoch 2 step 5/20"):
        run_kd(cfg, tmp_path / "run")
    assert load_checkpoint(tmp_path / "run" / LAST)["training"]["partial"]["steps"] == 5
    monkeypatch.undo()
    resumed = run_kd(replace(cfg, resume=True), tmp_path / "run")
    assert metrics_without_timing(tmp_path / "run") == metrics_without_timing(tmp_path / "reference")
    for peer in ("peer1", "peer2"):
        ours, theirs = (load_checkpoint(tmp_path / run / peer / BEST) for run in ("run", "reference"))
        assert ours["epoch"] == theirs["epoch"]
        assert all(torch.equal(ours["state_dict"][k], theirs["state_dict"][k]) for k in theirs["state_dict"])
    varying = {"checkpoint"}
    assert [{k: v for k, v in row.items() if k not in varying} for row in resumed["peers"]] == [
        {k: v for k, v in row.items() if k not in varying} for row in reference["peers"]
    ]


# --- born-again generations -----------------------------------------------------------------------


def test_born_again_generation_k_is_taught_by_generation_k_minus_1_and_resume_keeps_finished_ones(tmp_path, monkeypatch):
    cfg = small_kd_config(tmp_path, generations=3)
    reference = run_kd(cfg, tmp_path / "reference")
    generations = [json.loads((tmp_path / "reference" / f"gen{k}" / "summary.json").read_text()) for k in (1, 2, 3)]
    assert generations[0]["teacher"]["checkpoint"] == reference["teacher"]["checkpoint"]  # the run's teacher
    for k, (before, after) in enumerate(zip(generations, generations[1:]), 1):  # generation k+1's teacher: k's best.pt
        assert after["teacher"]["checkpoint"] == before["student"]["checkpoint"] == str(tmp_path / "reference" / f"gen{k}" / BEST)
        assert after["teacher"]["test_acc"] == pytest.approx(before["student"]["test_acc_best"])
        assert after["teacher"]["arch"] == after["student"]["arch"] == cfg.student.arch
    assert [row["test_acc_best"] for row in reference["generations"]] == [g["student"]["test_acc_best"] for g in generations]
    assert reference["student"]["checkpoint"] == generations[2]["student"]["checkpoint"]
    assert reference["kd_gain"] == pytest.approx(reference["student"]["test_acc_best"] - reference["baseline"]["test_acc_best"])
    _, data, loaders = prepare_run(cfg)
    together, labels = _probabilities([g["student"]["checkpoint"] for g in generations], loaders.test, data.info)
    assert reference["generations_ensemble"]["test_acc"] == pytest.approx((together.argmax(1) == labels).float().mean().item())
    roles = [row[0] for row in table_rows(results_table(reference))]
    assert roles == ["teacher", "generation 1", "generation 2", "generation 3", "student alone", "ensemble of the 3 generations"]

    def interrupt(parts):  # 20 steps per epoch, 2 epochs per generation: generation 2, epoch 1, step 5
        os.kill(os.getpid(), signal.SIGINT)
        return parts

    on_training_step(monkeypatch, 45, interrupt, factory="kd_step")
    with pytest.raises(Interrupted, match="student epoch 1 step 5/20"):
        run_kd(cfg, tmp_path / "run")
    monkeypatch.undo()
    trained = _record_fits(monkeypatch)
    resumed = run_kd(replace(cfg, resume=True), tmp_path / "run")
    assert [path.name for path in trained] == ["gen2", "gen3"]  # generation 1 finished before: kept
    for k in (1, 2, 3):
        assert metrics_without_timing(tmp_path / "run" / f"gen{k}") == metrics_without_timing(tmp_path / "reference" / f"gen{k}")
    assert [row["test_acc_best"] for row in resumed["generations"]] == [row["test_acc_best"] for row in reference["generations"]]


# --- teacher-assistant chain ----------------------------------------------------------------------


def test_assistant_chain_caches_each_step_so_a_second_run_trains_only_its_student(tmp_path, monkeypatch):
    cfg = small_kd_config(tmp_path, assistants=["mlp_small"])
    trained = _record_fits(monkeypatch)
    first = run_kd(cfg, tmp_path / "one")
    assert [path.relative_to(tmp_path).as_posix() for path in trained] == ["one/teacher", "one/assistant1", "one/baseline", "one"]
    teacher, assistant = first["chain"]
    assert (teacher["role"], teacher["source"], assistant["role"], assistant["source"]) == ("teacher", "trained", "assistant 1", "trained")
    # teacher -> assistant -> student: each link's kd run was taught by the link before
    taught = json.loads((tmp_path / "one" / "assistant1" / "summary.json").read_text())["teacher"]["checkpoint"]
    assert taught == teacher["checkpoint"] == first["teacher"]["checkpoint"]
    assert load_checkpoint(tmp_path / "one" / LAST)["config"]["teacher"]["checkpoint"] == assistant["checkpoint"]
    assert [row[0] for row in table_rows(results_table(first))] == ["teacher", "assistant 1", "student", "student alone"]
    assert models_of(first) == "cnn -> mlp_small -> mlp"

    trained.clear()
    second = run_kd(cfg, tmp_path / "two")
    assert [path.relative_to(tmp_path).as_posix() for path in trained] == ["two"]  # no teacher, assistant or baseline
    assert [(link["source"], link["checkpoint"]) for link in second["chain"]] == [("cache", link["checkpoint"]) for link in first["chain"]]
    assert second["student"]["test_acc_best"] == first["student"]["test_acc_best"]

    trained.clear()  # another teacher is another chain: the assistant's recipe holds its teacher's
    third = run_kd(replace(cfg, teacher_epochs=3), tmp_path / "three")
    assert [path.relative_to(tmp_path).as_posix() for path in trained] == ["three/teacher", "three/assistant1", "three"]
    assert third["chain"][1]["checkpoint"] != assistant["checkpoint"]


def test_a_given_teacher_checkpoint_keys_the_chain_by_its_content(tmp_path):
    """teacher.checkpoint=... starts a chain whose cached assistants are those of that file's content, wherever it lies."""
    for name, value in (("a.pt", 1), ("b.pt", 2)):
        torch.save({"weights": torch.full((3,), value)}, tmp_path / name)
    shutil.copyfile(tmp_path / "a.pt", tmp_path / "copy of a.pt")
    keys = [
        recipe_key(chain_teacher_recipe(small_kd_config(tmp_path, teacher=TeacherConfig("cnn", checkpoint=str(tmp_path / name)))))
        for name in ("a.pt", "copy of a.pt", "b.pt")
    ]
    assert keys[0] == keys[1] != keys[2]


# --- bad input -------------------------------------------------------------------------------------

BAD_CONFIG = [  # (overrides, the one line)
    (["teacher=ensemble"], "teacher.members: an empty ensemble"),
    (["teacher=ensemble", "teacher.members=[cnn,mpl]"], "teacher.members[1]: 'mpl' is no model option; did you mean 'mlp'"),
    (["teacher=ensemble", "teacher.members=[cnn,mlp]", "teacher.weights=[1]"], "teacher.weights: one weight > 0 per member (2)"),
    (["teacher.members=[mlp]"], "teacher.members: only teacher=ensemble takes members (teacher=cnn)"),
    (["generations=0"], "generations: must be >= 1"),
    (["peers=[mlp_small]"], "peers: deep mutual learning needs two or more networks, got one (mlp_small)"),
    (["peers=[mlp,mlp]", "generations=2"], "peers, generations: pick one training mode"),
    (["peers=[mlp,mlp]", "teacher=ensemble", "teacher.members=[cnn]"], "peers: mutual learning trains its peers from scratch"),
    (["assistants=[mlp_small]", "teacher=ensemble", "teacher.members=[cnn]"], "assistants: a chain starts from one teacher"),
]


@pytest.mark.parametrize("overrides, line", BAD_CONFIG, ids=[" ".join(o) for o, _ in BAD_CONFIG])
def test_a_bad_mode_config_is_one_line_naming_the_key(overrides, line):
    with pytest.raises(Exception) as error:
        validate_config("kd", compose_config("kd", overrides))
    assert one_line(error.value).startswith(line)


def _foreign_checkpoint(path, num_classes: int = 10, channels: int = 1, size: int = 8) -> str:
    """A checkpoint of mlp_small built for other data (class count, image shape)."""
    info = DatasetInfo("other", num_classes, channels, (size, size), mean=(0.5,) * channels, std=(0.25,) * channels,
                       class_names=tuple(map(str, range(num_classes))))
    model = build_model(ModelConfig("mlp", {"hidden": [32]}), info, "teacher")
    save_atomic(model_checkpoint(model, "mlp", {"hidden": [32]}, num_classes), path)
    return str(path)


@pytest.mark.parametrize(
    "case, line",
    [
        ("classes", r"teacher.checkpoints\[1\]: .*hundred.pt predicts 100 classes but dataset digits has 10"),
        ("shape", r"teacher.checkpoints\[1\]: .*rgb.pt does not fit the images of dataset digits: "),
        ("features", "loss=at: teacher=ensemble hands the student averaged probabilities only"),
        ("mutual features", r"loss=at: peers= \(mutual learning\) hands each network the others' predictions only"),
        ("mutual alone", "peers: with loss=kd alpha=0 the peers would not learn from each other"),
        ("mutual bad peer", r"peers\[1\].kwargs.nosuch: not an argument of model 'mlp'"),
        ("born-again alone", "generations: born-again students learn from the generation before"),
    ],
)
def test_modes_refuse_bad_input_before_anything_trains(tmp_path, monkeypatch, case, line):
    """Members that disagree with the data (class count, input shape), methods the mode cannot feed, modes
    without a teacher: one line naming the key, and nothing trained."""
    trained = _record_fits(monkeypatch)
    good = _foreign_checkpoint(tmp_path / "good.pt")
    ensemble = {
        "classes": [good, _foreign_checkpoint(tmp_path / "hundred.pt", num_classes=100)],
        "shape": [good, _foreign_checkpoint(tmp_path / "rgb.pt", channels=3, size=32)],
    }
    peers = ["mlp_small", "mlp_small"]
    cfg = {
        "features": small_kd_config(tmp_path, teacher=TeacherConfig("ensemble", members=["cnn"]), loss={"name": "at"}),
        "mutual features": small_kd_config(tmp_path, peers=peers, loss={"name": "at"}),
        "mutual alone": small_kd_config(tmp_path, peers=peers, alpha=0.0),
        "mutual bad peer": small_kd_config(tmp_path, peers=["mlp_small", {"name": "mlp", "kwargs": {"nosuch": 1}}]),
        "born-again alone": small_kd_config(tmp_path, generations=2, alpha=0.0),
    }.get(case) or small_kd_config(tmp_path, teacher=TeacherConfig("ensemble", checkpoints=ensemble[case]))
    with pytest.raises(DistillError, match=f"^{line}") as error:
        run_kd(cfg, tmp_path / "run")
    assert "\n" not in str(error.value) and trained == [] and not (tmp_path / "cache").exists()
