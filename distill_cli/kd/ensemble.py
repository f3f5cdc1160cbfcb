"""Multi-teacher ensembles (`teacher=ensemble`, Hinton et al. 2015): the student learns the weighted
average of the members' probabilities at temperature T.

The ensemble is handed to the objective as one frozen teacher whose "logits" are
T * log(sum_i w_i softmax(z_i / T)): softmax of them over T is exactly that average, so every method
that reads the teacher's logits (kd, dkd, mse_logits) and the cached teacher logits work unchanged.
Methods that read teacher features are refused: the members have no common features.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.checkpoint import load_checkpoint
from ..core.config import KDConfig, ModelConfig, TeacherConfig
from ..core.errors import DistillError
from ..core.world import SINGLE, World
from ..losses import logit_methods
from ..models import build_model
from ..models.checkpoints import load_weights
from ..training.compute import Compute
from .objective import objective_of


class EnsembleTeacher(nn.Module):
    """Frozen members whose output is the logits of their weighted average probabilities at temperature T."""

    def __init__(self, members: list[nn.Module], weights: list[float] | None = None, T: float = 1.0):
        super().__init__()
        weights = weights or [1.0] * len(members)
        self.members = nn.ModuleList(members)
        self.T = T
        total = sum(weights)
        self.register_buffer("log_weights", torch.tensor([math.log(w / total) for w in weights]).view(-1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([member(images).float() for member in self.members])  # (members, batch, classes)
        log_probs = F.log_softmax(logits / self.T, dim=-1) + self.log_weights
        return self.T * torch.logsumexp(log_probs, dim=0)


def member_configs(teacher: TeacherConfig, world: World = SINGLE) -> list[tuple[str, ModelConfig, Path | None]]:
    """(key, model config, checkpoint or None) of each member: `teacher.members`, then `teacher.checkpoints`
    (whose architecture is read from the checkpoint, by rank 0 with several processes)."""
    members = [(f"teacher.members[{i}]", member, None) for i, member in enumerate(teacher.ensemble_members())]
    for index, path in enumerate(map(Path, teacher.checkpoints)):
        arch, kwargs = world.on_main(lambda path=path: _architecture(path))
        members.append((f"teacher.checkpoints[{index}]", ModelConfig(arch, kwargs, f"{arch}:{path.parent.name}/{path.name}"), path))
    return members


def _architecture(path: Path) -> tuple[str, dict]:
    """The architecture and its arguments a checkpoint records."""
    checkpoint = load_checkpoint(path)
    return checkpoint["arch"], checkpoint["kwargs"]


def _refuse_feature_methods(cfg: KDConfig) -> None:
    if objective_of(cfg).reads_teacher_features:
        raise DistillError(
            f"loss={cfg.loss['name']}: teacher=ensemble hands the student averaged probabilities only, no "
            f"teacher features; use a logit method ({logit_methods(teacher_logits_only=True)})"
        )


def untrained_ensemble(cfg: KDConfig, compute: Compute, data) -> EnsembleTeacher:
    """The ensemble as built before training: each member's network, a given checkpoint's checked against
    the dataset's classes (and its weights against the input shape)."""
    _refuse_feature_methods(cfg)
    members = []
    for key, member, path in member_configs(cfg.teacher, compute.world):
        members.append(checked_member(key, member, path, data, compute.world) if path else build_model(member, data.info, key))
    return compute.place(EnsembleTeacher(members, cfg.teacher.weights, cfg.T))


def checked_member(key: str, member: ModelConfig, path: Path, data, world: World = SINGLE) -> nn.Module:
    """The member in checkpoint `path` (read by rank 0 with several processes, every rank getting it), refused
    (naming `key`) unless it predicts the dataset's classes from its images."""
    checkpoint = world.on_main(lambda: load_checkpoint(path))
    if checkpoint["num_classes"] != data.info.num_classes:
        raise DistillError(
            f"{key}: {path} predicts {checkpoint['num_classes']} classes but dataset {data.info.name} has "
            f"{data.info.num_classes} (every member must)"
        )
    model = build_model(member, data.info, key)
    return load_weights(model, checkpoint["state_dict"], f"{key}: {path} does not fit the images of dataset {data.info.name}")
