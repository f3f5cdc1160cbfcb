"""The teacher-view store (`cache_teacher=views|auto`): the frozen teacher's logits for every augmented view of
every training image, computed once; each kd step reads the logit of exactly the view it drew."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import metrics_without_timing, on_training_step, small_kd_config, small_train_config

import distill_cli.runs.teacher_views as teacher_views
from distill_cli.core.config import DatasetConfig, ModelConfig
from distill_cli.core.errors import DistillError, Interrupted
from distill_cli.data import Augment, load_dataset
from distill_cli.data.augment import apply_drawn, apply_with_views, augment_one_with_view, views_of
from distill_cli.data.loader import build_loader
import distill_cli.kd.teachers as kd_teachers
from distill_cli.kd.teachers import LIVE, VIEWS, look_up_views, teacher_supply, teacher_view_logits
from distill_cli.models import build_model
from distill_cli.runs.fused import run_kd_fused
from distill_cli.runs.kd import run_kd
from distill_cli.runs.train import run_train
from distill_cli.training.compute import Compute

pytestmark = pytest.mark.usefixtures("quiet_results")
CPU = Compute(torch.device("cpu"), "fp32")
PRESETS = [Augment(pad=2, flip=True), Augment(pad=1), Augment(flip=True)]


@pytest.mark.parametrize("augment", PRESETS, ids=["crop+flip", "crop", "flip"])
def test_the_view_a_batch_drew_is_made_again_from_its_number(augment):
    """Device pipeline (a batch) and stream pipeline (one image at a time): `views_of` remakes each image's
    view from the number the augmentation reported, and the numbers cover 0..view_count-1."""
    images = torch.randint(0, 256, (400, 3, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    augmented, views = apply_with_views(images, augment, torch.Generator().manual_seed(2))
    assert torch.equal(views_of(images, augment, views), augmented)
    assert set(views.tolist()) == set(range(augment.view_count))
    for position in range(20):
        one, view = augment_one_with_view(images[position], augment, torch.Generator().manual_seed(position))
        assert torch.equal(views_of(images[position : position + 1], augment, torch.tensor([view]))[0], one)


def test_views_are_not_reported_for_colour_jitter():
    images = torch.zeros(4, 3, 6, 6, dtype=torch.uint8)
    assert apply_with_views(images, Augment(pad=1, color_jitter=0.2), torch.Generator())[1] is None
    assert Augment(pad=4, flip=True).view_count == 162 and Augment(pad=1, color_jitter=0.2).view_count == 0


def _synthetic(pipeline: str, augment: Augment | None = None):
    cfg = DatasetConfig(name="synthetic", num_classes=5, channels=3, image_size=8, train_size=96, test_size=16, augment=True)
    data = load_dataset(cfg)
    augment = augment or data.info.augment
    loader = build_loader(pipeline, data.train, data.info, 32, CPU.device, shuffle=True, augment=augment, workers=0)
    return data, loader


JITTER_DRAWN = Augment(pad=1, flip=True, color_jitter=0.4, drawn=3)


@pytest.mark.parametrize("pipeline", ["device", "stream"])
def test_drawn_views_are_the_only_views_an_image_shows(pipeline):
    """teacher_views=K (here colour jitter, K=3): over many epochs every image shows only its K views drawn once,
    each the one `Loader.view_of` makes again from the reported number; all K are picked."""
    data, loader = _synthetic(pipeline, JITTER_DRAWN)
    picked = torch.zeros(len(data.train), JITTER_DRAWN.drawn, dtype=torch.long)
    for _ in range(4):
        for batch in loader:
            images = data.train.images[batch.index]
            for view in range(JITTER_DRAWN.drawn):
                shown = batch.view == view
                remade = loader.normalise(loader.view_of(images[shown], batch.index[shown], view))
                assert torch.equal(remade, batch.images[shown])
            picked[batch.index, batch.view] += 1
    assert picked.sum() == 4 * len(data.train) and (picked.sum(0) > 80).all()  # about 115 each


def test_drawn_views_are_fixed_and_differ_from_each_other():
    """The views are drawn once with a fixed seed (every run and seed of a sweep sees the same ones) and are
    different views: crops, flips and jitter factors vary among the K of an image."""
    (data, loader), again = _synthetic("device", JITTER_DRAWN), _synthetic("stream", JITTER_DRAWN)[1].drawn
    assert loader.drawn.shape == (len(data.train), 3, 6) and torch.equal(loader.drawn, again)
    assert len(torch.unique(loader.drawn[:, :, 3])) == loader.drawn[:, :, 3].numel()  # brightness: per image and view
    assert len(torch.unique(loader.drawn[:, :, :3], dim=0)) > 0.9 * len(data.train)  # crop and flip too
    # a view's parameters are applied: the window at its offset, mirrored, brightness scaled (contrast, saturation 1)
    images = data.train.images[:2]
    params = torch.tensor([[1.0, 1.0, 0.0, 1.3, 1.0, 1.0], [0.0, 2.0, 1.0, 1.0, 1.0, 1.0]])
    viewed = apply_drawn(images, JITTER_DRAWN, params)
    assert torch.equal(viewed[0], (images[0].float() * 1.3).clamp(0, 255).round().to(torch.uint8))
    padded = torch.nn.functional.pad(images[1], (1, 1, 1, 1))
    assert torch.equal(viewed[1], padded[:, 0:8, 2:10].flip(2))


@pytest.mark.parametrize("pipeline", ["device", "stream"])
@pytest.mark.parametrize("augment", [None, JITTER_DRAWN], ids=["crop+flip", "drawn jitter views"])
def test_a_step_reads_what_the_teacher_says_about_the_view_it_drew(pipeline, augment):
    """Both pipelines: the store's logit at (image, view) of a training batch is the teacher's forward of that
    batch, to float rounding (the store ran the images in other batches)."""
    data, loader = _synthetic(pipeline, augment)
    augment = loader.augment
    torch.manual_seed(0)
    teacher = CPU.place(build_model(ModelConfig("cnn", {"width": 8, "blocks": 2}), data.info, "teacher")).eval()
    table = torch.empty(len(data.train), augment.view_count, data.info.num_classes)
    store = teacher_view_logits(teacher, data.train, loader, CPU, data.info.num_classes, table, chunk=40)
    forward, look_up = CPU.frozen_forward(teacher), look_up_views(store)
    for batch in loader:
        assert batch.view is not None
        assert torch.allclose(look_up(batch).logits, forward(batch.images).logits, atol=1e-5, rtol=1e-5)


# small colour images with crop (pad 1) and flip: 18 views an image; 144 training images, 9 steps an epoch
TINY = DatasetConfig(name="synthetic", num_classes=5, channels=3, image_size=8, train_size=160, test_size=32, augment=True)
STEPS = 9


def _teacher(tmp_path: Path, **overrides) -> Path:
    """A teacher trained on `TINY`, its best.pt."""
    run_train(small_train_config(tmp_path, dataset=TINY, batch_size=16, **overrides), tmp_path / "teacher")
    return tmp_path / "teacher" / "best.pt"


def _kd(tmp_path: Path, teacher: Path, **overrides):
    given = replace(small_kd_config(tmp_path).teacher, checkpoint=str(teacher))
    return small_kd_config(tmp_path, teacher=given, **{"baseline": False, "dataset": TINY, "batch_size": 16, **overrides})


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """One teacher for the module's runs (each test keeps its own teacher cache, so its own stores)."""
    return _teacher(tmp_path_factory.mktemp("teacher"))


def test_training_from_the_store_is_training_with_the_teacher(tmp_path, teacher):
    """fp32 store, CPU: the same training as running the teacher every step, within float rounding (the teacher
    computed the stored logits in other batches: measured 2e-7 relative at most in the losses; not bit for bit)."""
    stored = run_kd(_kd(tmp_path, teacher, cache_teacher="views"), tmp_path / "views")
    live = run_kd(_kd(tmp_path, teacher, cache_teacher="false"), tmp_path / "live")
    assert stored["teacher_supply"] == VIEWS and live["teacher_supply"] == LIVE
    rows = metrics_without_timing(tmp_path / "views"), metrics_without_timing(tmp_path / "live")
    assert [sorted(row) for row in rows[0]] == [sorted(row) for row in rows[1]]
    for a, b in zip(*rows):
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert len(list((tmp_path / "cache" / "views").glob("*/logits.pt"))) == 1


def test_drawn_views_train_as_the_teacher_running_on_them(tmp_path, teacher):
    """teacher_views=3 with colour jitter (views that cannot be enumerated): the store of the drawn views trains
    what running the teacher on the same drawn views does (cache_teacher=false), to float rounding."""
    jitter = replace(TINY, color_jitter=0.4)
    stored = run_kd(_kd(tmp_path, teacher, dataset=jitter, teacher_views=3, cache_teacher="views"), tmp_path / "views")
    live = run_kd(_kd(tmp_path, teacher, dataset=jitter, teacher_views=3, cache_teacher="false"), tmp_path / "live")
    assert stored["teacher_supply"] == VIEWS and live["teacher_supply"] == LIVE
    for a, b in zip(metrics_without_timing(tmp_path / "views"), metrics_without_timing(tmp_path / "live"), strict=True):
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    (store,) = (tmp_path / "cache" / "views").glob("*/logits.pt")
    assert torch.load(store).shape[1] == 3
    with pytest.raises(DistillError, match=r"^teacher_views=3: the transfer set is not augmented"):
        run_kd(_kd(tmp_path, teacher, dataset=replace(TINY, augment=False), teacher_views=3), tmp_path / "plain")


def test_a_store_larger_than_the_free_memory_is_refused_or_not_built(tmp_path, monkeypatch):
    """The store is held on the device: over the memory free there, views is refused naming both figures and
    auto runs the teacher; with the memory free, both store the views."""
    augment, cpu = Augment(pad=4, flip=True), torch.device("cpu")  # 162 views x 1000 images x 10 classes: 6.5 MB
    for cache, supply in (("views", VIEWS), ("auto", VIEWS)):
        assert teacher_supply(small_kd_config(tmp_path, cache_teacher=cache), augment, 1000, 10, cpu) == supply
    monkeypatch.setattr(kd_teachers, "available_bytes", lambda device: 5 * 2**20)
    with pytest.raises(DistillError, match=r"needs 0\.01 GiB, over the 5\.0 MiB free on cpu; use teacher_views=K"):
        teacher_supply(small_kd_config(tmp_path, cache_teacher="views"), augment, 1000, 10, cpu)
    assert teacher_supply(small_kd_config(tmp_path, cache_teacher="auto"), augment, 1000, 10, cpu) == LIVE


def test_a_changed_teacher_gets_its_own_store(tmp_path, teacher):
    """The store is keyed by the teacher's weights: another teacher (here: another seed) never reads a stale one."""
    run_kd(_kd(tmp_path, teacher, cache_teacher="views"), tmp_path / "first")
    other = _teacher(tmp_path / "other", seed=1)
    stores = []
    build = teacher_views.teacher_view_logits
    runs = []

    def recording(teacher_module, *args, **kwargs):
        runs.append(teacher_module)
        return build(teacher_module, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(teacher_views, "teacher_view_logits", recording)
        run_kd(_kd(tmp_path, other, cache_teacher="views"), tmp_path / "second")  # the cache of the first
        run_kd(_kd(tmp_path, other, cache_teacher="views"), tmp_path / "third")  # its store now exists
    stores = sorted((tmp_path / "cache" / "views").glob("*/logits.pt"))
    assert len(stores) == 2 and len(runs) == 1


def test_auto_stores_the_views_where_it_pays(tmp_path, teacher, caplog):
    """auto: 2 epochs against 18 views do not pay for a store (the teacher runs live, and the log says so);
    18 epochs do; once stored, any run against that teacher reads it."""
    caplog.set_level("INFO", logger="distill")
    short = run_kd(_kd(tmp_path, teacher), tmp_path / "short")
    assert short["teacher_supply"] == LIVE and "teacher runs live" in caplog.text
    long = run_kd(_kd(tmp_path, teacher, epochs=18), tmp_path / "long")
    assert long["teacher_supply"] == VIEWS
    again = run_kd(_kd(tmp_path, teacher), tmp_path / "again")
    assert again["teacher_supply"] == VIEWS


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"cache_teacher": "views", "teacher_views_max_gb": 1e-6}, "cache_teacher=views: the store of 18 views x"),
        ({"cache_teacher": "views", "loss": {"name": "fitnet"}}, "cache_teacher=views: loss=fitnet reads the teacher's features"),
    ],
)
def test_views_that_cannot_be_stored_are_refused_before_training(tmp_path, overrides, message):
    cfg = _kd(tmp_path, tmp_path / "missing.pt", **overrides)
    with pytest.raises(DistillError, match=message):
        run_kd(replace(cfg, teacher=replace(cfg.teacher, checkpoint=None), student=ModelConfig("cnn", {"width": 4})), tmp_path / "run")
    assert not (tmp_path / "run" / "teacher").exists()  # nothing trained
    unaugmented = replace(cfg, dataset=replace(cfg.dataset, augment=False), cache_teacher="views", loss={"name": "kd"})
    with pytest.raises(DistillError, match="cache_teacher=views: the transfer set is not augmented"):
        run_kd(replace(unaugmented, teacher=replace(cfg.teacher, checkpoint=None)), tmp_path / "plain")


def test_an_interrupted_run_on_the_store_resumes_exactly(tmp_path, teacher, monkeypatch):
    cfg = _kd(tmp_path, teacher, cache_teacher="views", epochs=3)
    reference = tmp_path / "reference"
    run_kd(cfg, reference)

    def interrupt(parts):
        import os
        import signal

        os.kill(os.getpid(), signal.SIGTERM)
        return parts

    on_training_step(monkeypatch, STEPS + 5, interrupt, factory="kd_step")  # epoch 2, step 5
    with pytest.raises(Interrupted):
        run_kd(cfg, tmp_path / "run")
    monkeypatch.undo()
    run_kd(replace(cfg, resume=True), tmp_path / "run")
    assert metrics_without_timing(tmp_path / "run") == metrics_without_timing(reference)


def test_an_interrupted_build_continues_where_it_stopped(tmp_path, teacher, monkeypatch):
    """A build stopped after saving part of the store continues from that part and gives the same store."""
    cfg = _kd(tmp_path, teacher, cache_teacher="views", eval_batch_size=32)  # the store is built 32 images at a time
    run_kd(cfg, tmp_path / "whole")
    (whole,) = (tmp_path / "cache" / "views").glob("*/logits.pt")
    expected = torch.load(whole)
    whole.unlink()
    monkeypatch.setattr(teacher_views, "PROGRESS_STEPS", 4)
    save = teacher_views.save_atomic

    def stop_after_a_part(obj, path, *args, **kwargs):
        save(obj, path, *args, **kwargs)
        if path.name.endswith(".partial"):
            raise KeyboardInterrupt

    monkeypatch.setattr(teacher_views, "save_atomic", stop_after_a_part)
    with pytest.raises(KeyboardInterrupt):
        run_kd(cfg, tmp_path / "stopped")
    monkeypatch.setattr(teacher_views, "save_atomic", save)
    assert whole.with_suffix(".pt.partial").is_file() and not whole.is_file()
    built = []
    monkeypatch.setattr(teacher_views, "teacher_view_logits", lambda *args, **kwargs: built.append(args[6]) or build(*args, **kwargs))
    build = teacher_view_logits
    run_kd(cfg, tmp_path / "continued")
    assert built and built[0] > 0  # started after the saved part
    assert torch.equal(torch.load(whole), expected)


def test_a_fused_group_builds_one_store_and_each_job_trains_as_alone(tmp_path, teacher):
    cfgs = [_kd(tmp_path, teacher, cache_teacher="views", T=T) for T in (2.0, 4.0)]
    alone = [tmp_path / f"alone{n}" for n in range(2)]
    for cfg, folder in zip(cfgs, alone):
        run_kd(cfg, folder)
    fused = [tmp_path / f"fused{n}" for n in range(2)]
    run_kd_fused(cfgs, fused)
    for one, other in zip(fused, alone):
        assert metrics_without_timing(one) == metrics_without_timing(other)
    assert len(list((tmp_path / "cache" / "views").glob("*/logits.pt"))) == 1
