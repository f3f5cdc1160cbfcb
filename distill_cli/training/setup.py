"""A run's set-up before anything is built: the device, precision and kernels resolved, the data loaded
and the run's loaders (device or stream pipeline, sharded over data-parallel processes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..core.config import KDConfig, RunConfig
from ..core.errors import DistillError
from ..core.world import world as current_world
from ..data import DataSplits, load_dataset, training_augment
from ..data.loader import Loader, build_loader, choose_pipeline
from .compute import Compute, resolve_compute
from .graphs import checked_setting
from .optim import check_optimizer


@dataclass
class Loaders:
    train: Loader
    val: Loader | None
    test: Loader
    eval_loader: Callable[[object], Loader]  # an unshuffled, unaugmented loader over any split of the run
    pipeline: str  # device | stream


def prepare_run(cfg: RunConfig) -> tuple[Compute, DataSplits, Loaders]:
    """Resolve device, precision and kernels, load the data and build the run's loaders (device or stream pipeline);
    `device.cuda_graphs=true` where the step cannot be captured fails here, before anything is built."""
    world = current_world()
    compute = resolve_compute(cfg.device, world)
    checked_setting(cfg.device.cuda_graphs, compute, cfg.optimizer)
    check_optimizer(cfg.optimizer, compute)
    data = load_dataset(cfg.dataset)
    if cfg.batch_size * world.size > len(data.train):
        processes = f" x {world.size} processes" if world.size > 1 else ""
        raise DistillError(f"batch_size={cfg.batch_size}{processes} is larger than the training split ({len(data.train)} images)")
    pipeline = choose_pipeline(cfg.dataset, [data.train, data.val, data.test], compute.device)
    # batches come in channels_last unless it is off: most conv nets use it (see Compute.uses_channels_last)
    options = {"workers": cfg.dataset.workers, "dtype": compute.input_dtype, "channels_last": compute.channels_last is not False}

    def eval_loader(split) -> Loader:
        return build_loader(pipeline, split, data.info, cfg.eval_batch_size, compute.device, **options)

    train = build_loader(
        pipeline,
        data.train,
        data.info,
        cfg.batch_size,
        compute.device,
        shuffle=True,
        drop_last=True,
        seed=cfg.seed,
        # kd's teacher_views: each image restricted to views drawn once, whose teacher logits can be stored
        augment=training_augment(cfg.dataset, data.info, drawn=cfg.teacher_views if isinstance(cfg, KDConfig) else 0),
        shard=(world.rank, world.size),
        **options,
    )
    val = eval_loader(data.val) if len(data.val) else None
    return compute, data, Loaders(train, val, eval_loader(data.test), eval_loader, pipeline)
