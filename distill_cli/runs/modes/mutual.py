"""Deep mutual learning (`peers=[...]`, Zhang et al. 2018): two or more networks trained together from
scratch, each on cross-entropy plus the method's terms against each other network's (detached)
predictions, averaged over the others; one optimizer and one step per batch for all of them.

With `loss=kd` peer i's loss is (1 - alpha) CE + alpha T^2 mean_j KL(p_j || p_i), the paper's
L_C + 1/(K-1) sum_j D_KL(p_j || p_i) up to the factor alpha = 1/2 (`T=1 alpha=0.5`). Every peer gets
`<run>/peer<i>/best.pt` (picked on its own validation accuracy); `<run>/last.pt` holds all of them and
their optimizer state, so `distill resume` continues all peers exactly.
"""

from __future__ import annotations

import statistics
from dataclasses import replace

from torch import nn

from ...core.checkpoint import BEST, load_checkpoint, model_checkpoint, save_atomic
from ...core.config import KDConfig, ModelConfig, to_plain
from ...core.errors import DistillError
from ...kd.objective import objective_of
from ...kd.wiring import Link, build_student, wire_kd
from ...losses import logit_methods
from ...losses.base import Objective
from ...models.features import Outputs
from ...training.loop import FitResult, Step
from ...training.metrics import evaluate
from ...training.rng import seed_everything
from ..common import KDRun, checkpoint_maker, fit_network, trained_result
from ..teachers import baseline_entry


def mutual_step(forwards: list, objectives: list[Objective], labels: list[str]) -> Step:
    """One training step of all peers: each one's objective against every other peer's detached outputs,
    averaged over them. Terms are named `loss/<peer>/<term>` ("loss" is their sum), each peer's batch
    accuracy `train_acc/<peer>`; the logits returned (train_acc) are the first peer's."""

    def step(batch, epoch: int):
        outputs = [forward(batch.images) for forward in forwards]
        parts = {"loss": 0.0}
        for index, (label, objective, own) in enumerate(zip(labels, objectives, outputs)):
            others = [Outputs(other.logits.detach()) for j, other in enumerate(outputs) if j != index]
            terms = [objective(own, other, batch, epoch) for other in others]
            for name in terms[0]:
                mean = sum(term[name] for term in terms) / len(terms)
                if name == "loss":
                    parts["loss"] = parts["loss"] + mean
                else:
                    parts[f"loss/{label}/{name.removeprefix('loss/')}"] = mean
            parts[f"train_acc/{label}"] = (own.logits.argmax(1) == batch.labels).float().mean()
        return parts, outputs[0].logits

    return step


def _check_method(objective: Objective, loss_name: str) -> None:
    if objective.reads_teacher_features:
        raise DistillError(
            f"loss={loss_name}: peers= (mutual learning) hands each network the others' predictions only, "
            f"no features; use a logit method ({logit_methods(teacher_logits_only=True)})"
        )
    if not objective.needs_teacher:
        raise DistillError("peers: with loss=kd alpha=0 the peers would not learn from each other; set alpha > 0")


def mutual_learning(run: KDRun, summary: dict) -> None:
    """Train `cfg.peers` together into the run folder; the summary gets a row per peer (with the same
    network trained alone, when `baseline`) and, as `student`, the first peer's."""
    cfg, compute, data, loaders = run.cfg, run.compute, run.data, run.loaders
    models = cfg.peer_models()
    labels = [f"peer{index}" for index in range(1, len(models) + 1)]
    baselines = [baseline_entry(run, model, run.run_dir / f"baseline{i}") for i, model in enumerate(models, 1)] if cfg.baseline else []
    seed_everything(cfg.seed)
    peers, objectives, forwards = _build(run, models)
    joint = nn.ModuleList(peers)

    def validate() -> dict:
        if loaders.val is None:
            return {"val_acc": None, **{f"val_acc/{label}": None for label in labels}}
        accuracy = {f"val_acc/{label}": evaluate(peer, loaders.val, compute, data.info.num_classes).overall for label, peer in zip(labels, peers)}
        return {"val_acc": statistics.mean(accuracy.values()), **accuracy}

    def save_best(epoch: int, history: list[dict]) -> None:
        """Each peer's best.pt, when this epoch is its best on the validation split (the first best; the last without one)."""
        for label, peer, model in zip(labels, peers, models):
            *before, now = [row[f"val_acc/{label}"] for row in history]
            if now is None or all(now > value for value in before):
                make_checkpoint = checkpoint_maker(peer, model, cfg, data)
                save_atomic(make_checkpoint({"epoch": epoch, "val_acc": now}), run.run_dir / label / BEST)

    config = to_plain(cfg)
    result = fit_network(
        joint,
        mutual_step(forwards, objectives, labels),
        cfg,
        cfg.epochs,
        compute,
        data,
        loaders,
        run.run_dir,
        "peers",
        run.trackers,
        lambda state: model_checkpoint(joint, "peers", {}, data.info.num_classes, dataset=data.info.name, config=config, **state),
        method=nn.ModuleList(objectives),
        validate=validate,
        save_best=save_best,
    )
    if not compute.world.is_main:  # with several processes rank 0 tests the peers and writes the summary
        return
    rows = []
    for index, (label, peer, model) in enumerate(zip(labels, peers, models)):
        best = load_checkpoint(run.run_dir / label / BEST)
        chosen = FitResult(best_epoch=best["epoch"], best_val_acc=best["val_acc"], selection=result.selection)
        row = {"peer": label, **trained_result(peer, model, chosen, run.run_dir / label / BEST, compute, data, loaders)}
        if baselines:
            row["baseline"] = baselines[index]
            row["kd_gain"] = row["test_acc_best"] - baselines[index]["test_acc_best"]
        rows.append(row)
    summary.update(teacher=None, peers=rows, student=rows[0])
    if baselines:
        summary.update(baseline=baselines[0], kd_gain=rows[0]["kd_gain"])


def peer_config(cfg: KDConfig, models: list[ModelConfig], index: int) -> KDConfig:
    """The kd config of peer `index`: its network as the student, the next peer's as its "teacher"."""
    other = models[(index + 1) % len(models)]
    return replace(cfg, student=models[index], teacher=replace(cfg.teacher, **vars(other)), peers=[])


def links(cfg: KDConfig) -> list[Link]:
    """Each peer taught by the next one (the objective of each is wired against the others' outputs)."""
    _check_method(objective_of(cfg), cfg.loss["name"])
    models = cfg.peer_models()
    return [Link(peer_config(cfg, models, i), f"peers[{i}]", f"peers[{(i + 1) % len(models)}]") for i in range(len(models))]


def _build(run: KDRun, models: list[ModelConfig]) -> tuple[list[nn.Module], list[Objective], list]:
    """The peers as placed on the device, each one's objective (its "teacher" is the next peer) and forward pass."""
    compute, data = run.compute, run.data
    peers = [build_student(model, data, compute, f"peers[{i}]") for i, model in enumerate(models)]
    wired = [wire_kd(peer_config(run.cfg, models, i), data, compute, peers[(i + 1) % len(peers)], student=peer) for i, peer in enumerate(peers)]
    return peers, [w.objective for w in wired], [w.student_forward for w in wired]
