"""The KD method library: one module per method, registered by name (`loss=<name>`).

Every method is a `Method` (see `base.py`): it names the feature points of both networks it reads,
builds its trainable parts once it knows their shapes, and returns its weighted loss terms. The
Hinton soft-target term (top-level `T`, `alpha`) and cross-entropy are added around any method by
`Objective`, so `loss=crd alpha=0.9` is CRD plus Hinton KD. Each method's published defaults live in
`configs/loss/<name>.yaml`.

May import: `core`, `data`, `models` and other `losses` modules.
"""

from __future__ import annotations

import importlib
import pkgutil

from omegaconf import OmegaConf

from ..core.config import config_dir
from ..core.registry import Registry


def _register_all() -> None:
    """Import every method module of this package (each registers itself): a new method is one file."""
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


LOSSES: Registry = Registry("loss", _register_all)


def logit_methods(teacher_logits_only: bool = False) -> str:
    """The names of the methods that read logits (`Method.reads_logits`), comma-separated, for messages; with
    `teacher_logits_only`, of those only the ones that read no teacher feature (what a teacher that hands over
    its logits alone, an ensemble or a peer, can serve)."""
    names = [name for name in LOSSES.names() if LOSSES.get(name).reads_logits]
    return ", ".join(name for name in names if not (teacher_logits_only and LOSSES.get(name)().teacher_points))


def method_catalogue() -> list[tuple[str, str, str]]:
    """(name, what it computes, its published defaults) of every method: the class docstring's first
    line and `configs/loss/<name>.yaml` (alpha and the `loss.*` hyperparameters)."""
    rows = []
    for name in LOSSES.names():
        config = OmegaConf.to_container(OmegaConf.load(config_dir() / "loss" / f"{name}.yaml"))
        hyper = {key: value for key, value in config["loss"].items() if key != "name"}
        defaults = ", ".join([f"alpha={config['alpha']}", *(f"loss.{key}={value}" for key, value in hyper.items())])
        summary = (LOSSES.get(name).__doc__ or "").strip().splitlines()[0]
        rows.append((name, summary, defaults))
    return rows
