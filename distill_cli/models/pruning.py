"""Pruning a trained network and copying a teacher into a smaller student of its family.

`prune_channels` removes whole channels with torch-pruning's dependency graph (the layers that share a
channel, across residual additions and grouped convolutions, lose it together), ranked by an importance
(`IMPORTANCES`); `prune_weights` zeroes the smallest weights of every conv and linear layer
(`torch.nn.utils.prune`, made permanent); `keep_zeros` keeps those zeros at zero while a pruned network
fine-tunes. `copy_teacher` starts a shallower and/or narrower student of the teacher's family from the
teacher's weights: every k-th block of each stage, then the highest-importance channels (l1).
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from ..core.errors import DistillError
from .shapes import layer_shapes

IMPORTANCES = ("l1", "l2", "taylor")  # channel importance: the L1 or L2 norm of its weights, or Taylor (|w * dL/dw|)
STRUCTURES = ("channels", "weights")
WEIGHTED = (nn.Conv2d, nn.Linear)  # the layers whose weights `prune_weights` and `keep_zeros` treat


def torch_pruning():
    """The torch_pruning module, or a one-line error saying how to install it."""
    if importlib.util.find_spec("torch_pruning") is None:
        raise DistillError("channel pruning needs torch-pruning: pip install 'distill-cli[prune]'")
    import torch_pruning

    return torch_pruning


def classifier(model: nn.Module) -> nn.Module:
    """The output layer (the last linear or conv layer), whose outputs are the classes and are never pruned."""
    return [m for m in model.modules() if isinstance(m, WEIGHTED)][-1]


def channel_importance(name: str):
    """torch-pruning's importance for `name` (`IMPORTANCES`): summed over the layers a channel spans."""
    tp = torch_pruning()
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    return tp.importance.GroupMagnitudeImportance(p=1 if name == "l1" else 2)


def traced(build, what: str):
    """`build()` (torch-pruning tracing a network's channel dependencies); its failure as one line naming `what`."""
    try:
        return build()
    except (RuntimeError, ValueError, TypeError, ZeroDivisionError, IndexError, KeyError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DistillError(f"{what}: torch-pruning cannot trace this network's channel dependencies ({type(error).__name__}: {first})") from None


def taylor_gradients(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Accumulate the cross-entropy gradients of `batches` (images, labels) in `model`, which Taylor importance reads."""
    model.eval().requires_grad_(True).zero_grad()
    for images, labels in batches:
        F.cross_entropy(model(images), labels).backward()


def prune_channels(model: nn.Module, amount: float, importance: str, example: torch.Tensor) -> nn.Module:
    """Remove `amount` of the channels of every prunable layer group of `model` (in place; the classifier's
    outputs stay), the lowest by `importance` (Taylor: with gradients already accumulated, `taylor_gradients`)."""
    tp = torch_pruning()
    before = layer_shapes(model)
    model.requires_grad_(True)  # torch-pruning traces the autograd graph
    importance_of = channel_importance(importance)
    pruner = traced(lambda: tp.pruner.BasePruner(model, example, importance=importance_of, pruning_ratio=amount, ignored_layers=[classifier(model)]), "structure=channels")
    if not any(True for _ in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types)):
        raise DistillError("nothing to prune: the network has no channels outside its classifier (structure=weights prunes single weights)")
    pruner.step()
    model.zero_grad(set_to_none=True)
    if layer_shapes(model) == before and amount > 0:
        raise DistillError(f"amount={amount} removes no channel of this network (too few channels per layer); give a larger amount")
    return model.requires_grad_(False)


def weighted_layers(model: nn.Module) -> list[nn.Module]:
    layers = [m for m in model.modules() if isinstance(m, WEIGHTED)]
    if not layers:
        raise DistillError("nothing to prune: the network has no conv or linear layer")
    return layers


def prune_weights(model: nn.Module, amount: float) -> nn.Module:
    """Zero the `amount` smallest-magnitude weights of every conv and linear layer (in place, made permanent)."""
    for layer in weighted_layers(model):
        prune.l1_unstructured(layer, "weight", amount)
        prune.remove(layer, "weight")
    return model


def sparsity(model: nn.Module) -> float:
    """The share of the conv and linear weights that are exactly zero."""
    weights = [layer.weight for layer in model.modules() if isinstance(layer, WEIGHTED)]
    return sum(int((w == 0).sum()) for w in weights) / max(1, sum(w.numel() for w in weights))


def keep_zeros(model: nn.Module) -> int:
    """Keep every zero weight of `model`'s conv and linear layers (a weight-pruned network) at zero while it
    trains: their gradients are masked, so SGD and Adam(W) (momentum, weight decay of a zero) never move them.
    Returns how many weights are held at zero."""
    held = 0
    for layer in model.modules():
        if isinstance(layer, WEIGHTED):
            mask = (layer.weight != 0).to(layer.weight.dtype)
            if not mask.all():
                layer.weight.register_hook(lambda grad, mask=mask: grad * mask.to(grad.device))
                held += int((mask == 0).sum())
    return held


def _blocks_of(model: nn.Module) -> list[nn.Sequential]:
    """The stages of a zoo network (`models.layers.zoo_net`: `stages.<i>` holds blocks), or none."""
    stages = getattr(model, "stages", None)
    return list(stages) if isinstance(stages, nn.Sequential) else []


def _shallower(teacher: nn.Module, student: nn.Module, pair: str) -> None:
    """`teacher` (a copy) cut to the student's blocks per stage: blocks 0, k, 2k, ... (k = teacher's / student's)."""
    teacher_stages, student_stages = _blocks_of(teacher), _blocks_of(student)
    if len(teacher_stages) != len(student_stages):
        return
    for index, (ours, theirs) in enumerate(zip(teacher_stages, student_stages)):
        if len(theirs) > len(ours):
            raise DistillError(f"student.init=teacher: {pair}: the student's stage {index} has more blocks ({len(theirs)}) than the teacher's ({len(ours)}); it needs a shallower student")
        teacher.stages[index] = nn.Sequential(*(ours[j * len(ours) // len(theirs)] for j in range(len(theirs))))


def copy_teacher(student: nn.Module, teacher: nn.Module, example: torch.Tensor, pair: str) -> nn.Module:
    """`student` (in place) with `teacher`'s weights, for a student of the teacher's family that is shallower
    (zoo networks: every k-th block of each stage) and/or narrower (each layer group's highest-l1 channels,
    as `prune_channels` ranks them). Any other pair is refused in one line naming what it would need; `pair`
    names the two networks."""
    tp = torch_pruning()
    source = copy.deepcopy(teacher).cpu().float().eval().requires_grad_(True)
    _shallower(source, student, pair)
    if set(layer_shapes(source)) != set(layer_shapes(student)):
        raise DistillError(f"student.init=teacher: {pair}: the networks' layers differ beyond depth and width; it needs a student with the teacher's layers, fewer blocks per stage or fewer channels")
    shapes = layer_shapes(student)
    wanted = {name: shape.get("out_channels", shape.get("out_features")) for name, shape in shapes.items()}
    names = {module: name for name, module in source.named_modules()}
    graph = traced(lambda: tp.DependencyGraph().build_dependency(source, example_inputs=example.cpu()), f"student.init=teacher: {pair}")
    importance = channel_importance("l1")
    ranked = []  # every group ranked before any is cut, as `prune_channels` (torch-pruning's pruner) ranks them
    for group in graph.get_all_groups(ignored_layers=[classifier(source)], root_module_types=list(WEIGHTED)):
        root = group[0].dep.target.module
        have, want = root.weight.shape[0], wanted[names[root]]
        if want > have:
            raise DistillError(f"student.init=teacher: {pair}: the student's layer {names[root]} has {want} channels, the teacher's {have}; it needs a narrower student")
        if want < have:
            ranked.append((root, importance(group).argsort(descending=True)[want:]))
    for root, dropped in ranked:
        prune_out = tp.prune_conv_out_channels if isinstance(root, nn.Conv2d) else tp.prune_linear_out_channels
        graph.get_pruning_group(root, prune_out, idxs=sorted(dropped.tolist())).prune()
    different = [name for name, shape in layer_shapes(source).items() if shapes[name] != shape]
    if different:
        raise DistillError(f"student.init=teacher: {pair}: layer {different[0]} keeps another shape than the student's; it needs a student whose channels pruning can reach")
    student.load_state_dict(source.state_dict())
    return student
