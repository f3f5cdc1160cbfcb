"""CRD and CC: each loss against an independent computation of its formula, their bad input, and
gradients reaching every trainable part."""

import math

import numpy as np
import pytest
import torch
from test_losses import batch_of

from distill_cli.core.errors import DistillError
from distill_cli.core.world import World
from distill_cli.data.loader import Batch
from distill_cli.losses.base import MethodContext, build_method
from distill_cli.models.features import Outputs

STUDENT_DIM, TEACHER_DIM = 5, 7  # pooled sizes: the methods must take them from the context


def built(loss: dict, train_labels: torch.Tensor):
    """The method of `loss`, set up for a transfer set with `train_labels` and nets whose pooled features
    have STUDENT_DIM and TEACHER_DIM values."""
    method = build_method(loss)
    method.setup(
        MethodContext(
            num_classes=int(train_labels.max()) + 1,
            num_train=len(train_labels),
            train_labels=train_labels,
            student={"pooled": torch.Size([STUDENT_DIM])},
            teacher={"pooled": torch.Size([TEACHER_DIM])},
            epochs=1,
        )
    )
    return method


def pooled(features: torch.Tensor) -> Outputs:
    """A net's outputs carrying only its pooled features (the methods read no logits)."""
    return Outputs(torch.zeros(len(features), 1), {"pooled": features})


def at(index: list[int], train_labels: torch.Tensor) -> Batch:
    """A batch of the transfer-set samples at `index` (labels and positions only)."""
    return Batch(torch.empty(len(index), 0), train_labels[index], torch.tensor(index))


def linear(layer: torch.nn.Linear):
    """A Linear layer's weight and bias as float64 numpy arrays."""
    return layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy()


def unit(vector: np.ndarray) -> np.ndarray:
    return vector / math.sqrt(sum(v * v for v in vector))


# ---- CRD ---------------------------------------------------------------------------------------------

TRAIN_LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 2, 2, 1])  # 12 samples, classes of 3, 4 and 5
CRD = {"name": "crd", "embed_dim": 3, "negatives": 5, "temperature": 0.5, "momentum": 0.3, "weight": 0.7}


def record_negatives(method) -> list[torch.Tensor]:
    """The negatives `method` draws from now on, one (B, K) tensor per step."""
    drawn, draw = [], method.draw_negatives
    method.draw_negatives = lambda labels: drawn.append(draw(labels)) or drawn[-1]
    return drawn


def crd_reference(method, banks, steps, negatives, normalisers=None) -> tuple[list[float], list[float]]:
    """The CRD losses of consecutive steps and the normalisers Z, by explicit sums over anchors and
    samples (float64): critic h = P / (P + K/N) with P = exp(<bank row, anchor> / temperature) / Z, Z set
    from the first step's scores (N * their mean) unless given, and then kept, each bank row of the batch
    replaced by normalize(momentum * row + (1 - momentum) * anchor) after the step."""
    (w_s, b_s), (w_t, b_t) = linear(method.embed_student), linear(method.embed_teacher)
    student_bank, teacher_bank = (bank.double().numpy().copy() for bank in banks)
    hp, num_train = CRD, len(student_bank)
    noise = hp["negatives"] / num_train
    losses = []
    for (student, teacher, index), drawn in zip(steps, negatives):
        anchors_s = [unit(w_s @ f + b_s) for f in student.double().numpy()]
        anchors_t = [unit(w_t @ f + b_t) for f in teacher.double().numpy()]
        scores = []  # per direction: student anchors against the teacher's bank, teacher anchors against the student's
        for anchors, bank in ((anchors_s, teacher_bank), (anchors_t, student_bank)):
            scores.append(
                [
                    [math.exp(sum(bank[j] * anchor) / hp["temperature"]) for j in [position, *others]]
                    for anchor, position, others in zip(anchors, index, drawn.tolist())
                ]
            )
        if normalisers is None:
            normalisers = [num_train * sum(map(sum, rows)) / sum(map(len, rows)) for rows in scores]
        loss = 0.0
        for rows, z in zip(scores, normalisers):
            for row in rows:
                positive, *negative = (e / z for e in row)
                loss -= math.log(positive / (positive + noise)) / len(index)
                loss -= sum(math.log(noise / (p + noise)) for p in negative) / len(index)
        losses.append(hp["weight"] * loss)
        for i, position in enumerate(index):
            m = hp["momentum"]
            student_bank[position] = unit(m * student_bank[position] + (1 - m) * anchors_s[i])
            teacher_bank[position] = unit(m * teacher_bank[position] + (1 - m) * anchors_t[i])
    return losses, normalisers


def test_crd_is_the_nce_loss_with_a_frozen_normaliser_and_momentum_banks():
    torch.manual_seed(0)
    method = built(CRD, TRAIN_LABELS)
    banks = (method.student_bank.clone(), method.teacher_bank.clone())
    # two steps; the second revisits positions 4 and 9, so it reads rows the first one updated
    steps = [
        (torch.randn(4, STUDENT_DIM), torch.randn(4, TEACHER_DIM), [3, 4, 8, 9]),
        (torch.randn(3, STUDENT_DIM), torch.randn(3, TEACHER_DIM), [9, 0, 4]),
    ]
    drawn = record_negatives(method)
    losses = [
        method(pooled(student), pooled(teacher), at(index, TRAIN_LABELS), 1)["crd"].item()
        for student, teacher, index in steps
    ]
    expected, normalisers = crd_reference(method, banks, steps, drawn)
    assert losses == pytest.approx(expected, rel=1e-5)
    assert method.normaliser.tolist() == pytest.approx(normalisers, rel=1e-5)  # still the first step's


def test_crd_gradient_holds_the_normaliser_constant():
    # Z set on the first batch is a constant (the peers read it out with .item()), also in that batch's
    # gradient: the gradient is the derivative of the loss at fixed Z (central differences in float64)
    torch.manual_seed(0)
    method = built(CRD, TRAIN_LABELS)
    banks = (method.student_bank.clone(), method.teacher_bank.clone())
    student, teacher, index = torch.randn(4, STUDENT_DIM, requires_grad=True), torch.randn(4, TEACHER_DIM), [3, 4, 8, 9]
    drawn = record_negatives(method)
    method(pooled(student), pooled(teacher), at(index, TRAIN_LABELS), 1)["crd"].backward()
    direction, step, z = torch.randn(4, STUDENT_DIM, dtype=torch.float64), 1e-6, method.normaliser.tolist()
    at_fixed_z = []
    for moved in (student.detach() + step * direction, student.detach() - step * direction):
        at_fixed_z += crd_reference(method, banks, [(moved, teacher, index)], drawn, normalisers=z)[0]
    slope = (at_fixed_z[0] - at_fixed_z[1]) / (2 * step)
    assert (student.grad.double() * direction).sum().item() == pytest.approx(slope, rel=1e-4)


def test_crd_bank_rows_of_the_batch_move_towards_the_new_embeddings_and_stay_unit():
    torch.manual_seed(0)
    method = built(CRD, TRAIN_LABELS)
    before = method.student_bank.clone(), method.teacher_bank.clone()
    student, teacher, index = torch.randn(3, STUDENT_DIM), torch.randn(3, TEACHER_DIM), [2, 5, 11]
    method(pooled(student), pooled(teacher), at(index, TRAIN_LABELS), 1)
    for bank, old, (weight, bias), features in zip(
        (method.student_bank, method.teacher_bank),
        before,
        (linear(method.embed_student), linear(method.embed_teacher)),
        (student, teacher),
    ):
        for row, f in zip(index, features.double().numpy()):
            expected = unit(0.3 * old[row].double().numpy() + 0.7 * unit(weight @ f + bias))
            assert bank[row].tolist() == pytest.approx(expected.tolist(), abs=1e-6)
        untouched = [row for row in range(len(TRAIN_LABELS)) if row not in index]
        assert torch.equal(bank[untouched], old[untouched])


def test_crd_negatives_are_uniform_over_the_other_classes_from_the_global_generator():
    method = built(CRD | {"negatives": 30000}, TRAIN_LABELS)
    anchors = torch.tensor([0, 1, 2])
    torch.manual_seed(3)
    drawn = method.draw_negatives(anchors)
    torch.manual_seed(3)
    assert torch.equal(method.draw_negatives(anchors), drawn)  # torch's generator, saved with a run
    assert not torch.equal(method.draw_negatives(anchors), drawn)
    for label, positions in zip(anchors.tolist(), drawn):
        others = [p for p, y in enumerate(TRAIN_LABELS.tolist()) if y != label]
        counts = torch.bincount(positions, minlength=len(TRAIN_LABELS))
        assert counts[TRAIN_LABELS == label].sum() == 0
        share = len(positions) / len(others)
        assert all(abs(counts[p] - share) < 0.1 * share for p in others)  # 10%: about 6 standard deviations


def test_crd_state_comes_back_from_its_state_dict():
    # memory banks and the normaliser are buffers: last.pt holds them, and resume gets them back
    torch.manual_seed(0)
    method = built(CRD, TRAIN_LABELS)
    student, teacher = torch.randn(4, STUDENT_DIM), torch.randn(4, TEACHER_DIM)
    method(pooled(student), pooled(teacher), at([0, 1, 2, 3], TRAIN_LABELS), 1)
    restored = built(CRD, TRAIN_LABELS)
    restored.load_state_dict(method.state_dict())
    losses = []
    for copy in (method, restored):
        torch.manual_seed(1)
        losses.append(copy(pooled(student), pooled(teacher), at([4, 0, 9, 7], TRAIN_LABELS), 2)["crd"].item())
    assert losses[0] == losses[1]
    assert {"student_bank", "teacher_bank", "normaliser"} <= set(method.state_dict())


def test_crd_plans_the_negatives_it_draws_for_the_other_processes():
    """Each of N processes draws the negatives of the whole step's batch (N x batch_size x K int64 and their
    remainders) and keeps its rows: the memory plan counts the other N - 1 shares."""
    method = build_method({"name": "crd", "negatives": 1000})
    context = MethodContext(
        num_classes=3, num_train=12, train_labels=TRAIN_LABELS, student={"pooled": torch.Size([STUDENT_DIM])},
        teacher={"pooled": torch.Size([TEACHER_DIM])}, epochs=1, batch_size=64,
    )
    alone = method.planned_memory(context)
    context.world = World(size=4)
    four = method.planned_memory(context)
    assert sum(four.values()) - sum(alone.values()) == 3 * 64 * 1000 * 16
    assert "the other 3 processes' negatives, drawn here too" in four


def test_crd_refuses_a_transfer_set_of_one_class():
    with pytest.raises(DistillError, match="^loss=crd: .*single class"):
        built(CRD, torch.tensor([1, 1, 1, 1]))


# ---- CC ----------------------------------------------------------------------------------------------

CC = {"name": "cc", "embed_dim": 4, "weight": 0.3}


def test_cc_is_repdistillers_adjacent_pair_product_of_embedding_residuals():
    torch.manual_seed(0)
    method = built(CC, TRAIN_LABELS)
    student, teacher = torch.randn(5, STUDENT_DIM), torch.randn(5, TEACHER_DIM)
    (w_s, b_s), (w_t, b_t) = linear(method.embed_student), linear(method.embed_teacher)
    residuals = [
        [abs(a - b) for a, b in zip(w_s @ s + b_s, w_t @ t + b_t)]
        for s, t in zip(student.double().numpy(), teacher.double().numpy())
    ]
    pairs = [sum(a * b for a, b in zip(residuals[i], residuals[i + 1])) for i in range(len(residuals) - 1)]
    expected = 0.3 * sum(pairs) / len(pairs)
    assert method(pooled(student), pooled(teacher), batch_of(torch.zeros(5, dtype=torch.long)), 1)["cc"].item() == (
        pytest.approx(expected, rel=1e-5)
    )


def test_cc_is_zero_when_the_two_embeddings_agree():
    torch.manual_seed(0)
    method = built(CC, TRAIN_LABELS)
    features = torch.randn(6, STUDENT_DIM)
    teacher_features = torch.cat([features, torch.randn(6, TEACHER_DIM - STUDENT_DIM)], dim=1)
    with torch.no_grad():  # the teacher's embedding reads the student's features and ignores the rest
        method.embed_teacher.weight.zero_()
        method.embed_teacher.weight[:, :STUDENT_DIM] = method.embed_student.weight
        method.embed_teacher.bias.copy_(method.embed_student.bias)
    terms = method(pooled(features), pooled(teacher_features), batch_of(torch.zeros(6, dtype=torch.long)), 1)
    assert terms["cc"].item() == pytest.approx(0.0, abs=1e-7)


# ---- both --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", [CRD, CC], ids=["crd", "cc"])
def test_gradients_reach_every_trainable_part_and_the_student(loss):
    torch.manual_seed(0)
    method = built(loss, TRAIN_LABELS)
    student = torch.randn(4, STUDENT_DIM, requires_grad=True)
    terms = method(pooled(student), pooled(torch.randn(4, TEACHER_DIM)), at([0, 5, 6, 10], TRAIN_LABELS), 1)
    terms[loss["name"]].backward()
    parameters = dict(method.named_parameters())
    assert {"embed_student.weight", "embed_teacher.weight"} <= set(parameters)
    for name, parameter in parameters.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert student.grad.abs().sum() > 0


@pytest.mark.parametrize("loss", [CRD, CC], ids=["crd", "cc"])
def test_terms_are_computed_in_fp32_under_low_precision_autocast(loss):
    student, teacher = torch.randn(4, STUDENT_DIM), torch.randn(4, TEACHER_DIM)
    terms = []
    for autocast in (False, True):
        torch.manual_seed(0)
        method = built(loss, TRAIN_LABELS)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            terms.append(method(pooled(student), pooled(teacher), at([0, 5, 6, 10], TRAIN_LABELS), 1)[loss["name"]])
    assert terms[1].dtype == torch.float32
    assert terms[1].item() == pytest.approx(terms[0].item(), rel=1e-6)


@pytest.mark.parametrize(
    "loss, key",
    [
        ({"name": "crd", "weight": -0.1}, "loss.weight"),
        ({"name": "crd", "embed_dim": 0}, "loss.embed_dim"),
        ({"name": "crd", "embed_dim": 12.5}, "loss.embed_dim"),
        ({"name": "crd", "negatives": 0}, "loss.negatives"),
        ({"name": "crd", "temperature": 0.0}, "loss.temperature"),
        ({"name": "crd", "temperature": float("inf")}, "loss.temperature"),
        ({"name": "crd", "momentum": 1.0}, "loss.momentum"),
        ({"name": "crd", "momentum": -0.5}, "loss.momentum"),
        ({"name": "crd", "negative": 10}, "loss.negative"),
        ({"name": "cc", "weight": float("nan")}, "loss.weight"),
        ({"name": "cc", "embed_dim": -3}, "loss.embed_dim"),
    ],
)
def test_bad_hyperparameters_name_the_key(loss, key):
    with pytest.raises(DistillError, match=f"^{key}:"):
        build_method(loss)
