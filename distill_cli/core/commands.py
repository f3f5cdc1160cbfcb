"""The command table: each `distill` command's name, one-line help, example and how it runs.

The CLI's usage text and dispatch, the config schemas, run folders, sweep reports and the torchrun
launcher all read this table; a new command is a row here plus its function.
No torch here: the CLI reads it before it imports anything heavy.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    example: str = ""
    # how the CLI runs it: "hydra" (composed from configs/<name>.yaml, a run folder, -m sweeps),
    # "ship" (a run folder or checkpoint plus key=value options), or one of its own ("resume", "report", "list")
    kind: str = "hydra"
    # writes a run folder whose summary.json says how it ended (resume, sweep reports and search read it)
    writes_summary: bool = False
    # can train in several data-parallel processes (device.processes=N, torchrun)
    processes: bool = False
    # the options of a ship command, with their defaults (typed like them); any other key=value
    # overrides the run's recorded config (dataset.root=..., eval_batch_size=..., device.threads=...)
    options: dict = field(default_factory=dict)


COMMANDS = (
    Command("train", "train a teacher with cross-entropy", "distill train teacher=cnn epochs=20", writes_summary=True, processes=True),
    Command("kd", "distil a student from a teacher", "distill kd student=mlp_small T=4 alpha=0.5", writes_summary=True, processes=True),
    Command("bench", "images/s of train/kd steps vs a reference loop", "distill bench dataset=cifar10"),
    Command("resume", "continue a crashed or interrupted run or sweep", "distill resume outputs/2025-01-01/12-00-00.000000_kd", kind="resume"),
    Command("report", "table, plots, report.md/csv/json of a sweep", "distill report outputs/multirun/2025-01-01/12-00-00.000000_kd", kind="report"),
    Command("list", "list the datasets, models and losses", kind="list"),
    Command(
        "eval", "accuracy, ECE, MACs, latency of a run's models", "distill eval outputs/2025-01-01/12-00-00.000000_kd", kind="ship",
        options={"out": "", "gpu": True, "calls": 200, "batch": 256},
    ),
    Command(
        "export", "ONNX / torch.export file, checked vs PyTorch", "distill export <run dir>/best.pt format=onnx", kind="ship",
        options={"format": "", "out": "", "atol": 1e-4},
    ),
    Command(
        "quantize", "static int8 for the CPU, against fp32", "distill quantize <run dir>/best.pt", kind="ship",
        # qat=true: also fine-tune `epochs` epochs with fake quantization, the fp32 model as teacher at T, alpha
        # (distill kd loss=kd's defaults), at lr_scale x the run's learning rate
        options={
            "out": "", "gpu": True, "calls": 200, "batch": 256, "calibration": 512,
            "qat": False, "epochs": 0, "T": 4.0, "alpha": 0.9, "lr_scale": 0.01,
        },
    ),
    Command(
        "prune", "remove channels or weights, before vs after", "distill prune <run dir>/best.pt amount=0.5", kind="ship",
        options={"amount": 0.5, "structure": "channels", "importance": "l1", "out": "", "calls": 200, "batch": 256},
    ),
)
BY_NAME = {command.name: command for command in COMMANDS}
# the commands whose run folders hold a summary: what `distill resume`, sweep reports and searches read
SUMMARY_COMMANDS = tuple(command.name for command in COMMANDS if command.writes_summary)


def command_lines() -> str:
    """The commands part of `distill --help`: name, help and example of each, in columns."""
    return "\n".join(f"  {c.name:<9} {c.help:<47} {c.example}".rstrip() for c in COMMANDS)
