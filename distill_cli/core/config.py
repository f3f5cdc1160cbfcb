"""Structured config schemas, registered with Hydra's ConfigStore.

The YAML under `configs/` supplies values; these dataclasses supply the keys and types, so a typo
or a wrong type fails at start-up naming the key, and the range checks in `__post_init__` run when
a task converts its config with `to_object` (done first thing in every command).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf

from .errors import DistillError, did_you_mean

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # distill_cli/


def config_dir() -> Path:
    """The `configs/` folder: inside the package for a wheel install, at the repo top otherwise."""
    packaged = PACKAGE_DIR / "configs"
    return packaged if packaged.is_dir() else PACKAGE_DIR.parent / "configs"


def experiment_presets() -> dict[str, str]:
    """Each preset of configs/experiment/ and the command it is for ("train" or "kd"), read from the usage line its
    comment gives (`#   distill kd experiment=<name> ...`); "" where it gives none."""
    commands = {}
    for path in sorted((config_dir() / "experiment").glob("*.yaml")):
        usage = re.search(rf"distill (train|kd) experiment={re.escape(path.stem)}\b", path.read_text())
        commands[path.stem] = usage.group(1) if usage else ""
    return commands


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise DistillError(f"{key}: {message}")


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, key, f"{value!r} is not one of {', '.join(choices)}")


SYNTHETIC_ONLY = ("num_classes", "channels", "train_size", "test_size")


@dataclass
class DatasetConfig:
    """Which dataset, where it lives, how it is split and augmented; see `distill_cli/data/`."""

    name: str = "digits"
    # where torchvision datasets are (or are downloaded to); for imagefolder the tree's top folder
    root: str = "data"
    download: bool = True
    # fraction of the training set held out for picking best.pt (never the test split); 0 = use the last epoch
    val_split: float = 0.1
    # fraction held out for testing, for datasets that ship no test split (digits, test-less image folders)
    test_split: float = 0.2
    # the splits depend on this seed only, so every run (teacher and student) sees the same split
    split_seed: int = 0
    # the dataset's augmentation preset (crop with padding / jitter, flip), applied on the device
    augment: bool = False
    # with augment=true: also jitter brightness, contrast and saturation by factors in [1 - s, 1 + s]
    # (torchvision's ColorJitter(s, s, s)); 0 = off
    color_jitter: float = 0.0
    # classes dropped from the training (transfer) set only; validation and test keep them
    exclude_classes: list[int] = field(default_factory=list)
    # imagefolder: resize to this square size (null: keep the files' size); synthetic: the image size
    image_size: Optional[int] = None
    # imagefolder: decoded uint8 tensors are cached here, keyed by source folder, split and size
    cache_dir: str = "data/cache"
    # synthetic only (set in configs/dataset/synthetic.yaml; null = not applicable): the generated data's
    # classes, channels and split sizes. Every other dataset brings its own (see the summary's "data")
    num_classes: Optional[int] = None
    channels: Optional[int] = None
    train_size: Optional[int] = None
    test_size: Optional[int] = None
    # how batches reach the model: device = the whole split as uint8 on the compute device, augmented
    # there in batches; stream = DataLoader workers read (image folders: decode) and augment each
    # sample, pinned non-blocking copies; auto = device when the decoded splits fit in device_max_gb
    # (on a GPU, also in a quarter of its memory)
    pipeline: str = "auto"
    device_max_gb: float = 8.0
    # DataLoader worker processes of the stream pipeline; null = min(8, CPU count)
    workers: Optional[int] = None
    # imagefolder: pad = the training crop jitters by +-image_size/8 pixels after zero padding, evaluation sees the
    # whole image (CIFAR-style); resized = ImageNet-style: a random-resized crop (area 8-100%, aspect 3/4-4/3) to
    # image_size for training, resize to image_size/0.875 and a centre crop for evaluation (needs image_size; streams)
    crop: str = "pad"
    # per-channel normalisation on the [0, 1] scale; null = measured on the training images. Set them to what a
    # pretrained teacher was trained with (ImageNet: 0.485 0.456 0.406 / 0.229 0.224 0.225)
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None

    def __post_init__(self) -> None:
        _choice("dataset.pipeline", self.pipeline, ("auto", "device", "stream"))
        _choice("dataset.crop", self.crop, ("pad", "resized"))
        _check(
            self.crop == "pad" or (self.name == "imagefolder" and self.image_size is not None and self.pipeline != "device"),
            "dataset.crop",
            "resized is for image folders of any size, read as a stream: it needs dataset=imagefolder, "
            "dataset.image_size (the crop's size) and dataset.pipeline auto or stream",
        )
        _check((self.mean is None) == (self.std is None), "dataset.mean", "and dataset.std come together (or neither)")
        _check(self.std is None or all(value > 0 for value in self.std), "dataset.std", f"must be > 0, got {self.std}")
        _check(self.device_max_gb > 0, "dataset.device_max_gb", f"must be > 0, got {self.device_max_gb}")
        _check(self.workers is None or self.workers >= 0, "dataset.workers", f"must be >= 0, got {self.workers}")
        _check(0 <= self.color_jitter <= 1, "dataset.color_jitter", f"must be in [0, 1], got {self.color_jitter}")
        _check(
            self.augment or not self.color_jitter,
            "dataset.color_jitter",
            "is part of the augmentation; set dataset.augment=true as well",
        )
        _check(0 <= self.val_split < 1, "dataset.val_split", f"must be in [0, 1), got {self.val_split}")
        _check(0 < self.test_split < 1, "dataset.test_split", f"must be in (0, 1), got {self.test_split}")
        _check(self.image_size is None or self.image_size >= 1, "dataset.image_size", "must be >= 1")
        for key in SYNTHETIC_ONLY:
            value = getattr(self, key)
            if self.name == "synthetic":
                _check(value is not None and value >= 1, f"dataset.{key}", f"must be >= 1 for dataset=synthetic, got {value}")
            else:
                _check(value is None, f"dataset.{key}", f"only dataset=synthetic takes it; {self.name} brings its own")


@dataclass
class ModelConfig:
    """An architecture from the model registry and its keyword arguments."""

    arch: str = MISSING
    kwargs: dict[str, Any] = field(default_factory=dict)
    # the option the user chose (teacher=resnet20: "resnet20", set from the file name in configs/model/),
    # shown in results; a label only: models are built and cached by arch and kwargs
    name: Optional[str] = None

    @property
    def label(self) -> str:
        """The chosen option's name, or the architecture for a config built without one."""
        return self.name or self.arch


ENSEMBLE = "ensemble"  # teacher=ensemble: the teacher is the average of teacher.members / teacher.checkpoints


def model_option(entry: Any, key: str) -> ModelConfig:
    """A model option as `teacher=` takes it (`configs/model/<name>.yaml`), given as its name or as
    `{name: <option>, kwargs: {...}}` (arguments over the option's); `key` names the entry in errors."""
    if isinstance(entry, str):
        entry = {"name": entry}
    _check(
        isinstance(entry, dict) and isinstance(entry.get("name"), str) and set(entry) <= {"name", "kwargs"},
        key,
        f"expected a model option (cnn) or {{name: cnn, kwargs: {{width: 8}}}}, got {entry!r}",
    )
    options = sorted(path.stem for path in (config_dir() / "model").glob("*.yaml"))
    name = entry["name"]
    _check(name in options, key, f"{name!r} is no model option; {did_you_mean(name, options)}")
    node = OmegaConf.to_container(OmegaConf.load(config_dir() / "model" / f"{name}.yaml"))
    kwargs = {**node.get("kwargs", {}), **(entry.get("kwargs") or {})}
    return ModelConfig(arch=node["arch"], kwargs=kwargs, name=name)


STUDENT_INITS = ("random", "teacher")


@dataclass
class StudentConfig(ModelConfig):
    # start from this checkpoint's network and weights (a pruned one included: its architecture is read from
    # the file, so no student= is needed); the zeros of a weight-pruned one stay zero while it trains
    checkpoint: Optional[str] = None
    # random: as the architecture initialises it; teacher: the teacher's weights copied into a shallower
    # and/or narrower student of its family (every k-th block, the highest-l1 channels; models/pruning.py)
    init: str = "random"

    def __post_init__(self) -> None:
        _choice("student.init", self.init, STUDENT_INITS)
        _check(self.checkpoint is None or self.init == "random", "student.init", "student.checkpoint already gives the student its weights; drop one of them")

    @property
    def starts_trained(self) -> bool:
        """The student starts from trained weights (a checkpoint, or the teacher's), not from scratch."""
        return self.checkpoint is not None or self.init == "teacher"


@dataclass
class TeacherConfig(ModelConfig):
    # a checkpoint to load instead of training (or reusing a cached) teacher
    checkpoint: Optional[str] = None
    # teacher=ensemble: its members, model options each obtained like a teacher (given, cached or trained
    # once): [cnn, mlp] or [{name: cnn, kwargs: {width: 12}}, ...]; and/or checkpoints of trained ones
    members: list[Any] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    # the members' weights in the averaged probabilities (members first, then checkpoints); [] = equal
    weights: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        count = len(self.members) + len(self.checkpoints)
        if self.arch != ENSEMBLE:
            _check(not count and not self.weights, "teacher.members", f"only teacher=ensemble takes members (teacher={self.label})")
            return
        _check(count > 0, "teacher.members", "an empty ensemble: name its teachers (teacher.members=[cnn,mlp] and/or teacher.checkpoints=[a.pt,b.pt])")
        _check(self.checkpoint is None, "teacher.checkpoint", "teacher=ensemble takes teacher.checkpoints=[...], one per member")
        for index, entry in enumerate(self.members):
            model_option(entry, f"teacher.members[{index}]")
        weights_ok = all(math.isfinite(w) and w > 0 for w in self.weights)
        _check(not self.weights or (len(self.weights) == count and weights_ok), "teacher.weights",
               f"one weight > 0 per member ({count}), got {self.weights}")

    def ensemble_members(self) -> list[ModelConfig]:
        """teacher=ensemble's members given as model options."""
        return [model_option(entry, f"teacher.members[{index}]") for index, entry in enumerate(self.members)]


@dataclass
class OptimizerConfig:
    """Optimizer and its learning-rate schedule (stepped once per epoch)."""

    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    # weight decay on every parameter (as mdistiller and RepDistiller); false: not on 1-D ones (biases, norms)
    decay_all: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: str = "cosine"
    warmup_epochs: int = 0
    # step schedule: epochs, as fractions of the run, at which the lr is multiplied by gamma
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    gamma: float = 0.1
    # update kernel: fused (one kernel for all parameters), foreach (batched ops), loop (per parameter);
    # auto = fused on CUDA and CPU, torch's default elsewhere
    impl: str = "auto"
    # name=dot (DOT, Zhao et al. ICCV 2023): momentum - dot_delta for the task (cross-entropy) gradient,
    # momentum + dot_delta for the distillation terms' gradient
    dot_delta: float = 0.075
    # clip the gradients' global L2 norm (every trained parameter: the network and a method's parts) to this before
    # each step, after they are averaged over the processes; null = no clipping
    clip_grad_norm: Optional[float] = None

    def __post_init__(self) -> None:
        _choice("optimizer.name", self.name, ("sgd", "adam", "adamw", "dot"))
        norm = self.clip_grad_norm
        _check(norm is None or (math.isfinite(norm) and norm > 0), "optimizer.clip_grad_norm", f"must be > 0 (or null: no clipping), got {norm}")
        if self.name == "dot":
            _check(norm is None, "optimizer.clip_grad_norm", "not with name=dot (it steps on two gradients, the clip would see one)")
            _check(not self.nesterov, "optimizer.nesterov", "must be false with name=dot (DOT's two momenta are heavy-ball)")
            _check(
                0 <= self.dot_delta <= self.momentum and self.momentum + self.dot_delta < 1, "optimizer.dot_delta",
                f"must be in [0, momentum] with momentum + dot_delta < 1, got {self.dot_delta} (momentum {self.momentum})",
            )
        _choice("optimizer.impl", self.impl, ("auto", "fused", "foreach", "loop"))
        _choice("optimizer.schedule", self.schedule, ("cosine", "step", "constant"))
        _check(self.lr > 0, "optimizer.lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.warmup_epochs >= 0, "optimizer.warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        _check(all(0 < m < 1 for m in self.milestones), "optimizer.milestones", "must be fractions in (0, 1)")


@dataclass
class DeviceConfig:
    """Where and in which precision to compute."""

    # auto picks CUDA when present, else CPU; or name one: cpu, cuda, cuda:1, mps
    type: str = "auto"
    # auto = bf16 autocast on CUDA, fp32 elsewhere; fp16 uses a GradScaler (CUDA only)
    precision: str = "auto"
    # torch.use_deterministic_algorithms; on CPU runs are reproducible either way
    deterministic: bool = False
    # CPU threads for torch; 0 keeps torch's default
    threads: int = 0
    # conv nets and their input batches in channels_last (NHWC) memory; null = auto: conv nets with
    # convolutions of >= 8 output channels on median (narrower ones are slower so), not on MPS
    channels_last: Optional[bool] = None
    # torch.compile the models' training and teacher forward passes (first steps pay the compile time)
    compile: bool = False
    # data-parallel training processes on this machine, started with torchrun (one per GPU, or CPU
    # processes with gloo); batch_size is per process, so a step trains on batch_size x processes images.
    # Under your own `torchrun ... -m distill_cli` leave it at 1: torchrun's world size counts
    processes: int = 1
    # with several processes on GPUs: BatchNorm statistics over the whole step's batch (SyncBatchNorm)
    # instead of each process's share
    sync_batchnorm: bool = False
    # replay each training step (forward, backward, optimizer, GradScaler) from a CUDA graph: auto = on CUDA
    # when the step can be captured (the log says why not), true = refuse to run otherwise, false = eager
    cuda_graphs: str = "auto"

    def __post_init__(self) -> None:
        _choice("device.precision", self.precision, ("auto", "bf16", "fp16", "fp32"))
        self.cuda_graphs = str(self.cuda_graphs).lower()  # a YAML true/false arrives as a bool
        _choice("device.cuda_graphs", self.cuda_graphs, ("auto", "true", "false"))
        _check(self.threads >= 0, "device.threads", f"must be >= 0, got {self.threads}")
        _check(self.processes >= 1, "device.processes", f"must be >= 1, got {self.processes}")


@dataclass
class LoggerConfig:
    """Experiment trackers beside metrics.jsonl (`logger=tensorboard`, `mlflow`, `[tensorboard,mlflow]`).

    Execution only: they record a run, never change what it trains. See `distill_cli/training/trackers.py`."""

    # scalars per epoch and the summary as hparams under <run dir>/tb/<run name>/
    tensorboard: bool = False
    # a run per job: params (the config), metrics per epoch, the summary, best.pt and summary.json
    mlflow: bool = False
    # MLflow's tracking store: a SQLite file (created on first use) or a tracking server's http(s)://
    tracking_uri: str = "sqlite:///outputs/mlflow.db"
    # the MLflow experiment; null = one per sweep (named after its folder), else the command's name
    experiment: Optional[str] = None
    # the run's name in both trackers; null = the job's overrides (T=2,alpha=0.9), or the command's name
    name: Optional[str] = None


@dataclass
class PublishedConfig:
    """The published test top-1 accuracies (%) of the recipe an experiment preset follows (`published:` in
    configs/experiment/), set beside the run's own in its summary and results table. Descriptive only: they never
    change what a run trains (and a run resumes whatever they say)."""

    source: str = ""  # where the numbers come from: the paper's or repository's table
    dataset: Optional[str] = None  # the dataset they are on (`dataset.name`): a run on another is told so
    epochs: Optional[int] = None  # the schedule they come from: a run of another length is told so
    teacher: Optional[float] = None  # the network `distill train` trains with the preset; a kd preset's teacher
    student: Optional[float] = None  # a kd preset's student trained alone
    # a kd preset's distilled student, by method: the loss name, then "_kd" where the run adds Hinton's term to
    # another method (alpha > 0) and "_dot" under optimizer=dot (kd, crd, crd_kd, kd_dot)
    kd: dict[str, float] = field(default_factory=dict)
    # the loss settings a kd number was published with, where they are not the method's defaults, by the key of
    # `kd` ({dkd: {nckd_weight: 2}}): a run with other values is told so
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.epochs is None or self.epochs >= 1, "published.epochs", f"must be >= 1, got {self.epochs}")
        for key in self.settings:
            _check(key in self.kd, f"published.settings.{key}", f"has no published number (published.kd: {', '.join(self.kd) or 'none'})")
        named = {"teacher": self.teacher, "student": self.student, **{f"kd.{key}": value for key, value in self.kd.items()}}
        for key, value in named.items():
            _check(value is None or 1 < value <= 100, f"published.{key}", f"must be a top-1 accuracy in % (79.42, not 0.7942), got {value}")

    @property
    def given(self) -> bool:
        """Whether any number is set."""
        return self.teacher is not None or self.student is not None or bool(self.kd)


@dataclass
class RunConfig:
    """Keys shared by every command."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    epochs: int = 30
    batch_size: int = 64
    eval_batch_size: int = 512
    seed: int = 0
    # label smoothing of the cross-entropy (Szegedy et al. 2016): the target puts 1 - label_smoothing on the label
    # and label_smoothing spread evenly over all classes. `distill train`: the teacher's; `distill kd`: the
    # student's CE term and its baseline's (the teacher's is `teacher_label_smoothing`)
    label_smoothing: float = 0.0
    # where trained teachers are kept, keyed by their recipe, for later kd runs to reuse
    teacher_cache: str = "outputs/teacher_cache"
    # print test accuracy per class (always on when dataset.exclude_classes is set)
    per_class: bool = False
    # continue the run in hydra.run.dir from its last checkpoint (set by `distill resume <run dir>`)
    resume: bool = False
    # what the recipe of an experiment preset scored in its paper (set by the preset; see PublishedConfig)
    published: PublishedConfig = field(default_factory=PublishedConfig)

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.eval_batch_size >= 1, "eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")
        _check(0 <= self.label_smoothing < 1, "label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")


@dataclass
class TrainConfig(RunConfig):
    """`distill train`: train a teacher with cross-entropy."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)


# the training modes of `distill kd` beyond one student and one teacher, and the key that turns each on
# (their code: distill_cli/runs/modes/)
MODE_KEYS = {"mutual": "peers", "born_again": "generations", "assistants": "assistants"}


@dataclass
class KDConfig(RunConfig):
    """`distill kd`: distil a student from a teacher."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    # the KD method: {"name": <registered method>, <its hyperparameters>}; checked against the method's
    # constructor (`losses.base.build_method`), its published defaults in configs/loss/<name>.yaml
    loss: dict[str, Any] = field(default_factory=lambda: {"name": "kd"})
    T: float = 4.0
    alpha: float = 0.5
    # epochs for the teacher when kd has to train it (same optimizer, batch size and seed as the run)
    teacher_epochs: int = 30
    # the teacher's learning rate when kd trains it or looks it up in the cache (null: optimizer.lr, as the
    # student's); the tables train ShuffleNet/MobileNet students at 0.01 from teachers trained at 0.05
    teacher_lr: Optional[float] = None
    # the teacher's label smoothing when kd trains it or looks it up in the cache (null: label_smoothing, as the
    # student's); Müller et al. 2019 found teachers trained with it distil worse: teacher_label_smoothing=0.1
    teacher_label_smoothing: Optional[float] = None
    # also train (once per recipe, cached) the same student alone and report what KD bought over it
    baseline: bool = True
    # compute the teacher's logits once and skip its forward pass in every step (methods that read only
    # the teacher's logits): true = one logit per image (exact only with dataset.augment=false); views = one
    # per augmented view of every image (crop + flip: (2 pad + 1)^2 x 2 views), stored with the cached
    # teacher for every later run; auto = the exact one that pays (views: when the store exists or this
    # run's epochs reach its view count, and it fits teacher_views_max_gb); false always runs the teacher
    cache_teacher: str = "auto"
    # the largest teacher-view store to build (GiB), and the precision of its logits (float32, float16)
    teacher_views_max_gb: float = 4.0
    teacher_views_dtype: str = "float32"
    # K > 0: each training image shows only K views, drawn once (seeded, the same for every run) and picked
    # among every epoch, whose teacher logits the store holds (FKD's stored views): for augmentation that
    # cannot be enumerated (colour jitter), or fewer views than crop + flip make. It narrows the augmentation
    # the student sees (opt-in; the baseline keeps the full augmentation); 0 = fresh views every epoch
    teacher_views: int = 0
    # at the end of the run, export the student's best.pt to best.onnx or best.pt2 (see `distill export`)
    export: Optional[str] = None
    # deep mutual learning: these networks (model options, as `student=` takes) train together from
    # scratch, each on CE + the method's terms against each other one's predictions; [] = off
    peers: list[Any] = field(default_factory=list)
    # born-again networks: generation k (k >= 2) is the student again, taught by generation k-1's best.pt
    generations: int = 1
    # teacher assistants: teacher -> assistants[0] -> ... -> student, each step a cached kd run
    assistants: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.cache_teacher = str(self.cache_teacher).lower()
        _choice("cache_teacher", self.cache_teacher, ("auto", "true", "false", "views"))
        _choice("teacher_views_dtype", self.teacher_views_dtype, ("float32", "float16"))
        _check(self.teacher_views_max_gb >= 0, "teacher_views_max_gb", f"must be >= 0, got {self.teacher_views_max_gb}")
        _check(self.teacher_views >= 0, "teacher_views", f"must be >= 0 (0: fresh views every epoch), got {self.teacher_views}")
        if self.export is not None:
            _choice("export", self.export, ("onnx", "pt2"))
        _check(math.isfinite(self.T) and self.T > 0, "T", f"temperature must be a finite number > 0, got {self.T}")
        _check(0 <= self.alpha <= 1, "alpha", f"must be in [0, 1], got {self.alpha}")
        _check(isinstance(self.loss.get("name"), str), "loss.name", "name the KD method (loss=<method>; see distill list)")
        _check(self.teacher_epochs >= 1, "teacher_epochs", f"must be >= 1, got {self.teacher_epochs}")
        _check(self.teacher_lr is None or self.teacher_lr > 0, "teacher_lr", f"must be > 0 (or null: optimizer.lr), got {self.teacher_lr}")
        smoothing = self.teacher_label_smoothing
        _check(smoothing is None or 0 <= smoothing < 1, "teacher_label_smoothing", f"must be in [0, 1) (or null: label_smoothing), got {smoothing}")
        _check(self.generations >= 1, "generations", f"must be >= 1 (1: no born-again generations), got {self.generations}")
        _check(len(self.peers) != 1, "peers", f"deep mutual learning needs two or more networks, got one ({self.peers[0] if self.peers else ''})")
        for key in ("peers", "assistants"):
            for index, entry in enumerate(getattr(self, key)):
                model_option(entry, f"{key}[{index}]")
        modes = [MODE_KEYS[mode] for mode in self.modes_asked()]
        _check(len(modes) <= 1, ", ".join(modes), "pick one training mode: peers (mutual learning), generations (born-again) or assistants")
        if self.peers:
            _check(
                self.optimizer.clip_grad_norm is None, "optimizer.clip_grad_norm",
                "not with peers (they train under one optimizer: one norm over all of them would tie each peer's step to the others')",
            )
            teacherless = self.teacher.arch != ENSEMBLE and self.teacher.checkpoint is None
            _check(teacherless, "peers", "mutual learning trains its peers from scratch with no teacher; leave teacher= as it is")
        if self.assistants:
            _check(self.teacher.arch != ENSEMBLE, "assistants", "a chain starts from one teacher, not teacher=ensemble")
        if not isinstance(self.student, StudentConfig):  # a config built in code with a plain ModelConfig
            self.student = StudentConfig(arch=self.student.arch, kwargs=self.student.kwargs, name=self.student.name)
        if self.student.starts_trained:
            key = "student.checkpoint" if self.student.checkpoint is not None else "student.init"
            _check(not modes, key, f"a student that starts trained is distilled in the plain mode, not with {', '.join(modes)}")
        if self.student.init == "teacher":
            _check(self.teacher.arch != ENSEMBLE, "student.init", "teacher=ensemble has no one network to copy; give one teacher")

    def modes_asked(self) -> list[str]:
        """The training modes this config turns on (`MODE_KEYS`); validation allows at most one."""
        asked = {"mutual": bool(self.peers), "born_again": self.generations > 1, "assistants": bool(self.assistants)}
        return [mode for mode, on in asked.items() if on]

    @property
    def mode(self) -> str:
        """The training mode of this kd run: "single" (one student, one teacher) or one of `MODE_KEYS`."""
        return next(iter(self.modes_asked()), "single")

    def peer_models(self) -> list[ModelConfig]:
        """The networks of mutual learning (`peers`)."""
        return [model_option(entry, f"peers[{index}]") for index, entry in enumerate(self.peers)]

    def assistant_models(self) -> list[ModelConfig]:
        """The teacher assistants of the chain, from the teacher's end."""
        return [model_option(entry, f"assistants[{index}]") for index, entry in enumerate(self.assistants)]


@dataclass
class BenchConfig(KDConfig):
    """`distill bench`: images/s of the train and kd steps, against a plain per-sample reference loop."""

    warmup_steps: int = 5
    steps: int = 30
    repeats: int = 5
    # DataLoader workers of the reference loop (the usual tutorial setting)
    reference_workers: int = 2
    # image folders: the reference decodes every file per sample, as torchvision's ImageFolder does;
    # false: it makes its PIL images from the decoded images in memory, as torchvision's CIFAR10 does
    reference_from_files: bool = True
    # K >= 2: time a sweep of K kd jobs instead (T and alpha varied): one job after another vs fused
    # (hydra/launcher=fused: one teacher forward per batch; students one after another, and stacked)
    fused: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("steps", "repeats"):
            _check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        _check(self.fused == 0 or self.fused >= 2, "fused", f"the students of a fused sweep to time: 0 (off) or >= 2, got {self.fused}")
        _check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(self.reference_workers >= 0, "reference_workers", f"must be >= 0, got {self.reference_workers}")


# the config of each command that Hydra composes (`kind="hydra"` in commands.COMMANDS)
SCHEMAS = {"train": TrainConfig, "kd": KDConfig, "bench": BenchConfig}


def register_configs() -> None:
    """Store the schemas and expose every `configs/model/*.yaml` as both a teacher and a student option.

    `teacher=<arch>` and `student=<arch>` therefore accept exactly the same names, and adding a model
    is one Python file (the registered module) plus one YAML in `configs/model/`. Each option's `name`
    is its file name, so results say `resnet20` rather than its architecture `resnet_cifar`.
    """
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for command, schema in SCHEMAS.items():
        store.store(name=f"{command}_schema", node=schema)
    for path in sorted((config_dir() / "model").glob("*.yaml")):
        node = OmegaConf.load(path)
        node.name = path.stem
        for group in ("teacher", "student"):
            store.store(group=group, name=path.stem, node=node)
    store.store(group="teacher", name=ENSEMBLE, node={"arch": ENSEMBLE, "name": ENSEMBLE})


# dicts whose keys are names the config does not know: a model's arguments, a method's, a preset's published methods
_OPEN_KEYS, _OPEN_PATHS = ("kwargs", "loss"), ("published.kd", "published.settings")


def _unknown_keys(values: dict, schema: dict, prefix: str = "") -> list[str]:
    unknown = []
    for key, value in values.items():
        if key not in schema:
            unknown.append(prefix + key)
        elif isinstance(value, dict) and isinstance(schema[key], dict) and key not in _OPEN_KEYS and prefix + key not in _OPEN_PATHS:
            unknown += _unknown_keys(value, schema[key], f"{prefix}{key}.")
    return unknown


def validate_config(command: str, cfg: Any) -> RunConfig:
    """The composed config as its schema dataclass: unknown keys (also ones added with `+key=`),
    wrong types and out-of-range values raise, naming the key. Model `kwargs` and the method's `loss.*`
    keys stay open here; they are checked against the model's and the method's arguments."""
    schema = SCHEMAS[command]
    unknown = _unknown_keys(
        OmegaConf.to_container(cfg, resolve=False), OmegaConf.to_container(OmegaConf.structured(schema))
    )
    if unknown:
        raise DistillError(f"{unknown[0]}: not a key of the {command} config")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), cfg))


def to_plain(config: Any) -> Any:
    """A JSON-ready dict of a config dataclass (or DictConfig)."""
    if is_dataclass(config):
        return asdict(config)
    return OmegaConf.to_container(config, resolve=True)
