"""The device and stream pipelines, cached teacher logits and the kernel switches."""

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import (
    metrics_without_timing,
    run_distill_in_process,
    small_kd_config,
    small_train_config,
    write_image_tree,
)

from distill_cli.core.config import (
    DatasetConfig,
    DeviceConfig,
    OptimizerConfig,
    TeacherConfig,
)
from distill_cli.core.errors import DistillError
from distill_cli.data import Augment, DatasetInfo, Split, load_dataset
from distill_cli.data.augment import augment_one
from distill_cli.data.imagefolder import FileSplit
from distill_cli.data.loader import DeviceLoader, StreamLoader, choose_pipeline
from distill_cli.models import build_model
from distill_cli.models.cnn import cnn
from distill_cli.runs.kd import run_kd
from distill_cli.runs.train import run_train
from distill_cli.training.compute import Compute
from distill_cli.training.optim import build_optimizer

CPU = torch.device("cpu")
INFO = DatasetInfo("toy", 3, 1, (8, 8), mean=(0.5,), std=(0.25,), class_names=("a", "b", "c"))


def _numbered(n: int = 50) -> Split:
    """Images whose pixels spell out their own number (and a gradient, so flips and crops show)."""
    ramp = torch.arange(64, dtype=torch.uint8).view(1, 1, 8, 8)
    images = (torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1) + ramp) % 251
    return Split(images, torch.arange(n) % 3)


def _batches(loader) -> list[tuple]:
    return [(b.images.clone(), b.labels.clone(), b.index.clone()) for b in loader]


def _same_batches(a: list[tuple], b: list[tuple]) -> bool:
    return len(a) == len(b) and all(all(torch.equal(x, y) for x, y in zip(p, q)) for p, q in zip(a, b))


# ---------------------------------------------------------------- per-sample augmentation


def test_per_sample_augmentation_is_pad_then_slice_and_flip():
    image = torch.randint(0, 256, (3, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(image, (2,) * 4)
    windows = {tuple(padded[:, r : r + 6, c : c + 6].flatten().tolist()) for r in range(5) for c in range(5)}
    mirrored = {tuple(torch.tensor(w).view(3, 6, 6).flip(2).flatten().tolist()) for w in windows}
    outputs = [augment_one(image, Augment(pad=2, flip=True), torch.Generator().manual_seed(s)) for s in range(400)]
    seen = {tuple(o.flatten().tolist()) for o in outputs}
    assert all(o.shape == image.shape and o.dtype == torch.uint8 for o in outputs)
    assert seen <= windows | mirrored  # every view is a padded window, maybe mirrored
    assert len(seen) > 40  # and they vary (25 windows x 2 flips)


# ---------------------------------------------------------------- both pipelines augment alike

PIPELINES = {"device": DeviceLoader, "stream": StreamLoader}
VIEWS = 4000  # images per statistic: shares within about +-0.02 of the expected ones


def _views(pipeline: str, images: torch.Tensor, augment: Augment) -> torch.Tensor:
    """The uint8 views that one epoch of `pipeline`'s loader hands out for `images`, in order."""
    n, channels = images.shape[:2]
    info = DatasetInfo("views", 1, channels, tuple(images.shape[2:]), (0.0,) * channels, (1 / 255,) * channels, ("a",))
    options = {"workers": 0} if pipeline == "stream" else {}
    split = Split(images, torch.zeros(n, dtype=torch.int64))
    (batch,) = PIPELINES[pipeline](split, info, n, CPU, seed=0, augment=augment, **options)
    views = batch.images.round().to(torch.uint8)  # normalised with mean 0, std 1/255: the pixels themselves
    assert views.shape == images.shape
    return views


def _dot_images(n: int, size: int = 8) -> torch.Tensor:
    """Images with a single bright pixel at the centre, to read crop offsets back."""
    images = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    images[:, :, size // 2, size // 2] = 255
    return images


def test_both_pipelines_crop_at_uniform_offsets_within_the_padding():
    """RandomCrop(padding=pad): each (row, column) offset in -pad..pad equally likely, in both pipelines."""
    pad, cells = 2, 25
    shares = {}
    for pipeline in PIPELINES:
        views = _views(pipeline, _dot_images(VIEWS), Augment(pad=pad))
        assert set(views.unique().tolist()) == {0, 255} and ((views == 255).flatten(1).sum(1) == 1).all()  # the dot, once
        where = views.flatten(1).argmax(1)
        rows, cols = where // 8 - 4, where % 8 - 4
        assert rows.abs().max() <= pad and cols.abs().max() <= pad
        shares[pipeline] = torch.bincount((rows + pad) * (2 * pad + 1) + cols + pad, minlength=cells).float() / VIEWS
        assert torch.allclose(shares[pipeline], torch.full((cells,), 1 / cells), atol=0.015), pipeline
    assert torch.allclose(shares["device"], shares["stream"], atol=0.02)


def test_both_pipelines_flip_half_the_images():
    """RandomHorizontalFlip(0.5): an exact mirror image, half the time, in both pipelines."""
    ramp = torch.arange(4, dtype=torch.uint8).view(1, 1, 1, 4).repeat(VIEWS, 1, 1, 1)
    rates = {}
    for pipeline in PIPELINES:
        views = _views(pipeline, ramp, Augment(flip=True))
        flipped = views[:, 0, 0, 0] == 3
        assert torch.equal(views[flipped], ramp[flipped].flip(3)) and torch.equal(views[~flipped], ramp[~flipped])
        rates[pipeline] = flipped.float().mean().item()
        assert 0.47 < rates[pipeline] < 0.53, pipeline
    assert abs(rates["device"] - rates["stream"]) < 0.04


# two colours, in the left and right halves, chosen so that no factor in [0.6, 1.4] clips a pixel
JITTER_COLOURS = torch.tensor([[120.0, 150.0, 80.0], [60.0, 75.0, 40.0]])
LUMA = torch.tensor([0.299, 0.587, 0.114])


def _two_colour_images(n: int) -> torch.Tensor:
    images = torch.empty(n, 3, 4, 4, dtype=torch.uint8)
    images[..., :2] = JITTER_COLOURS[0].to(torch.uint8).view(3, 1, 1)
    images[..., 2:] = JITTER_COLOURS[1].to(torch.uint8).view(3, 1, 1)
    return images


def _jitter_factors(views: torch.Tensor) -> torch.Tensor:
    """The (brightness, contrast, saturation) factors, one row per view of `_two_colour_images`, read back.

    Brightness scales the luma; contrast then scales the luma difference of the two halves about their
    mean; saturation then scales each pixel's distance from its own luma (which it keeps).
    """
    pixels = views[..., 0, ::2].float().transpose(1, 2)  # (n, half, channel)
    luma = pixels @ LUMA
    source_luma = JITTER_COLOURS @ LUMA
    brightness = luma.mean(1) / source_luma.mean()
    contrast = (luma[:, 0] - luma[:, 1]) / (brightness * (source_luma[0] - source_luma[1]))
    colour, source_colour = pixels - luma[..., None], JITTER_COLOURS - source_luma[:, None]
    saturation = (colour * source_colour).sum((1, 2)) / (brightness * contrast * source_colour.square().sum())
    return torch.stack([brightness, contrast, saturation], dim=1)


def test_both_pipelines_draw_the_same_colour_jitter_factors():
    """ColorJitter(s, s, s): brightness, contrast and saturation factors independent and uniform over [1 - s, 1 + s]."""
    strength, levels = 0.4, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    quantiles = {}
    for pipeline in PIPELINES:
        factors = _jitter_factors(_views(pipeline, _two_colour_images(VIEWS), Augment(color_jitter=strength)))
        # the full range and no more, up to the rounding to uint8 (worst for saturation at low brightness x contrast)
        low, high = factors.min(0).values, factors.max(0).values
        assert torch.allclose(low, torch.full((3,), 1 - strength), atol=0.05), (pipeline, low)
        assert torch.allclose(high, torch.full((3,), 1 + strength), atol=0.05), (pipeline, high)
        quantiles[pipeline] = torch.quantile(factors, levels, dim=0)  # (level, factor)
        uniform = (1 - strength + 2 * strength * levels)[:, None].expand(-1, 3)
        assert torch.allclose(quantiles[pipeline], uniform, atol=0.025), (pipeline, quantiles[pipeline])
        correlation = torch.corrcoef(factors.T)
        assert (correlation - torch.eye(3)).abs().max() < 0.1, (pipeline, correlation)
    assert torch.allclose(quantiles["device"], quantiles["stream"], atol=0.03)


def test_both_pipelines_jitter_after_cropping():
    """Crop, flip, then colour jitter: the zero padding a crop brings in is jittered with the image.

    On a flat grey image a contrast factor below 1 lifts the black padding towards the view's mean, so
    about half of the views that show padding keep no black pixel; jittering before the crop would leave
    the padding black in every one of them. (Jitter and flip commute, and crop and flip give the same
    distribution of views in either order, offsets being symmetric, so the jitter's place is the order
    that shows.)
    """
    grey = torch.full((VIEWS, 3, 8, 8), 100, dtype=torch.uint8)
    shares = {}
    for pipeline in PIPELINES:
        views = _views(pipeline, grey, Augment(pad=2, flip=True, color_jitter=0.4))
        shows_padding = views.flatten(1).amin(1) < views.flatten(1).amax(1)
        assert 0.9 < shows_padding.float().mean() < 1  # 24 of the 25 offsets
        black = views.flatten(1).amin(1) == 0
        shares[pipeline] = black[shows_padding].float().mean().item()
        assert 0.42 < shares[pipeline] < 0.62, pipeline
    assert abs(shares["device"] - shares["stream"]) < 0.05


# ---------------------------------------------------------------- stream loader


def test_stream_loader_hands_out_the_device_loaders_batches_without_augmentation():
    """Same seed, no augmentation: the same order and normalisation, batch for batch."""
    split = _numbered()
    for shuffle in (False, True):
        device = DeviceLoader(split, INFO, 8, CPU, shuffle=shuffle, seed=4)
        stream = StreamLoader(split, INFO, 8, CPU, shuffle=shuffle, seed=4, workers=0)
        assert len(device) == len(stream) == 7
        assert _same_batches(_batches(device), _batches(stream))
        assert _same_batches(_batches(device), _batches(stream))  # the second epoch too


def test_stream_views_do_not_depend_on_the_worker_count():
    split = _numbered()
    options = dict(shuffle=True, seed=2, augment=Augment(pad=2, flip=True))
    inline = StreamLoader(split, INFO, 8, CPU, workers=0, **options)
    workers = StreamLoader(split, INFO, 8, CPU, workers=2, **options)
    first, second = _batches(inline), _batches(workers)
    assert _same_batches(first, second)
    plain = _batches(StreamLoader(split, INFO, 8, CPU, shuffle=True, seed=2, workers=0))
    assert not _same_batches(first, plain)  # augmentation changed the images
    assert _same_batches(_batches(inline), _batches(workers))  # the next epoch's views agree too
    assert not _same_batches(_batches(inline), first)  # and differ from the first epoch's


@pytest.mark.parametrize("loader_class", [DeviceLoader, StreamLoader])
def test_loaders_normalise_into_the_compute_dtype_and_memory_format(loader_class):
    options = {"workers": 0} if loader_class is StreamLoader else {}
    loader = loader_class(_numbered(), INFO, 8, CPU, dtype=torch.bfloat16, channels_last=True, **options)
    batch = next(iter(loader))
    assert batch.images.dtype == torch.bfloat16
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    expected = ((torch.arange(8.0) + 0) / 255 - 0.5) / 0.25  # image 0's first row
    assert torch.allclose(batch.images[0, 0, 0].float(), expected, atol=1e-2)


# ---------------------------------------------------------------- choosing a pipeline


def test_auto_pipeline_keeps_what_fits_on_the_device_and_streams_the_rest():
    data = load_dataset(DatasetConfig(name="digits"))
    splits = [data.train, data.val, data.test]
    assert choose_pipeline(DatasetConfig(), splits) == "device"
    assert choose_pipeline(DatasetConfig(device_max_gb=1e-5), splits) == "stream"  # 115 KB > 10 KB
    assert choose_pipeline(DatasetConfig(pipeline="stream"), splits) == "stream"
    assert choose_pipeline(DatasetConfig(pipeline="device", device_max_gb=1e-5), splits) == "device"


def test_a_streamed_image_folder_decodes_lazily_the_same_images(tmp_path):
    write_image_tree(tmp_path / "tree", "train", 12)
    write_image_tree(tmp_path / "tree", "test", 4)
    base = DatasetConfig(name="imagefolder", root=str(tmp_path / "tree"), cache_dir=str(tmp_path / "cache"))
    streamed = load_dataset(replace(base, device_max_gb=1e-6))  # auto: 48 images x 300 B do not fit in 1 KB
    assert isinstance(streamed.train, FileSplit) and isinstance(streamed.test, FileSplit)
    assert not (tmp_path / "cache").exists()  # nothing decoded up front
    assert choose_pipeline(base, [streamed.train, streamed.val, streamed.test]) == "stream"
    resident = load_dataset(replace(base, pipeline="device"))
    for lazy, decoded in ((streamed.train, resident.train), (streamed.val, resident.val), (streamed.test, resident.test)):
        assert torch.equal(lazy.labels, decoded.labels)
        assert all(torch.equal(lazy.image(i), decoded.images[i]) for i in range(len(lazy)))
    assert streamed.info.mean == pytest.approx(resident.info.mean, abs=1e-6)  # all 36 train/ images sampled


def test_an_undecodable_file_in_a_worker_is_one_clear_error(tmp_path):
    write_image_tree(tmp_path / "tree", "train", 2)
    broken = tmp_path / "tree" / "train" / "cat" / "broken.png"
    broken.write_bytes(b"not an image")
    paths = sorted((tmp_path / "tree" / "train").glob("*/*.png"))
    split = FileSplit(paths, torch.zeros(len(paths), dtype=torch.int64), (10, 10))
    info = replace(INFO, channels=3, image_size=(10, 10), mean=(0.5,) * 3, std=(0.25,) * 3)
    loader = StreamLoader(split, info, 4, CPU, workers=1)
    with pytest.raises(DistillError) as error:
        list(loader)
    message = str(error.value)
    assert message.startswith("cannot decode image") and "broken.png" in message and "\n" not in message


# ---------------------------------------------------------------- training on both pipelines


def test_training_is_identical_on_both_pipelines_without_augmentation(tmp_path, quiet_results):
    """No augmentation, same seed, CPU fp32: the stream pipeline feeds exactly the device pipeline's batches."""
    summaries = {}
    for pipeline in ("device", "stream"):
        cfg = small_train_config(tmp_path, teacher_cache=str(tmp_path / pipeline / "cache"))
        cfg = replace(cfg, dataset=replace(cfg.dataset, pipeline=pipeline, workers=1))
        summaries[pipeline] = run_train(cfg, tmp_path / pipeline)
    assert summaries["stream"]["pipeline"] == "stream" and summaries["device"]["pipeline"] == "device"
    assert metrics_without_timing(tmp_path / "device") == metrics_without_timing(tmp_path / "stream")
    assert summaries["device"]["teacher"]["test_acc_best"] == summaries["stream"]["teacher"]["test_acc_best"] > 0.5


# ---------------------------------------------------------------- cached teacher logits


def test_cached_teacher_logits_train_the_same_student(tmp_path, quiet_results):
    runs = {}
    for cache in ("true", "false"):
        cfg = small_kd_config(tmp_path, cache_teacher=cache, baseline=False)
        runs[cache] = run_kd(cfg, tmp_path / cache)
    assert runs["true"]["teacher_logits_cached"] and not runs["false"]["teacher_logits_cached"]
    cached, computed = (metrics_without_timing(tmp_path / cache) for cache in ("true", "false"))
    for a, b in zip(cached, computed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and a["val_acc"] == pytest.approx(b["val_acc"], abs=0.01)
    assert runs["true"]["student"]["test_acc_best"] == pytest.approx(runs["false"]["student"]["test_acc_best"], abs=0.01)


def test_auto_caches_teacher_logits_only_without_augmentation(tmp_path, quiet_results):
    cfg = small_kd_config(tmp_path, baseline=False, epochs=1)
    augmented = replace(cfg, dataset=replace(cfg.dataset, augment=True))
    assert run_kd(cfg, tmp_path / "plain")["teacher_logits_cached"]
    assert not run_kd(augmented, tmp_path / "augmented")["teacher_logits_cached"]


def test_insisting_on_cached_logits_with_augmentation_is_refused_at_start(tmp_path):
    result = run_distill_in_process("kd", "dataset.augment=true", "cache_teacher=true", cwd=tmp_path, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("distill kd: error: cache_teacher=true: with dataset.augment=true")
    assert not (tmp_path / "outputs" / "teacher_cache").exists()  # refused before any training


# ---------------------------------------------------------------- kernels


def test_channels_last_applies_to_conv_nets_only():
    compute = Compute(CPU, "fp32", channels_last=True)
    conv = compute.place(cnn(INFO, width=4))
    assert conv[3].weight.is_contiguous(memory_format=torch.channels_last)  # the 4 -> 4 channel conv
    mlp = compute.place(build_model(TeacherConfig(arch="mlp", kwargs={"hidden": [8]}), INFO, "student"))
    assert all(p.is_contiguous() for p in mlp.parameters())
    plain = Compute(CPU, "fp32").place(cnn(INFO, width=4))
    assert not plain[3].weight.is_contiguous(memory_format=torch.channels_last)
    auto = Compute(CPU, "fp32", channels_last=None)  # only conv nets wide enough to gain
    assert not auto.uses_channels_last(cnn(INFO, width=4)) and auto.uses_channels_last(cnn(INFO, width=8))


def test_forward_hands_each_model_its_memory_format():
    """A channels_last batch reaches a wide conv net as it is and a narrow one as NCHW."""
    rgb = replace(INFO, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    compute = Compute(CPU, "fp32", channels_last=None)
    reached = {}
    for width in (4, 16):
        model = compute.place(cnn(rgb, width=width))
        model[0].register_forward_pre_hook(
            lambda module, args, width=width: reached.update({width: args[0].is_contiguous(memory_format=torch.channels_last)})
        )
        compute.forward(model)(torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last))
    assert reached == {4: False, 16: True}


def test_frozen_forward_runs_a_folded_copy_without_gradients():
    """kd steps run the teacher in inference mode with its BatchNorm folded away: same logits, no autograd
    graph, model untouched."""
    rgb = replace(INFO, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    model = cnn(rgb, width=8)
    model.train()
    model(torch.randn(16, 3, 8, 8))  # running statistics that are not 0 / 1
    model.eval()
    ran = []
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.register_forward_hook(lambda *args: ran.append(1))
    compute = Compute(CPU, "fp32", channels_last=None)
    images = torch.randn(4, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    logits = compute.frozen_forward(model)(images).logits
    assert not ran and not logits.requires_grad  # no BatchNorm module ran
    assert not logits.is_inference()  # a loss may save it for backward, e.g. a logit-matching MSE:
    student = torch.nn.Linear(3 * 8 * 8, 3)
    torch.nn.functional.mse_loss(student(images.flatten(1)), logits).backward()
    with torch.no_grad():
        assert torch.allclose(logits, model(images), atol=1e-5)
    assert ran and all(p.requires_grad for p in model.parameters())


KERNELS = ("fused", "foreach", "loop")


def _toy_loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    """A loss on a seeded batch of `INFO`-shaped images, the same for every model copy."""
    images = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(step))
    return model(images).square().mean()


def _flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_optimizer_kernels_take_the_same_steps(name):
    """From the same initial weights, the fused, foreach and loop kernels take the same three steps."""
    torch.manual_seed(0)
    start = cnn(INFO, width=4)
    cfg = OptimizerConfig(name=name, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    results = {}
    for impl in KERNELS:
        model = copy.deepcopy(start)
        optimizer = build_optimizer(model, replace(cfg, impl=impl), CPU)
        for step in range(3):
            _toy_loss(model, step).backward()
            optimizer.step()
            optimizer.zero_grad()
        results[impl] = _flat_parameters(model)
    assert (results["loop"] - _flat_parameters(start)).abs().min() > 0  # every parameter moved
    assert torch.allclose(results["fused"], results["loop"], atol=1e-6)
    assert torch.allclose(results["foreach"], results["loop"], atol=1e-6)


def _expected_first_step(name: str, weight: torch.Tensor, grad: torch.Tensor, lr: float, decay: float) -> torch.Tensor:
    """A parameter after the first step without momentum: SGD and Adam add `decay * weight` to the gradient
    (L2), AdamW shrinks the weight by `lr * decay` (decoupled); Adam's first step is lr * g / (|g| + eps)."""
    if name == "adamw":
        return weight * (1 - lr * decay) - lr * grad / (grad.abs() + 1e-8)
    grad = grad + decay * weight
    return weight - lr * (grad if name == "sgd" else grad / (grad.abs() + 1e-8))


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_each_kernels_first_step_has_the_right_size(name, impl):
    """The first step moves each parameter by exactly lr times its update, with weight decay on the conv and
    linear weights only (not on biases and BatchNorm parameters)."""
    lr, decay = 0.1, 0.05
    torch.manual_seed(0)
    model = cnn(INFO, width=4)
    optimizer = build_optimizer(model, OptimizerConfig(name=name, impl=impl, lr=lr, momentum=0.0, weight_decay=decay), CPU)
    _toy_loss(model, 0).backward()
    before = {key: (p.detach().clone(), p.grad.clone()) for key, p in model.named_parameters()}
    optimizer.step()
    assert {p.ndim > 1 for p in model.parameters()} == {True, False}  # weights, and biases and BatchNorm parameters
    for parameter_name, parameter in model.named_parameters():
        weight, grad = before[parameter_name]
        expected = _expected_first_step(name, weight, grad, lr, decay if parameter.ndim > 1 else 0.0)
        assert torch.allclose(parameter.detach() - weight, expected - weight, rtol=1e-4, atol=1e-7), parameter_name


@pytest.mark.slow
def test_compiled_training_saves_plain_weights(tmp_path, quiet_results, monkeypatch):
    """device.compile=true trains through torch.compile's wrapper and saves the plain module's weights. Compiled
    with dynamo and AOT autograd as the run does, but the `aot_eager` backend: inductor's C++ code generation
    took 30-50 s of this 2-core machine and is not what the test checks."""
    compile_for_real, compiled = torch.compile, []
    monkeypatch.setattr(torch, "compile", lambda model, **options: compiled.append(model) or compile_for_real(model, backend="aot_eager", **options))
    cfg = small_train_config(tmp_path, teacher=TeacherConfig(arch="mlp", kwargs={"hidden": [16]}), epochs=1)
    cfg = replace(cfg, device=DeviceConfig(type="cpu", compile=True))
    summary = run_train(cfg, tmp_path / "run")
    assert summary["teacher"]["test_acc_best"] > 0.3
    weights = torch.load(Path(summary["teacher"]["checkpoint"]), weights_only=True)["state_dict"]
    assert compiled and weights and not any(key.startswith("_orig_mod") for key in weights)
