import pytest

from distill_cli.config import KDConfig, TrainConfig, config_dir, validate_config
from distill_cli.errors import DistillError
from distill_cli.teacher_cache import teacher_recipe

from conftest import compose_config, run_distill


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


def test_default_kd_teacher_recipe_matches_default_train():
    """`distill train` then `distill kd` (no arguments) must hit the teacher cache."""
    from distill_cli.tasks import teacher_training_config
    from distill_cli.teacher_cache import teacher_recipe

    train = validate_config("train", compose_config("train", []))
    kd = validate_config("kd", compose_config("kd", []))
    assert teacher_recipe(teacher_training_config(kd)) == teacher_recipe(train)


@pytest.mark.parametrize("value, expected", [("true", "true"), ("True", "true"), ("false", "false"), ("auto", "auto")])
def test_cache_teacher_takes_yaml_booleans_and_auto(value, expected):
    assert validate_config("kd", compose_config("kd", [f"cache_teacher={value}"])).cache_teacher == expected


def test_execution_settings_do_not_change_the_teacher_recipe():
    """Pipeline, workers and the optimizer kernel change how a teacher is computed, not which one."""
    from distill_cli.teacher_cache import teacher_recipe

    base = validate_config("train", compose_config("train", []))
    other = validate_config(
        "train",
        compose_config("train", ["dataset.pipeline=stream", "dataset.workers=3", "optimizer.impl=loop", "dataset.cache_dir=x"]),
    )
    assert teacher_recipe(other) == teacher_recipe(base)
    assert teacher_recipe(validate_config("train", compose_config("train", ["dataset.augment=true"]))) != teacher_recipe(base)


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
        (["train", "epochs=0"], "epochs: must be >= 1"),
        (["train", "batch_size=0"], "batch_size: must be >= 1"),
        (["kd", "batch_size=-3"], "batch_size: must be >= 1"),
        (["trian"], "unknown command 'trian'"),
    ],
)
def test_cli_rejects_bad_input_with_one_line(tmp_path, args, expected):
    result = run_distill(*args, cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]


def test_cli_cfg_job_prints_config_without_running(tmp_path):
    result = run_distill("kd", "T=2", "--cfg", "job", cwd=tmp_path)
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
    out = run_distill("list", cwd=tmp_path).stdout
    for name in ("digits", "cifar100", "imagefolder", "synthetic", "mlp_small", "kd", "sgd"):
        assert name in out


EXPERIMENTS = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))
# the presets `distill train` takes; each other preset is a kd preset named <teacher preset>_<student>
TEACHER_PRESETS = ["cifar100_resnet32x4", "cifar100_resnet56", "cifar100_vgg13", "cifar100_wrn_40_2", "mnist_hinton"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_preset_composes_and_validates(name):
    command = "train" if name in TEACHER_PRESETS else "kd"
    validate_config(command, compose_config(command, [f"experiment={name}"]))


@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if n not in TEACHER_PRESETS])
def test_kd_presets_reuse_the_teacher_their_train_preset_caches(name):
    """`distill train experiment=<teacher preset>` then `distill kd experiment=<pair preset>` must hit the
    teacher cache: the kd preset's teacher recipe is the train preset's."""
    from distill_cli.tasks import teacher_training_config

    kd = validate_config("kd", compose_config("kd", [f"experiment={name}"]))
    teacher_preset = next(t for t in TEACHER_PRESETS if name.startswith(t + "_"))
    train = validate_config("train", compose_config("train", [f"experiment={teacher_preset}"]))
    assert teacher_recipe(teacher_training_config(kd)) == teacher_recipe(train)
