"""What storing the teacher-view logits in float16 (`teacher_views_dtype=float16`) changes in the KD term.

Runs a trained teacher over `--images` training images in `--views` random augmented views each, exactly as the
store is built (`kd.teachers.teacher_view_logits`: the training loader's views, the frozen BN-folded forward),
keeps the float32 logits, rounds them to float16 as the store would, and reports at temperature `--T`:

- the largest absolute and relative logit error;
- the teacher's soft targets p_T: the largest absolute change of a probability, and KL(p32 || p16) (mean, max);
- the KD term's gradient with respect to the student's logits is T (p_T(student) - p_T(teacher)): its change is
  T |p16 - p32|, reported against the gradient's typical size for a student that has learned nothing (uniform).

    PYTHONPATH=. python benchmarks/view_store_precision.py --teacher outputs/teacher_cache/<arch-key>/teacher.pt \
        dataset=imagefolder dataset.root=/path/to/cifar10-jpg dataset.augment=true
"""

from __future__ import annotations

import argparse

import torch
from omegaconf import OmegaConf

from distill_cli.core.config import validate_config
from distill_cli.kd.teachers import teacher_view_logits
from distill_cli.models.checkpoints import model_from_checkpoint
from distill_cli.training.setup import prepare_run


class FirstImages:
    """The first `count` images of a split, as `teacher_view_logits` reads a split."""

    def __init__(self, split, count: int):
        self.split, self.count = split, count

    def __len__(self) -> int:
        return self.count

    def image(self, position: int) -> torch.Tensor:
        return self.split.image(position)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="a teacher checkpoint (best.pt or a cached teacher.pt)")
    parser.add_argument("--images", type=int, default=200, help="the first training images (each run in all its views)")
    parser.add_argument("--views", type=int, default=20, help="random views per image (of the preset's enumerable views)")
    parser.add_argument("--T", type=float, default=4.0)
    args, overrides = parser.parse_known_args()
    cfg = validate_config("kd", OmegaConf.merge(
        OmegaConf.create({"teacher": {"arch": "cnn"}, "student": {"arch": "cnn"}, "device": {"type": "cpu"}}),
        OmegaConf.from_dotlist(overrides),
    ))
    compute, data, loaders = prepare_run(cfg)
    teacher, _ = model_from_checkpoint(args.teacher, data.info)
    teacher = compute.place(teacher)
    loader = loaders.train
    subset = FirstImages(data.train, min(args.images, len(data.train)))
    table = torch.empty(len(subset), loader.augment.view_count, data.info.num_classes)
    teacher_view_logits(teacher, subset, loader, compute, data.info.num_classes, table, chunk=cfg.eval_batch_size)
    picked = torch.randint(0, loader.augment.view_count, (len(subset), args.views), generator=torch.Generator().manual_seed(0))
    full = table.gather(1, picked[:, :, None].expand(-1, -1, table.shape[2])).reshape(-1, table.shape[2])
    half = full.half().float()
    p32, p16 = (torch.softmax(logits / args.T, dim=1) for logits in (full, half))
    kl = (p32 * (p32.log() - p16.log())).sum(1)
    uniform_gradient = (args.T * (p32 - 1 / p32.shape[1]).abs()).mean()
    print(f"teacher {args.teacher}: {len(full):,} views ({len(subset):,} images x {args.views}), {data.info.num_classes} classes, T={args.T:g}")
    print(f"logits: |max| {full.abs().max():.2f}; float16 error max {(half - full).abs().max():.2e}, "
          f"relative max {((half - full).abs() / full.abs().clamp_min(1e-6)).max():.2e}")
    print(f"soft targets: max |p16 - p32| {(p16 - p32).abs().max():.2e}; KL(p32 || p16) mean {kl.mean():.2e}, max {kl.max():.2e}")
    print(f"KD gradient change: max {args.T * (p16 - p32).abs().max():.2e}, mean {args.T * (p16 - p32).abs().mean():.2e} "
          f"(typical size against a uniform student: {uniform_gradient:.2e})")


if __name__ == "__main__":
    main()
