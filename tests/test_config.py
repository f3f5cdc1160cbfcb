import copy
import functools
import re
import typing
from dataclasses import fields, is_dataclass

import pytest
from conftest import compose_config, run_distill_in_process

from distill_cli.core.config import (
    SYNTHETIC_ONLY,
    DatasetConfig,
    KDConfig,
    TrainConfig,
    config_dir,
    experiment_presets,
    validate_config,
)
from distill_cli.core.errors import DistillError
from distill_cli.runs.teacher_cache import recipe_key, teacher_recipe
from distill_cli.runs.teachers import baseline_training_config, teacher_training_config


def test_kd_composes_with_top_level_T_and_alpha():
    cfg = validate_config("kd", compose_config("kd", ["T=2", "alpha=0.7", "student=mlp", "optimizer=adamw"]))
    assert isinstance(cfg, KDConfig)
    assert (cfg.T, cfg.alpha) == (2.0, 0.7)
    assert cfg.student.arch == "mlp" and cfg.student.kwargs["hidden"] == [256, 256]
    assert cfg.optimizer.name == "adamw" and cfg.optimizer.schedule == "cosine"
    assert cfg.dataset.name == "digits" and cfg.device.type == "auto"


def test_train_composes_with_defaults():
    cfg = validate_config("train", compose_config("train", []))
    assert isinstance(cfg, TrainConfig)
    assert cfg.teacher.arch == "cnn" and cfg.epochs >= 1


def test_teacher_and_student_accept_the_same_names():
    names = sorted(p.stem for p in (config_dir() / "model").glob("*.yaml"))
    assert len(names) >= 3
    for name in names:
        cfg = validate_config("kd", compose_config("kd", [f"teacher={name}", f"student={name}"]))
        assert cfg.teacher.arch == cfg.student.arch
        assert cfg.teacher.name == cfg.student.name == name  # the option chosen, shown in the results


def test_default_kd_teacher_recipe_matches_default_train():
    """`distill train` then `distill kd` (no arguments) must hit the teacher cache."""
    train = validate_config("train", compose_config("train", []))
    kd = validate_config("kd", compose_config("kd", []))
    assert teacher_recipe(teacher_training_config(kd)) == teacher_recipe(train)


@pytest.mark.parametrize("value, expected", [("true", "true"), ("True", "true"), ("false", "false"), ("auto", "auto")])
def test_cache_teacher_takes_yaml_booleans_and_auto(value, expected):
    assert validate_config("kd", compose_config("kd", [f"cache_teacher={value}"])).cache_teacher == expected


# Keys that say where files live, how a model is computed or what is reported, not which model is
# trained: they must not change a recipe's cache key. Every other key of a config must.
EXECUTION_ONLY = {
    "dataset.root", "dataset.download", "dataset.cache_dir", "dataset.pipeline", "dataset.device_max_gb",
    "dataset.workers", "optimizer.impl", "device.type", "device.precision", "device.deterministic",
    "device.threads", "device.channels_last", "device.compile", "device.processes", "device.sync_batchnorm", "device.cuda_graphs",
    "eval_batch_size", "teacher_cache",
    "per_class", "resume", "teacher.checkpoint", "teacher.name", "student.name", "export", "logger.tensorboard",
    "logger.mlflow", "logger.tracking_uri", "logger.experiment", "logger.name",
    # what a preset's paper published: set beside the results, never part of what trains
    "published.source", "published.dataset", "published.epochs", "published.teacher", "published.student", "published.kd", "published.settings",
}
# kd's keys that train the student only: the teacher kd trains (or takes from the cache) ignores them;
# it learns from every class (exclude_classes shrinks the transfer set only)
STUDENT_ONLY = {
    "epochs", "T", "alpha", "baseline", "cache_teacher", "teacher_views_max_gb", "teacher_views_dtype", "teacher_views", "loss", "student.arch", "student.kwargs",
    "dataset.exclude_classes",
}
# the student trained alone (the baseline) ignores the teacher
TEACHER_ONLY = {"teacher.arch", "teacher.kwargs", "teacher_epochs", "teacher_lr", "teacher_label_smoothing", "T", "alpha", "baseline", "cache_teacher", "teacher_views_max_gb", "teacher_views_dtype", "teacher_views", "loss"}
# an ensemble's members, the peers of mutual learning, born-again generations and teacher assistants pick
# how kd trains; each network they add is cached (where it is) under a recipe of its own; a student that starts
# trained (student.checkpoint, student.init=teacher) is never cached and has no cached baseline
# DOT's split of the momentum trains a kd student only: a network trained alone under optimizer=dot trains as
# under SGD, so it keeps SGD's recipe (tests/test_dot.py)
DOT_ONLY = {"optimizer.dot_delta"}
MODES = {"teacher.members", "teacher.checkpoints", "teacher.weights", "peers", "generations", "assistants", "student.checkpoint", "student.init"}



def _leaves(config, prefix: str = ""):
    """(dotted key, value, type annotation) of every leaf field of a config dataclass."""
    hints = typing.get_type_hints(type(config))
    for item in fields(config):
        value = getattr(config, item.name)
        if is_dataclass(value):
            yield from _leaves(value, f"{prefix}{item.name}.")
        else:
            yield prefix + item.name, value, hints[item.name]


def _other_values(value, hint) -> list:
    """Values of `hint`'s type other than `value`; for a dict (model kwargs): each entry changed, and one added."""
    if value is None:
        kind = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        return [[0.5]] if typing.get_origin(kind) is list else [{int: 1, float: 0.5, bool: True, str: "other"}[kind]]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, float):  # inside every range a float key has ([0, 1) for the label smoothing)
        return [value / 2 if value else 0.5]
    if isinstance(value, int):
        return [value + 1]
    if isinstance(value, str):
        return [value + "_other"]
    if isinstance(value, list):
        return [value[:-1] if value else [1]]
    changed = [{**value, name: other} for name, entry in value.items() for other in _other_values(entry, type(entry))]
    return changed + [{**value, "added": 1}]


def _with_value(config, key: str, value):
    """A copy of `config` with the dotted `key` set to `value` (unchecked)."""
    changed = copy.deepcopy(config)
    *parents, name = key.split(".")
    setattr(functools.reduce(getattr, parents, changed), name, value)
    return changed


def _keys_that_change_the_recipe(config, recipe_of) -> dict[str, bool]:
    """For every leaf key of `config`: whether changing its value changes `recipe_of(config)`'s cache key."""
    base = recipe_key(recipe_of(config))
    return {
        key: any(recipe_key(recipe_of(_with_value(config, key, other))) != base for other in _other_values(value, hint))
        for key, value, hint in _leaves(config)
    }


@pytest.mark.parametrize(
    "command, recipe_of, ignored",
    [
        ("train", teacher_recipe, EXECUTION_ONLY | DOT_ONLY | MODES),
        ("kd", lambda kd: teacher_recipe(teacher_training_config(kd)), EXECUTION_ONLY | STUDENT_ONLY | DOT_ONLY | MODES),
        ("kd", lambda kd: teacher_recipe(baseline_training_config(kd)), EXECUTION_ONLY | TEACHER_ONLY | DOT_ONLY | MODES),
    ],
    ids=["train", "kd-teacher", "kd-baseline"],
)
def test_every_recipe_key_changes_the_cache_key(command, recipe_of, ignored, monkeypatch):
    """Each field of a config, also one added later, changes the cached model's key unless it is listed as
    not part of that recipe: seed, batch size, model arguments, optimizer and schedule, epochs, splits,
    augmentation, excluded classes..."""
    # one key changed alone may break a rule between keys (colour jitter needs augment, the synthetic
    # sizes need dataset=synthetic) where kd re-checks the dataset config; a recipe reads the fields either way
    monkeypatch.setattr(DatasetConfig, "__post_init__", lambda self: None)
    changes = _keys_that_change_the_recipe(validate_config(command, compose_config(command, [])), recipe_of)
    assert {"seed", "batch_size", "dataset.augment", "dataset.color_jitter", "dataset.split_seed"} <= set(changes)
    assert [key for key, changed in changes.items() if changed == (key in ignored)] == []


def test_an_image_folder_is_part_of_the_recipe(tmp_path):
    """For torchvision datasets `dataset.root` only says where the files are; an image folder's root is its data."""
    one, two = (
        validate_config("train", compose_config("train", ["dataset=imagefolder", f"dataset.root={tmp_path / name}"]))
        for name in ("one", "two")
    )
    assert recipe_key(teacher_recipe(one)) != recipe_key(teacher_recipe(two))


def test_equivalent_model_options_share_a_recipe():
    """A model's name is a label: teacher=resnet20 and teacher=resnet32 with depth 20 are one cached teacher."""
    twenty = validate_config("train", compose_config("train", ["teacher=resnet20"]))
    also_twenty = validate_config("train", compose_config("train", ["teacher=resnet32", "teacher.kwargs.depth=20"]))
    assert (twenty.teacher.name, also_twenty.teacher.name) == ("resnet20", "resnet32")
    assert recipe_key(teacher_recipe(twenty)) == recipe_key(teacher_recipe(also_twenty))


def test_synthetic_only_keys_are_null_for_other_datasets():
    """The synthetic data's shape keys do not apply to a dataset that brings its own (null in the composed config)."""
    digits = validate_config("train", compose_config("train", [])).dataset
    assert [getattr(digits, key) for key in SYNTHETIC_ONLY] == [None] * len(SYNTHETIC_ONLY)
    synthetic = validate_config("train", compose_config("train", ["dataset=synthetic"])).dataset
    assert [getattr(synthetic, key) for key in SYNTHETIC_ONLY] == [10, 3, 5000, 1000]


@pytest.mark.parametrize(
    "overrides, error",
    [
        (["dataset.channels=3"], "dataset.channels: only dataset=synthetic takes it; digits brings its own"),
        (["dataset=cifar10", "dataset.num_classes=5"], "dataset.num_classes: only dataset=synthetic takes it"),
        (["dataset=synthetic", "dataset.train_size=0"], "dataset.train_size: must be >= 1 for dataset=synthetic"),
        (["dataset=synthetic", "dataset.test_size=null"], "dataset.test_size: must be >= 1 for dataset=synthetic"),
    ],
)
def test_synthetic_only_keys_are_checked(overrides, error):
    with pytest.raises(DistillError, match=rf"^{re.escape(error)}"):
        validate_config("train", compose_config("train", overrides))


def test_model_kwargs_can_be_overridden_and_added():
    cfg = validate_config("kd", compose_config("kd", ["student.kwargs.dropout=0.1", "+teacher.kwargs.extra=1"]))
    assert cfg.student.kwargs["dropout"] == 0.1
    assert cfg.teacher.kwargs["extra"] == 1  # model arguments are checked when the model is built


@pytest.mark.parametrize(
    "override, key",
    [
        ("T=0", "T"),
        ("T=-1", "T"),
        ("alpha=1.5", "alpha"),
        ("alpha=-0.1", "alpha"),
        ("epochs=0", "epochs"),
        ("batch_size=0", "batch_size"),
        ("optimizer.lr=0", "optimizer.lr"),
        ("dataset.val_split=1.0", "dataset.val_split"),
        ("device.precision=fp8", "device.precision"),
        ("dataset.pipeline=gpu", "dataset.pipeline"),
        ("dataset.device_max_gb=0", "dataset.device_max_gb"),
        ("dataset.workers=-1", "dataset.workers"),
        ("optimizer.impl=cuda", "optimizer.impl"),
        ("cache_teacher=maybe", "cache_teacher"),
        ("dataset.color_jitter=1.5", "dataset.color_jitter"),
        ("dataset.color_jitter=0.4", "dataset.color_jitter"),  # digits: augment is off
    ],
)
def test_range_checks_name_the_key(override, key):
    with pytest.raises(DistillError, match=rf"^{key}:"):
        validate_config("kd", compose_config("kd", [override]))


@pytest.mark.parametrize(
    "args, expected",
    [
        (["kd", "T=0"], "T: temperature must be a finite number > 0"),
        (["kd", "T=inf"], "T: temperature must be a finite number > 0"),
        (["kd", "alpha=2"], "alpha: must be in [0, 1]"),
        (["kd", "T=hot"], "T: Value 'hot'"),
        (["kd", "epochs=1.5"], "epochs: Value '1.5'"),
        (["kd", "Temp=3"], "Temp"),
        (["kd", "+Temp=3"], "Temp: not a key of the kd config"),
        (["kd", "teacher=resnt"], "teacher=resnt: no such teacher option"),
        (["kd", "student=mlp_smal"], "did you mean 'mlp_small'"),
        (["train", "dataset=nope"], "dataset=nope: no such dataset option"),
        (["kd", "-m", "hydra/launcher=jobllib"], "hydra/launcher=jobllib: no such hydra/launcher option; did you mean 'joblib'"),
        (["train", "epochs=0"], "epochs: must be >= 1"),
        (["train", "batch_size=0"], "batch_size: must be >= 1"),
        (["train", "dataset.channels=3"], "dataset.channels: only dataset=synthetic takes it"),
        (["kd", "batch_size=-3"], "batch_size: must be >= 1"),
        (["trian"], "unknown command 'trian'"),
    ],
)
def test_cli_rejects_bad_input_with_one_line(tmp_path, args, expected):
    result = run_distill_in_process(*args, cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]


def test_cli_cfg_job_prints_config_without_running(tmp_path):
    result = run_distill_in_process("kd", "T=2", "--cfg", "job", cwd=tmp_path)
    assert "T: 2" in result.stdout and "alpha:" in result.stdout
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("summary.json"))


def test_every_dataset_has_a_config_and_every_config_a_dataset():
    from distill_cli.data import DATASETS

    yamls = sorted(p.stem for p in (config_dir() / "dataset").glob("*.yaml"))
    assert yamls == DATASETS.names()
    for name in yamls:
        overrides = [f"dataset={name}"] + (["dataset.root=/tmp/x"] if name == "imagefolder" else [])
        assert validate_config("train", compose_config("train", overrides)).dataset.name == name


def test_distill_list_names_datasets_models_and_losses(tmp_path):
    out = run_distill_in_process("list", cwd=tmp_path).stdout
    for name in ("digits", "cifar100", "imagefolder", "synthetic", "mlp_small", "kd", "sgd"):
        assert name in out
    flat = " ".join(out.split())
    assert "experiment (train)" in flat and "imagenet_resnet34_resnet18" in flat and "cifar10_resnet56_resnet20" in flat


EXPERIMENTS = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))
# the presets `distill train` takes; each other preset is a kd preset named <teacher preset>_<student>
TEACHER_PRESETS = [
    "cifar100_resnet32x4", "cifar100_resnet50", "cifar100_resnet56", "cifar100_resnet110", "cifar100_vgg13", "cifar100_wrn_40_2", "cifar10_resnet20",
    "cifar10_resnet56", "imagenet_resnet18", "imagenet_resnet34", "mnist_hinton",
]


def test_every_preset_says_which_command_it_is_for():
    """Each preset's comment gives its usage line (`distill train|kd experiment=<name>`), which `distill list` reads:
    the train presets are those `distill train` takes, the others kd's."""
    assert experiment_presets() == {name: "train" if name in TEACHER_PRESETS else "kd" for name in EXPERIMENTS}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_preset_composes_and_validates(name):
    command = "train" if name in TEACHER_PRESETS else "kd"
    validate_config(command, compose_config(command, [f"experiment={name}"]))


@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if n not in TEACHER_PRESETS])
def test_kd_presets_reuse_the_teacher_their_train_preset_caches(name):
    """`distill train experiment=<teacher preset>` then `distill kd experiment=<pair preset>` must hit the
    teacher cache: the kd preset's teacher recipe is the train preset's."""
    from distill_cli.runs.teachers import teacher_training_config

    kd = validate_config("kd", compose_config("kd", [f"experiment={name}"]))
    teacher_preset = next(t for t in TEACHER_PRESETS if name.startswith(t + "_"))
    train = validate_config("train", compose_config("train", [f"experiment={teacher_preset}"]))
    assert teacher_recipe(teacher_training_config(kd)) == teacher_recipe(train)
