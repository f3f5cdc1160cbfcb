"""The memory budget of a fused group (distill_cli/runs/memory.py): each student's need measured on its real
networks, and the split of a group that would not fit into consecutive sub-groups."""

import logging
import os
from dataclasses import replace

import pytest
from conftest import small_kd_config

from distill_cli.core.config import ModelConfig
from distill_cli.core.errors import DistillError
from distill_cli.runs import memory
from distill_cli.training.device_memory import available_ram
from distill_cli.training.setup import prepare_run

DIGITS_PIXELS, CLASSES, HIDDEN = 8 * 8, 10, 16


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """A digits student mlp(hidden=[16]) trained alone (loss=kd alpha=0: cross-entropy, no teacher), its run's
    device, data and loaders, and the training images a step is measured on."""
    cfg = small_kd_config(tmp_path_factory.mktemp("memory"), student=ModelConfig(arch="mlp", kwargs={"hidden": [HIDDEN]}), alpha=0.0)
    compute, data, loaders = prepare_run(cfg)
    return cfg, compute, data, loaders, memory.probe_batch(loaders, data, cfg.batch_size)


def _need(probe, **changes) -> memory.Need:
    cfg, compute, data, _, batch = probe
    return memory.training_bytes(replace(cfg, **changes), compute, data, batch, None)


def test_a_students_need_counts_its_weights_and_the_optimizers_state_per_parameter(probe):
    cfg = probe[0]
    parameters = (DIGITS_PIXELS + 1) * HIDDEN + (HIDDEN + 1) * CLASSES  # two Linear layers, float32
    sgd = _need(probe)
    assert sgd.weights == sgd.gradients == 4 * parameters
    assert sgd.optimizer == 4 * parameters  # SGD with momentum: one buffer
    assert _need(probe, optimizer=replace(cfg.optimizer, momentum=0.0)).optimizer == 0
    for name in ("adam", "adamw"):  # first and second moments
        assert _need(probe, optimizer=replace(cfg.optimizer, name=name)).optimizer == 2 * 4 * parameters


def test_a_steps_activations_are_what_backward_keeps_and_scale_with_the_batch(probe):
    cfg = probe[0]
    # by hand: the flattened images (first Linear's input), the hidden layer (ReLU's output, second Linear's
    # input), cross-entropy's log-probabilities (float32) and the labels (int64)
    by_hand = cfg.batch_size * (4 * (DIGITS_PIXELS + HIDDEN + CLASSES) + 8)
    activations = _need(probe).activations
    assert by_hand <= activations <= 1.1 * by_hand
    assert _need(probe, batch_size=2 * cfg.batch_size).activations == 2 * activations
    assert _need(probe, batch_size=2 * cfg.batch_size).weights == _need(probe).weights


def test_the_split_is_into_the_fewest_near_equal_consecutive_sub_groups_that_fit():
    assert memory.sub_groups([1] * 4, 4) == [[0, 1, 2, 3]]
    assert memory.sub_groups([1] * 4, 2) == [[0, 1], [2, 3]]
    assert memory.sub_groups([1] * 6, 3.5) == [[0, 1, 2], [3, 4, 5]]
    assert memory.sub_groups([1] * 5, 3) == [[0, 1, 2], [3, 4]]
    assert memory.sub_groups([1] * 7, 2) == [[0, 1], [2, 3], [4, 5], [6]]
    assert memory.sub_groups([3, 1, 1, 1], 3) == [[0], [1], [2], [3]]  # 2 or 3 near-equal parts: [3, 1] is over
    assert memory.sub_groups([2, 2, 1], 1) == [[0], [1], [2]]  # not even one fits: one at a time


def test_the_plan_says_what_the_students_need_and_how_they_train_in_one_line():
    gib = memory.GIB
    line = memory.describe_plan([int(1.3 * gib)] * 6, 4 * gib, "cuda:0", 128, [[0, 1, 2], [3, 4, 5]])
    assert line == (
        "fused: 6 students need ~7.8 GiB (1.3 GiB each: weights, gradients, optimizer state, activations of a batch "
        "of 128), budget 4.0 GiB on cuda:0: trained as 2 groups of 3"
    )
    assert memory.describe_plan([2**20, 3 * 2**20], 8 * 2**20, "cpu", 64, [[0, 1]]).endswith(
        "~4.0 MiB (1.0 MiB to 3.0 MiB each: weights, gradients, optimizer state, activations of a batch of 64), "
        "budget 8.0 MiB on cpu: trained together"
    )
    assert memory.describe_plan([3 * 2**10] * 5, 7 * 2**10, "cpu", 64, [[0, 1], [2, 3], [4]]).endswith(
        "budget 7.0 KiB on cpu: trained as 3 groups of 2, 2 and 1"
    )
    assert memory.describe_plan([3 * 2**10] * 2, 2**10, "cpu", 64, [[0], [1]]).endswith(
        ": one student alone does not fit: trained one at a time"
    )


def test_without_a_budget_the_plan_takes_a_share_of_the_memory_free(probe, monkeypatch, caplog):
    cfg, compute, data, loaders, _ = probe
    need = _need(probe).total
    monkeypatch.setattr(memory, "available_bytes", lambda device: 3.2 * need)  # a share of it fits 2 students, not 3
    with caplog.at_level(logging.INFO, logger="distill"):
        assert memory.plan_fused([cfg] * 6, compute, data, loaders, None) == [[0, 1], [2, 3], [4, 5]]
    assert f"budget {memory.byte_size(memory.SAFETY * 3.2 * need)} on cpu: trained as 3 groups of 2" in caplog.text
    assert memory.plan_fused([cfg] * 4, compute, data, loaders, 4.5 * need / memory.GIB) == [[0, 1, 2, 3]]


def test_a_job_whose_config_fails_to_build_needs_nothing_in_the_plan(probe):
    cfg, compute, data, loaders, _ = probe
    broken = replace(cfg, loss={"name": "fitnet"}, alpha=0.5)  # an mlp has no feature point for FitNets
    assert memory.plan_fused([cfg, broken, cfg], compute, data, loaders, 2.5 * _need(probe).total / memory.GIB) == [[0, 1, 2]]


def test_the_cpus_free_memory_is_read_in_bytes():
    free = available_ram()
    assert os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2 <= free <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("value", [None, 2, 0.5])
def test_a_budget_is_a_positive_number_of_gib_or_null(value):
    assert memory.checked_budget(value) == value


@pytest.mark.parametrize("value", [0, -1.5, float("nan"), float("inf"), "lots", True, [4]])
def test_any_other_budget_is_refused_naming_the_key(value):
    with pytest.raises(DistillError, match=r"^hydra\.launcher\.memory_gb: .* is not a positive number of GiB"):
        memory.checked_budget(value)
