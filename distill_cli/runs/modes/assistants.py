"""Teacher-assistant chains (`assistants=[...]`, Mirzadeh et al. 2020): teacher -> assistants[0] -> ...
-> student, each link a kd run with the run's method, T, alpha and epochs.

Each assistant is distilled once per recipe and cached beside the teachers: its recipe is its own
training recipe, the kd settings and its teacher's recipe (a given teacher checkpoint: its content
hash), so a second identical run retrains no teacher and no assistant (they train into
`<run>/assistant<i>/` the first time). The student at the end of the chain is the run's own product,
trained into the run folder as every kd student is (a kd run always trains its student); the
student-alone baseline is cached as usual. The summary's teacher is the chain's teacher; `chain` lists
the teacher and each assistant with its test accuracy.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from functools import partial
from itertools import pairwise
from pathlib import Path

from ...core.config import KDConfig, ModelConfig, TeacherConfig
from ...core.errors import DistillError
from ...kd.objective import needs_teacher
from ...kd.wiring import Link
from ..common import KDRun
from ..student import compare_with_teacher, distil
from ..teacher_cache import teacher_recipe
from ..teachers import baseline_training_config, load_frozen, made_once, model_entry, obtain_teacher, teacher_training_config


def link_config(cfg: KDConfig, teacher: ModelConfig, checkpoint: str | None, student: ModelConfig) -> KDConfig:
    """The kd config of one link of the chain: `student` taught by `teacher` (its trained `checkpoint`)."""
    taught_by = TeacherConfig(arch=teacher.arch, kwargs=dict(teacher.kwargs), name=teacher.name, checkpoint=checkpoint)
    return replace(cfg, teacher=taught_by, student=student, assistants=[])


def chain_teacher_recipe(cfg: KDConfig, processes: int = 1) -> dict:
    """What determines the chain's teacher: its training recipe (by `processes` data-parallel processes), or a given
    checkpoint's content."""
    if cfg.teacher.checkpoint is None:
        return teacher_recipe(teacher_training_config(cfg), processes)
    return {"arch": cfg.teacher.arch, "checkpoint_sha256": hashlib.sha256(Path(cfg.teacher.checkpoint).read_bytes()).hexdigest()}


def assistant_recipe(cfg: KDConfig, assistant: ModelConfig, teacher_recipe_: dict, processes: int = 1) -> dict:
    """What determines a distilled assistant: its training recipe (on the transfer set, `epochs`, by `processes`
    data-parallel processes: another batch per step), the kd settings and its teacher's recipe."""
    train_cfg = baseline_training_config(replace(cfg, student=assistant))
    kd = {"T": cfg.T, "alpha": cfg.alpha, "loss": dict(cfg.loss), "cache_teacher": cfg.cache_teacher}
    return {**teacher_recipe(train_cfg, processes), "kd": kd, "teacher": teacher_recipe_}


def links(cfg: KDConfig) -> list[Link]:
    """Each link of the chain: teacher -> assistants[0] (the teacher as given) -> ... -> student."""
    if not needs_teacher(cfg):
        raise DistillError("assistants: a chain distils each link from the one before, but loss=kd alpha=0 uses no teacher")
    chain = [cfg.teacher, *cfg.assistant_models(), cfg.student]
    checkpoints = [cfg.teacher.checkpoint] + [None] * (len(chain) - 2)
    return [Link(link_config(cfg, teacher, checkpoint, student)) for (teacher, student), checkpoint in zip(pairwise(chain), checkpoints)]


def assistant_chain(run: KDRun, summary: dict) -> None:
    """Distil each assistant from the one before (the first from the teacher), cached once per recipe,
    then the student from the last into the run folder; fills `summary` like a plain kd run plus `chain`."""
    cfg = run.cfg
    assistants = cfg.assistant_models()
    chain = [cfg.teacher, *assistants, cfg.student]
    teacher_module, teacher_entry = obtain_teacher(run)
    processes = run.compute.world.size
    recipe = chain_teacher_recipe(cfg, processes)
    rows, path = [{"role": "teacher", **teacher_entry}], teacher_entry["checkpoint"]
    for index, (teacher, assistant) in enumerate(zip(chain, assistants), 1):
        link = link_config(cfg, teacher, path, assistant)
        link = replace(link, baseline=False, export=None, logger=replace(cfg.logger, mlflow=False))
        recipe = assistant_recipe(cfg, assistant, recipe, processes)
        label = f"assistant {index}"
        made, source = made_once(cfg, recipe, run.run_dir / f"assistant{index}", label, partial(run.nested, link))
        model = load_frozen(made, assistant, "assistant", run.data, run.compute, run.compute.world)
        entry = run.compute.world.on_main(lambda: model_entry(run, model, assistant, made, source))  # called here, in this iteration
        rows.append({"role": label, **entry})
        path = str(made)
    student = distil(replace(run, cfg=link_config(cfg, assistants[-1], path, cfg.student)), summary)
    summary["chain"] = rows
    summary["teacher"] = teacher_entry
    if student is not None:  # rank 0: against the chain's teacher, not the last assistant
        compare_with_teacher(run, summary, teacher_module, student)
