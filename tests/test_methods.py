"""Every KD method, through the wiring `distill kd` uses (`distill_cli.kd.wiring`): training steps on each model
family, every trainable part reached by gradients, fp32 terms from low-precision outputs."""

import copy
import os
import signal
from dataclasses import replace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from conftest import (
    comparable_results,
    metrics_without_timing,
    on_training_step,
    small_kd_config,
)

from distill_cli.core.checkpoint import LAST, load_checkpoint
from distill_cli.core.config import DatasetConfig, KDConfig, ModelConfig, TeacherConfig
from distill_cli.core.errors import DistillError, Interrupted
from distill_cli.core.world import World
from distill_cli.data import Augment, load_dataset
from distill_cli.data.loader import Batch
from distill_cli.kd import objective as objective_module
from distill_cli.kd.teachers import CACHED, LIVE, VIEWS, teacher_supply
from distill_cli.kd.wiring import Link, check_kd, wire_kd
from distill_cli.losses import LOSSES
from distill_cli.losses.base import build_method
from distill_cli.models import build_model
from distill_cli.models.features import Outputs
from distill_cli.runs.kd import run_kd
from distill_cli.training.compute import Compute
from distill_cli.training.optim import build_optimizer

CPU = Compute(torch.device("cpu"), "fp32", channels_last=None)
METHODS = LOSSES.names()
# teacher -> student pairs covering every zoo family, also across families (other stage counts and widths)
PAIRS = {
    "resnet": ("resnet_cifar", {"depth": 14}, "resnet_cifar", {"depth": 8}),
    "wrn": ("wrn", {"depth": 16, "widen_factor": 2}, "wrn", {"depth": 16, "widen_factor": 1}),
    "vgg": ("vgg", {"depth": 11}, "vgg", {"depth": 8}),
    "mobilenetv2": ("resnet_cifar", {"depth": 8}, "mobilenetv2", {}),
    "shufflenet": ("resnet_cifar", {"depth": 8}, "shufflenetv1", {}),
    # a 4-stage bottleneck teacher (ResNet50's design, one block a stage) for a 3-stage student
    "bottleneck": ("resnet_bottleneck", {"blocks": [1, 1, 1, 1], "stem": 16}, "resnet_cifar", {"depth": 8}),
}
THREE_STAGE = [family for family in PAIRS if family != "bottleneck"]
# refused before training, in one line: FSP compares Gram matrices channel by channel (these pairs pair
# stages of different widths); OFD and AB read pre-ReLU stage outputs, which MobileNetV2's linear bottlenecks lack
REFUSED = {
    **{("fsp", family): r"^loss=fsp: the student's stage\d has \d+ channels, the teacher's" for family in ("wrn", "mobilenetv2", "shufflenet")},
    **{(m, "mobilenetv2"): rf"^loss={m}: student=mobilenetv2 has no feature point 'preact1' \(it has: stem, stage1, " for m in ("ofd", "ab")},
}


@pytest.fixture(scope="module")
def data():
    """A small synthetic 3x8x8, 10-class dataset."""
    return load_dataset(
        DatasetConfig(name="synthetic", num_classes=10, channels=3, image_size=8, train_size=64, test_size=16, val_split=0.0)
    )


def _config(method: str, teacher=("resnet_cifar", {"depth": 8}), student=("resnet_cifar", {"depth": 8}), **overrides):
    loss = {"name": method}
    return KDConfig(
        teacher=TeacherConfig(arch=teacher[0], kwargs=teacher[1]),
        student=ModelConfig(arch=student[0], kwargs=student[1]),
        loss=loss,
        **overrides,
    )


def _wired(cfg: KDConfig, data, compute: Compute = CPU):
    """The student, objective and kd step `distill kd` wires (`wire_kd`) with an untrained teacher."""
    torch.manual_seed(0)
    teacher = compute.place(build_model(cfg.teacher, data.info, "teacher")).eval().requires_grad_(False)
    wired = wire_kd(cfg, data, compute, teacher, seed=0)
    return wired.student, wired.objective, wired.step


def _batch(data, size: int = 8, start: int = 0) -> Batch:
    index = torch.arange(start, start + size)
    images = (data.train.images[index].float() / 255 - 0.5) / 0.25
    return Batch(images.contiguous(memory_format=torch.channels_last), data.train.labels[index], index)


# feature methods on every family; a method that reads only logits (every family has them) on one
LOGIT_ONLY = [m for m in METHODS if not build_method({"name": m}).student_points]
# AB's term trains the student before distillation only (its stage: tests/test_methods_stages.py): here its
# main step is cross-entropy on any family, so it runs on one, and on MobileNetV2, which it refuses
FAMILIES_OF = {
    **{m: ["resnet"] for m in LOGIT_ONLY}, "ab": ["resnet", "mobilenetv2"],
    # the bottleneck teacher with methods that read every stage or its pre-ReLU sums, paired from the deepest
    **{m: [*THREE_STAGE, "bottleneck"] for m in ("at", "ofd", "reviewkd")},
}
METHOD_FAMILIES = [(m, f) for m in METHODS for f in FAMILIES_OF.get(m, THREE_STAGE)]


@pytest.mark.parametrize("method, family", METHOD_FAMILIES)
def test_two_training_steps_on_every_model_family(method, family, data):
    """Finite terms that sum to the loss, and every trainable weight of student and method moved."""
    teacher_arch, teacher_kwargs, student_arch, student_kwargs = PAIRS[family]
    cfg = _config(method, (teacher_arch, teacher_kwargs), (student_arch, student_kwargs), alpha=0.5)
    if (method, family) in REFUSED:
        with pytest.raises(DistillError, match=REFUSED[method, family]):
            _wired(cfg, data)
        return
    student, objective, step = _wired(cfg, data)
    trained = torch.nn.ModuleList([student, objective])
    before = copy.deepcopy(trained.state_dict())
    optimizer = build_optimizer(trained, cfg.optimizer, CPU.device)
    student.train()
    for number, epoch in enumerate((1, 30)):  # epoch 30: past every warm-up
        parts, logits = step(_batch(data, start=8 * number), epoch)
        assert all(torch.isfinite(value) for value in parts.values()), parts
        assert parts["loss"].item() == pytest.approx(sum(v.item() for k, v in parts.items() if k != "loss"), rel=1e-5)
        assert logits.shape == (8, 10)
        optimizer.zero_grad()
        parts["loss"].backward()
        optimizer.step()
    # AB's term trains the student before distillation only (its stage: tests/test_methods_stages.py)
    assert method in ("kd", "ab") or parts.keys() - {"loss", "loss/ce", "loss/kd"}, "the method adds a term of its own"
    stuck = [
        name
        for name, p in trained.named_parameters()
        if p.requires_grad and torch.equal(p.detach(), before[name])
    ]
    assert not stuck, f"not trained: {stuck}"


@pytest.mark.parametrize("method", METHODS)
def test_every_kd_step_can_be_captured_in_a_cuda_graph(method, data):
    """The whole kd step, forward and backward, on fake tensors with static shapes: an op whose output shape depends
    on the values (boolean-mask indexing) or that reads a value on the host (`.item()`, F.one_hot's range check)
    raises here, as it breaks a CUDA graph's capture (device.cuda_graphs). DKD, NKD, RKD and TFKD did, found on an
    H200: their steps ran eagerly under `auto`."""
    _, _, step = _wired(_config(method, alpha=0.5), data)
    with FakeTensorMode(allow_non_fake_inputs=True):
        parts, _ = step(_batch(data), 30)
        parts["loss"].backward()


def test_ofas_exits_on_a_vits_blocks_can_be_captured_in_a_cuda_graph_too(data):
    """OFA's token exits (patch merging, transformer blocks, the class token) on a timm ViT student, the whole kd step
    on fake tensors as above."""
    pytest.importorskip("timm")
    vit = ("timm", {"name": "vit_tiny_patch16_224", "model_args": {"img_size": 8, "patch_size": 2, "depth": 2, "embed_dim": 32, "num_heads": 2}})
    _, objective, step = _wired(_config("ofa", student=vit, alpha=0.5), data)
    assert [len(exit_.blocks) for exit_ in objective.method.exits] == [1, 1]
    with FakeTensorMode(allow_non_fake_inputs=True):
        parts, _ = step(_batch(data), 30)
        parts["loss"].backward()


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_every_trainable_part_of_the_method(method, data):
    _, objective, step = _wired(_config(method, alpha=0.0), data)
    parts, _ = step(_batch(data), 30)
    parts["loss"].backward()
    parts_of_method = [(name, p) for name, p in objective.named_parameters() if p.requires_grad]
    missing = [name for name, p in parts_of_method if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"{method}: no gradient for {missing}"


@pytest.mark.parametrize("method", METHODS)
def test_every_term_is_fp32_from_low_precision_outputs(method, data):
    """Autocast hands a loss bf16/fp16 logits and features: every term must be computed in fp32 from
    them, equal to the fp32 computation on the same (rounded) values. Both dtypes share one wiring. The networks
    run on the images a step shows them (`Method.step_images`: SSKD's rotations too)."""
    cfg = _config(method, alpha=0.5)
    student, objective, _ = _wired(cfg, data)
    batch = _batch(data)
    with torch.no_grad():
        forward = CPU.outputs(student, data.info, objective.method.student_points)
        teacher_model = build_model(cfg.teacher, data.info, "teacher").eval()
        teacher_forward = CPU.frozen_forward(teacher_model, points=objective.method.teacher_points, info=data.info)
        images = objective.method.step_images(batch.images)
        s, t = forward(images), teacher_forward(images)

    def rounded(outputs: Outputs, dtype, to) -> Outputs:
        return Outputs(outputs.logits.to(dtype).to(to), {k: v.to(dtype).to(to) for k, v in outputs.features.items()})

    def terms(dtype, precision):  # the same random draws (CRD's negatives) and method state for both
        torch.manual_seed(0)
        return copy.deepcopy(objective)(rounded(s, dtype, precision), rounded(t, dtype, precision), batch, 30)

    for dtype in (torch.bfloat16, torch.float16):
        low, reference = terms(dtype, dtype), terms(dtype, torch.float32)
        assert low.keys() == reference.keys()
        for name, value in low.items():
            assert value.dtype == torch.float32, (dtype, name)
            assert value.item() == pytest.approx(reference[name].item(), rel=1e-5, abs=1e-6), (dtype, name)


@pytest.mark.parametrize("role", ["student", "teacher"])
@pytest.mark.parametrize("method", [m for m in METHODS if build_method({"name": m}).student_points])
def test_feature_methods_refuse_a_network_without_feature_maps_naming_it(method, role, data):
    """An MLP has no stages (only `pooled`): a method reading its stages names the method, the role and the model."""
    mlp, cnn = ("mlp", {"hidden": [8]}), ("cnn", {"width": 4})
    cfg = _config(method, teacher=mlp if role == "teacher" else cnn, student=mlp if role == "student" else cnn)
    method_of = build_method({"name": method})
    points = method_of.student_points if role == "student" else method_of.teacher_points
    reads_stages = any(p.startswith("stage") or p.endswith("stage") or p in ("stages", "preacts") for p in points)
    if not reads_stages:  # pooled-only methods work with MLPs
        _wired(cfg, data)
        return
    with pytest.raises(DistillError, match=rf"^loss={method}: {role}=mlp has no feature point '(stage|preact)\d' \(it has: pooled\)$"):
        _wired(cfg, data)


@pytest.mark.parametrize("method", METHODS)
def test_teacher_logits_are_cached_only_for_methods_that_read_logits_alone(method, data):
    _, objective, _ = _wired(_config(method), data)
    logits_only = not objective.method.teacher_points
    assert (teacher_supply(_config(method), None) == CACHED) == logits_only
    crop_and_flip = Augment(pad=1, flip=True)  # 18 views an image: stored when the method reads logits alone
    assert teacher_supply(_config(method), crop_and_flip, 100, 10) == (VIEWS if logits_only else LIVE)
    assert teacher_supply(_config(method), Augment(pad=1, color_jitter=0.2), 100, 10) == LIVE  # views not enumerable
    if not logits_only:
        for cache in ("true", "views"):
            with pytest.raises(DistillError, match=f"cache_teacher={cache}: loss={method} reads the teacher's features"):
                teacher_supply(_config(method, cache_teacher=cache), crop_and_flip if cache == "views" else None, 100, 10)


# the methods that compare the samples of a batch with each other (CRD compares each sample with its memory
# banks: a batch of one has its negatives there; DIST correlates each class over the batch; SSKD each rotated
# image with the batch's images)
BATCH_RELATIONAL = ["rkd", "cc", "sp", "pkt", "dist", "sskd"]
SMALL_CNN = ("cnn", {"width": 4})  # quick to build, with stages and a pooled feature


def _check(method: str, data, compute: Compute = CPU, **changes) -> None:
    """The check before training (`check_kd`) of `method` between two small cnns, with the config `changes`."""
    cfg = replace(_config(method, teacher=SMALL_CNN, student=SMALL_CNN), **changes)
    check_kd([Link(cfg)], data, compute, augment=None)


def test_only_the_batch_relational_methods_need_two_samples_a_batch():
    assert sorted(m for m in METHODS if build_method({"name": m}).min_batch > 1) == sorted(BATCH_RELATIONAL)


@pytest.mark.parametrize("method", BATCH_RELATIONAL)
def test_a_batch_of_one_is_refused_by_the_check_before_training_naming_the_method(method, data):
    with pytest.raises(DistillError, match=rf"^batch_size=1: loss={method} compares the samples of a batch with each other and needs batch_size >= 2$"):
        _check(method, data, batch_size=1)
    _check(method, data, batch_size=2)


def test_the_smallest_batch_is_per_process_under_data_parallel_training(data):
    two_processes = replace(CPU, world=World(rank=1, size=2))  # each takes batch_size samples of a step's 2 x batch_size
    with pytest.raises(DistillError, match=r"needs batch_size >= 2, per process: each of the 2 processes steps on batch_size samples$"):
        _check("rkd", data, two_processes, batch_size=1)


@pytest.mark.parametrize(
    "method, changes, parts",
    [
        ("crd", {"loss": {"name": "crd", "negatives": 10**9}},
         r"2 memory banks of 64 x loss\.embed_dim=128 floats and a step's copies: 128\.0 KiB; "
         r"a step's batch_size=64 x \(1 \+ loss\.negatives=1000000000\) scores: 3\.7 TiB"),
        ("rkd", {"batch_size": 4096}, r"a step's angles and distances of batch_size=4096 samples \(4096\^3 \+ 4096\^2 x 16 entries\): 771\.0 GiB"),
    ],
)
def test_a_method_that_would_not_fit_the_free_memory_is_refused_with_the_figure_and_the_limit(method, changes, parts, data, monkeypatch):
    monkeypatch.setattr(objective_module, "available_bytes", lambda device: 2**30)
    with pytest.raises(DistillError, match=rf"^loss={method} would hold ~[\d.]+ [GT]iB \({parts}\), more than the 1\.0 GiB free on cpu$"):
        _check(method, data, **changes)
    _check(method, data)  # at the published defaults it fits


def test_method_parts_sit_on_the_objective_and_build_with_published_defaults():
    for method in METHODS:
        assert build_method({"name": method}).needs_teacher == (method not in ("kd", "tfkd"))


@pytest.mark.usefixtures("quiet_results")
@pytest.mark.parametrize(
    "loss",
    [{"name": "fitnet"}, {"name": "crd", "negatives": 64}],  # a connector; embeddings, memory banks, normaliser
    ids=["fitnet", "crd"],
)
def test_an_interrupted_method_run_resumes_exactly(tmp_path, monkeypatch, loss):
    """SIGINT mid-epoch, then `resume=true`: the same metrics, student and method state (trainable parts,
    buffers) as the run never stopped, on the CPU."""
    cfg = small_kd_config(
        tmp_path, student=ModelConfig("cnn", {"width": 4}), loss=loss, alpha=0.0, teacher_epochs=1, baseline=False
    )
    reference = run_kd(cfg, tmp_path / "reference")
    on_training_step(monkeypatch, 25, lambda parts: os.kill(os.getpid(), signal.SIGINT) or parts, factory="kd_step")
    with pytest.raises(Interrupted):
        run_kd(cfg, tmp_path / "run")
    assert load_checkpoint(tmp_path / "run" / LAST)["training"]["partial"]["steps"] == 5  # epoch 2, step 5 of 20
    monkeypatch.undo()
    resumed = run_kd(replace(cfg, resume=True), tmp_path / "run")
    assert metrics_without_timing(tmp_path / "run") == metrics_without_timing(tmp_path / "reference")
    assert comparable_results(resumed)["student"] == comparable_results(reference)["student"]
    method_states = [load_checkpoint(folder / LAST)["training"]["method"] for folder in (tmp_path / "reference", tmp_path / "run")]
    assert method_states[0].keys() == method_states[1].keys() and method_states[0]
    assert all(torch.equal(method_states[0][key], method_states[1][key]) for key in method_states[0])
