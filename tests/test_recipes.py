"""The papers' exact recipes: the CE weight independent of alpha (`loss.ce_weight`), weight decay on every
parameter (`optimizer.decay_all`), and the CIFAR-100 presets against mdistiller's and RepDistiller's configs."""

import math

import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf
from torch import nn

from distill_cli.core.config import KDConfig, OptimizerConfig, TrainConfig, config_dir, validate_config
from distill_cli.core.errors import DistillError
from distill_cli.data.loader import Batch
from distill_cli.kd.objective import objective_of
from distill_cli.models.features import Outputs
from distill_cli.runs.teacher_cache import teacher_recipe
from distill_cli.training.optim import build_optimizer


def _terms(cfg: KDConfig, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> dict:
    batch = Batch(images=torch.empty(len(labels), 0), labels=labels, index=torch.arange(len(labels)))
    return objective_of(cfg)(Outputs(student), Outputs(teacher), batch, epoch=1)


def _by_hand(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, T: float) -> tuple[float, float]:
    """Cross-entropy and T^2 KL(p_t || p_s), batch means, from the formulas row by row."""
    ce = kl = 0.0
    for s_row, t_row, label in zip(student.tolist(), teacher.tolist(), labels.tolist()):
        ce += math.log(sum(math.exp(v) for v in s_row)) - s_row[label]
        p_s = [math.exp(v / T) / sum(math.exp(w / T) for w in s_row) for v in s_row]
        p_t = [math.exp(v / T) / sum(math.exp(w / T) for w in t_row) for v in t_row]
        kl += sum(t * math.log(t / s) for t, s in zip(p_t, p_s))
    return ce / len(labels), kl / len(labels) * T * T


def test_ce_weight_is_independent_of_alpha_and_unset_keeps_one_minus_alpha():
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    ce, kd = _by_hand(student, teacher, labels, T=4.0)
    given = _terms(KDConfig(loss={"name": "kd", "ce_weight": 0.3}, alpha=0.5, T=4.0), student, teacher, labels)
    assert given["loss/ce"].item() == pytest.approx(0.3 * ce, rel=1e-5)
    assert given["loss/kd"].item() == pytest.approx(0.5 * kd, rel=1e-5)
    unset = _terms(KDConfig(loss={"name": "kd"}, alpha=0.75, T=4.0), student, teacher, labels)
    assert unset["loss/ce"].item() == pytest.approx(0.25 * ce, rel=1e-5)
    # alpha=1 with the CE weight given keeps the cross-entropy (RepDistiller's -r 1 -a 1)
    both = _terms(KDConfig(loss={"name": "kd", "ce_weight": 1.0}, alpha=1.0, T=4.0), student, teacher, labels)
    assert both["loss"].item() == pytest.approx(ce + kd, rel=1e-5)


def test_repdistillers_crd_plus_kd_composes_as_published():
    """`loss=crd alpha=1`: CE 1, KD 1 (T=4), CRD 0.8, as RepDistiller's scripts/run_cifar_distill.sh."""
    cfg = validate_config("kd", compose_config("kd", ["experiment=cifar100_resnet32x4_resnet8x4", "loss=crd", "alpha=1"]))
    objective = objective_of(cfg)
    assert (objective.ce_weight, objective.alpha, objective.T, objective.method.weight) == (1.0, 1.0, 4.0, 0.8)
    assert objective_of(validate_config("kd", compose_config("kd", ["loss=kd"]))).ce_weight == pytest.approx(0.1)


@pytest.mark.parametrize("value", [-1, "one"])
def test_a_bad_ce_weight_is_refused_naming_the_key(value):
    with pytest.raises(DistillError, match=r"^loss\.ce_weight: "):
        objective_of(KDConfig(loss={"name": "kd", "ce_weight": value}))


def test_decay_all_decays_biases_and_norms_too():
    """One SGD step with zero gradients: weight decay alone shrinks a parameter by lr x weight_decay."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    for decay_all in (False, True):
        before = [p.detach().clone() for p in model.parameters()]
        optimizer = build_optimizer(model, OptimizerConfig(lr=0.1, momentum=0.0, weight_decay=0.5, decay_all=decay_all, impl="loop"), torch.device("cpu"))
        for parameter in model.parameters():
            parameter.grad = torch.zeros_like(parameter)
        optimizer.step()
        for old, new in zip(before, model.parameters()):
            shrunk = decay_all or old.ndim > 1
            assert torch.allclose(new, old * (0.95 if shrunk else 1.0)), (decay_all, old.shape)


def test_decay_all_is_its_own_teacher_recipe_and_the_default_keeps_the_cached_keys():
    plain = TrainConfig()
    assert "decay_all" not in teacher_recipe(plain)["optimizer"]  # keys cached before the key existed still match
    decayed = TrainConfig(optimizer=OptimizerConfig(decay_all=True))
    assert teacher_recipe(decayed)["optimizer"]["decay_all"] is True


# mdistiller configs/cifar100/*.yaml (SOLVER) and RepDistiller train_student.py: the recipe of every pair
PUBLISHED_SOLVER = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4, "decay_all": True,
                    "schedule": "step", "gamma": 0.1}
# mdistiller mdistiller/engine/cfg.py and configs/cifar100/reviewkd.yaml; RepDistiller scripts/run_cifar_distill.sh
# for CC (-b 0.02): (alpha = the KD weight, CE weight, the method's weights)
PUBLISHED_WEIGHTS = {
    "kd": (0.9, None, {}),
    "at": (0.0, 1.0, {"weight": 1000.0, "p": 2.0}),
    "rkd": (0.0, 1.0, {"distance_weight": 25.0, "angle_weight": 50.0}),
    "fitnet": (0.0, 1.0, {"weight": 100.0, "hint": "stage2"}),
    "pkt": (0.0, 1.0, {"weight": 30000.0}),
    "sp": (0.0, 1.0, {"weight": 3000.0}),
    "vid": (0.0, 1.0, {"weight": 1.0, "init_variance": 5.0, "eps": 1e-5}),
    "crd": (0.0, 1.0, {"weight": 0.8, "embed_dim": 128, "negatives": 16384, "temperature": 0.07, "momentum": 0.5}),
    "reviewkd": (0.0, 1.0, {"weight": 5.0, "warmup_epochs": 20}),
    "dkd": (0.0, 1.0, {"tckd_weight": 1.0, "nckd_weight": 8.0, "temperature": 4.0, "warmup": 20}),
    "cc": (0.0, 1.0, {"weight": 0.02, "embed_dim": 128}),
}


@pytest.mark.parametrize("teacher", ["resnet32x4", "resnet56", "vgg13", "wrn_40_2"])
def test_cifar100_presets_follow_the_published_solver(teacher):
    cfg = validate_config("train", compose_config("train", [f"experiment=cifar100_{teacher}"]))
    solver = {key: getattr(cfg.optimizer, key) for key in PUBLISHED_SOLVER}
    assert solver == PUBLISHED_SOLVER
    assert [round(m * cfg.epochs) for m in cfg.optimizer.milestones] == [150, 180, 210]
    assert (cfg.epochs, cfg.batch_size, cfg.dataset.name, cfg.dataset.augment) == (240, 64, "cifar100", True)


def test_methods_yamls_hold_the_published_weights():
    for name, (alpha, ce_weight, weights) in PUBLISHED_WEIGHTS.items():
        config = OmegaConf.to_container(OmegaConf.load(config_dir() / "loss" / f"{name}.yaml"))
        loss = config["loss"]
        assert (config["alpha"], loss.get("ce_weight")) == (alpha, ce_weight), name
        assert {key: value for key, value in loss.items() if key not in ("name", "ce_weight")} == weights, name
    assert OmegaConf.load(config_dir() / "kd.yaml")["T"] == 4.0
