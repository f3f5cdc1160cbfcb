"""How much the kd summary's speed-up moves when the same teacher / student pair is timed again.

Times `distill_cli.runs.student.compare_with_teacher` (the code that fills `summary.json`'s
`inference_images_per_s` and `speedup`) `--repeats` times in one process, each time as a new kd job
would (nothing shared between repetitions), for two pairs on CIFAR-shaped synthetic images (3x32x32,
10 classes, 3,000 test images: the test split of the CIFAR-10 10k subset of docs/results.md):

- `method table`: teacher `cnn` width 16, student `cnn` width 8 (the pair of docs/results.md's table);
- `identical`: student `cnn` width 8 against a copy of itself (a speed-up of 1.0 is the truth).

It runs whichever `distill_cli` is first on the path, so the same script measures the code before and
after a change:

    PYTHONPATH=/path/to/tree python benchmarks/speedup_spread.py [--repeats 10] [device.threads=1 ...]

Prints each repetition's speed-up and, per pair, min / median / max and the spread (max / min - 1).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf

from distill_cli.core.config import ModelConfig, validate_config
from distill_cli.kd.teachers import Shared
from distill_cli.models import build_model
from distill_cli.runs.student import compare_with_teacher
from distill_cli.training.setup import prepare_run

PAIRS = {"method table": (16, 8), "identical": (8, 8)}  # cnn widths: teacher, student


def kd_config(overrides: list[str]):
    base = {
        "student": {"arch": "cnn", "kwargs": {"width": 8, "blocks": 2}},
        "teacher": {"arch": "cnn", "kwargs": {"width": 16, "blocks": 2}},
        "dataset": {"name": "synthetic", "channels": 3, "image_size": 32, "num_classes": 10,
                    "train_size": 256, "test_size": 3000, "augment": False},
        "device": {"type": "cpu"},
    }
    return validate_config("kd", OmegaConf.merge(OmegaConf.create(base), OmegaConf.from_dotlist(overrides)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("overrides", nargs="*", help="kd config overrides (device.threads=1, eval_batch_size=...)")
    options = parser.parse_args()
    cfg = kd_config(options.overrides)
    compute, data, loaders = prepare_run(cfg)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
    for pair, (teacher_width, student_width) in PAIRS.items():
        torch.manual_seed(0)
        teacher = build_model(ModelConfig(arch="cnn", kwargs={"width": teacher_width, "blocks": 2}), data.info, "teacher")
        student = build_model(ModelConfig(arch="cnn", kwargs={"width": student_width, "blocks": 2}), data.info, "student")
        teacher, student = compute.place(teacher), compute.place(student)
        speedups, seconds = [], []
        for _ in range(options.repeats):
            run = SimpleNamespace(compute=compute, loaders=loaders, shared=Shared(), data=data, cfg=cfg)
            summary = {"teacher": {"params": 2}, "student": {"params": 1}}
            start = time.perf_counter()
            compare_with_teacher(run, summary, teacher, student)
            seconds.append(time.perf_counter() - start)
            speedups.append(summary["speedup"])
            print(f"  {pair}: teacher {summary['teacher']['inference_images_per_s']:,.0f} img/s, "
                  f"student {summary['student']['inference_images_per_s']:,.0f} img/s, speed-up {summary['speedup']:.2f}x", flush=True)
        low, high = min(speedups), max(speedups)
        print(f"{pair}: speed-up min {low:.2f}x, median {statistics.median(speedups):.2f}x, max {high:.2f}x, "
              f"spread {100 * (high / low - 1):.0f}% over {len(speedups)} repetitions ({statistics.median(seconds):.1f} s each)")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
