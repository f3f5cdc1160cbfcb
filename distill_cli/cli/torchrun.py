"""The torchrun launcher: `distill train|kd` in several data-parallel processes, one per device.

Two ways in, one engine:
- `torchrun --nproc_per_node=N -m distill_cli kd ...` (one node or many, torchrun's rendezvous flags):
  every process runs `distill`; rank 0 composes the config with Hydra, makes the run folder and hands
  (command, validated config, run folder) to the other ranks (`lead` / `follow`), which never touch
  Hydra, so there is one run folder and one log.
- `distill kd device.processes=N`: the Hydra job starts `torchrun --standalone` itself (`launch`) on this
  machine, each process running this module's `main`.

What the processes do together in training (sharded batches, DistributedDataParallel, averaged method
gradients, rank 0 reading and writing files) is `core.world.World`'s.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ..core.commands import BY_NAME
from ..core.config import to_plain, validate_config
from ..core.console import console_handler, silence
from ..core.errors import DistillError, Interrupted, one_line
from ..core.files import write_json_atomic
from ..core.processes import torchrun_world_size
from ..core.run_folders import read_summary
from ..core.world import join, leave, world
from ..runs.commands import runner

log = logging.getLogger("distill")


LAUNCH_FILE = "distributed.json"  # in the run folder: the command and config `launch` hands its workers


_handed_out = False  # whether rank 0 of `torchrun -m distill_cli` has handed the other ranks their work


def lead(command: str, plain_config: dict, run_dir: Path) -> None:
    """Rank 0 of `torchrun -m distill_cli`: hand the other ranks the run's command, config and folder."""
    global _handed_out
    if world().distributed and world().is_main and not _handed_out:
        _handed_out = True
        world().broadcast((command, plain_config, str(run_dir)))


def release() -> None:
    """Rank 0 at the end of `distill`: tell ranks still waiting for work that there is none (it stopped
    before training: a bad config, --help, ...), then leave the process group."""
    global _handed_out
    if world().distributed and world().is_main and not _handed_out:
        world().broadcast(None)
    _handed_out = False
    leave()


def quiet_rank() -> None:
    """Ranks other than 0 print nothing but their own errors: rank 0 logs for the run."""
    silence()
    logging.getLogger().setLevel(logging.ERROR)


def run_rank(command: str, plain_config: dict, run_dir: Path) -> int:
    """Run `command` on this rank with an already validated config; errors become one line on stderr
    (the first rank's error also goes to the others, see `root_cause`). Returns the exit status."""
    try:
        config = validate_config(command, OmegaConf.create(plain_config))
        runner(command)(config, run_dir)
        return 0
    except KeyboardInterrupt as interrupt:
        stopped = Interrupted.wrap(interrupt)
        if world().is_main:  # read by `launch`
            print(f"distill {command}: interrupted (signal {stopped.signum}): {stopped.where}", file=sys.stderr)
        return 128 + stopped.signum
    except Exception as error:
        if os.environ.get("DISTILL_TRACEBACK") == "1":
            raise
        message = world().root_cause(one_line(error), error)
        world().report_error(message)
        print(f"distill {command}: error: {message}", file=sys.stderr)
        return 1


def follow(command: str) -> int:
    """A rank other than 0 of `torchrun -m distill_cli`: wait for rank 0's work and do its part."""
    quiet_rank()
    work = world().broadcast(None)
    try:
        if work is None:  # rank 0 stopped before training (a bad config, --help, ...): it says why
            return 0
        command, plain_config, run_dir = work
        return run_rank(command, plain_config, Path(run_dir))
    finally:
        leave()


def check_devices(cfg, processes: int) -> None:
    """Refuse, before any process starts, what `processes` data-parallel processes cannot do with the
    device config `cfg`: more processes than GPUs, one named GPU for all, SyncBatchNorm on the CPU, CUDA graphs."""
    on_gpu = cfg.type.startswith("cuda") or (cfg.type == "auto" and torch.cuda.is_available())
    if cfg.type not in ("auto", "cpu", "cuda"):
        raise DistillError(f"device.type={cfg.type} with {processes} processes; use cuda (process k takes GPU k) or cpu")
    if on_gpu and processes > torch.cuda.device_count():
        raise DistillError(f"device.processes={processes}, but this machine has {torch.cuda.device_count()} GPU(s): one process per GPU")
    if cfg.sync_batchnorm and not on_gpu:
        raise DistillError("device.sync_batchnorm: SyncBatchNorm runs on CUDA GPUs only (torch refuses it on the CPU)")
    if cfg.cuda_graphs == "true":
        raise DistillError("device.cuda_graphs=true: the training step cannot be captured with several processes (use device.processes=1)")


def launch(command: str, plain_config: dict, run_dir: Path, processes: int) -> dict:
    """`device.processes=N`: run `command` in N processes on this machine with torchrun, in `run_dir`,
    and return rank 0's summary. A rank's error is raised here as one line naming the rank."""
    write_json_atomic({"command": command, "config": plain_config}, run_dir / LAUNCH_FILE)
    torchrun_log = run_dir / "torchrun.log"
    arguments = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
        "--monitor-interval=0.5", "--no-python", sys.executable, "-c", _RANK_PROGRAM, str(run_dir),
    ]
    log.info(f"distill {command}: {processes} processes (torchrun --standalone --nproc_per_node={processes})")
    start = torchrun_log.stat().st_size if torchrun_log.exists() else 0
    # the ranks' logs go to the console (stdout); stderr (torchrun's own multi-line reports, the ranks'
    # one-line errors) to torchrun.log, from which the first error is raised here as one line
    with open(torchrun_log, "ab") as agent_log:
        process = subprocess.Popen(arguments, stderr=agent_log)
        signum = None
        try:
            status = process.wait()
        except KeyboardInterrupt as interrupt:
            # Ctrl-C reached torchrun too (same terminal); a SIGTERM meant for this process is passed on.
            # torchrun hands it to every rank, which stop at the next step and save last.pt
            signum = getattr(interrupt, "signum", signal.SIGINT)
            if signum == signal.SIGTERM:
                process.send_signal(signal.SIGTERM)
            status = process.wait()
    summary = read_summary(run_dir)
    if status == 0 and summary is not None and summary.get("status") == "completed":
        return summary
    with open(torchrun_log, "rb") as agent_log:
        agent_log.seek(start)
        lines = agent_log.read().decode(errors="replace").splitlines()
    stopped = [re.match(rf"distill {command}: interrupted \(signal (\d+)\): (.*)", line) for line in lines]
    stopped = [match for match in stopped if match]
    if stopped or signum is not None:
        raise Interrupted(signum or int(stopped[0][1]), stopped[0][2] if stopped else "")
    errors = [line.split(": error: ", 1)[1] for line in lines if line.startswith(f"distill {command}: error: ")]
    if errors:
        raise DistillError(errors[0])
    raise DistillError(f"the {processes} training processes ended with exit status {status} (see {torchrun_log})")


# what each process `launch` starts runs (a program rather than `-m` of this module, which would load
# this module twice: as __main__ and as distill_cli.cli.torchrun)
_RANK_PROGRAM = (
    "import sys; from distill_cli.cli.torchrun import main; from distill_cli.core.processes import exit_process; "
    "exit_process(main(sys.argv[1:]))"
)


def main(argv: list[str]) -> int:
    """One rank of a `launch`ed run: `argv` = [run dir]."""
    run_dir = Path(argv[0])
    world = join()
    try:
        work = json.loads((run_dir / LAUNCH_FILE).read_text())
        if world.is_main:
            _log_to_run(run_dir, work["command"])
        else:
            quiet_rank()
        return run_rank(work["command"], work["config"], run_dir)
    finally:
        leave()


def _log_to_run(run_dir: Path, command: str) -> None:
    """Rank 0 of a launched run logs to the console and appends to the run's log file, as the job did."""
    file_handler = logging.FileHandler(run_dir / f"{command}.log")
    file_handler.setFormatter(logging.Formatter("[%(asctime)s][%(levelname)s] %(message)s"))
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.addHandler(console_handler())
    root.addHandler(file_handler)


def run_distributed(command: str, config, run_dir: Path) -> dict | None:
    """`command` in several processes: started here with torchrun (`device.processes=N`), or as rank 0
    of the torchrun that started this process, handing the other ranks their work."""
    world_size = torchrun_world_size()
    check_devices(config.device, max(world_size, config.device.processes))
    if not world_size:
        return launch(command, to_plain(config), run_dir, config.device.processes)
    if config.device.processes not in (1, world_size):
        raise DistillError(
            f"device.processes={config.device.processes}, but torchrun started {world_size} processes; "
            "under torchrun leave device.processes at 1"
        )
    lead(command, to_plain(config), run_dir)
    return runner(command)(config, run_dir)


def check_torchrun_command(command: str, rest: list[str]) -> None:
    """Under torchrun: only train and kd, one run (a sweep's jobs each start their own torchrun)."""
    if command not in BY_NAME or not BY_NAME[command].processes:
        several = " and ".join(f"`distill {c.name}`" for c in BY_NAME.values() if c.processes)
        raise DistillError(f"torchrun runs {several}, not `distill {command}`")
    if "-m" in rest or "--multirun" in rest:
        raise DistillError(
            "a sweep (-m) under torchrun: run `distill kd -m ... device.processes=N` instead (each job starts its own torchrun)"
        )
