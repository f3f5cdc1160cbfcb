"""The classic feature methods the peers ship (NST, FSP, KDSVD, OFD, ICKD, SRD) against independent
computations of their papers' formulas (values and the gradients reaching the student's features),
their refusals, and one short `distill kd` run each on synthetic data."""

import json
import math

import pytest
import torch
from conftest import small_kd_config
from test_losses import batch_of
from test_methods_features import BATCH, PAIRS, STUDENT, TEACHER, outputs_of, set_up
from torch import nn

from distill_cli.core.config import DatasetConfig, ModelConfig
from distill_cli.core.errors import DistillError
from distill_cli.data import DatasetInfo
from distill_cli.losses.base import build_method
from distill_cli.models import build_model
from distill_cli.models.features import Outputs, feature_extractor
from distill_cli.runs.kd import run_kd

LABELS = batch_of(torch.zeros(BATCH, dtype=torch.long))
INFO = DatasetInfo("synthetic", 10, 3, (8, 8), (0.0,) * 3, (1.0,) * 3, tuple(str(i) for i in range(10)))


def pooled_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """A square (B, C, H, H) map averaged over non-overlapping blocks down to (B, C, size, size)."""
    b, c, h, _ = x.shape
    return x.reshape(b, c, size, h // size, size, h // size).mean(dim=(3, 5))


def same_size(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    size = min(a.shape[-1], b.shape[-1])
    return pooled_to(a, size), pooled_to(b, size)


def doubled(outputs: Outputs) -> dict[str, torch.Tensor]:
    """The features as float64 leaves, for the independent computation and its gradients."""
    return {point: value.detach().double().requires_grad_(True) for point, value in outputs.features.items()}


def check(method, term: str, student: Outputs, teacher: Outputs, expected_of) -> None:
    """The method's `term` equals `expected_of(student features, teacher features)` (float64, written from
    the paper) and so do the gradients reaching every student feature."""
    ours = method(student, teacher, LABELS, 30)[term]
    ours.backward()
    reference_features = doubled(student)
    expected = expected_of(reference_features, {p: v.double() for p, v in teacher.features.items()})
    expected.backward()
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)
    for point, feature in student.features.items():
        if feature.grad is not None or reference_features[point].grad is not None:
            torch.testing.assert_close(feature.grad.double(), reference_features[point].grad, rtol=1e-4, atol=1e-9)


def batch_norm_train(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """BatchNorm in training mode by its formula: batch statistics per channel, biased variance."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    scale, shift = bn.weight.detach().double().reshape(1, -1, 1, 1), bn.bias.detach().double().reshape(1, -1, 1, 1)
    return (x - mean) / torch.sqrt(var + bn.eps) * scale + shift


def conv1x1(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    return torch.einsum("oc,bchw->bohw", conv.weight.detach().double()[:, :, 0, 0], x)


def randomise(method: nn.Module, seed: int) -> None:
    """Every parameter (BatchNorm scales and shifts too) away from its initial value."""
    torch.manual_seed(seed)
    for parameter in method.parameters():
        parameter.data = torch.randn_like(parameter)


# ---- NST ----


def test_nst_is_the_polynomial_kernel_mmd_between_channel_maps():
    def mmd(s_feats, t_feats):
        total = 0.0
        for s_point, t_point in PAIRS:
            s, t = same_size(s_feats[s_point], t_feats[t_point])
            for b in range(BATCH):
                fs = [c / c.norm() for c in s[b].flatten(1)]
                ft = [c / c.norm() for c in t[b].flatten(1)]
                k = lambda xs, ys: sum((x @ y) ** 2 for x in xs for y in ys) / (len(xs) * len(ys))
                total = total + (k(ft, ft) + k(fs, fs) - 2 * k(fs, ft)) / BATCH
        return 50.0 * total

    student, teacher = outputs_of(STUDENT, seed=1, requires_grad=True), outputs_of(TEACHER, seed=2)
    check(set_up({"name": "nst"}), "nst", student, teacher, mmd)


# ---- FSP ----

FSP_STUDENT = {"stage1": (3, 4, 4), "stage2": (5, 2, 2)}
FSP_TEACHER = {"stage1": (2, 8, 8), "stage2": (3, 8, 8), "stage3": (5, 4, 4)}  # stages 2, 3 pair with 1, 2


def test_fsp_is_the_squared_difference_of_gram_matrices_between_consecutive_stages():
    def fsp(feats, bottom, top):
        b, t = same_size(feats[bottom], feats[top])
        hw = b.shape[-1] * b.shape[-2]
        return torch.stack([
            torch.stack([torch.stack([(t[n, j] * b[n, i]).sum() / hw for i in range(b.shape[1])]) for j in range(t.shape[1])])
            for n in range(BATCH)
        ])

    def expected(s_feats, t_feats):
        difference = fsp(s_feats, "stage1", "stage2") - fsp(t_feats, "stage2", "stage3")
        return 7.0 * (difference**2).mean()

    method = set_up({"name": "fsp", "weight": 7.0}, FSP_STUDENT, FSP_TEACHER)
    student, teacher = outputs_of(FSP_STUDENT, seed=3, requires_grad=True), outputs_of(FSP_TEACHER, seed=4)
    check(method, "fsp", student, teacher, expected)


@pytest.mark.parametrize(
    "student, message",
    [
        ({"stage1": (3, 4, 4), "stage2": (4, 2, 2)}, "loss=fsp: the student's stage2 has 4 channels, the teacher's stage3 5: "),
        ({"stage1": (5, 4, 4)}, "loss=fsp: needs two stages in both nets (an FSP matrix is the flow between two stage outputs); the student has 1, the teacher 3"),
    ],
    ids=["unequal-channels", "one-stage"],
)
def test_fsp_refuses_what_it_cannot_pair_in_one_line(student, message):
    with pytest.raises(DistillError) as error:
        set_up({"name": "fsp"}, student, FSP_TEACHER)
    assert str(error.value).startswith(message)


# ---- KDSVD ----


def test_kdsvd_compares_rbfs_of_sign_aligned_leading_singular_vectors_across_stages():
    k = 2

    def singular(feature, count):  # per sample: the (C*H, W) matrix; values normalised, unit vectors
        values, vectors = [], []
        for n in range(BATCH):
            matrix = feature[n].reshape(-1, feature.shape[-1])
            _, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)  # the same routine: the same signs
            s, v = s.double()[:count], vh.double().T[:, :count]
            values.append(s / s.norm())
            vectors.append(v / v.norm(dim=0, keepdim=True))
        return values, vectors

    def expected(s_feats, t_feats):
        total, previous = 0.0, None
        for s_point, t_point in PAIRS:
            s_map, t_map = same_size(s_feats[s_point], t_feats[t_point])
            t_values, t_vectors = singular(t_map, k)
            _, s_vectors = singular(s_map, k + 3)
            current = []
            for n in range(BATCH):
                columns = []
                for j in range(t_vectors[n].shape[1]):
                    cosines = [s_vectors[n][:, i] @ t_vectors[n][:, j] for i in range(s_vectors[n].shape[1])]
                    best = max(range(len(cosines)), key=lambda i: abs(cosines[i].item()))
                    columns.append(torch.sign(cosines[best]) * s_vectors[n][:, best])
                student_v = torch.stack(columns, dim=1) * t_values[n]
                current.append((student_v, t_vectors[n] * t_values[n]))
            if previous is not None:
                for n in range(BATCH):
                    rbf = lambda a, b: torch.exp(-((a[:, None, :] - b[None, :, :]) ** 2) / 8)
                    total = total + ((rbf(current[n][0], previous[n][0]) - rbf(current[n][1], previous[n][1])) ** 2).sum() / BATCH
            previous = current
        return 3.0 * total

    method = set_up({"name": "kdsvd", "weight": 3.0, "k": k})
    student, teacher = outputs_of(STUDENT, seed=5, requires_grad=True), outputs_of(TEACHER, seed=6)
    check(method, "kdsvd", student, teacher, expected)


def test_kdsvd_gradient_stays_finite_through_a_map_of_zeros():
    """A sample whose stage map is all zeros (every unit of a ReLU stage off) has repeated singular values:
    SVD's backward divides by zero there. Its non-finite gradient entries are zeroed, the others kept: one
    such map on the CIFAR-10 table's first steps turned the student's weights into NaN."""
    torch.manual_seed(0)
    maps = {"stage1": torch.randn(4, 8, 16, 16).relu(), "stage2": torch.randn(4, 8, 8, 8).relu()}
    maps["stage1"][0] = 0
    student = Outputs(torch.randn(4, 10), {k: v.clone().requires_grad_(True) for k, v in maps.items()})
    teacher = Outputs(torch.randn(4, 10), {"stage1": torch.randn(4, 16, 16, 16).relu(), "stage2": torch.randn(4, 16, 8, 8).relu()})
    build_method({"name": "kdsvd"})(student, teacher, None, 1)["kdsvd"].backward()
    for gradient in (student.features["stage1"].grad, student.features["stage2"].grad):
        assert torch.isfinite(gradient).all() and gradient[1:].abs().sum() > 0


# ---- ICKD ----


def test_ickd_is_the_squared_difference_of_row_normalised_channel_gram_matrices():
    def gram(x):
        flat = x.flatten(2)
        g = flat @ flat.transpose(1, 2)
        return g / g.norm(dim=2, keepdim=True)

    def expected(s_feats, t_feats):
        embedded = batch_norm_train(conv1x1(s_feats["stage2"], method.embed[0]), method.embed[1])
        teacher_map = t_feats["stage3"]
        channels = teacher_map.shape[1]
        return 2.0 * ((gram(embedded) - gram(teacher_map)) ** 2).sum() / (channels * BATCH)

    method = set_up({"name": "ickd", "weight": 2.0})
    randomise(method, 7)
    student, teacher = outputs_of(STUDENT, seed=8, requires_grad=True), outputs_of(TEACHER, seed=9)
    check(method, "ickd", student, teacher, expected)


# ---- SRD ----


def with_teacher(loss: dict, network: nn.Module, student: dict = STUDENT, teacher: dict = TEACHER):
    """`loss`'s method set up with the teacher's `network` (what SRD and OFD copy from it)."""
    return set_up(loss, student, teacher, teacher_network=network, info=INFO)


@pytest.mark.parametrize("term", ["srd_feature", "srd_logits"])
def test_srd_judges_the_connected_student_feature_by_the_teachers_classifier(term):
    classifier = nn.Linear(TEACHER["pooled"][0], 10)
    method = with_teacher({"name": "srd", "feature_weight": 2.0, "logit_weight": 3.0}, nn.Sequential(nn.Flatten(), classifier))
    randomise(method.connector, 10)
    student, teacher = outputs_of(STUDENT, seed=11, requires_grad=True), outputs_of(TEACHER, seed=12)

    def expected(s_feats, t_feats):
        connected = batch_norm_train(conv1x1(s_feats["stage2"], method.connector[0]), method.connector[1]).clamp(min=0)
        feature = connected.mean(dim=(2, 3))
        if term == "srd_feature":
            return 2.0 * ((feature - t_feats["pooled"]) ** 2).mean()
        logits = feature @ classifier.weight.detach().double().T + classifier.bias.detach().double()
        return 3.0 * ((logits - teacher.logits.double()) ** 2).mean()

    check(method, term, student, teacher, expected)


def test_srd_keeps_a_frozen_copy_of_the_teachers_classifier():
    classifier = nn.Linear(TEACHER["pooled"][0], 10)
    method = with_teacher({"name": "srd"}, nn.Sequential(nn.Flatten(), classifier))
    assert torch.equal(method.classifier_weight, classifier.weight.detach())
    assert "classifier_weight" not in dict(method.named_parameters())
    classifier.weight.data.add_(1)
    assert not torch.equal(method.classifier_weight, classifier.weight.detach())


def test_srd_refuses_a_teacher_without_a_final_linear_classifier():
    with pytest.raises(DistillError, match="^loss=srd: the teacher has no final Linear classifier"):
        with_teacher({"name": "srd"}, nn.Sequential(nn.Flatten()))


# ---- OFD ----


def ofd_set_up(weight: float = 1.0):
    """OFD set up on a `cnn` teacher (two stages, each ending in BN -> ReLU) with random BatchNorms, and
    a student of two pre-ReLU points."""
    torch.manual_seed(13)
    network = build_model(ModelConfig("cnn", {"width": 3}), INFO, "teacher")
    for module in network.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data = torch.randn_like(module.weight)
            module.bias.data = torch.randn_like(module.bias) * 2
    teacher = {"preact1": (3, 8, 8), "preact2": (6, 4, 4)}
    student = {"preact1": (4, 4, 4), "preact2": (5, 2, 2)}
    method = with_teacher({"name": "ofd", "weight": weight}, network, student, teacher)
    batch_norms = [m for m in network.modules() if isinstance(m, nn.BatchNorm2d)][1::2]  # each stage's second BN
    return method, student, teacher, batch_norms


def margin_of(gamma: float, beta: float) -> float:
    """E[x | x < 0] for x ~ N(beta, gamma^2), or -3 |gamma| when P(x < 0) <= 0.001 (the paper's margin)."""
    s = abs(gamma)
    below = 0.5 * math.erfc(beta / s / math.sqrt(2))
    if below <= 0.001:
        return -3 * s
    return beta - s * math.exp(-((beta / s) ** 2) / 2) / math.sqrt(2 * math.pi) / below


def test_ofd_margins_are_the_means_of_the_negative_half_of_the_teachers_batch_norm_gaussians():
    method, _, _, batch_norms = ofd_set_up()
    for index, bn in enumerate(batch_norms):
        expected = [margin_of(g, b) for g, b in zip(bn.weight.tolist(), bn.bias.tolist())]
        assert getattr(method, f"margin{index}").tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_ofd_is_the_partial_l2_to_the_teachers_pre_relu_maps_deeper_stages_weighing_more():
    method, student_shapes, teacher_shapes, batch_norms = ofd_set_up(weight=0.5)
    randomise(method.connectors, 14)
    student, teacher = outputs_of(student_shapes, seed=15, requires_grad=True), outputs_of(teacher_shapes, seed=16)
    pairs = [("preact1", "preact1"), ("preact2", "preact2")]

    def expected(s_feats, t_feats):
        total = 0.0
        for index, ((s_point, t_point), connector, bn) in enumerate(zip(pairs, method.connectors, batch_norms)):
            s = batch_norm_train(conv1x1(s_feats[s_point], connector[0]), connector[1])
            s, t = same_size(s, t_feats[t_point])
            margin = torch.tensor([margin_of(g, b) for g, b in zip(bn.weight.tolist(), bn.bias.tolist())], dtype=torch.float64)
            m = margin.reshape(1, -1, 1, 1).expand_as(t)
            # the paper's three cases: teacher below its margin, between margin and 0, positive
            below = (t <= m) & (s > m)
            between = (t > m) & (t <= 0) & (s > t)
            positive = t > 0
            distance = (s - m) ** 2 * below + (s - t) ** 2 * between + (s - t) ** 2 * positive
            total = total + distance.sum() / BATCH / 2 ** (len(pairs) - 1 - index)
        return 0.5 * total

    check(method, "ofd", student, teacher, expected)


def test_ofd_refuses_a_teacher_whose_pre_relu_output_no_batch_norm_makes():
    network = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    with pytest.raises(DistillError, match=r"^loss=ofd: the teacher's preact1 \(its stage output before the ReLU\) is made by no BatchNorm"):
        with_teacher({"name": "ofd"}, network, {"preact1": (4, 8, 8)}, {"preact1": (4, 8, 8)})


# ---- every method here ----


@pytest.mark.parametrize(
    "loss, key",
    [
        ({"name": "nst", "weight": -1.0}, "loss.weight"),
        ({"name": "fsp", "weight": float("nan")}, "loss.weight"),
        ({"name": "kdsvd", "k": 0}, "loss.k"),
        ({"name": "ofd", "weight": -0.1}, "loss.weight"),
        ({"name": "ickd", "weight": float("inf")}, "loss.weight"),
        ({"name": "srd", "logit_weight": -1.0}, "loss.logit_weight"),
    ],
)
def test_bad_hyperparameters_name_the_key(loss, key):
    with pytest.raises(DistillError, match=f"^{key}:"):
        build_method(loss)


@pytest.fixture(scope="module")
def shared_teacher_cache(tmp_path_factory) -> str:
    """One teacher trained for all the runs below (the same recipe: the cache hands it back)."""
    return str(tmp_path_factory.mktemp("teacher_cache"))


@pytest.mark.slow
@pytest.mark.usefixtures("quiet_results")
@pytest.mark.parametrize("method", ["nst", "fsp", "kdsvd", "ofd", "ickd", "srd"])
def test_one_epoch_of_distill_kd_trains_with_the_method_term(tmp_path, method, shared_teacher_cache):
    """A cnn teacher and a cnn student of the same widths (FSP needs equal channel counts), one epoch on
    small synthetic data: finite method terms in metrics.jsonl and a tested student."""
    cfg = small_kd_config(
        tmp_path,
        loss={"name": method},
        alpha=0.0,
        dataset=DatasetConfig(name="synthetic", num_classes=10, channels=3, image_size=8, train_size=64, test_size=16, val_split=0.0),
        student=ModelConfig("cnn", {"width": 8, "blocks": 2}),
        epochs=1,
        teacher_epochs=1,
        baseline=False,
        teacher_cache=shared_teacher_cache,
    )
    summary = run_kd(cfg, tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    terms = {key for line in lines for key in line if key.startswith(f"loss/{method}")}
    assert terms and all(math.isfinite(line[key]) for line in lines for key in terms if key in line)
    assert summary["student"]["test_acc_best"] >= 0

@pytest.mark.parametrize("arch, kwargs", [("cnn", {"width": 4}), ("resnet_cifar", {"depth": 8}), ("vgg", {"depth": 8})])
def test_pre_relu_points_are_the_stage_outputs_before_their_relu(arch, kwargs):
    """`preactN` holds negatives and its ReLU is `stageN`, also for the cnn, whose ReLUs are in place."""
    torch.manual_seed(17)
    network = build_model(ModelConfig(arch, kwargs), INFO, "student").eval()
    extractor = feature_extractor(network, INFO, ["preact1", "stage1", "preact2", "stage2"], "student")
    features = extractor(torch.randn(2, 3, 8, 8))
    for number in (1, 2):
        preact, stage = features[f"preact{number}"], features[f"stage{number}"]
        assert (preact < 0).any()
        torch.testing.assert_close(preact.clamp(min=0), stage)


def test_a_pre_activation_nets_pre_relu_point_is_the_output_of_the_batch_norm_its_stage_feeds():
    """WRN's blocks end without a ReLU: `preactN` is the next BN-ReLU's BatchNorm output (as the OFD authors)."""
    torch.manual_seed(18)
    network = build_model(ModelConfig("wrn", {"depth": 16, "widen_factor": 1}), INFO, "student").eval()
    features = feature_extractor(network, INFO, ["stage1", "preact1", "stage3", "preact3"], "student")(torch.randn(2, 3, 8, 8))
    torch.testing.assert_close(features["preact1"], network.stages[1][0].preact[0](features["stage1"]))
    torch.testing.assert_close(features["preact3"], network.head.pre[0](features["stage3"]))
