"""`hydra/launcher=fused` (configs/hydra/launcher/fused.yaml). Hydra instantiates launchers only from the
`hydra_plugins` package; the work is `distill_cli.sweeps.fused_launcher.launch_fused` (imported when a sweep launches, so
Hydra's scan of its plugins stays cheap)."""

from hydra.plugins.launcher import Launcher


class FusedLauncher(Launcher):
    """Runs a sweep's kd jobs that share their data and teacher in one process, on shared batches."""

    def __init__(self, batching: str = "auto", memory_gb=None) -> None:
        self.batching = batching  # hydra.launcher.batching: see distill_cli.training.stacked.choose_batching
        self.memory_gb = memory_gb  # GiB for a group's students; None: the memory free (checked when launching)

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config

    def launch(self, job_overrides, initial_job_idx):
        from distill_cli.sweeps.fused_launcher import launch_fused

        return launch_fused(
            self.hydra_context, self.task_function, self.config, job_overrides, initial_job_idx, self.batching, self.memory_gb
        )
