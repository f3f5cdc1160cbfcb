import math

import pytest
import torch
import torch.nn.functional as F

from distill_cli.losses import build_loss
from distill_cli.losses.hinton import kd_loss


def _softmax(values, T):
    exps = [math.exp(v / T) for v in values]
    return [e / sum(exps) for e in exps]


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


def test_total_loss_mixes_terms_by_alpha():
    torch.manual_seed(0)
    student, teacher = torch.randn(8, 5), torch.randn(8, 5)
    targets = torch.randint(0, 5, (8,))
    parts = build_loss("kd", T=4.0, alpha=0.7)(student, teacher, targets)
    ce = F.cross_entropy(student, targets)
    assert parts["ce"].item() == pytest.approx(ce.item())
    assert parts["loss"].item() == pytest.approx(0.7 * parts["kd"].item() + 0.3 * ce.item(), rel=1e-6)


def test_alpha_zero_is_cross_entropy_and_ignores_teacher():
    torch.manual_seed(0)
    student = torch.randn(8, 5)
    targets = torch.randint(0, 5, (8,))
    parts = build_loss("kd", T=4.0, alpha=0.0)(student, None, targets)
    assert parts["loss"].item() == pytest.approx(F.cross_entropy(student, targets).item())
    assert "kd" not in parts


def test_alpha_one_has_no_cross_entropy_term():
    torch.manual_seed(0)
    student = torch.randn(8, 5, requires_grad=True)
    teacher = torch.randn(8, 5)
    good, bad = torch.randint(0, 5, (8,)), torch.randint(0, 5, (8,))
    loss_fn = build_loss("kd", T=3.0, alpha=1.0)
    first = loss_fn(student, teacher, good)["loss"]
    second = loss_fn(student, teacher, bad)["loss"]
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


def test_loss_works_in_low_precision_logits():
    student = torch.randn(4, 10).to(torch.bfloat16)
    teacher = torch.randn(4, 10).to(torch.bfloat16)
    parts = build_loss("kd", T=4.0, alpha=0.5)(student, teacher, torch.tensor([0, 1, 2, 3]))
    assert parts["loss"].dtype == torch.float32 and torch.isfinite(parts["loss"])
