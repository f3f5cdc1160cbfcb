"""DIST, NKD, CTKD, WTTM, MLKD, Tf-KD and the logit standardization switch: each loss (value and gradient)
against an independent float64 computation of its paper's formula, the bad inputs, and one short kd run
per method on synthetic data."""

import math

import numpy as np
import pytest
import torch
from conftest import run_distill_in_process, small_kd_config
from test_losses import batch_of

from distill_cli.core.checkpoint import LAST, load_checkpoint
from distill_cli.core.config import ModelConfig
from distill_cli.core.errors import DistillError
from distill_cli.losses.base import MethodContext, Objective, build_method
from distill_cli.models.features import Outputs
from distill_cli.runs.kd import run_kd

CLASSES = 6
LABELS = torch.tensor([0, 5, 2, 2, 1, 3, 4, 0])


def logits(seed: int, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (student, teacher) logits of a batch of 8 over 6 classes, the student's requiring grad."""
    generator = torch.Generator().manual_seed(seed)
    student = (torch.randn(8, CLASSES, generator=generator) * scale).requires_grad_(True)
    return student, torch.randn(8, CLASSES, generator=generator) * scale


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory):
    """One teacher cache for the module's runs: the teacher is trained once."""
    return str(tmp_path_factory.mktemp("teacher_cache"))


def context() -> MethodContext:
    return MethodContext(
        num_classes=CLASSES, num_train=8, train_labels=LABELS, student={}, teacher={}, epochs=10, dataset="synthetic"
    )


def method_terms(loss: dict, student, teacher, epoch: int = 30) -> tuple[torch.nn.Module, dict]:
    method = build_method(loss)
    method.setup(context())
    return method, method(Outputs(student), Outputs(teacher), batch_of(LABELS[: len(student)]), epoch)


def assert_same_value_and_gradient(ours: torch.Tensor, reference: torch.Tensor, student: torch.Tensor) -> None:
    """`ours` (float32) equals `reference` (float64, from the formula), and so do their gradients in `student`."""
    assert ours.dtype == torch.float32
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-7)
    (grad,) = torch.autograd.grad(ours, student, retain_graph=True)
    (expected,) = torch.autograd.grad(reference, student, retain_graph=True)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-7)


def p64(x: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """Softmax at T in float64, from exponentials."""
    e = torch.exp(x.double() / T - (x.double() / T).max(1, keepdim=True).values)
    return e / e.sum(1, keepdim=True)


def kl_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p_i || q_i) of each row."""
    return (p * (p.log() - q.log())).sum(1)


# --- DIST ------------------------------------------------------------------------------------------------


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    da, db = a - a.mean(), b - b.mean()
    return (da * db).sum() / torch.sqrt((da * da).sum() * (db * db).sum())


def test_dist_matches_inter_and_intra_class_pearson_relations():
    student, teacher = logits(0)
    beta, gamma, tau = 1.5, 0.5, 3.0
    _, terms = method_terms({"name": "dist", "beta": beta, "gamma": gamma, "tau": tau}, student, teacher)
    ys, yt = p64(student, tau), p64(teacher, tau)
    inter = 1 - sum(pearson(ys[i], yt[i]) for i in range(8)) / 8
    intra = 1 - sum(pearson(ys[:, c], yt[:, c]) for c in range(CLASSES)) / CLASSES
    assert_same_value_and_gradient(terms["dist_inter"], tau**2 * beta * inter, student)
    assert_same_value_and_gradient(terms["dist_intra"], tau**2 * gamma * intra, student)


def test_dist_is_zero_for_a_student_whose_predictions_are_the_teachers():
    _, teacher = logits(1)
    _, terms = method_terms({"name": "dist"}, teacher.clone(), teacher)
    assert all(abs(value.item()) < 1e-4 for value in terms.values()), terms


# --- NKD -------------------------------------------------------------------------------------------------


def test_nkd_matches_the_target_and_normalised_non_target_cross_entropies():
    student, teacher = logits(2)
    gamma, T = 2.0, 1.5
    _, terms = method_terms({"name": "nkd", "gamma": gamma, "temperature": T}, student, teacher)
    ps, pt = p64(student), p64(teacher)
    target = non_target = 0.0
    for i, y in enumerate(LABELS.tolist()):
        target = target - pt[i, y] * ps[i, y].log()
        rest = [c for c in range(CLASSES) if c != y]
        qs, qt = p64(student[i : i + 1, rest], T)[0], p64(teacher[i : i + 1, rest], T)[0]
        non_target = non_target - (qt * qs.log()).sum()
    assert_same_value_and_gradient(terms["nkd_target"], target / 8, student)
    assert_same_value_and_gradient(terms["nkd_non_target"], gamma * T * T * non_target / 8, student)


# --- WTTM ------------------------------------------------------------------------------------------------


def test_wttm_matches_the_norm_weighted_kl_to_the_power_transformed_teacher():
    student, teacher = logits(3)
    gamma, weight = 0.3, 2.0
    _, terms = method_terms({"name": "wttm", "gamma": gamma, "weight": weight}, student, teacher)
    powered = p64(teacher) ** gamma
    norm = powered.sum(1)
    reference = weight * (norm * kl_rows(powered / norm[:, None], p64(student))).mean()
    assert_same_value_and_gradient(terms["wttm"], reference, student)


def test_wttm_at_gamma_one_is_kd_at_temperature_one():
    student, teacher = logits(4)
    _, terms = method_terms({"name": "wttm", "gamma": 1.0, "weight": 1.0}, student, teacher)
    assert terms["wttm"].item() == pytest.approx(kl_rows(p64(teacher), p64(student)).mean().item(), rel=1e-5)


# --- CTKD ------------------------------------------------------------------------------------------------


def curriculum(epoch: int, epochs: int = 10) -> float:
    """The authors' CosineDecay(max 0, min -1, loops 10).get_value(epoch): the GRL's factor (negative)."""
    i = min(epoch, epochs)
    return (math.cos(i * math.pi / epochs) + 1.0) * 0.5 * (0 - (-1)) + (-1)


@pytest.mark.parametrize("epoch", [1, 4, 30])
def test_ctkd_global_is_kd_at_the_learned_temperature_and_reverses_its_gradient(epoch):
    student, teacher = logits(5)
    method, terms = method_terms({"name": "ctkd"}, student, teacher, epoch)
    (parameter,) = method.parameters()
    x = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)  # the authors' Global_T starts at 1
    tau = 1 + 20 * torch.sigmoid(x)
    reference = 0.9 * tau**2 * kl_rows(p64(teacher, tau), p64(student, tau)).mean()
    assert_same_value_and_gradient(terms["ctkd"], reference, student)
    terms["ctkd"].backward()
    (x_grad,) = torch.autograd.grad(reference, x)
    # the temperature ascends the loss the student descends, scaled by the curriculum
    assert parameter.grad.item() == pytest.approx(curriculum(epoch) * x_grad.item(), rel=2e-3)  # fp32 vs fp64


def test_ctkd_instance_gives_each_sample_its_temperature_from_both_logits():
    student, teacher = logits(6)
    method, terms = method_terms({"name": "ctkd", "variant": "instance", "hidden": 4}, student, teacher, epoch=5)
    mlp = method.temperature_module
    with torch.no_grad():
        tau = 1 + 20 * torch.sigmoid(mlp(torch.cat([teacher, student], 1)).double())  # (8, 1)
    reference = 0.9 * (tau[:, 0] ** 2 * kl_rows(p64(teacher, tau), p64(student, tau))).mean()
    assert_same_value_and_gradient(terms["ctkd"], reference, student)
    terms["ctkd"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mlp.parameters())


# --- MLKD ------------------------------------------------------------------------------------------------


def test_mlkd_matches_the_instance_class_and_batch_terms_with_the_authors_median_masks():
    student, teacher = logits(7)
    # 7 samples, 6 classes: the sample mask keeps 4/7, the class mask 3/6, so a mask mixed up shows
    student, teacher = student[:7].detach().requires_grad_(True), teacher[:7]
    temperatures, weight = (2.0, 4.0), 0.5
    _, terms = method_terms({"name": "mlkd", "weight": weight, "temperatures": list(temperatures)}, student, teacher)
    pt1 = p64(teacher).detach().numpy()
    confidence, class_total = pt1.max(1), pt1.sum(0)
    sample_share = np.mean(confidence <= np.percentile(confidence, 50))
    class_share = np.mean(class_total <= np.percentile(class_total, 50))
    assert sample_share != class_share
    instance = class_level = batch_level = 0.0
    for T in temperatures:
        ps, pt = p64(student, T), p64(teacher, T)
        instance = instance + T * T * kl_rows(pt, ps).mean()
        class_level = class_level + ((pt.t() @ pt - ps.t() @ ps) ** 2).sum() / CLASSES
        batch_level = batch_level + ((pt @ pt.t() - ps @ ps.t()) ** 2).sum() / 7
    assert_same_value_and_gradient(terms["mlkd_instance"], weight * sample_share * instance, student)
    assert_same_value_and_gradient(terms["mlkd_class"], weight * class_share * class_level, student)
    assert_same_value_and_gradient(terms["mlkd_batch"], weight * sample_share * batch_level, student)


# --- Tf-KD -----------------------------------------------------------------------------------------------


def test_tfkd_matches_the_kl_to_the_softened_virtual_teacher_averaged_over_samples_and_classes():
    student, _ = logits(8)
    weight, a, T = 3.0, 0.9, 5.0
    _, terms = method_terms({"name": "tfkd", "weight": weight, "correct_prob": a, "temperature": T}, student, None)
    virtual = torch.full((8, CLASSES), (1 - a) / (CLASSES - 1), dtype=torch.float64)
    virtual[torch.arange(8), LABELS] = a
    reference = weight * kl_rows(p64(virtual, T), p64(student)).sum() / (8 * CLASSES)
    assert_same_value_and_gradient(terms["tfkd"], reference, student)


# --- logit standardization -------------------------------------------------------------------------------


def zscore64(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    mean = x.mean(1, keepdim=True)
    std = torch.sqrt(((x - mean) ** 2).sum(1, keepdim=True) / (x.shape[1] - 1))
    return (x - mean) / std


def test_standardized_kd_is_kd_on_z_scored_logits_and_ce_keeps_the_raw_ones():
    student, teacher = logits(9)
    T, alpha = 2.0, 0.6
    objective = Objective(build_method({"name": "kd", "logit_standardization": True}), T, alpha)
    terms = objective(Outputs(student), Outputs(teacher), batch_of(LABELS), 1)
    ce = torch.nn.functional.cross_entropy(student.double(), LABELS)
    kd = T * T * kl_rows(p64(zscore64(teacher), T), p64(zscore64(student), T)).mean()
    assert_same_value_and_gradient(terms["loss/ce"], (1 - alpha) * ce, student)
    assert_same_value_and_gradient(terms["loss/kd"], alpha * kd, student)


def test_standardization_reaches_a_methods_own_terms_and_removes_the_logits_scale_and_shift():
    student, teacher = logits(10)
    standardized = Objective(build_method({"name": "dkd", "warmup": 0, "logit_standardization": True}), 4.0, 0.0)
    on_z_scores = Objective(build_method({"name": "dkd", "warmup": 0}), 4.0, 0.0)
    batch = batch_of(LABELS)
    terms = standardized(Outputs(student), Outputs(teacher), batch, 1)
    reference = on_z_scores(Outputs(zscore64(student).float()), Outputs(zscore64(teacher).float()), batch, 1)
    moved = standardized(Outputs(student), Outputs(teacher * 7 - 3), batch, 1)
    for term in ("loss/dkd_tckd", "loss/dkd_nckd"):
        assert terms[term].item() == pytest.approx(reference[term].item(), rel=1e-5)
        assert moved[term].item() == pytest.approx(terms[term].item(), rel=1e-4)


def test_standardization_is_off_unless_asked_for():
    assert not build_method({"name": "dist"}).logit_standardization
    assert build_method({"name": "dist", "logit_standardization": True}).logit_standardization


# --- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss, key",
    [
        ({"name": "dist", "beta": -1.0}, "loss.beta"),
        ({"name": "dist", "tau": 0.0}, "loss.tau"),
        ({"name": "nkd", "gamma": float("nan")}, "loss.gamma"),
        ({"name": "nkd", "temperature": -1.0}, "loss.temperature"),
        ({"name": "ctkd", "variant": "local"}, "loss.variant"),
        ({"name": "ctkd", "min_temperature": 0.0}, "loss.min_temperature"),
        ({"name": "ctkd", "curriculum_epochs": -1}, "loss.curriculum_epochs"),
        ({"name": "ctkd", "hidden": 0}, "loss.hidden"),
        ({"name": "wttm", "gamma": 0.0}, "loss.gamma"),
        ({"name": "wttm", "weight": float("inf")}, "loss.weight"),
        ({"name": "mlkd", "temperatures": []}, "loss.temperatures"),
        ({"name": "mlkd", "temperatures": [2.0, -1.0]}, "loss.temperatures"),
        ({"name": "tfkd", "correct_prob": 1.0}, "loss.correct_prob"),
        ({"name": "tfkd", "temperature": 0.0}, "loss.temperature"),
        ({"name": "kd", "logit_standardization": "yes"}, "loss.logit_standardization"),
    ],
)
def test_out_of_range_hyperparameters_name_the_key(loss, key):
    with pytest.raises(DistillError, match=f"^{key}:"):
        build_method(loss)


@pytest.mark.parametrize("name", ["at", "fitnet", "crd", "rkd"])
def test_standardization_is_refused_for_a_method_that_reads_no_logits(name):
    with pytest.raises(DistillError, match=rf"^loss\.logit_standardization: loss={name} reads no logits, there are none to standardize \(logit methods: .*dkd.*kd"):
        build_method({"name": name, "logit_standardization": True})


@pytest.mark.slow
def test_cli_refuses_standardization_for_a_feature_method_in_one_line(tmp_path):
    result = run_distill_in_process("kd", "loss=at", "loss.logit_standardization=true", cwd=tmp_path, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    (error,) = result.stderr.strip().splitlines()
    assert error.startswith("distill kd: error: loss.logit_standardization: loss=at reads no logits")


# --- end to end ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "loss",
    [
        {"name": "dist"},
        {"name": "nkd"},
        {"name": "ctkd"},
        {"name": "wttm"},
        {"name": "mlkd"},
        {"name": "dkd", "logit_standardization": True},
    ],
    ids=["dist", "nkd", "ctkd", "wttm", "mlkd", "dkd_standardized"],
)
def test_each_method_trains_end_to_end_on_synthetic_data(tmp_path, teacher_cache, loss):
    cfg = small_kd_config(
        tmp_path, student=ModelConfig("mlp", {"hidden": [8]}), loss=loss, alpha=0.0, epochs=1, teacher_epochs=1,
        baseline=False, teacher_cache=teacher_cache,
    )
    summary = run_kd(cfg, tmp_path / "run")
    assert 0 <= summary["student"]["test_acc_best"] <= 1
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert f'"loss/{loss["name"]}' in metrics  # the method's own terms were logged
    if loss["name"] == "ctkd":  # its temperature is trained by the student's optimizer and saved with it
        assert summary["student"]["method_params"] == 1
        state = load_checkpoint(tmp_path / "run" / LAST)["training"]["method"]
        (value,) = [v for k, v in state.items() if k.endswith("global_logit")]
        assert value.item() != 1.0


@pytest.mark.slow
def test_tfkd_builds_and_trains_no_teacher_and_is_compared_with_the_student_alone(tmp_path):
    cfg = small_kd_config(tmp_path, loss={"name": "tfkd"}, alpha=0.0, epochs=1)
    summary = run_kd(cfg, tmp_path / "run")
    assert summary["teacher"] is None and summary["teacher_supply"] == "none"
    assert not list((tmp_path / "cache").glob("cnn-*"))  # no teacher (a cnn) trained or cached, the baseline (mlp) is
    assert summary["kd_gain"] == summary["student"]["test_acc_best"] - summary["baseline"]["test_acc_best"]


# --- OFA -------------------------------------------------------------------------------------------------

OFA_STAGES = {"stage1": torch.Size([4, 16, 16]), "stage2": torch.Size([8, 8, 8]), "stage3": torch.Size([16, 4, 4])}


def ofa_reference(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, eps: float, T: float) -> torch.Tensor:
    """The authors' `ofa_loss` (Hao840/OFAKD distillers/ofa.py) in float64: -sum((p_t + y)^eps - y) * log p_s, batch mean."""
    mask = torch.zeros(len(labels), student.shape[1], dtype=torch.float64)
    mask[torch.arange(len(labels)), labels] = 1.0
    weights = (p64(teacher, T) + mask) ** eps - mask
    return (-(weights * p64(student, T).log()).sum(1)).mean()


def ofa_method(**loss) -> torch.nn.Module:
    method = build_method({"name": "ofa", **loss})
    method.setup(MethodContext(num_classes=CLASSES, num_train=8, train_labels=LABELS, student=OFA_STAGES, teacher={}, epochs=10))
    return method


@pytest.mark.parametrize("eps, T", [(1.0, 1.0), (1.5, 1.0), (1.5, 2.0)])
def test_ofa_is_the_authors_enhanced_target_loss_on_the_logits_and_every_stage_exit(eps, T):
    """`ofa_logits` is the authors' loss of the student's logits (value and gradient); `ofa` their loss of each stage
    exit's logits, summed; each term times its weight."""
    torch.manual_seed(0)
    student, teacher = logits(3)
    method = ofa_method(eps=eps, temperature=T, weight=0.5, logits_weight=2.0)
    features = {stage: torch.randn(8, *shape) for stage, shape in OFA_STAGES.items()}
    terms = method(Outputs(student, features), Outputs(teacher), batch_of(LABELS), 1)
    assert_same_value_and_gradient(terms["ofa_logits"], 2.0 * ofa_reference(student, teacher, LABELS, eps, T), student)
    exits = [exit_(features[stage]).detach() for stage, exit_ in zip(OFA_STAGES, method.exits)]
    expected = 0.5 * sum(ofa_reference(exit_logits, teacher, LABELS, eps, T) for exit_logits in exits)
    assert terms["ofa"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_ofa_at_eps_1_is_cross_entropy_with_the_teachers_probabilities():
    student, teacher = logits(4)
    method = ofa_method()
    features = {stage: torch.randn(8, *shape) for stage, shape in OFA_STAGES.items()}
    terms = method(Outputs(student, features), Outputs(teacher), batch_of(LABELS), 1)
    soft_ce = torch.nn.functional.cross_entropy(student, teacher.softmax(1))
    assert terms["ofa_logits"].item() == pytest.approx(soft_ce.item(), rel=1e-6)


def test_ofa_exits_downsample_each_stage_to_the_last_and_train():
    """Stage k of N exits through N - k SepConv downsamplers (channels doubling, the last to the hidden width: the
    student's last stage's, or loss.hidden), the last stage through a 1x1 convolution; every exit's weights and the
    student's stage maps get gradients; a student without stage maps is refused in one line."""
    method = ofa_method()
    downsamplers = [sum(1 for block in exit_ if isinstance(block, torch.nn.Sequential)) for exit_ in method.exits]
    assert downsamplers == [2, 1, 0] and isinstance(method.exits[2][0], torch.nn.Conv2d)
    assert [exit_[-1].in_features for exit_ in method.exits] == [16, 16, 16] and method.exits[0][0][5].out_channels == 8
    assert [exit_[-1].in_features for exit_ in ofa_method(hidden=24).exits] == [24, 24, 24]
    student, teacher = logits(5)
    features = {stage: torch.randn(8, *shape, requires_grad=True) for stage, shape in OFA_STAGES.items()}
    sum(method(Outputs(student, features), Outputs(teacher), batch_of(LABELS), 1).values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())
    assert all(feature.grad.abs().sum() > 0 for feature in features.values())
    with pytest.raises(DistillError, match="^loss=ofa: the student has no stages"):
        build_method({"name": "ofa"}).setup(context())


TOKEN_STAGES = {f"stage{k}": torch.Size([17, 8]) for k in range(1, 7)}  # 6 blocks: a class token, 4 x 4 patches, width 8


def token_method(stages: dict = TOKEN_STAGES, **loss) -> torch.nn.Module:
    method = build_method({"name": "ofa", **loss})
    method.setup(MethodContext(num_classes=CLASSES, num_train=8, train_labels=LABELS, student=stages, teacher={}, epochs=10))
    return method


def test_ofa_exits_on_a_vits_blocks_are_transformer_blocks_on_the_last_block_of_each_quarter():
    """A ViT student's stages are its blocks' token sequences: exits on the last block of each quarter (blocks 1, 3, 4
    and 6 of 6) with 3, 2, 1, 1 transformer blocks; `ofa` is the authors' loss of their logits, summed; every exit
    trains, and only the four blocks read get gradients."""
    torch.manual_seed(0)
    method = token_method(eps=1.5)
    assert method.stages == ["stage1", "stage3", "stage4", "stage6"]
    assert [len(exit_.blocks) for exit_ in method.exits] == [3, 2, 1, 1]
    assert all(exit_.class_tokens == 1 and len(exit_.merges) == 0 for exit_ in method.exits)
    student, teacher = logits(6)
    features = {stage: torch.randn(8, *shape, requires_grad=True) for stage, shape in TOKEN_STAGES.items()}
    terms = method(Outputs(student, features), Outputs(teacher), batch_of(LABELS), 1)
    exits = [exit_(features[stage]).detach() for stage, exit_ in zip(method.stages, method.exits)]
    expected = sum(ofa_reference(exit_logits, teacher, LABELS, 1.5, 1.0) for exit_logits in exits)
    assert terms["ofa"].item() == pytest.approx(expected.item(), rel=1e-5)
    terms["ofa"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())
    assert [features[stage].grad is not None for stage in TOKEN_STAGES] == [True, False, True, True, False, True]


@pytest.mark.parametrize("tokens", [17, 16])
def test_a_token_exit_reads_the_class_token_or_the_mean_of_the_tokens(tokens):
    """The exit has no positions of its own, so with a class token (17 tokens) its logits come from that token and
    do not change when the patches are permuted, but do when the class token changes; an MLP-Mixer's 16 patches
    alone are averaged, in any order."""
    torch.manual_seed(1)
    exit_ = token_method({"stage1": torch.Size([tokens, 8])}).exits[0].eval()
    sequence = torch.randn(2, tokens, 8)
    first = tokens - 16  # the class tokens before the 4 x 4 patches
    permuted = torch.cat([sequence[:, :first], sequence[:, first:].flip(1)], dim=1)
    torch.testing.assert_close(exit_(permuted), exit_(sequence), rtol=1e-5, atol=1e-6)
    if first:
        changed = sequence.clone()
        changed[:, 0] += 1.0
        assert not torch.allclose(exit_(changed), exit_(sequence))


def test_a_token_exit_merges_2x2_patches_down_to_a_grid_of_at_most_7():
    """ImageNet's 14 x 14 patches (and a class token) are merged once, each new token from the 2 x 2 patches (0, 0),
    (1, 0), (0, 1), (1, 1) of its neighbourhood in that order (Swin's patch merging), the class token kept apart;
    8 x 8 patches are not merged; a grid that cannot be halved is refused in one line."""
    exit_ = token_method({"stage1": torch.Size([197, 8])}).exits[0]
    (merging,) = exit_.merges
    seen = []
    merging.norm.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    tokens = torch.randn(2, 197, 8)
    assert exit_(tokens).shape == (2, CLASSES)
    patches = exit_.project(tokens)[:, 1:]
    expected_first = torch.cat([patches[:, 0], patches[:, 14], patches[:, 1], patches[:, 15]], dim=-1)
    assert seen[0].shape == (2, 49, 32)
    torch.testing.assert_close(seen[0][:, 0], expected_first)
    assert len(token_method({"stage1": torch.Size([65, 8])}).exits[0].merges) == 0
    with pytest.raises(DistillError, match=r"^loss=ofa: a token stage's grid of 15 x 15 patches cannot be halved 1 times"):
        token_method({"stage1": torch.Size([226, 8])})
