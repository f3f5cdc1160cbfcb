"""Feature-based KD methods (VID, ReviewKD) against independent computations of their papers' formulas."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import run_distill_in_process, small_kd_config
from test_losses import batch_of
from torch import nn

from distill_cli.core.checkpoint import LAST, load_checkpoint
from distill_cli.core.config import ModelConfig, TeacherConfig
from distill_cli.core.errors import DistillError
from distill_cli.losses.base import MethodContext, build_method
from distill_cli.losses.reviewkd import hierarchical_context_loss
from distill_cli.models.features import Outputs
from distill_cli.runs.kd import run_kd

BATCH = 4
# A student with two stages and a teacher with three: stages pair from the deepest back, so the teacher's
# stage1 is left out, the student's 4x4 stage1 meets the teacher's 2x2 stage2 (the student's map is
# pooled) and the student's 2x2 stage2 meets the teacher's 4x4 stage3 (the teacher's map is pooled).
STUDENT = {"stage1": (3, 4, 4), "stage2": (5, 2, 2), "pooled": (7,)}
TEACHER = {"stage1": (2, 8, 8), "stage2": (4, 2, 2), "stage3": (6, 4, 4), "pooled": (9,)}
PAIRS = [("stage1", "stage2"), ("stage2", "stage3")]
# ReviewKD reads the teacher's stages before their ReLU (`preactN`), paired as above
PREACT_TEACHER = {point.replace("stage", "preact"): shape for point, shape in TEACHER.items()}
REVIEW_PAIRS = [(student, teacher.replace("stage", "preact")) for student, teacher in PAIRS]


def set_up(loss: dict, student: dict = STUDENT, teacher: dict = TEACHER, **more):
    """`loss`'s method, set up for feature points of the shapes `student` / `teacher` (batch axis left out);
    `more`: more `MethodContext` fields (the teacher's network)."""
    method = build_method(loss)
    context = MethodContext(
        num_classes=10,
        num_train=100,
        train_labels=torch.zeros(100, dtype=torch.long),
        student={point: torch.Size(shape) for point, shape in student.items()},
        teacher={point: torch.Size(shape) for point, shape in teacher.items()},
        epochs=1,
        **more,
    )
    method.setup(context)
    return method


def outputs_of(shapes: dict, seed: int, requires_grad: bool = False) -> Outputs:
    """Random features of `shapes` (and logits) for a batch of BATCH."""
    generator = torch.Generator().manual_seed(seed)
    features = {
        point: torch.randn(BATCH, *shape, generator=generator).requires_grad_(requires_grad)
        for point, shape in shapes.items()
    }
    return Outputs(torch.randn(BATCH, 10, generator=generator), features)


def block_mean(x: np.ndarray, size: int) -> np.ndarray:
    """A square (B, C, H, H) array averaged over non-overlapping blocks down to (B, C, size, size)."""
    b, c, h, _ = x.shape
    k = h // size
    return x.reshape(b, c, size, k, size, k).mean(axis=(3, 5))


def to_same_size(student: np.ndarray, teacher: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The larger of two square maps block-averaged to the smaller one's size."""
    size = min(student.shape[-1], teacher.shape[-1])
    return block_mean(student, size), block_mean(teacher, size)


def numpy_of(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().double().numpy()


# ---- VID ----


def test_vid_is_the_gaussian_negative_log_likelihood_of_the_teacher_maps():
    weight, eps = 2.0, 1e-3
    method = set_up({"name": "vid", "weight": weight, "eps": eps})
    torch.manual_seed(1)
    for log_scale in method.log_scales:  # per-channel variances that differ, as after some training
        log_scale.data = torch.randn_like(log_scale)
    student, teacher = outputs_of(STUDENT, seed=2), outputs_of(TEACHER, seed=3)
    expected = 0.0
    for (student_point, teacher_point), regressor, log_scale in zip(PAIRS, method.regressors, method.log_scales):
        s, t = to_same_size(numpy_of(student.features[student_point]), numpy_of(teacher.features[teacher_point]))
        convs = [m for m in regressor.modules() if isinstance(m, nn.Conv2d)]
        assert [tuple(c.weight.shape[:2]) for c in convs] == [(t.shape[1], s.shape[1])] + [(t.shape[1],) * 2] * 2
        assert all(c.bias is None and c.kernel_size == (1, 1) for c in convs)
        mean = s
        for number, conv in enumerate(convs):  # 1x1 convs with a ReLU between them
            mean = np.einsum("oc,bchw->bohw", numpy_of(conv.weight[:, :, 0, 0]), mean)
            mean = np.maximum(mean, 0) if number < len(convs) - 1 else mean
        variance = np.log(1 + np.exp(numpy_of(log_scale))) + eps
        nll = 0.0
        for channel, var in enumerate(variance):
            nll += np.sum(0.5 * ((t[:, channel] - mean[:, channel]) ** 2 / var + np.log(var)))
        expected += nll / t.size
    assert method(student, teacher, batch_of(torch.zeros(BATCH, dtype=torch.long)), 1)["vid"].item() == pytest.approx(
        weight * expected, rel=1e-5
    )


def test_vid_variances_start_at_init_variance():
    method = set_up({"name": "vid", "init_variance": 3.0, "eps": 0.01})
    assert len(method.log_scales) == len(PAIRS)
    for log_scale, (_, teacher_point) in zip(method.log_scales, PAIRS):
        variance = np.log(1 + np.exp(numpy_of(log_scale))) + 0.01
        assert variance.shape == (TEACHER[teacher_point][0],)
        assert variance == pytest.approx(3.0, rel=1e-6)


def test_vid_variances_are_trained_with_the_student_and_saved_in_last_pt(tmp_path, quiet_results):
    """mdistiller keeps VID's log-scales in a plain list: never trained, never saved. Ours are both."""
    cfg = small_kd_config(
        tmp_path,
        loss={"name": "vid"},
        alpha=0.0,
        student=ModelConfig("cnn", {"width": 4, "blocks": 2}),
        epochs=1,
        teacher_epochs=1,
        baseline=False,
    )
    run_kd(cfg, tmp_path / "run")
    method_state = load_checkpoint(tmp_path / "run" / LAST)["training"]["method"]
    log_scales = {name: value for name, value in method_state.items() if "log_scales" in name}
    assert len(log_scales) == 2  # the cnn's two stages
    initial = math.log(math.expm1(5.0 - 1e-5))
    for value in log_scales.values():
        assert value.abs().sum() > 0 and not torch.allclose(value, torch.full_like(value, initial))


# ---- ReviewKD ----


def test_hierarchical_context_loss_weights_levels_below_the_map_size_and_normalises():
    """A constant offset a plus a checkerboard of amplitude b: full-resolution MSE a^2 + b^2, every pooled
    level a^2 (the checkerboard averages out), so HCL = a^2 + b^2 / (sum of the weights of the levels used)."""
    a, b = 0.5, 2.0
    weight_sums = {8: 1 + 1 / 2 + 1 / 4 + 1 / 8, 4: 1 + 1 / 2 + 1 / 4, 2: 1 + 1 / 2, 1: 1.0}
    for size, weight_sum in weight_sums.items():
        rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        checkerboard = (1 - 2 * ((rows + cols) % 2)).float() if size > 1 else torch.zeros(1, 1)
        teacher = torch.randn(2, 3, size, size)
        student = teacher + a + b * checkerboard
        expected = a**2 + (b**2 if size > 1 else 0) / weight_sum
        assert hierarchical_context_loss(student, teacher).item() == pytest.approx(expected, rel=1e-5), size


def hcl_by_blocks(student: np.ndarray, teacher: np.ndarray) -> float:
    """HCL with explicit block means: levels 4, 2, 1 below the map size, weights 1/2, 1/4, 1/8, normalised."""
    size = student.shape[-1]
    levels = [level for level in (4, 2, 1) if level < size]
    weights = [1.0] + [0.5 ** (number + 1) for number in range(len(levels))]
    errors = [np.mean((student - teacher) ** 2)]
    errors += [np.mean((block_mean(student, level) - block_mean(teacher, level)) ** 2) for level in levels]
    return sum(w * e for w, e in zip(weights, errors)) / sum(weights)


def reviewkd_by_hand(method, student: Outputs, teacher: Outputs, pairs=REVIEW_PAIRS) -> float:
    """The knowledge review of the paper, composed step by step from the method's layers: deepest level
    (the pooled feature as a 1x1 map) first; each shallower level blends its reduced student map with the
    deeper level's blend, upsampled by repetition, by sigmoid(1x1 conv) weights; HCL per level, summed."""
    levels = [("pooled", "pooled"), *reversed(pairs)]
    as_map = {2: lambda x: x[:, :, None, None], 4: lambda x: x}
    total, deeper = 0.0, None
    for (student_point, teacher_point), fusion in zip(levels, method.fusions, strict=True):
        feature = student.features[student_point]
        blend = fusion.reduce(as_map[feature.dim()](feature))
        if deeper is None:
            assert fusion.attention is None
        else:
            up = nearest_by_index(deeper, blend.shape[-1])
            conv = fusion.attention[0]
            both = torch.cat([blend, up], dim=1)
            logits = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], both) + conv.bias[None, :, None, None]
            attention = 1 / (1 + torch.exp(-logits))
            blend = blend * attention[:, 0:1] + up * attention[:, 1:2]
        target = as_map[teacher.features[teacher_point].dim()](teacher.features[teacher_point])
        blend = nearest_by_index(blend, target.shape[-1])  # to the teacher's size, before the 3x3 conv
        total += hcl_by_blocks(numpy_of(fusion.project(blend)), numpy_of(target))
        deeper = blend
    return total


def nearest_by_index(x: torch.Tensor, size: int) -> torch.Tensor:
    """Nearest resize of square maps to `size` x `size`: output pixel i takes input pixel floor(i * in / size)."""
    index = torch.arange(size) * x.shape[-1] // size
    return x[:, :, index][:, :, :, index]


# the student's 4x4 stage2 meets the teacher's 2x2 preact2: that level's blend goes on at 2x2, and the next
# (8x8) level upsamples it from there
SHRINKING_STUDENT = {"stage1": (3, 8, 8), "stage2": (5, 4, 4), "pooled": (7,)}
SHRINKING_TEACHER = {"preact1": (2, 8, 8), "preact2": (4, 2, 2), "pooled": (9,)}


@pytest.mark.parametrize(
    "student_shapes, teacher_shapes, pairs",
    [(STUDENT, PREACT_TEACHER, REVIEW_PAIRS), (SHRINKING_STUDENT, SHRINKING_TEACHER, [("stage1", "preact1"), ("stage2", "preact2")])],
    ids=["two-sizes-each-way", "shrunk-then-upsampled"],
)
def test_reviewkd_is_the_hcl_of_attention_fused_student_levels_to_the_teacher(student_shapes, teacher_shapes, pairs):
    weight = 3.0
    method = set_up({"name": "reviewkd", "weight": weight, "warmup_epochs": 20}, student=student_shapes, teacher=teacher_shapes)
    torch.manual_seed(4)
    for parameter in method.parameters():  # BatchNorm scales and shifts too, away from 1 and 0
        parameter.data = torch.randn_like(parameter)
    student, teacher = outputs_of(student_shapes, seed=5), outputs_of(teacher_shapes, seed=6)
    expected = weight * reviewkd_by_hand(method, student, teacher, pairs)
    labels = torch.zeros(BATCH, dtype=torch.long)
    assert method(student, teacher, batch_of(labels), 20)["reviewkd"].item() == pytest.approx(expected, rel=1e-5)


def test_reviewkd_shared_width_is_the_student_pooled_width_capped_at_512():
    assert set_up({"name": "reviewkd"}).fusions[0].reduce[0].out_channels == STUDENT["pooled"][0]
    wide = {**STUDENT, "pooled": (600,)}
    assert set_up({"name": "reviewkd"}, student=wide).fusions[0].reduce[0].out_channels == 512


def test_reviewkd_warms_up_linearly_over_warmup_epochs_counted_from_one():
    student, teacher = outputs_of(STUDENT, seed=7), outputs_of(PREACT_TEACHER, seed=8)
    labels = batch_of(torch.zeros(BATCH, dtype=torch.long))
    method = set_up({"name": "reviewkd", "warmup_epochs": 20}, teacher=PREACT_TEACHER).eval()
    full = method(student, teacher, labels, 20)["reviewkd"].item()
    assert full > 0
    for epoch, factor in [(1, 1 / 20), (10, 0.5), (40, 1.0)]:
        assert method(student, teacher, labels, epoch)["reviewkd"].item() == pytest.approx(factor * full, rel=1e-6)
    without = set_up({"name": "reviewkd", "warmup_epochs": 0}, teacher=PREACT_TEACHER).eval()
    without.load_state_dict(method.state_dict())
    assert without(student, teacher, labels, 1)["reviewkd"].item() == pytest.approx(full, rel=1e-6)


def test_reviewkd_reads_the_teachers_stages_before_their_relu_and_the_students_after():
    """As the authors' code (`preact=True` on the teacher only): what the teacher's ReLU clips (its negative
    `preactN`) moves the loss and its `stageN` do not; the student's `stageN` move it, its `preactN` do not."""
    student_shapes = {**STUDENT, "preact1": STUDENT["stage1"], "preact2": STUDENT["stage2"]}
    method = set_up({"name": "reviewkd"}, student=student_shapes, teacher={**TEACHER, **PREACT_TEACHER})
    student, teacher = outputs_of(student_shapes, seed=11), outputs_of({**TEACHER, **PREACT_TEACHER}, seed=12)
    for number in (1, 2, 3):
        teacher.features[f"stage{number}"] = teacher.features[f"preact{number}"].clamp(min=0)
    labels = batch_of(torch.zeros(BATCH, dtype=torch.long))

    def loss_with(outputs, point, change):
        changed = {**outputs.features, point: change(outputs.features[point])}
        pair = (replace(student, features=changed), teacher) if outputs is student else (student, replace(teacher, features=changed))
        return method(*pair, labels, 20)["reviewkd"].item()

    loss = method(student, teacher, labels, 20)["reviewkd"].item()
    assert loss_with(teacher, "preact3", lambda x: torch.where(x < 0, 2 * x, x)) != pytest.approx(loss, rel=1e-4)
    assert loss_with(teacher, "stage3", lambda x: x + 1) == loss
    assert loss_with(student, "stage2", lambda x: x.flip(0)) != pytest.approx(loss, rel=1e-4)  # BN would undo a shift
    assert loss_with(student, "preact2", lambda x: x.flip(0)) == loss


def test_reviewkd_refuses_a_teacher_without_pre_activation_stages_before_anything_trains(tmp_path):
    """MobileNetV2's stages end in no ReLU (linear bottlenecks): no `preactN` to read."""
    cfg = small_kd_config(
        tmp_path,
        loss={"name": "reviewkd"},
        teacher=TeacherConfig("mobilenetv2", {"width_mult": 0.25}),
        student=ModelConfig("cnn", {"width": 4}),
    )
    with pytest.raises(DistillError, match=r"^loss=reviewkd: teacher=mobilenetv2 has no feature point 'preact1' \(it has: stem, stage1,"):
        run_kd(cfg, tmp_path / "run")
    assert not (tmp_path / "cache").exists()


# ---- every method here ----


@pytest.mark.parametrize(
    "name, teacher_shapes, trainable",
    [
        ("vid", TEACHER, 2 * (3 + 1)),  # per stage pair: three 1x1 convs and the per-channel variances
        ("reviewkd", PREACT_TEACHER, 3 * (1 + 2 + 1 + 2) + 2 * 2),  # per level: two convs + BNs; attention conv but deepest
    ],
)
def test_gradients_reach_every_trainable_part_and_the_student(name, teacher_shapes, trainable):
    method = set_up({"name": name}, teacher=teacher_shapes)
    student, teacher = outputs_of(STUDENT, seed=9, requires_grad=True), outputs_of(teacher_shapes, seed=10)
    method(student, teacher, batch_of(torch.zeros(BATCH, dtype=torch.long)), 20)[name].backward()
    parameters = dict(method.named_parameters())
    assert len(parameters) == trainable
    for parameter_name, parameter in parameters.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, parameter_name
    for point in ("stage1", "stage2"):
        assert student.features[point].grad.abs().sum() > 0, point


@pytest.mark.parametrize(
    "loss, key",
    [
        ({"name": "vid", "weight": -1.0}, "loss.weight"),
        ({"name": "vid", "eps": 0.0}, "loss.eps"),
        ({"name": "vid", "init_variance": float("inf")}, "loss.init_variance"),
        ({"name": "vid", "init_variance": 1e-6}, "loss.init_variance"),  # below eps: no variance reaches it
        ({"name": "reviewkd", "weight": float("nan")}, "loss.weight"),
        ({"name": "reviewkd", "warmup_epochs": -1}, "loss.warmup_epochs"),
    ],
)
def test_bad_hyperparameters_name_the_key(loss, key):
    with pytest.raises(DistillError, match=f"^{key}:"):
        build_method(loss)


@pytest.mark.slow
def test_cli_refuses_vid_for_the_default_mlp_student_in_one_line(tmp_path):
    result = run_distill_in_process("kd", "loss=vid", cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    (error,) = result.stderr.strip().splitlines()
    assert error == "distill kd: error: loss=vid: student=mlp_small has no feature point 'stage1' (it has: pooled)"


def pad_l2_by_hand(student_pooled, teacher_pooled, linear, batch_norm, eps):
    """torchdistill's PADL2Loss over VarianceBranch4PAD (Linear, then BatchNorm1d in training mode), in float64: the
    mean over samples of the mean over dimensions of (t - s)^2 / (eps + exp(log v)) + log v."""
    s, t = student_pooled.double(), teacher_pooled.double()
    hidden = s @ linear.weight.double().T + linear.bias.double()
    mean, variance = hidden.mean(0), hidden.var(0, unbiased=False)
    log_v = (hidden - mean) / torch.sqrt(variance + batch_norm.eps) * batch_norm.weight.double() + batch_norm.bias.double()
    return torch.mean(((t - s) ** 2 / (eps + torch.exp(log_v)) + log_v).mean(1))


@pytest.mark.parametrize("weight, eps", [(1.0, 1e-6), (2.5, 0.1)])
def test_pad_l2_is_torchdistills_padl2loss_over_a_linear_batchnorm_variance_branch(weight, eps):
    """Equal widths (torchdistill's case): no embedding; value and gradients (student feature, the branch) as
    torchdistill computes them, re-typed here in float64."""
    shapes = {"pooled": (6,)}
    method = set_up({"name": "pad_l2", "weight": weight, "eps": eps}, shapes, shapes)
    linear, batch_norm = method.variance
    nn.init.normal_(batch_norm.weight)  # not the identity it starts as, nor a zero mean of log v
    nn.init.normal_(batch_norm.bias)
    student, teacher = outputs_of(shapes, 0, requires_grad=True), outputs_of(shapes, 1)
    term = method(student, teacher, None, 1)["pad_l2"]
    expected = weight * pad_l2_by_hand(student.features["pooled"], teacher.features["pooled"], linear, batch_norm, eps)
    assert isinstance(method.embed, nn.Identity)
    assert term.item() == pytest.approx(expected.item(), rel=1e-5)
    got = torch.autograd.grad(term, [student.features["pooled"], linear.weight])
    wanted = torch.autograd.grad(expected, [student.features["pooled"], linear.weight])
    for a, b in zip(got, wanted):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-6)


def test_pad_l2_weights_the_squared_error_down_where_the_predicted_variance_is_large():
    """With the branch's output fixed at log v, the term is mean((t - s)^2 / (eps + e^log v) + log v): larger variances
    shrink the error's share and cost log v; for one squared error e the term is least at v = e."""
    shapes = {"pooled": (3,)}
    method = set_up({"name": "pad_l2", "eps": 0.0}, shapes, shapes)
    linear, batch_norm = method.variance
    student, teacher = outputs_of(shapes, 0), Outputs(None, {"pooled": outputs_of(shapes, 0).features["pooled"] + 2.0})
    terms = []
    for log_v in (0.0, float(np.log(4.0)), 3.0):
        nn.init.constant_(batch_norm.bias, log_v)
        nn.init.zeros_(batch_norm.weight)
        terms.append(method(student, teacher, None, 1)["pad_l2"].item())
    assert terms[0] == pytest.approx(4.0) and terms[1] == pytest.approx(1 + np.log(4.0), rel=1e-5)
    assert terms[1] < terms[0] and terms[1] < terms[2]


def test_l2_is_the_weighted_mse_of_the_pooled_features_and_embeds_a_narrower_student():
    """l2 (PAD's first stage): weight x MSE of the pooled features; widths 7 -> 9 through a linear layer, which
    pad_l2 shares, its variance branch predicting the teacher's 9 dimensions from the student's 7."""
    student, teacher = outputs_of(STUDENT, 0), outputs_of(TEACHER, 1)
    method = set_up({"name": "l2", "weight": 15.0})
    embedded = method.embed(student.features["pooled"])
    expected = 15.0 * torch.nn.functional.mse_loss(embedded, teacher.features["pooled"])
    assert method(student, teacher, None, 1)["l2"].item() == pytest.approx(expected.item(), rel=1e-6)
    pad = set_up({"name": "pad_l2"})
    assert (pad.embed.in_features, pad.embed.out_features) == (7, 9)
    assert (pad.variance[0].in_features, pad.variance[1].num_features) == (7, 9)
    assert pad(student, teacher, None, 1)["pad_l2"].isfinite()
