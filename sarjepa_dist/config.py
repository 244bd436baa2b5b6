"""Typed configuration: dataclasses loaded from YAML, overridable with ``--set section.key=value``.

Every field is validated after loading; an error names the key, the value and what is allowed.
Unknown keys are errors too (a typo must never silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from sarjepa_dist.errors import UsageError


class ConfigError(UsageError, ValueError):
    """A configuration value is missing, unknown or out of range; the message says how to fix it."""


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` / ``5E4`` as floats.

    PyYAML follows YAML 1.1, where a float needs a dot (``1.0e-3``), so ``lr: 1e-3`` or
    ``--set optim.lr=1e-3`` would load as the *string* '1e-3' and be refused as "must be a number".
    """


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2-style floats (see ``_YamlLoader``)."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


# --------------------------------------------------------------------------- allowed values
# Each set of allowed values is defined here once; the validators below and the modules that act
# on a value (transforms, model) use these names.

CONDITIONINGS = ("amplitude", "log", "db")
TRANSFORM_PLACEMENTS = ("data", "device")
GRADIENT_DOMAINS = ("gradient-by-ratio", "sobel", "identity")
GRADIENT_FUSES = ("mean", "max")
# name -> (embed_dim, depth, num_heads): timm's standard VisionTransformer widths
ENCODER_ARCHS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}
PATCH_SIZES = (4, 8, 14, 16, 32)
TARGET_MODES = ("ema-gradient", "ema-pixel", "gradient-features")
CONTEXT_DOMAINS = ("raw", "gradient")
PREDICTOR_CONTEXTS = ("per-block", "shared")
LR_SCALINGS = ("linear", "none")
TUNE_MODES = ("min", "max")
FEWSHOT_METHODS = ("linear", "knn", "prototype")
FEATURE_DOMAINS = ("context", "target")
# How an encoder's patch tokens become one feature vector (model/pooling.py says what each means).
FEATURE_POOLINGS = ("mean", "grid2", "grid4", "centre")
# test-time views an encoder's tokens are averaged over (model/pooling.py): none, or the chip and its
# azimuth mirror (the one flip a real SAR acquisition can produce; see data.augment.vertical_flips)
FEATURE_TTAS = ("none", "hflip")
# fewshot.tta adds hflip+crops: the mirror-averaged tokens further averaged over the chip and five
# crops of 15/16 of its side (centre and corners, transforms.crop_views), taken from the stored chip
# before the resize. It applies to the hand-made baselines too (the same views for every feature).
# The online probe embeds chips already resized to the model, so probe.tta stays in FEATURE_TTAS.
FEWSHOT_TTAS = FEATURE_TTAS + ("hflip+crops",)
PROBE_METHODS = ("knn", "linear")
# train.precision: auto = bf16 autocast on CUDA when train.amp, fp32 elsewhere; bf16 = bf16 autocast
# on every device (CPU autocast included); fp32 = no autocast.
PRECISIONS = ("auto", "bf16", "fp32")


# --------------------------------------------------------------------------- validation helpers


def check_range(key: str, value: float, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False) -> None:
    bad = False
    if lo is not None:
        bad |= value <= lo if lo_open else value < lo
    if hi is not None:
        bad |= value >= hi if hi_open else value > hi
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        raise ConfigError(f"{key} = {value!r} is out of range; allowed: {left}{lo_s}, {hi_s}{right}")


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{key} = {value!r} is not allowed; choose one of {choices}")


def check_pair(key: str, pair: tuple[float, float], lo: float | None = None, hi: float | None = None) -> None:
    if len(pair) != 2:
        raise ConfigError(f"{key} = {pair!r} must be a pair [low, high]")
    check_range(f"{key}[0]", pair[0], lo, hi)
    check_range(f"{key}[1]", pair[1], lo, hi)
    if pair[0] > pair[1]:
        raise ConfigError(f"{key} = {list(pair)} has low > high; write it as [low, high]")


# --------------------------------------------------------------------------- sections


@dataclass
class RayConfig:
    address: str | None = None  # None: RAY_ADDRESS or a new local cluster
    num_cpus: int | None = None  # only for a new local cluster
    num_gpus: int | None = None

    def validate(self, p: str = "ray") -> None:
        if self.num_cpus is not None:
            check_range(f"{p}.num_cpus", self.num_cpus, 1)
        if self.num_gpus is not None:
            check_range(f"{p}.num_gpus", self.num_gpus, 0)


@dataclass
class StorageConfig:
    """Where S3-compatible storage lives. Credentials are read from the environment only."""

    endpoint_url: str | None = None  # else AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3
    region: str | None = None  # else AWS_REGION / AWS_DEFAULT_REGION

    def validate(self, p: str = "storage") -> None:
        if self.endpoint_url is not None and "://" not in self.endpoint_url:
            raise ConfigError(f"{p}.endpoint_url = {self.endpoint_url!r} needs a scheme, e.g. http://127.0.0.1:9000")


@dataclass
class AugmentConfig:
    # Only what a real acquisition can produce: rows run along range (the radar at the top), so a
    # vertical flip or a 90° rotation puts the radar and the shadow where no real chip has them; a
    # horizontal flip mirrors the aspect angle. MSTAR, 3,000 steps, report split: 10-shot linear
    # 60.5 -> 64.2, k-NN 56.2 -> 59.9 without them (README: learning curves).
    flips: bool = True
    vertical_flips: bool = False  # with flips: also flip along range
    rot90: bool = False
    crop_scale: tuple[float, float] = (0.6, 1.0)  # random-resized-crop area fraction; (1, 1) disables

    def validate(self, p: str = "data.augment") -> None:
        check_pair(f"{p}.crop_scale", self.crop_scale, 0.05, 1.0)


@dataclass
class GradientConfig:
    """The gradient-domain operator that makes the target-encoder input ∇x (METHOD.md §2)."""

    domain: str = "gradient-by-ratio"  # GRADIENT_DOMAINS
    radii: tuple[int, ...] = (5, 9, 13, 17)
    eps: float = 1e-2
    fuse: str = "mean"  # how scales fuse to one map per channel: GRADIENT_FUSES

    def validate(self, p: str = "gradient") -> None:
        check_choice(f"{p}.domain", self.domain, GRADIENT_DOMAINS)
        if not self.radii:
            raise ConfigError(f"{p}.radii is empty; give at least one radius, e.g. [5, 9, 13, 17]")
        for i, r in enumerate(self.radii):
            check_range(f"{p}.radii[{i}]", r, 1, 64)
        check_range(f"{p}.eps", self.eps, 0, 1, lo_open=True)
        check_choice(f"{p}.fuse", self.fuse, GRADIENT_FUSES)


@dataclass
class DataConfig:
    path: str = ""  # a shard dataset: local path, file:// or s3://bucket/prefix
    img_size: int = 64  # chips are cropped/resized to this before the model
    channels: int = 1
    conditioning: str = "log"  # CONDITIONINGS
    transform_placement: str = "device"  # where ∇x is computed: data (Ray Data CPU workers) | device
    batch_size: int = 32  # per worker
    shuffle_buffer: int = 512  # local shuffle buffer, in chips
    # Ray Data emits blocks in input order, so an epoch's chip order depends on the seed alone (a
    # resumed run then sees exactly the chips an uninterrupted one would); costs some throughput.
    preserve_order: bool = False
    seed: int = 0
    max_bad_fraction: float = 0.01  # stop the run when more rows than this are bad
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self, p: str = "data") -> None:
        check_range(f"{p}.img_size", self.img_size, 8, 4096)
        check_range(f"{p}.channels", self.channels, 1, 64)
        check_choice(f"{p}.conditioning", self.conditioning, CONDITIONINGS)
        check_choice(f"{p}.transform_placement", self.transform_placement, TRANSFORM_PLACEMENTS)
        check_range(f"{p}.batch_size", self.batch_size, 1, 65536)
        check_range(f"{p}.shuffle_buffer", self.shuffle_buffer, 0)
        check_range(f"{p}.max_bad_fraction", self.max_bad_fraction, 0.0, 1.0)
        self.augment.validate(f"{p}.augment")


@dataclass
class MaskConfig:
    """I-JEPA multi-block masking (METHOD.md §3)."""

    num_context_blocks: int = 1
    context_scale: tuple[float, float] = (0.85, 1.0)
    num_target_blocks: int = 4
    target_scale: tuple[float, float] = (0.15, 0.2)
    target_aspect: tuple[float, float] = (0.75, 1.5)
    min_keep: int = 10
    # One block size per batch (as the I-JEPA reference samples): blocks stay whole after the
    # batch's counts are equalised. False draws sizes per sample, then truncates to the batch
    # minimum, which on 8x8 grids leaves a context near min_keep.
    shared_sizes: bool = True

    def validate(self, p: str = "mask") -> None:
        for blocks in ("context", "target"):
            check_range(f"{p}.num_{blocks}_blocks", getattr(self, f"num_{blocks}_blocks"), 1, 16)
            check_pair(f"{p}.{blocks}_scale", getattr(self, f"{blocks}_scale"), 0.0, 1.0)
        check_pair(f"{p}.target_aspect", self.target_aspect, 0.1, 10.0)
        check_range(f"{p}.min_keep", self.min_keep, 1)


@dataclass
class ModelConfig:
    encoder: str = "vit_tiny"  # a name in ENCODER_ARCHS
    patch_size: int = 8
    depth: int | None = None  # override the architecture's depth (tiny models in tests)
    predictor_dim: int = 96
    predictor_depth: int = 6
    predictor_heads: int = 3
    target_mode: str = "ema-gradient"  # TARGET_MODES
    context_domain: str = "raw"  # CONTEXT_DOMAINS: what the context encoder sees
    drop_path: float = 0.0
    # shared: the context runs through the predictor once for all target blocks, its tokens not
    # attending to mask tokens (cheaper; level with per-block on MSTAR: README, "Measured");
    # per-block: once per target block, as I-JEPA does
    predictor_context: str = "shared"  # PREDICTOR_CONTEXTS

    def validate(self, p: str = "model") -> None:
        check_choice(f"{p}.encoder", self.encoder, ENCODER_ARCHS)
        check_choice(f"{p}.patch_size", self.patch_size, PATCH_SIZES)
        if self.depth is not None:
            check_range(f"{p}.depth", self.depth, 1, 48)
        check_range(f"{p}.predictor_dim", self.predictor_dim, 8, 4096)
        check_range(f"{p}.predictor_depth", self.predictor_depth, 1, 48)
        check_range(f"{p}.predictor_heads", self.predictor_heads, 1, 64)
        if self.predictor_dim % 4:
            raise ConfigError(f"{p}.predictor_dim = {self.predictor_dim} must be a multiple of 4 "
                              f"(2-D sin-cos positions split the width in four)")
        if self.predictor_dim % self.predictor_heads:
            raise ConfigError(f"{p}.predictor_dim = {self.predictor_dim} must be divisible by "
                              f"{p}.predictor_heads = {self.predictor_heads}")
        check_choice(f"{p}.target_mode", self.target_mode, TARGET_MODES)
        check_choice(f"{p}.context_domain", self.context_domain, CONTEXT_DOMAINS)
        check_range(f"{p}.drop_path", self.drop_path, 0.0, 1.0, hi_open=True)
        check_choice(f"{p}.predictor_context", self.predictor_context, PREDICTOR_CONTEXTS)

    def check_resumes(self, saved: Mapping[str, Any], where: str, p: str = "model") -> None:
        """Refuse to continue a checkpoint whose ``model`` section (``saved``, from its config.json)
        trained a different method: same-shaped weights would load without complaint. A key the
        checkpoint lacks takes the value the project used before the key existed. ``drop_path``
        (regularisation, not the method) may change."""
        changed = []
        for f in dataclasses.fields(self):
            if f.name == "drop_path":
                continue
            here = getattr(self, f.name)
            before = saved.get(f.name, _MODEL_KEYS_BEFORE_THEY_EXISTED.get(f.name, here))
            if before != here:
                changed.append((f"{p}.{f.name}", here, before))
        if changed:
            what = "; ".join(f"{key} = {here!r} here but {before!r} in the checkpoint" for key, here, before in changed)
            sets = " ".join(f"--set {key}={'null' if before is None else before}" for key, _, before in changed)
            raise ConfigError(f"cannot resume from {where}: {what}. To continue that run, set the checkpoint's "
                              f"values ({sets}); to start another, give a new train.name")


# What a checkpoint written before a model key existed trained with (ModelConfig.check_resumes).
_MODEL_KEYS_BEFORE_THEY_EXISTED: dict[str, Any] = {"predictor_context": "per-block"}


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine lr, cosine weight decay, EMA ramp (METHOD.md §4)."""

    lr: float = 1e-3
    start_lr: float = 2e-4
    final_lr: float = 1e-6
    warmup_fraction: float = 0.1  # of total steps
    weight_decay: float = 0.04
    final_weight_decay: float = 0.4
    betas: tuple[float, float] = (0.9, 0.95)
    ema: tuple[float, float] = (0.996, 1.0)  # τ ramps linearly from [0] to [1]
    grad_clip: float = 1.0  # 0 disables
    # lr, start_lr and final_lr are for a global batch of `reference_batch`; with "linear" they are
    # multiplied by global_batch / reference_batch (SAR-JEPA's rule: 1e-3 x batch/256). Unscaled
    # 1e-3 at batch 32 collapses small runs (target effective rank falls from ~16 to ~4).
    lr_scaling: str = "linear"  # LR_SCALINGS
    reference_batch: int = 256

    def scale_for(self, global_batch: int) -> float:
        return global_batch / self.reference_batch if self.lr_scaling == "linear" else 1.0

    def validate(self, p: str = "optim") -> None:
        check_choice(f"{p}.lr_scaling", self.lr_scaling, LR_SCALINGS)
        check_range(f"{p}.reference_batch", self.reference_batch, 1)
        check_range(f"{p}.lr", self.lr, 0, 10, lo_open=True)
        check_range(f"{p}.start_lr", self.start_lr, 0, 10)
        check_range(f"{p}.final_lr", self.final_lr, 0, 10)
        check_range(f"{p}.warmup_fraction", self.warmup_fraction, 0.0, 1.0)
        check_range(f"{p}.weight_decay", self.weight_decay, 0.0, 10.0)
        check_range(f"{p}.final_weight_decay", self.final_weight_decay, 0.0, 10.0)
        check_pair(f"{p}.betas", self.betas, 0.0, 0.99999)
        check_pair(f"{p}.ema", self.ema, 0.0, 1.0)
        check_range(f"{p}.grad_clip", self.grad_clip, 0.0)


@dataclass
class TrainConfig:
    name: str = "sarjepa-pretrain"  # relaunching with the same name resumes
    storage_path: str = "runs"  # checkpoints and results: local path or s3://bucket/prefix
    steps: int = 1000  # total optimiser steps
    num_workers: int = 1
    # Elastic training (Train V2): start with as few as min_workers and grow to num_workers as nodes
    # join; a resize restarts the group from the latest checkpoint. None: exactly num_workers.
    min_workers: int | None = None
    elastic_resize_interval_s: float = 60.0  # how often a running group looks for more resources
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    checkpoint_every: int = 200
    num_to_keep: int = 2
    max_failures: int = 0
    log_every: int = 10
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU (train.precision: bf16 forces it everywhere)
    precision: str = "auto"  # PRECISIONS
    compile: bool = False  # torch.compile the model
    seed: int = 0

    def autocast_dtype(self, device_type: str) -> str | None:
        """The torch dtype name the step autocasts to on ``device_type`` (None: plain fp32)."""
        if self.precision == "bf16" or (self.precision == "auto" and self.amp and device_type == "cuda"):
            return "bfloat16"
        return None

    def validate(self, p: str = "train") -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"{p}.name = {self.name!r} must be a non-empty name without '/'")
        check_range(f"{p}.steps", self.steps, 1)
        check_range(f"{p}.num_workers", self.num_workers, 1, 4096)
        if self.min_workers is not None:
            check_range(f"{p}.min_workers", self.min_workers, 1, self.num_workers)
        check_range(f"{p}.elastic_resize_interval_s", self.elastic_resize_interval_s, 0.0)
        check_range(f"{p}.cpus_per_worker", self.cpus_per_worker, 0.0, 256.0)
        check_range(f"{p}.checkpoint_every", self.checkpoint_every, 1)
        check_range(f"{p}.num_to_keep", self.num_to_keep, 1)
        check_range(f"{p}.max_failures", self.max_failures, -1)
        check_range(f"{p}.log_every", self.log_every, 1)
        check_choice(f"{p}.precision", self.precision, PRECISIONS)
        if self.precision == "bf16" and not self.amp:
            raise ConfigError(f"{p}.amp = false contradicts {p}.precision = 'bf16'; "
                              f"set {p}.precision = 'fp32' (or drop {p}.amp)")


@dataclass
class ProbeConfig:
    """Online few-shot probe of the evaluation encoder during pretraining (``sarjepa_dist/probe.py``)."""

    every: int = 0  # steps between probes on rank 0; 0 disables
    # a labelled shard dataset, read whole into rank 0's memory once (keep it small: a few thousand
    # chips); None: data.path, which must then be labelled and small
    data: str | None = None
    shots: int = 10  # K support chips per class
    episodes: int = 5  # support draws averaged per probe
    test_fraction: float = 0.3  # of the probe chips per class, scored
    max_per_class: int | None = 60  # probe chips per class (caps the probe's cost); None: all
    methods: list[str] = field(default_factory=lambda: ["knn"])
    pooling: str = "mean"  # mean | grid2 | grid4 | centre (model/pooling.py), as fewshot.pooling
    tta: str = "none"  # FEATURE_TTAS, as fewshot.tta
    seed: int = 0

    def validate(self, p: str = "probe") -> None:
        check_range(f"{p}.every", self.every, 0)
        check_range(f"{p}.shots", self.shots, 1)
        check_range(f"{p}.episodes", self.episodes, 1, 100)
        check_range(f"{p}.test_fraction", self.test_fraction, 0.0, 1.0, lo_open=True, hi_open=True)
        if self.max_per_class is not None:
            check_range(f"{p}.max_per_class", self.max_per_class, 2)
            if self.max_per_class * (1 - self.test_fraction) < self.shots:
                raise ConfigError(f"{p}.max_per_class = {self.max_per_class} leaves fewer than {p}.shots = "
                                  f"{self.shots} pool chips per class after {p}.test_fraction = "
                                  f"{self.test_fraction}; raise max_per_class or lower shots")
        if not self.methods:
            raise ConfigError(f"{p}.methods is empty; choose from {list(PROBE_METHODS)}")
        for m in self.methods:
            check_choice(f"{p}.methods[]", m, PROBE_METHODS)
        check_choice(f"{p}.pooling", self.pooling, FEATURE_POOLINGS)
        check_choice(f"{p}.tta", self.tta, FEATURE_TTAS)


# tune.search samplers -> how many arguments each takes (Ray Tune's sampling API, sarjepa_dist/tune/space.py):
# grid/choice take a list of values; the others [low, high] or [low, high, q]. randint/lograndint
# exclude high (as Ray does); qrandint includes it.
SEARCH_SAMPLERS: dict[str, tuple[int, ...]] = {
    "grid": (), "choice": (), "uniform": (2,), "quniform": (3,), "loguniform": (2,), "qloguniform": (3,),
    "randint": (2,), "qrandint": (3,), "lograndint": (2,),
}
SEARCH_ALGS = ("random", "optuna")  # random: Ray Tune's grid/random variant generator; optuna: TPE
# asha: asynchronous rungs (Tune's ASHAScheduler); hyperband: synchronous successive halving, paused
# trials resume from their checkpoints (tune/halving.py); none: every trial to train.steps
TUNE_SCHEDULERS = ("asha", "hyperband", "none")
# the order a grid's points start in under ASHA (sweep.sweep_param_space says why it matters)
GRID_ORDERS = ("shuffled", "as-written")
# how a trial trains: auto = trial-process for a one-worker trial, torch-trainer for more
TRIAL_EXECUTORS = ("auto", "trial-process", "torch-trainer")


def _check_axis(key: str, spec: Any) -> None:
    """One search axis: ``{sampler: args}``, or a bare list (a grid)."""
    if isinstance(spec, list):
        spec = {"grid": spec}
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{key} = {spec!r} must be one sampler and its arguments, e.g. "
                          f"{{loguniform: [1e-4, 3e-3]}}; samplers: {list(SEARCH_SAMPLERS)}")
    (sampler, args), = spec.items()
    check_choice(f"{key} sampler", sampler, SEARCH_SAMPLERS)
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{key}.{sampler} = {args!r} must be a non-empty list")
    arity = SEARCH_SAMPLERS[sampler]
    if arity and len(args) not in arity:
        raise ConfigError(f"{key}.{sampler} = {args!r} takes {arity[0]} numbers "
                          f"({'[low, high]' if arity[0] == 2 else '[low, high, q]'})")
    if arity:
        if any(isinstance(a, bool) or not isinstance(a, (int, float)) for a in args):
            raise ConfigError(f"{key}.{sampler} = {args!r} must be numbers")
        if args[0] >= args[1]:
            raise ConfigError(f"{key}.{sampler} = {args!r} needs low < high")
        if sampler.endswith("loguniform") or sampler == "lograndint":
            check_range(f"{key}.{sampler}[0]", args[0], 0, lo_open=True)
        if sampler in ("randint", "qrandint", "lograndint") and not all(isinstance(a, int) for a in args):
            raise ConfigError(f"{key}.{sampler} = {args!r} must be integers")


@dataclass
class TuneConfig:
    name: str = "sarjepa-sweep"  # relaunching with the same name and storage_path resumes the sweep
    storage_path: str = "runs"
    num_samples: int = 1  # draws of the sampled axes (each grid combination is run num_samples times)
    max_concurrent_trials: int = 1
    # the online probe figure trials are stopped and ranked by: probe_<method> of probe.methods
    metric: str = "probe_knn"
    mode: str = "max"
    # search axes: dotted config key (a pair's element as key[0] / key[1]) -> {sampler: args}, e.g.
    # {"optim.lr": {"loguniform": [1e-4, 3e-3]}, "mask.target_scale": {"choice": [[0.1, 0.15], [0.15, 0.2]]}}
    search: dict[str, Any] = field(default_factory=dict)
    # grid axes (the older form, same as {grid: [...]} in search): dotted key -> list of values
    grid: dict[str, list[Any]] = field(default_factory=dict)
    search_alg: str = "random"  # SEARCH_ALGS
    scheduler: str = "asha"  # TUNE_SCHEDULERS: asha/hyperband stop trials whose probe trails at a rung
    grace_period: int | None = None  # steps before ASHA may stop a trial; None: probe.every (not hyperband)
    reduction_factor: float = 2.0  # ASHA/hyperband keep the best 1/reduction_factor at each rung
    max_failures: int = 1  # retries of a failed trial (it resumes from its own checkpoint)
    seed: int | None = 0  # of the random/TPE sampler and the grid's shuffle; None: a fresh draw each launch
    grid_order: str = "shuffled"  # GRID_ORDERS: under ASHA, a grid's points start in a seeded random order
    # TRIAL_EXECUTORS: trial-process runs a one-worker trial's loop in the trial's own process (no
    # Ray Train controller, worker or dataset coordinator to start); torch-trainer runs a TorchTrainer
    trial_executor: str = "auto"

    def validate(self, p: str = "tune") -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"{p}.name = {self.name!r} must be a non-empty name without '/'")
        check_range(f"{p}.num_samples", self.num_samples, 1)
        check_range(f"{p}.max_concurrent_trials", self.max_concurrent_trials, 1)
        check_choice(f"{p}.mode", self.mode, TUNE_MODES)
        if not self.metric.startswith("probe_"):
            raise ConfigError(f"{p}.metric = {self.metric!r}: a sweep stops and ranks trials by the online "
                              f"probe, never by the JEPA loss; use probe_<method> for a method in "
                              f"probe.methods, e.g. probe_knn")
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{p}.grid.{key} must be a non-empty list of values")
            if key in self.search:
                raise ConfigError(f"{key} is both in {p}.grid and {p}.search; keep one")
        for key, spec in self.search.items():
            _check_axis(f"{p}.search.{key}", spec)
        check_choice(f"{p}.search_alg", self.search_alg, SEARCH_ALGS)
        check_choice(f"{p}.scheduler", self.scheduler, TUNE_SCHEDULERS)
        check_choice(f"{p}.grid_order", self.grid_order, GRID_ORDERS)
        check_choice(f"{p}.trial_executor", self.trial_executor, TRIAL_EXECUTORS)
        if self.grace_period is not None:
            check_range(f"{p}.grace_period", self.grace_period, 1)
        check_range(f"{p}.reduction_factor", self.reduction_factor, 1.0, lo_open=True)
        check_range(f"{p}.max_failures", self.max_failures, -1)


@dataclass
class PipelineConfig:
    """``sarjepa pipeline``: sweep, then a full pretraining with the best point, then a few-shot report."""

    name: str = ""  # the full run's train.name; "": <tune.name>-best
    steps: int = 1000  # train.steps of the full run (the sweep's trials run train.steps)
    probe_every: int | None = None  # probe.every of the full run; None: the sweep's probe.every
    # what the chosen encoder is compared with in the few-shot report (fewshot.encoders entries)
    compare: list[str] = field(default_factory=lambda: ["random-init"])
    out: str = ""  # where the best config, pipeline.json and the sweep's copies go; "": fewshot.out

    def validate(self, p: str = "pipeline") -> None:
        if "/" in self.name:
            raise ConfigError(f"{p}.name = {self.name!r} must be a name without '/'")
        check_range(f"{p}.steps", self.steps, 1)
        if self.probe_every is not None:
            check_range(f"{p}.probe_every", self.probe_every, 0)


@dataclass
class FewshotConfig:
    encoders: list[str] = field(default_factory=lambda: ["random-init"])  # checkpoint dirs, .safetensors, random-init
    data: str = ""  # labelled shard dataset (the train pool, and the test set unless test_data is given)
    test_data: str | None = None  # a second dataset as the test set
    split_column: str | None = None  # metadata column that splits pool/test, e.g. depression_deg
    train_values: list[Any] = field(default_factory=list)
    test_values: list[Any] = field(default_factory=list)
    test_fraction: float = 0.3  # seeded stratified split when neither of the above is given
    shots: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20, 40])
    seeds: int = 5
    methods: list[str] = field(default_factory=lambda: ["linear", "knn", "prototype"])
    feature_domain: str = "context"  # FEATURE_DOMAINS: which domain feeds the EMA encoder
    # FEATURE_POOLINGS (model/pooling.py). mean: what pretraining improves as runs grow (MSTAR, 3,000
    # steps: +36 points over random init under the linear probe, while a 4x4 grid falls back to the
    # random-init level; grid4 leads only for short runs, e.g. the demo). README: learning curves.
    pooling: str = "mean"
    # FEWSHOT_TTAS. hflip: tokens averaged over the chip and its azimuth mirror (MSTAR, 6,000 steps,
    # validation split: 10-shot linear 68.5 -> 76.3; baselines are mirror-equivariant). hflip+crops:
    # that, averaged over the chip and 5 crops of 15/16 of its side, baselines included (12,000
    # steps, validation: 10/20-shot linear +5.7/+4.8 over hflip; report split +3.0/+2.2, raw pixels'
    # k-NN +3.0/+2.0). README: learning curves.
    tta: str = "hflip+crops"
    linear_epochs: int = 100
    knn_k: int = 1
    batch_size: int = 64
    out: str = "runs/fewshot"
    seed: int = 0

    def validate(self, p: str = "fewshot") -> None:
        if not self.encoders:
            raise ConfigError(f"{p}.encoders is empty; list checkpoints, exports or 'random-init'")
        for i, k in enumerate(self.shots):
            check_range(f"{p}.shots[{i}]", k, 1)
        check_range(f"{p}.seeds", self.seeds, 1)
        check_range(f"{p}.test_fraction", self.test_fraction, 0.0, 1.0, lo_open=True, hi_open=True)
        for m in self.methods:
            check_choice(f"{p}.methods[]", m, FEWSHOT_METHODS)
        check_choice(f"{p}.feature_domain", self.feature_domain, FEATURE_DOMAINS)
        check_choice(f"{p}.pooling", self.pooling, FEATURE_POOLINGS)
        check_choice(f"{p}.tta", self.tta, FEWSHOT_TTAS)
        check_range(f"{p}.linear_epochs", self.linear_epochs, 1)
        check_range(f"{p}.knn_k", self.knn_k, 1)
        check_range(f"{p}.batch_size", self.batch_size, 1)
        if (self.split_column is None) != (not self.train_values and not self.test_values):
            if self.split_column is None:
                raise ConfigError(f"{p}.train_values/test_values need {p}.split_column")
        if self.split_column is not None and (not self.train_values or not self.test_values):
            raise ConfigError(f"{p}.split_column = {self.split_column!r} needs both {p}.train_values "
                              f"and {p}.test_values")


@dataclass
class Config:
    ray: RayConfig = field(default_factory=RayConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    gradient: GradientConfig = field(default_factory=GradientConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    fewshot: FewshotConfig = field(default_factory=FewshotConfig)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)
        if self.data.img_size % self.model.patch_size:
            raise ConfigError(f"data.img_size = {self.data.img_size} must be a multiple of "
                              f"model.patch_size = {self.model.patch_size}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)


# --------------------------------------------------------------------------- loading


def to_plain(obj: Any) -> Any:
    """Dataclasses/tuples to plain dicts/lists (YAML- and JSON-safe)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of fields, got {value!r}")
        return _from_dict(tp, value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} = {value!r} must be a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key} = {value!r} must have {len(args)} items")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} = {value!r} must be a list")
        item = args[0] if args else Any
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} = {value!r} must be a mapping")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} = {value!r} must be true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key} = {value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} = {value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {value!r} must be a string")
        return value
    return value


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"unknown config key {key!r}; known keys here: {sorted(names)}")
        kwargs[k] = _coerce(key, v, hints[k])
    return cls(**kwargs)


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """``tree[a][b][c] = value`` for ``dotted = "a.b.c"``, making the sections on the way."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def dotted_tree(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1, "a.c": 2}`` → ``{"a": {"b": 1, "c": 2}}``."""
    tree: dict[str, Any] = {}
    for dotted, value in flat.items():
        set_dotted(tree, dotted, value)
    return tree


def parse_override(text: str) -> tuple[str, Any]:
    """``section.key=value`` with the value parsed as YAML (so lists, numbers and null work)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r} has no key before '='")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {exc}") from exc
    return key, value


def merge_tree(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("grid", "search"):
            out[k] = merge_tree(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path: str | Path | None = None, overrides: Iterable[str] = (),
                base: dict[str, Any] | None = None) -> Config:
    """Defaults ← ``base`` ← YAML file ← ``--set`` overrides, then validated."""
    tree: dict[str, Any] = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
        tree = merge_tree(tree, loaded)
    for text in overrides:
        key, value = parse_override(text)
        tree = merge_tree(tree, dotted_tree({key: value}))
    try:
        cfg = _from_dict(Config, tree)
    except TypeError as exc:  # pragma: no cover - dataclass signature mismatch
        raise ConfigError(str(exc)) from exc
    return cfg.validate()


def config_from_dict(tree: dict[str, Any]) -> Config:
    return _from_dict(Config, tree).validate()


def with_absolute_paths(cfg: Config, keys: Iterable[str] = ("data.path", "probe.data")) -> Config:
    """``cfg`` with the local paths at ``keys`` made absolute against this process's working
    directory. Ray's train workers and Tune's trials run in other directories, so a relative
    ``runs/data/...`` that the driver reads would name nothing there. URIs (``s3://``,
    ``file://``) and unset keys are left as they are."""
    tree = cfg.to_dict()
    for key in keys:
        section, name = key.split(".")
        value = tree[section].get(name)
        if isinstance(value, str) and value and "://" not in value:
            tree[section][name] = str(Path(value).expanduser().absolute())
    return config_from_dict(tree)
