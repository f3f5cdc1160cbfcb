"""A parallel sweep's jobs share the cores: each job of a joblib sweep gets device.threads = cores // jobs at
once (`cli.main.share_cores`), said in one log line; an explicit device.threads wins. The sweep itself, with
every job's threads recorded, is in test_trackers.py (`test_a_joblib_sweep_...`)."""

import logging
import os

import pytest
from omegaconf import OmegaConf

from distill_cli.cli.main import share_cores
from distill_cli.core.config import DeviceConfig, TrainConfig
from distill_cli.core.processes import jobs_at_once, threads_per_job

JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"


@pytest.fixture
def eight_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)


def _launcher(target: str, **settings):
    return OmegaConf.create({"_target_": target, **settings})


@pytest.mark.usefixtures("eight_cores")
def test_jobs_at_once_is_joblibs_n_jobs_counted_as_joblib_does():
    assert [jobs_at_once(_launcher(JOBLIB, n_jobs=n)) for n in (2, 4, 16, -1, -2, -9)] == [2, 4, 16, 8, 7, 1]
    assert jobs_at_once(_launcher("hydra._internal.core_plugins.basic_launcher.BasicLauncher")) == 1
    assert jobs_at_once(_launcher("hydra_plugins.distill_fused_launcher.fused_launcher.FusedLauncher", batching="auto")) == 1
    assert jobs_at_once(_launcher("hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher", cpus_per_task=8)) == 1
    assert [threads_per_job(jobs) for jobs in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    assert threads_per_job(2, processes=2) == 2


@pytest.mark.usefixtures("eight_cores")
def test_a_parallel_job_gets_its_share_of_the_cores_unless_device_threads_is_set(caplog):
    def threads(jobs: int, **device) -> int:
        config = TrainConfig(device=DeviceConfig(type="cpu", **device))
        share_cores(config, jobs)
        return config.device.threads

    with caplog.at_level(logging.INFO, logger="distill"):
        assert threads(2) == 4
    assert [record.getMessage() for record in caplog.records] == [
        "device.threads=4: the 8 cores split among the 2 jobs that run at once (hydra.launcher.n_jobs); set device.threads to choose"
    ]
    assert (threads(4), threads(16), threads(2, processes=2)) == (2, 1, 2)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="distill"):
        assert (threads(2, threads=3), threads(1), threads(-1)) == (3, 0, 0)  # explicit, or nothing shared: unchanged
    assert caplog.records == []
