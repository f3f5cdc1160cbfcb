"""DKD, AT, SP, PKT and RKD: each loss against an independent computation of its paper's formula (numpy
loops in float64), its bad inputs, and the gradient it hands the student."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import small_kd_config
from test_losses import batch_of

from distill_cli.core.config import DatasetConfig
from distill_cli.core.errors import DistillError
from distill_cli.losses.base import MethodContext, build_method, kd_loss
from distill_cli.models.features import Outputs
from distill_cli.runs.kd import run_kd


def stages(*features: torch.Tensor) -> dict[str, torch.Tensor]:
    """Features as a net's `stage1`..`stageN` points, shallow to deep."""
    return {f"stage{number}": feature for number, feature in enumerate(features, start=1)}


def relu_maps(*shapes) -> list[torch.Tensor]:
    """Random non-negative (ReLU-like) feature maps of `shapes`, in NHWC memory as kd hands them over."""
    return [torch.randn(shape).relu().to(memory_format=torch.channels_last) for shape in shapes]


def context(num_classes: int = 10, student=None, teacher=None, dataset: str = "digits") -> MethodContext:
    """What kd hands `setup`, for a dataset of `num_classes` classes and the given feature shapes."""
    return MethodContext(
        num_classes=num_classes,
        num_train=8,
        train_labels=torch.zeros(8, dtype=torch.long),
        student=student or {},
        teacher=teacher or {},
        epochs=1,
        dataset=dataset,
    )


def softmax64(logits: np.ndarray) -> np.ndarray:
    exps = np.exp(logits - logits.max())
    return exps / exps.sum()


def kl64(p: np.ndarray, q: np.ndarray) -> float:
    return float(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))


# --- DKD ---------------------------------------------------------------------------------------------


def test_dkd_terms_match_the_papers_binary_and_non_target_divergences():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 5) * 3, torch.randn(6, 5) * 3
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    T, tckd_weight, nckd_weight = 2.0, 1.5, 6.0
    method = build_method({"name": "dkd", "tckd_weight": tckd_weight, "nckd_weight": nckd_weight, "temperature": T})
    terms = method(Outputs(student), Outputs(teacher), batch_of(labels), epoch=20)
    tckd = nckd = 0.0
    for s, t, y in zip(student.double().numpy(), teacher.double().numpy(), labels.tolist()):
        p_s, p_t = softmax64(s / T), softmax64(t / T)
        tckd += kl64([p_t[y], 1 - p_t[y]], [p_s[y], 1 - p_s[y]])
        rest = [c for c in range(5) if c != y]
        nckd += kl64(p_t[rest] / p_t[rest].sum(), p_s[rest] / p_s[rest].sum())
    assert set(terms) == {"dkd_tckd", "dkd_nckd"}
    assert terms["dkd_tckd"].item() == pytest.approx(tckd_weight * T * T * tckd / 6, rel=1e-5)
    assert terms["dkd_nckd"].item() == pytest.approx(nckd_weight * T * T * nckd / 6, rel=1e-5)


def test_dkd_parts_recompose_hinton_kd():
    # KD = TCKD + (1 - p_t) * NCKD, p_t the teacher's target probability at T (the paper's eq. 5)
    torch.manual_seed(1)
    student, teacher = torch.randn(5, 7) * 2, torch.randn(5, 7) * 2
    labels = torch.tensor([6, 0, 3, 3, 5])
    T = 4.0
    method = build_method({"name": "dkd", "tckd_weight": 1.0, "nckd_weight": 1.0, "temperature": T, "warmup": 0})
    for s, t, y in zip(student, teacher, labels):
        terms = method(Outputs(s[None]), Outputs(t[None]), batch_of(y[None]), epoch=1)
        p_target = softmax64(t.double().numpy() / T)[y]
        recomposed = terms["dkd_tckd"].item() + (1 - p_target) * terms["dkd_nckd"].item()
        assert recomposed == pytest.approx(kd_loss(s[None], t[None], T).item(), rel=1e-5)


def test_dkd_warms_up_linearly_from_epoch_one():
    torch.manual_seed(2)
    student, teacher, labels = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])

    def total(epoch: int, warmup: int) -> float:
        method = build_method({"name": "dkd", "warmup": warmup})
        terms = method(Outputs(student), Outputs(teacher), batch_of(labels), epoch)
        return sum(terms.values()).item()

    full = total(1, warmup=0)
    assert full > 0
    assert total(1, warmup=20) == pytest.approx(full / 20, rel=1e-6)  # 1-based: epoch 1 already counts
    assert total(10, warmup=20) == pytest.approx(full / 2, rel=1e-6)
    assert total(20, warmup=20) == pytest.approx(full, rel=1e-6)
    assert total(35, warmup=20) == pytest.approx(full, rel=1e-6)


def test_dkd_refuses_a_two_class_dataset_before_training(tmp_path):
    dataset = DatasetConfig(name="synthetic", num_classes=2, channels=1, image_size=8, train_size=64, test_size=16)
    cfg = small_kd_config(tmp_path, dataset=dataset, loss={"name": "dkd"}, alpha=0.0, batch_size=16)
    with pytest.raises(DistillError, match=r"^loss=dkd: dataset=synthetic has 2 classes; .*needs at least 3"):
        run_kd(cfg, tmp_path / "run")
    assert not (tmp_path / "cache").exists()  # refused before any teacher was trained
    build_method({"name": "dkd"}).setup(context(num_classes=3))  # three classes are enough


# --- AT ----------------------------------------------------------------------------------------------


def attention64(feature: np.ndarray) -> np.ndarray:
    """(B, H*W): sum over channels of a^2, each sample's map scaled to unit length (channel mean or sum:
    the same after scaling)."""
    maps = (feature**2).sum(axis=1).reshape(len(feature), -1)
    return maps / np.sqrt((maps**2).sum(axis=1, keepdims=True))


def pool2x2(feature: np.ndarray) -> np.ndarray:
    """Average of each 2x2 block: (B, C, H, W) -> (B, C, H/2, W/2)."""
    b, c, h, w = feature.shape
    return feature.reshape(b, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))


def test_at_pairs_stages_from_the_deepest_back_and_pools_the_larger_map():
    torch.manual_seed(3)
    student = relu_maps((4, 3, 8, 8), (4, 5, 4, 4))  # two stages
    teacher = relu_maps((4, 2, 16, 16), (4, 6, 16, 16), (4, 7, 4, 4))  # three stages
    terms = build_method({"name": "at", "weight": 10.0})(
        Outputs(torch.zeros(4, 3), stages(*student)), Outputs(torch.zeros(4, 3), stages(*teacher)), None, 1
    )
    s1, s2 = (f.double().numpy() for f in student)
    _, t2, t3 = (f.double().numpy() for f in teacher)
    expected = 0.0
    for s, t in ((s2, t3), (s1, pool2x2(t2))):  # deepest with deepest; teacher's first stage unused
        expected += ((attention64(s) - attention64(t)) ** 2).mean()
    assert terms["at"].item() == pytest.approx(10.0 * expected, rel=1e-5)


def test_at_is_zero_for_identical_features_and_blind_to_their_scale():
    torch.manual_seed(4)
    features = relu_maps((4, 3, 8, 8), (4, 5, 4, 4))
    at = build_method({"name": "at"})
    logits = torch.zeros(4, 3)
    same = at(Outputs(logits, stages(*features)), Outputs(logits, stages(*(f.clone() for f in features))), None, 1)
    scaled = at(Outputs(logits, stages(*features)), Outputs(logits, stages(*(3 * f for f in features))), None, 1)
    assert same["at"].item() == pytest.approx(0.0, abs=1e-9)
    assert scaled["at"].item() == pytest.approx(0.0, abs=1e-6)


# --- SP ----------------------------------------------------------------------------------------------


def test_sp_matches_the_row_normalised_gram_difference_of_the_last_stages():
    torch.manual_seed(5)
    student = relu_maps((5, 3, 8, 8), (5, 4, 4, 4))
    teacher = relu_maps((5, 6, 8, 8), (5, 9, 2, 2))  # other widths and sizes: only B x B is compared
    terms = build_method({"name": "sp", "weight": 7.0})(
        Outputs(torch.zeros(5, 3), stages(*student)), Outputs(torch.zeros(5, 3), stages(*teacher)), None, 1
    )

    def gram_rows(feature: torch.Tensor) -> list[list[float]]:
        flat = [sample.permute(1, 2, 0).reshape(-1).double().numpy() for sample in feature]  # any fixed order
        rows = [[float(np.dot(a, b)) for b in flat] for a in flat]
        return [[g / math.sqrt(sum(v * v for v in row)) for g in row] for row in rows]

    g_s, g_t = gram_rows(student[-1]), gram_rows(teacher[-1])
    expected = sum((g_t[i][j] - g_s[i][j]) ** 2 for i in range(5) for j in range(5)) / 25
    assert terms["sp"].item() == pytest.approx(7.0 * expected, rel=1e-5)


def test_sp_is_zero_for_identical_features_and_blind_to_their_scale():
    torch.manual_seed(6)
    features = relu_maps((4, 3, 4, 4))
    sp, logits = build_method({"name": "sp"}), torch.zeros(4, 3)
    same = sp(Outputs(logits, stages(*features)), Outputs(logits, stages(features[0].clone())), None, 1)
    scaled = sp(Outputs(logits, stages(*features)), Outputs(logits, stages(5 * features[0])), None, 1)
    assert same["sp"].item() == pytest.approx(0.0, abs=1e-9)
    assert scaled["sp"].item() == pytest.approx(0.0, abs=1e-6)


# --- PKT ---------------------------------------------------------------------------------------------


def test_pkt_matches_the_kl_of_cosine_kernel_neighbour_distributions():
    torch.manual_seed(7)
    student, teacher = torch.randn(5, 3), torch.randn(5, 8)
    terms = build_method({"name": "pkt", "weight": 2.0})(
        Outputs(torch.zeros(5, 3), {"pooled": student}), Outputs(torch.zeros(5, 3), {"pooled": teacher}), None, 1
    )

    def neighbours(embedding: torch.Tensor) -> list[list[float]]:
        rows = embedding.double().numpy()
        cos = [[float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) for b in rows] for a in rows]
        kernel = [[(c + 1) / 2 for c in row] for row in cos]
        return [[k / sum(row) for k in row] for row in kernel]

    p_s, p_t = neighbours(student), neighbours(teacher)
    eps = 1e-7
    summed = sum(p_t[i][j] * math.log((p_t[i][j] + eps) / (p_s[i][j] + eps)) for i in range(5) for j in range(5))
    assert terms["pkt"].item() == pytest.approx(2.0 * summed / 25, rel=1e-4)


def test_pkt_is_zero_for_identical_embeddings_and_blind_to_their_scale():
    torch.manual_seed(8)
    embedding, logits = torch.randn(6, 4), torch.zeros(6, 3)
    pkt = build_method({"name": "pkt"})
    same = pkt(Outputs(logits, {"pooled": embedding}), Outputs(logits, {"pooled": embedding.clone()}), None, 1)
    scaled = pkt(Outputs(logits, {"pooled": embedding}), Outputs(logits, {"pooled": 4 * embedding}), None, 1)
    assert same["pkt"].item() == pytest.approx(0.0, abs=1e-9)
    assert scaled["pkt"].item() == pytest.approx(0.0, abs=1e-3)  # 30000 x float rounding


# --- RKD ---------------------------------------------------------------------------------------------


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def test_rkd_matches_distance_and_angle_huber_losses_over_pairs_and_triplets():
    torch.manual_seed(9)
    b = 5
    student, teacher = torch.randn(b, 3), torch.randn(b, 6) * 2
    terms = build_method({"name": "rkd", "distance_weight": 3.0, "angle_weight": 4.0})(
        Outputs(torch.zeros(b, 3), {"pooled": student}), Outputs(torch.zeros(b, 3), {"pooled": teacher}), None, 1
    )

    def distances(e: np.ndarray) -> list[list[float]]:
        d = [[float(np.linalg.norm(e[i] - e[j])) for j in range(b)] for i in range(b)]
        mean = sum(d[i][j] for i in range(b) for j in range(b) if i != j) / (b * (b - 1))
        return [[value / mean for value in row] for row in d]

    def angle_cosine(e: np.ndarray, i: int, j: int, k: int) -> float:
        if i in (j, k):
            return 0.0  # no angle at a vertex that coincides with an end
        u, v = e[j] - e[i], e[k] - e[i]
        return float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))

    s, t = student.double().numpy(), teacher.double().numpy()
    d_s, d_t = distances(s), distances(t)
    distance = sum(huber(d_s[i][j] - d_t[i][j]) for i in range(b) for j in range(b)) / b**2
    triplets = [(i, j, k) for i in range(b) for j in range(b) for k in range(b)]
    angle = sum(huber(angle_cosine(s, *ijk) - angle_cosine(t, *ijk)) for ijk in triplets) / b**3
    assert terms["rkd_distance"].item() == pytest.approx(3.0 * distance, rel=1e-5)
    assert terms["rkd_angle"].item() == pytest.approx(4.0 * angle, rel=1e-5)


def test_rkd_is_blind_to_scaling_and_moving_the_embeddings():
    torch.manual_seed(10)
    student, teacher, logits = torch.randn(6, 4), torch.randn(6, 4), torch.zeros(6, 3)
    rkd = build_method({"name": "rkd"})
    base = rkd(Outputs(logits, {"pooled": student}), Outputs(logits, {"pooled": teacher}), None, 1)
    moved = rkd(Outputs(logits, {"pooled": 7 * student + 2}), Outputs(logits, {"pooled": teacher / 3 - 1}), None, 1)
    same = rkd(Outputs(logits, {"pooled": 5 * teacher}), Outputs(logits, {"pooled": teacher}), None, 1)
    assert base["rkd_distance"].item() > 0.01 and base["rkd_angle"].item() > 0.01
    for term in ("rkd_distance", "rkd_angle"):
        assert moved[term].item() == pytest.approx(base[term].item(), rel=1e-4)
        assert same[term].item() == pytest.approx(0.0, abs=1e-5)


# --- every method --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss, key",
    [
        ({"name": "dkd", "tckd_weight": -1.0}, "loss.tckd_weight"),
        ({"name": "dkd", "nckd_weight": float("nan")}, "loss.nckd_weight"),
        ({"name": "dkd", "temperature": 0.0}, "loss.temperature"),
        ({"name": "dkd", "warmup": -1}, "loss.warmup"),
        ({"name": "dkd", "warmup": 2.5}, "loss.warmup"),
        ({"name": "at", "weight": -1.0}, "loss.weight"),
        ({"name": "at", "p": 0.0}, "loss.p"),
        ({"name": "sp", "weight": float("inf")}, "loss.weight"),
        ({"name": "pkt", "weight": -0.5}, "loss.weight"),
        ({"name": "rkd", "distance_weight": -25.0}, "loss.distance_weight"),
        ({"name": "rkd", "angle_weight": float("nan")}, "loss.angle_weight"),
    ],
)
def test_out_of_range_hyperparameters_name_the_key(loss, key):
    with pytest.raises(DistillError, match=f"^{key}:"):
        build_method(loss)


def outputs_of_every_kind(dtype=torch.float32, grad: bool = False) -> tuple[Outputs, Outputs]:
    """Student (3 stages, requiring grad when `grad`) and teacher (4 stages) outputs with logits, stage
    maps in NHWC memory and a pooled embedding: what any of these methods reads."""
    torch.manual_seed(11)
    student = Outputs(
        torch.randn(6, 5), {**stages(*relu_maps((6, 3, 8, 8), (6, 4, 4, 4), (6, 5, 2, 2))), "pooled": torch.randn(6, 5)}
    )
    teacher = Outputs(
        torch.randn(6, 5),
        {**stages(*relu_maps((6, 2, 8, 8), (6, 3, 8, 8), (6, 6, 4, 4), (6, 8, 2, 2))), "pooled": torch.randn(6, 9)},
    )
    for outputs in (student, teacher):
        outputs.logits = outputs.logits.to(dtype)
        outputs.features = {name: value.to(dtype) for name, value in outputs.features.items()}
    if grad:
        student.logits.requires_grad_(True)
        for value in student.features.values():
            value.requires_grad_(True)
    return student, teacher


# what each method's gradient must reach in the student: every tensor it reads
READS = {
    "dkd": ["logits"],
    "at": ["stage1", "stage2", "stage3"],  # three student stages pair with the teacher's deepest three
    "sp": ["stage3"],
    "pkt": ["pooled"],
    "rkd": ["pooled"],
}


@pytest.mark.parametrize("name", sorted(READS))
def test_every_term_sends_a_finite_gradient_to_what_the_method_reads(name):
    method = build_method({"name": name})
    student, teacher = outputs_of_every_kind(grad=True)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    terms = method(student, teacher, batch_of(labels), epoch=1)
    assert not list(method.parameters())  # nothing of its own to train: the student gets it all
    tensors = {"logits": student.logits, **student.features}
    for term, value in terms.items():
        grads = torch.autograd.grad(value, [tensors[p] for p in READS[name]], retain_graph=True, allow_unused=True)
        for point, grad in zip(READS[name], grads):
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, (term, point)


@pytest.mark.parametrize("name", sorted(READS))
def test_low_precision_inputs_give_fp32_terms(name):
    method = build_method({"name": name})
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    low = outputs_of_every_kind(torch.bfloat16)
    # the same bf16-rounded values, handed over in fp32
    upcast = [replace(o, logits=o.logits.float(), features={k: v.float() for k, v in o.features.items()}) for o in low]
    terms, reference = method(*low, batch_of(labels), epoch=1), method(*upcast, batch_of(labels), epoch=1)
    for term, value in terms.items():
        assert value.dtype == torch.float32, term
        assert value.item() == pytest.approx(reference[term].item(), rel=1e-6), term  # computed in fp32 throughout
