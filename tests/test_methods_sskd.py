"""SSKD (Xu et al. 2020): its terms against a re-statement of the authors' `student.py` (rows interleaved as theirs:
image i's rotation r at 4i + r), the step that shows both networks each image with its rotations, the refusals,
and `distill kd loss=sskd` composed from its YAML on the digits (the teacher's head first, then distillation).
The stage's resume is tested with FT's in tests/test_methods_stages.py."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config, read_jsonl, small_kd_config
from test_methods_features import set_up

from distill_cli.core.config import DatasetConfig, KDConfig, ModelConfig, TeacherConfig, validate_config
from distill_cli.core.errors import DistillError
from distill_cli.data import DatasetInfo, load_dataset
from distill_cli.data.loader import Batch
from distill_cli.kd.wiring import wire_kd
from distill_cli.losses.base import ce_weight, kd_loss
from distill_cli.losses.sskd import kept, kept_kl
from distill_cli.models import build_model
from distill_cli.models.features import Outputs
from distill_cli.runs.kd import run_kd
from distill_cli.training.compute import Compute

CPU = Compute(torch.device("cpu"), "fp32", channels_last=None)
B, CLASSES = 4, 10
WIDTHS = {"student": 6, "teacher": 5}


def interleaved(rows: torch.Tensor) -> torch.Tensor:
    """Our (4B, ...) rows in blocks by rotation (image i's rotation r at rB + i) in the authors' order (4i + r)."""
    return rows.reshape(4, B, *rows.shape[1:]).transpose(0, 1).reshape(4 * B, *rows.shape[1:])


def head(module: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Linear - ReLU - Linear in float64 from the module's weights (the authors' `proj_head`)."""
    first, last = module[0], module[2]
    hidden = F.relu(F.linear(x, first.weight.double(), first.bias.double()))
    return F.linear(hidden, last.weight.double(), last.bias.double())


def authors_similarity(feat: torch.Tensor) -> torch.Tensor:
    """student.py: each rotated row's cosine similarity to the batch's images, by broadcasting (3B, D, B)."""
    nor_index, aug_index = torch.arange(4 * B) % 4 == 0, torch.arange(4 * B) % 4 != 0
    nor = feat[nor_index].unsqueeze(2).expand(-1, -1, 3 * B).transpose(0, 2)
    aug = feat[aug_index].unsqueeze(2).expand(-1, -1, B)
    return F.cosine_similarity(aug, nor, dim=1)


def authors_selection(knowledge: torch.Tensor, aug_target: torch.Tensor, ratio: float) -> torch.Tensor:
    """student.py's error-level ranking: the rows kept. The cut must not fall between rows of equal rank (the
    authors' unstable sort would pick among them arbitrarily), asserted; and it drops some rows, but not all wrong ones."""
    rank = torch.argsort(knowledge, dim=1, descending=True)
    rank = torch.argmax(torch.eq(rank, aug_target.unsqueeze(1)).long(), dim=1)
    index = torch.argsort(rank)
    wrong_num = torch.nonzero(rank, as_tuple=True)[0].numel()
    keep = 3 * B - wrong_num + int(wrong_num * ratio)
    assert 3 * B - wrong_num < keep < 3 * B and rank[index[keep - 1]] < rank[index[keep]]
    return torch.sort(index[:keep])[0]


def authors_terms(s_logits, t_logits, s_feat, t_feat, labels, tf_ratio, ss_ratio):
    """student.py's loss3 (tf, T 4) and loss4 (ss, T 0.5), rows interleaved, float64."""
    aug_index = torch.arange(4 * B) % 4 != 0
    log_aug_output = F.log_softmax(s_logits[aug_index] / 4.0, dim=1)
    aug_knowledge = F.softmax(t_logits[aug_index] / 4.0, dim=1)
    tf_rows = authors_selection(aug_knowledge, labels.unsqueeze(1).expand(-1, 3).reshape(-1), tf_ratio)
    s_simi, t_simi = authors_similarity(s_feat), authors_similarity(t_feat)
    ss_rows = authors_selection(t_simi, torch.arange(B).unsqueeze(1).expand(-1, 3).reshape(-1), ss_ratio)
    log_simi, simi_knowledge = F.log_softmax(s_simi / 0.5, dim=1), F.softmax(t_simi / 0.5, dim=1)
    tf = F.kl_div(log_aug_output[tf_rows], aug_knowledge[tf_rows], reduction="batchmean") * 16
    ss = F.kl_div(log_simi[ss_rows], simi_knowledge[ss_rows], reduction="batchmean") * 0.25
    return tf, ss, t_simi


def random_outputs(seed: int, role: str, requires_grad: bool = False) -> Outputs:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(4 * B, CLASSES, generator=generator).requires_grad_(requires_grad)
    pooled = torch.randn(4 * B, WIDTHS[role], generator=generator).requires_grad_(requires_grad)
    return Outputs(logits, {"pooled": pooled})


def sskd(**loss) -> torch.nn.Module:
    method = set_up({"name": "sskd", **loss}, {"pooled": (WIDTHS["student"],)}, {"pooled": (WIDTHS["teacher"],)})
    torch.manual_seed(3)
    for parameter in method.parameters():
        parameter.data = torch.randn_like(parameter)
    return method


def test_tf_and_ss_are_the_authors_terms_on_the_rows_their_ranking_keeps():
    """Values and the gradients reaching the student's logits and pooled feature, with ratios that drop wrong rows."""
    tf_ratio, ss_ratio = 0.5, 0.75  # on these outputs, both cuts fall between ranks (`authors_selection`)
    method = sskd(tf_weight=2.0, ss_weight=3.0, tf_ratio=tf_ratio, ss_ratio=ss_ratio)
    student, teacher = random_outputs(1, "student", requires_grad=True), random_outputs(17, "teacher")
    labels = torch.tensor([1, 5, 5, 9])
    ours = method(student, teacher, Batch(None, labels, torch.arange(B)), 1)
    (ours["sskd_tf"] + ours["sskd_ss"]).backward()

    s_logits, s_pooled = (interleaved(x.detach().double()).requires_grad_(True) for x in (student.logits, student.features["pooled"]))
    tf, ss, _ = authors_terms(
        s_logits, interleaved(teacher.logits.double()), head(method.student_head, s_pooled),
        head(method.teacher_head, interleaved(teacher.features["pooled"].double())), labels, tf_ratio, ss_ratio,
    )
    (2.0 * tf + 3.0 * ss).backward()
    assert ours["sskd_tf"].item() == pytest.approx(2.0 * tf.item(), rel=1e-5)
    assert ours["sskd_ss"].item() == pytest.approx(3.0 * ss.item(), rel=1e-5)
    torch.testing.assert_close(interleaved(student.logits.grad.double()), s_logits.grad, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(interleaved(student.features["pooled"].grad.double()), s_pooled.grad, rtol=1e-4, atol=1e-9)


def scores_ranking_the_target(ranks: list[int]) -> torch.Tensor:
    """(N, 5) scores whose row i ranks its target (column 0) below exactly ranks[i] other entries."""
    return torch.tensor([[0.0] + [1.0] * rank + [-1.0] * (4 - rank) for rank in ranks])


def test_the_rows_kept_are_the_right_ones_then_the_wrong_ones_with_the_target_ranked_highest():
    """Of the wrong rows, floor(wrong * ratio) with the fewest entries above the target, the earlier on a tie; the floor
    exact (the authors' float64 also gives 63 for 75 x 0.84, float32 62); a step keeping no row gives 0, not NaN."""
    scores, targets = scores_ranking_the_target([0, 2, 1, 0, 1, 3]), torch.zeros(6, dtype=torch.long)
    assert kept(scores, targets, 0.5).tolist() == [1, 0, 1, 1, 1, 0]
    assert kept(scores, targets, 0.25).tolist() == [1, 0, 1, 1, 0, 0]
    assert kept(scores, targets, 1.0).tolist() == [1] * 6
    all_wrong, targets = scores_ranking_the_target([1] * 75), torch.zeros(75, dtype=torch.long)
    assert kept(all_wrong, targets, 0.84).tolist() == [1] * 63 + [0] * 12
    assert kept_kl(torch.randn(75, 5), all_wrong, 4.0, kept(all_wrong, targets, 0.0)).item() == 0.0


def test_the_teacher_heads_stage_is_the_cross_entropy_of_its_similarities_to_the_own_image():
    """student.py's ssp_head training: F.cross_entropy(simi, target), no temperature; 60 epochs at 0.05, x0.1 at 30 and 45."""
    method = sskd()
    teacher = random_outputs(4, "teacher")
    stage = method.stage()
    assert (stage.epochs, stage.lr, stage.milestones, stage.trains_student) == (60, 0.05, (0.5, 0.75), False)
    assert stage.parts is method.teacher_head and not any(p.requires_grad for p in method.teacher_head.parameters())
    ours = stage.terms(None, teacher, Batch(None, torch.zeros(B, dtype=torch.long), torch.arange(B)), 1)["sskd_pretext"]
    simi = authors_similarity(head(method.teacher_head, interleaved(teacher.features["pooled"].double())))
    target = torch.arange(B).unsqueeze(1).expand(-1, 3).reshape(-1)
    assert ours.item() == pytest.approx(F.cross_entropy(simi, target).item(), rel=1e-5)


SQUARE = DatasetConfig(name="synthetic", num_classes=CLASSES, channels=3, image_size=8, train_size=8, test_size=4, val_split=0.0)


def rotations_by_hand(images: torch.Tensor) -> torch.Tensor:
    """The batch, then np.rot90 by 1, 2, 3 (the authors' cifar.py, on (H, W)): transpose then flip rows, flip
    both, transpose then flip columns."""
    h, w = -2, -1
    turns = [images, images.transpose(h, w).flip(h), images.flip(h, w), images.transpose(h, w).flip(w)]
    return torch.cat(turns)


def test_the_step_shows_both_networks_each_image_and_its_rotations_with_ce_and_kd_on_the_batchs_own():
    data = load_dataset(SQUARE)
    cfg = KDConfig(teacher=TeacherConfig("cnn", {"width": 4}), student=ModelConfig("cnn", {"width": 6}), loss={"name": "sskd"}, alpha=0.9)
    torch.manual_seed(0)
    teacher = build_model(cfg.teacher, data.info, "teacher").eval().requires_grad_(False)
    wired = wire_kd(cfg, data, CPU, teacher, seed=0)
    method = wired.objective.method
    seen = []
    method.forward = lambda student, teacher, batch, epoch: seen.append((student, teacher)) or {}
    batch = Batch(data.train.images.float() / 255, data.train.labels, torch.arange(8))
    parts, logits = wired.step(batch, 1)
    (student, teacher_out), shown = seen[0], rotations_by_hand(batch.images)
    with torch.no_grad():
        torch.testing.assert_close(teacher_out.logits, teacher(shown), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(student.logits, wired.student(shown), rtol=1e-4, atol=1e-5)  # train mode: 4B batch statistics
    assert logits.shape == (8, CLASSES) and torch.equal(logits, student.logits[:8])  # accuracy: the batch's own images
    assert parts["loss/ce"].item() == pytest.approx(0.1 * F.cross_entropy(student.logits[:8], batch.labels).item(), rel=1e-6)
    assert parts["loss/kd"].item() == pytest.approx(0.9 * kd_loss(student.logits[:8], teacher_out.logits[:8], 4.0).item(), rel=1e-6)
    with wired.stage.training():
        stage_parts, stage_logits = wired.stage_step(batch, 1)  # the teacher's head on the same 4B images
    assert set(stage_parts) == {"loss", "loss/sskd_pretext"}
    torch.testing.assert_close(stage_logits, teacher_out.logits[:8])  # accuracy: the teacher's, on the batch's own images


def test_non_square_images_are_refused_at_set_up_naming_the_method():
    info = DatasetInfo("folder", CLASSES, 3, (8, 6), (0.0,) * 3, (1.0,) * 3, tuple(str(i) for i in range(CLASSES)))
    with pytest.raises(DistillError, match=r"^loss=sskd: rotates each image by 90 degrees, which needs square images; dataset=folder has 8x6$"):
        set_up({"name": "sskd"}, {"pooled": (6,)}, {"pooled": (5,)}, info=info, dataset="folder")


@pytest.mark.parametrize(
    "loss, key",
    [({"tf_ratio": 1.5}, "loss.tf_ratio"), ({"ss_ratio": -0.1}, "loss.ss_ratio"), ({"ss_temperature": 0.0}, "loss.ss_temperature"),
     ({"init_epochs": -1}, "loss.init_epochs")],
)
def test_bad_hyperparameters_name_the_key(loss, key):
    with pytest.raises(DistillError, match=f"^{key}:"):
        set_up({"name": "sskd", **loss}, {"pooled": (6,)}, {"pooled": (5,)})


@pytest.mark.usefixtures("quiet_results")
def test_distill_kd_loss_sskd_trains_the_teachers_head_then_distils_on_the_digits(tmp_path):
    """The composed config has the published defaults (CE 0.1, KD 0.9 at T 4); two stage epochs (lr 0.05, then x0.1)
    and one of distillation with every term, into <run>/pretrain and the run."""
    cfg = validate_config("kd", compose_config("kd", ["loss=sskd"]))
    assert (cfg.alpha, cfg.T, ce_weight(cfg.loss, cfg.alpha)) == (0.9, 4.0, pytest.approx(0.1))
    assert cfg.loss == {"name": "sskd", "tf_weight": 2.7, "ss_weight": 10.0, "tf_temperature": 4.0, "ss_temperature": 0.5,
                        "tf_ratio": 1.0, "ss_ratio": 0.75, "init_epochs": 60, "init_lr": 0.05, "logit_standardization": False}
    small = small_kd_config(tmp_path, student=ModelConfig("cnn", {"width": 4}), teacher_epochs=1, baseline=False, epochs=1)
    run = replace(small, loss={**cfg.loss, "init_epochs": 2}, alpha=cfg.alpha)
    summary = run_kd(run, tmp_path / "run")
    stage = read_jsonl(tmp_path / "run" / "pretrain" / "metrics.jsonl")
    assert [(line["epoch"], line["lr"]) for line in stage] == [(1, 0.05), (2, pytest.approx(0.005))]
    assert stage[-1]["loss/sskd_pretext"] < stage[0]["loss/sskd_pretext"]
    main = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert {"loss/ce", "loss/kd", "loss/sskd_tf", "loss/sskd_ss"} <= main[0].keys() and "loss/sskd_pretext" not in main[0]
    assert summary["pretrain"]["epochs"] == 2 and summary["teacher_supply"] == "live"
