"""The objective (cross-entropy + Hinton KD around any method) and the method interface."""

import math

import pytest
import torch
import torch.nn.functional as F

from distill_cli.core.errors import DistillError
from distill_cli.data.loader import Batch
from distill_cli.losses import LOSSES
from distill_cli.losses.base import CE_WEIGHT_KEY, Objective, build_method, kd_loss
from distill_cli.models.features import Outputs


def _softmax(values, T):
    exps = [math.exp(v / T) for v in values]
    return [e / sum(exps) for e in exps]


def batch_of(labels: torch.Tensor) -> Batch:
    """A batch carrying only labels and positions (what a loss reads besides the outputs)."""
    return Batch(images=torch.empty(len(labels), 0), labels=labels, index=torch.arange(len(labels)))


def hinton(T: float, alpha: float) -> Objective:
    return Objective(build_method({"name": "kd"}), T, alpha)


def test_kd_term_matches_hand_computation():
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    teacher = torch.tensor([[2.0, 1.0, 0.0], [1.0, 0.0, 2.0]])
    T = 2.0
    expected = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        p_s, p_t = _softmax(s_row, T), _softmax(t_row, T)
        expected += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
    expected = expected / 2 * T * T  # batch mean, times T^2
    assert kd_loss(student, teacher, T).item() == pytest.approx(expected, rel=1e-6)


def test_total_loss_mixes_weighted_terms_by_alpha_and_sums_them_exactly():
    torch.manual_seed(0)
    student, teacher = torch.randn(8, 5), torch.randn(8, 5)
    targets = torch.randint(0, 5, (8,))
    parts = hinton(T=4.0, alpha=0.7)(Outputs(student), Outputs(teacher), batch_of(targets), epoch=1)
    ce = F.cross_entropy(student, targets)
    assert parts["loss/ce"].item() == pytest.approx(0.3 * ce.item())
    assert parts["loss/kd"].item() == pytest.approx(0.7 * kd_loss(student, teacher, 4.0).item())
    assert set(parts) == {"loss", "loss/ce", "loss/kd"}
    assert parts["loss"].item() == parts["loss/ce"].item() + parts["loss/kd"].item()


def test_alpha_zero_is_cross_entropy_and_needs_no_teacher():
    torch.manual_seed(0)
    student = torch.randn(8, 5)
    targets = torch.randint(0, 5, (8,))
    objective = hinton(T=4.0, alpha=0.0)
    assert not objective.needs_teacher
    parts = objective(Outputs(student), None, batch_of(targets), epoch=1)
    assert parts["loss"].item() == pytest.approx(F.cross_entropy(student, targets).item())
    assert "loss/kd" not in parts


def test_alpha_one_has_no_cross_entropy_term():
    torch.manual_seed(0)
    student = torch.randn(8, 5, requires_grad=True)
    teacher = torch.randn(8, 5)
    good, bad = torch.randint(0, 5, (8,)), torch.randint(0, 5, (8,))
    objective = hinton(T=3.0, alpha=1.0)
    first = objective(Outputs(student), Outputs(teacher), batch_of(good), 1)["loss"]
    second = objective(Outputs(student), Outputs(teacher), batch_of(bad), 1)["loss"]
    assert first.item() == second.item()  # labels do not matter at all
    assert first.item() == pytest.approx(kd_loss(student, teacher, 3.0).item())


def test_kd_is_zero_when_student_matches_teacher():
    logits = torch.randn(4, 10)
    assert kd_loss(logits, logits.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)


def test_t_squared_keeps_soft_gradient_magnitude_comparable_across_temperatures():
    # Hinton et al.: the gradient of the soft term scales as 1/T^2, which the T^2 factor undoes.
    torch.manual_seed(0)
    teacher = torch.randn(256, 10) * 3
    base = torch.randn(256, 10)
    norms, unscaled = {}, {}
    for T in (1.0, 2.0, 4.0, 8.0):
        student = base.clone().requires_grad_(True)
        kd_loss(student, teacher, T).backward()
        norms[T] = student.grad.norm().item()
        unscaled[T] = norms[T] / (T * T)
    # with T^2 the gradient norm stays within a small factor across an 8x range of T ...
    assert max(norms.values()) / min(norms.values()) < 2
    # ... while without it the gradient would shrink by well over an order of magnitude
    assert unscaled[1.0] / unscaled[8.0] > 15


def test_mse_logits_is_the_mean_squared_logit_difference():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 4), torch.randn(6, 4)
    terms = build_method({"name": "mse_logits", "weight": 2.0})(Outputs(student), Outputs(teacher), None, 1)
    expected = 2.0 * sum((s - t) ** 2 for s, t in zip(student.flatten().tolist(), teacher.flatten().tolist())) / 24
    assert terms["mse_logits"].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "loss, key",
    [
        ({"name": "fitnet", "nosuch": 1}, "loss.nosuch"),
        ({"name": "fitnet", "weight": "heavy"}, "loss.weight"),
        ({"name": "fitnet", "weight": -1.0}, "loss.weight"),
        ({"name": "fitnet", "weight": float("nan")}, "loss.weight"),
        ({"name": "fitnet", "hint": "pooled"}, "loss.hint"),
        ({"name": "mse_logits", "weight": True}, "loss.weight"),
    ],
)
def test_bad_hyperparameters_name_the_key(loss, key):
    with pytest.raises(DistillError, match=f"^{key}:"):
        build_method(loss)


def test_unknown_method_suggests_names():
    with pytest.raises(DistillError, match="did you mean"):
        build_method({"name": "fitnets"})


def test_every_method_has_a_yaml_with_its_defaults_and_a_docstring():
    from omegaconf import OmegaConf

    from distill_cli.core.config import config_dir
    from distill_cli.losses.base import hyperparameters

    yamls = {path.stem: path for path in (config_dir() / "loss").glob("*.yaml")}
    assert set(yamls) == set(LOSSES.names())
    for name, path in yamls.items():
        config = OmegaConf.to_container(OmegaConf.load(path))
        method = LOSSES.get(name)
        assert config["loss"]["name"] == name
        assert 0 <= config["alpha"] <= 1  # each method states its published CE/KD mix
        assert set(config["loss"]) - {"name", CE_WEIGHT_KEY} <= set(hyperparameters(method))
        assert method.__doc__ and path.read_text().startswith("# @package _global_\n#")
        build_method(config["loss"])  # the published defaults pass the method's own checks
