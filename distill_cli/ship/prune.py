"""`distill prune <run folder or checkpoint> amount=<0..1> structure=channels|weights importance=l1|l2|taylor`.

`channels` removes `amount` of the channels of every prunable layer group (torch-pruning's dependency graph:
residual and grouped convolutions stay consistent), a smaller and faster network; `weights` zeroes the
`amount` smallest weights of every conv and linear layer (permanent; the size on disk and the speed stay,
the sparsity is reported). The pruned checkpoint (`<checkpoint>.pruned.pt`, or `out=`) records the pruned
layer shapes as numbers (`models.shapes`), so `distill eval`, `export`, `quantize` and
`distill kd student.checkpoint=` rebuild it with no further arguments. Before and after are measured as
`distill eval` measures (`measure`, timed in turns) and written to prune.json beside the eval results.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

from rich.text import Text

from ..core.checkpoint import BEST, load_checkpoint, model_checkpoint, save_atomic
from ..core.console import CONSOLE, library_log
from ..core.errors import DistillError
from ..core.files import write_json_atomic
from ..models.checkpoints import model_from_checkpoint
from ..models.pruning import IMPORTANCES, STRUCTURES, prune_channels, prune_weights, sparsity, taylor_gradients
from ..models.shapes import shape_changes
from ..training.setup import prepare_run
from .evaluate import Timing, eval_table, first_images, measure, subject, timed

TAYLOR_BATCHES = 8  # training batches whose gradients rank the channels for importance=taylor


def check_options(options: dict) -> None:
    """One-line refusals of bad options, before anything is loaded."""
    amount, structure, importance = options["amount"], options["structure"], options["importance"]
    if not 0 <= amount < 1:
        raise DistillError(f"amount={amount}: the share of channels or weights to remove must be in [0, 1)")
    if structure not in STRUCTURES:
        raise DistillError(f"structure={structure}: choose {' or '.join(STRUCTURES)}")
    if importance not in IMPORTANCES:
        raise DistillError(f"importance={importance}: choose {', '.join(IMPORTANCES)}")
    if structure == "weights" and importance != "l1":
        raise DistillError(f"importance={importance}: structure=weights removes single weights by magnitude (importance=l1)")


def run_prune(path: str | Path, overrides: list[str], options: dict) -> dict:
    """`distill prune`: the checkpoint (a run folder: its best.pt) pruned, written, and measured before and
    after; prune.json in `out`'s folder's eval/ (default `<run folder>/eval`)."""
    check_options(options)
    source = Path(path) / BEST if Path(path).is_dir() else Path(path)
    sub = subject(path, overrides)
    target = Path(options["out"]) if options["out"] else source.with_suffix(".pruned.pt")
    folder = target.parent / "eval"
    with library_log(folder / "prune.log") as logged:
        result = prune_checkpoint(source, target, sub.config, options)
    write_json_atomic(result, folder / "prune.json")
    CONSOLE.print(eval_table(result))
    CONSOLE.print(Text(prune_line(result)))
    CONSOLE.print(f"wrote {target} and {folder / 'prune.json'}{logged.mention()}")
    return result


def prune_line(result: dict) -> str:
    """What the pruning did, in one line under the table."""
    before, after = result["models"]
    return (
        f"structure={result['structure']} amount={result['amount']} importance={result['importance']}: "
        f"params {before['params']:,} -> {after['params']:,}, MACs {before['macs']:,} -> {after['macs']:,}, "
        f"sparsity {result['sparsity_before']:.1%} -> {result['sparsity_after']:.1%}, "
        f"test acc {before['test_acc']:.2%} -> {after['test_acc']:.2%} (before fine-tuning; heal it with "
        f"distill kd student.checkpoint={result['checkpoint']} teacher.checkpoint={result['source']})"
    )


def prune_checkpoint(source: Path, target: Path, config, options: dict) -> dict:
    """The checkpoint at `source` pruned as `options` say, written to `target`, both measured (CPU)."""
    compute, data, loaders = prepare_run(config)
    model, name = model_from_checkpoint(source, data.info)
    recorded = load_checkpoint(source)
    timing = Timing(calls=options["calls"], batch=options["batch"])
    images = first_images(loaders.test, timing.batch)
    pruned = copy.deepcopy(model)
    if options["structure"] == "weights":
        prune_weights(pruned, options["amount"])
    else:
        if options["importance"] == "taylor":
            batches = ((batch.images.float().cpu(), batch.labels.cpu()) for batch in loaders.eval_loader(data.train))
            taylor_gradients(pruned, itertools.islice(batches, TAYLOR_BATCHES))
        prune_channels(pruned, options["amount"], options["importance"], images[:1])
    pruning = {key: options[key] for key in ("structure", "amount", "importance")}
    layers = {**(recorded.get("layers") or {}), **shape_changes(pruned, model)}
    checkpoint = model_checkpoint(
        pruned, recorded["arch"], recorded["kwargs"], recorded["num_classes"], dataset=recorded.get("dataset"), config=recorded.get("config"),
        **({"layers": layers} if layers else {}), pruning={**pruning, "source": str(source)},
    )
    save_atomic(checkpoint, target)
    rows = [
        measure("before", name, source, model, loaders.test, data.info, compute, timing, gpu=False),
        measure("after", f"{name} pruned", target, pruned, loaders.test, data.info, compute, timing, gpu=False),
    ]
    return {
        "command": "prune",
        **pruning,
        "source": str(source),
        "checkpoint": str(target),
        "dataset": data.info.name,
        "test_images": len(data.test),
        "timing": timing.__dict__,
        "sparsity_before": sparsity(model),
        "sparsity_after": sparsity(pruned),
        "pruned_layers": len(shape_changes(pruned, model)),
        "models": timed(rows, images, timing),
    }
