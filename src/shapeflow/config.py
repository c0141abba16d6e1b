"""Typed parameters per stage, loaded from params.yaml.

This is the only module that reads params.yaml. Every section is a dataclass; unknown keys and
values of the wrong type or range raise `ParamsError` naming the key, so a typo in params.yaml fails
loudly instead of silently falling back to a default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ParamsError(ValueError):
    """params.yaml (or a command-line override) holds an invalid value."""


@dataclass(frozen=True)
class SplitParams:
    val: float = 0.1
    test: float = 0.1
    # Words that mark a variant of an asset in a local file's name (BirchTree_Autumn_1 is a variant of
    # BirchTree_1): left out of the name when it is made into the object's group, which decides the
    # split (shapeflow.data.local.group_name; docs/conventions.md).
    variant_words: tuple[str, ...] = (
        "autumn", "fall", "spring", "summer", "winter", "snow", "snowy", "frozen",
        "dead", "dry", "burnt", "damaged", "broken", "moss", "mossy", "empty", "filled", "full",
        "harvested", "fruit", "golden", "gold", "silver", "white", "black", "red", "green", "blue",
        "yellow", "orange", "purple", "pink", "brown",
    )  # fmt: skip

    def check(self, where: str) -> None:
        for name in ("val", "test"):
            share = getattr(self, name)
            if not 0.0 <= share < 1.0:
                raise ParamsError(f"{where}.{name}: a share in [0, 1) is required, got {share}")
        if self.val + self.test >= 1.0:
            raise ParamsError(f"{where}: val + test must leave room for train, got {self.val + self.test}")
        bad = [w for w in self.variant_words if not w.isalnum() or w != w.lower()]
        if bad:
            raise ParamsError(f"{where}.variant_words: lower-case letters and digits only, got {bad}")


@dataclass(frozen=True)
class BuiltinParams:
    per_category: int = 40
    defect_share: float = 0.3

    def check(self, where: str) -> None:
        if self.per_category < 1:
            raise ParamsError(f"{where}.per_category: at least 1, got {self.per_category}")
        if not 0.0 <= self.defect_share <= 1.0:
            raise ParamsError(f"{where}.defect_share: a share in [0, 1], got {self.defect_share}")


@dataclass(frozen=True)
class LocalParams:
    path: str | None = None
    extra_paths: tuple[str, ...] = ()  # more folders, each read like `path`, into the same dataset
    recursive: bool = True

    @property
    def paths(self) -> tuple[str, ...]:
        """Every folder to read: `path`, then `extra_paths`."""
        return (self.path, *self.extra_paths) if self.path else self.extra_paths


@dataclass(frozen=True)
class ObjaverseParams:
    list: str | None = None
    limit: int = 100
    cache_dir: str = "~/.objaverse"
    retries: int = 3
    processes: int = 4

    def check(self, where: str) -> None:
        if self.limit < 1:
            raise ParamsError(f"{where}.limit: at least 1, got {self.limit}")
        if self.retries < 0:
            raise ParamsError(f"{where}.retries: 0 or more, got {self.retries}")


@dataclass(frozen=True)
class FetchParams:
    source: Literal["builtin", "local", "objaverse"] = "builtin"
    # More sources fetched into the same dataset after `source`, e.g. [builtin] beside source: local.
    extra_sources: tuple[Literal["builtin", "local", "objaverse"], ...] = ()
    builtin: BuiltinParams = field(default_factory=BuiltinParams)
    local: LocalParams = field(default_factory=LocalParams)
    objaverse: ObjaverseParams = field(default_factory=ObjaverseParams)
    split: SplitParams = field(default_factory=SplitParams)

    @property
    def sources(self) -> tuple[str, ...]:
        """Every source, in the order they are read: `source`, then `extra_sources`."""
        return (self.source, *self.extra_sources)

    def check(self, where: str) -> None:
        if len(set(self.sources)) < len(self.sources):
            raise ParamsError(f"{where}.extra_sources: each source once, got {list(self.sources)} with source")
        if "local" in self.sources and not self.local.path:
            raise ParamsError(f"{where}.local.path: required when 'local' is one of the sources")
        if "objaverse" in self.sources and not self.objaverse.list:
            raise ParamsError(f"{where}.objaverse.list: required when 'objaverse' is one of the sources")
        names = [Path(p).resolve().name for p in self.local.paths]
        if len(set(names)) < len(names):
            raise ParamsError(
                f"{where}.local: the folders {list(self.local.paths)} must have different names (a file's "
                "source is recorded as local:<folder name>/<path in it>)"
            )


@dataclass(frozen=True)
class WatertightParams:
    resolution: int = 256
    # Shell half-width in voxels: eps = eps_voxels * 2 / resolution (1.0 gives the dense baseline's eps = 2/R).
    eps_voxels: float = 1.0
    # Keep the input surface where the input is closed and consistently oriented (else the eps-offset
    # surface of the dense baseline is produced everywhere).
    keep_closed_surface: bool = True
    # Open parts that bound a solid (w of the open faces ~1 behind them) keep their surface and their
    # holes are capped; off: every open face gets the eps shell.
    winding: bool = True
    backend: Literal["auto", "cpu", "cuda"] = "auto"

    def check(self, where: str) -> None:
        if not 16 <= self.resolution <= 2048:
            raise ParamsError(f"{where}.resolution: between 16 and 2048, got {self.resolution}")
        if not 0.25 <= self.eps_voxels <= 8.0:
            raise ParamsError(f"{where}.eps_voxels: between 0.25 and 8, got {self.eps_voxels}")


@dataclass(frozen=True)
class GridSampleParams:
    """What the sample stage adds for the grid family (train_vae.family: grid); see geometry.grids."""

    resolution: int = 64  # cells per axis of the coarse grid of truncated signed distances
    truncation: float = 0.1  # its values are clipped to +-truncation
    sparse_resolution: int = 128  # cells per axis of the near-surface level
    band_cells: float = 2.0  # near-surface cells: centre within band_cells of those cells of the surface

    @property
    def band(self) -> float:
        return self.band_cells * 2.0 / self.sparse_resolution

    def check(self, where: str) -> None:
        def power_of_two(n: int) -> bool:
            return n >= 1 and not n & (n - 1)

        if not (16 <= self.resolution <= 256 and self.resolution % 16 == 0 and power_of_two(self.resolution // 16)):
            raise ParamsError(f"{where}.resolution: 16, 32, 64, 128 or 256, got {self.resolution}")
        ratio = self.sparse_resolution // self.resolution
        if self.sparse_resolution % self.resolution or ratio < 2 or not power_of_two(ratio):
            raise ParamsError(
                f"{where}.sparse_resolution: {self.resolution} (the resolution) times 2, 4, ..., "
                f"got {self.sparse_resolution}"
            )
        if self.sparse_resolution > 1024:
            raise ParamsError(f"{where}.sparse_resolution: at most 1024, got {self.sparse_resolution}")
        if self.band_cells <= 0:
            raise ParamsError(f"{where}.band_cells: positive, got {self.band_cells}")
        if self.truncation <= 0:
            raise ParamsError(f"{where}.truncation: positive, got {self.truncation}")


@dataclass(frozen=True)
class SampleParams:
    surface: int = 16384
    sharp: int = 4096
    sharp_angle_deg: float = 30.0
    volume: int = 16384
    near: int = 16384
    near_scales: tuple[float, ...] = (0.005, 0.02)
    sharp_near: int = 8192
    sharp_near_scale: float = 0.005
    # Written only when train_vae.family is grid.
    grid: GridSampleParams = field(default_factory=GridSampleParams)

    def check(self, where: str) -> None:
        for name in ("surface", "volume", "near"):
            if getattr(self, name) < 1:
                raise ParamsError(f"{where}.{name}: at least 1, got {getattr(self, name)}")
        for name in ("sharp", "sharp_near"):
            if getattr(self, name) < 0:
                raise ParamsError(f"{where}.{name}: 0 or more, got {getattr(self, name)}")
        if not 0.0 < self.sharp_angle_deg < 180.0:
            raise ParamsError(f"{where}.sharp_angle_deg: in (0, 180), got {self.sharp_angle_deg}")
        if len(self.near_scales) < 1 or any(s <= 0 for s in self.near_scales):
            raise ParamsError(f"{where}.near_scales: one or more positive scales, got {list(self.near_scales)}")
        if self.sharp_near_scale <= 0:
            raise ParamsError(f"{where}.sharp_near_scale: positive, got {self.sharp_near_scale}")


@dataclass(frozen=True)
class ComputeParams:
    # Local worker processes for per-object stages; 0 means one per CPU core.
    workers: int = 0
    # The Prefect preprocessing flow: shards per stage (0: one per worker) and, when set, the
    # address of a Dask scheduler to run them on (tcp://host:8786) instead of a local process pool.
    shards: int = 0
    dask_address: str | None = None
    # Bounds on one object in the per-object stages (fetch, watertight, sample): a file larger than
    # max_file_mb, a mesh with more than max_faces faces, or work that takes longer than
    # object_timeout_s seconds is a failed row instead of hours or gigabytes. 0 turns a bound off.
    max_file_mb: float = 256.0
    max_faces: int = 2_000_000
    object_timeout_s: float = 600.0

    def check(self, where: str) -> None:
        for name in ("max_file_mb", "max_faces", "object_timeout_s"):
            if getattr(self, name) < 0:
                raise ParamsError(f"{where}.{name}: 0 (no bound) or more, got {getattr(self, name)}")
        if self.workers < 0:
            raise ParamsError(f"{where}.workers: 0 (all cores) or more, got {self.workers}")
        if self.shards < 0:
            raise ParamsError(f"{where}.shards: 0 (one per worker) or more, got {self.shards}")
        if self.dask_address is not None and "://" not in self.dask_address:
            raise ParamsError(
                f"{where}.dask_address: a scheduler address like tcp://127.0.0.1:8786, got {self.dask_address!r}"
            )


@dataclass(frozen=True)
class VAELossParams:
    kind: Literal["l1", "mse", "bce"] = "l1"  # truncated SDF regression (l1, mse) or occupancy (bce)
    truncation: float = 0.1  # SDF targets clipped to +-truncation
    volume_weight: float = 1.0
    near_weight: float = 1.0
    sharp_weight: float = 1.0
    coarse_weight: float = 1.0  # grid family: the coarse field against the input grid
    kl_weight: float = 1e-4

    def check(self, where: str) -> None:
        if self.truncation <= 0:
            raise ParamsError(f"{where}.truncation: positive, got {self.truncation}")
        for name in ("volume_weight", "near_weight", "sharp_weight", "coarse_weight", "kl_weight"):
            if getattr(self, name) < 0:
                raise ParamsError(f"{where}.{name}: 0 or more, got {getattr(self, name)}")


@dataclass(frozen=True)
class VAEDataParams:
    input_points: int = 2048  # surface points (with normals) fed to the encoder per shape
    sharp_points: int = 512  # salient-edge points for the sharp branch
    volume_points: int = 1024  # supervision points per shape and step, by kind
    near_points: int = 1024
    sharp_near_points: int = 512
    loader_workers: int = 0  # DataLoader worker processes per training process
    # Train objects whose watertight output has a shell_ratio below this are left out of training
    # (train_vae and train_dit alike): about 1 is a thin double-walled shell. 0 keeps every object.
    min_shell_ratio: float = 0.0

    def check(self, where: str) -> None:
        for name in ("input_points", "volume_points", "near_points"):
            if getattr(self, name) < 1:
                raise ParamsError(f"{where}.{name}: at least 1, got {getattr(self, name)}")
        for name in ("sharp_points", "sharp_near_points", "loader_workers", "min_shell_ratio"):
            if getattr(self, name) < 0:
                raise ParamsError(f"{where}.{name}: 0 or more, got {getattr(self, name)}")


def _check_training(section: Any, where: str, model: str, non_negative: tuple[str, ...]) -> None:
    """The checks every training section shares (steps, batch, schedule, optimizer, model overrides)."""
    if not all(isinstance(k, str) for k in section.model):
        raise ParamsError(f"{where}.model: a mapping of {model} config fields, got {section.model!r}")
    for name in ("steps", "batch_size", "grad_accum", "log_every", "checkpoint_every", "keep_checkpoints"):
        if getattr(section, name) < 1:
            raise ParamsError(f"{where}.{name}: at least 1, got {getattr(section, name)}")
    for name in ("warmup_steps", *non_negative):
        if getattr(section, name) < 0:
            raise ParamsError(f"{where}.{name}: 0 or more, got {getattr(section, name)}")
    if section.lr <= 0 or section.weight_decay < 0 or section.grad_clip < 0:
        raise ParamsError(f"{where}: lr must be positive, weight_decay and grad_clip 0 or more")
    if not 0.0 <= section.min_lr_ratio <= 1.0:
        raise ParamsError(f"{where}.min_lr_ratio: in [0, 1], got {section.min_lr_ratio}")


@dataclass(frozen=True)
class TrainVAEParams:
    # vecset: a set of latent tokens (shapeflow.models.vae); grid: a latent grid from 3-D convolutions
    # over the sample stage's grids (shapeflow.models.grid_vae). The DiT follows the VAE's family.
    family: Literal["vecset", "grid"] = "vecset"
    preset: str = "tiny"  # a size in the family's PRESETS: tiny (tests), local (CPU default), base
    # Fields of the preset's VAEConfig to replace, e.g. {num_latents: 128}; checked by the stage.
    model: dict[str, Any] = field(default_factory=dict)
    loss: VAELossParams = field(default_factory=VAELossParams)
    data: VAEDataParams = field(default_factory=VAEDataParams)
    # category: every epoch draws the categories equally often (objects drawn with replacement,
    # weighted 1 / their category's count); none: every epoch is a shuffle of every object.
    balance: Literal["none", "category"] = "none"
    steps: int = 2000  # optimizer steps
    batch_size: int = 8  # shapes per process and micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 on a GPU that has it, else fp32
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    val_every: int = 500  # 0: validate only at the end
    val_objects: int = 8  # val objects scored by the periodic validations (0 = all); the last one scores all
    val_resolution: int = 256  # decode grid points per axis
    accelerate_config: str = "configs/accelerate/default.yaml"

    def check(self, where: str) -> None:
        _check_training(self, where, "VAE", ("val_every", "val_objects"))
        if not 16 <= self.val_resolution <= 1024:
            raise ParamsError(f"{where}.val_resolution: between 16 and 1024, got {self.val_resolution}")


@dataclass(frozen=True)
class FlowParams:
    t_mean: float = 0.0  # logit-normal training times: t = sigmoid(t_mean + t_std * N(0, 1))
    t_std: float = 1.0
    # > 1 moves training and sampling times towards the noise end; auto: the VAE family's default
    # (shapeflow.models.families.T_SHIFT)
    t_shift: float | Literal["auto"] = "auto"

    def check(self, where: str) -> None:
        if self.t_std <= 0:
            raise ParamsError(f"{where}.t_std: must be positive, got {self.t_std}")
        if self.t_shift != "auto" and self.t_shift <= 0:
            raise ParamsError(f"{where}.t_shift: must be positive or auto, got {self.t_shift}")


@dataclass(frozen=True)
class GenerateParams:
    steps: int = 50  # Euler steps from noise to data
    guidance: float = 2.0  # classifier-free guidance scale; 1 = plain conditional
    resolution: int = 256  # decode grid points per axis: the meshes users get

    def check(self, where: str) -> None:
        if self.steps < 1:
            raise ParamsError(f"{where}.steps: at least 1, got {self.steps}")
        if self.guidance < 0:
            raise ParamsError(f"{where}.guidance: 0 or more, got {self.guidance}")
        if not 16 <= self.resolution <= 1024:
            raise ParamsError(f"{where}.resolution: between 16 and 1024, got {self.resolution}")


@dataclass(frozen=True)
class TrainDiTParams:
    preset: str = "tiny"  # a preset of shapeflow.models.dit.PRESETS
    model: dict[str, Any] = field(default_factory=dict)  # DiTConfig fields to replace
    conditional: bool = True  # condition on the manifest's category (with guidance); false: unconditional
    cond_dropout: float = 0.1  # share of training labels replaced by the null label (for guidance)
    anchor_weight: float = 4.0  # flow-loss weight of an anchored VAE's xyz channels, the others 1
    flow: FlowParams = field(default_factory=FlowParams)
    balance: Literal["none", "category"] = "none"  # as train_vae.balance, over the train latents
    steps: int = 2000
    batch_size: int = 16  # latent sets per process and micro-batch
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # EMA of the weights, saved beside the raw ones; 0 turns it off
    precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    log_every: int = 20
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    val_every: int = 500  # flow loss on the val latents (fixed times and noise); 0: at the end only
    final_samples: int = 16  # shapes generated and scored at the end (watertight share, category match)
    generate: GenerateParams = field(default_factory=GenerateParams)
    accelerate_config: str = "configs/accelerate/default.yaml"

    def check(self, where: str) -> None:
        _check_training(self, where, "DiT", ("val_every", "final_samples"))
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ParamsError(f"{where}.cond_dropout: in [0, 1), got {self.cond_dropout}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ParamsError(f"{where}.ema_decay: in [0, 1), got {self.ema_decay}")
        if not self.anchor_weight > 0:
            raise ParamsError(f"{where}.anchor_weight: must be > 0, got {self.anchor_weight}")


@dataclass(frozen=True)
class EvaluateParams:
    split: Literal["train", "val", "test"] = "test"  # the split reconstructed and generated against
    resolution: int = 256  # decode grid points per axis, reconstructions and samples alike
    recon_objects: int = 0  # objects of the split reconstructed (the first by key); 0: all
    recon_points: int = 100_000  # surface points a side for reconstruction CD, F-score, normal consistency
    gen_per_category: int = 0  # samples per category; 0: as many as the split holds of that category
    gen_points: int = 2048  # points per cloud for MMD, COV and 1-NNA (PointFlow)
    previews: int = 8  # objects drawn in the reconstruction preview (and samples, for an unconditional DiT)
    preview_per_category: int = 4  # samples per category drawn in the samples preview
    category_min_train: int = 10  # category_match_common counts the categories with this many training objects

    def check(self, where: str) -> None:
        if not 16 <= self.resolution <= 1024:
            raise ParamsError(f"{where}.resolution: between 16 and 1024, got {self.resolution}")
        for name in ("recon_objects", "gen_per_category", "previews", "preview_per_category", "category_min_train"):
            if getattr(self, name) < 0:
                raise ParamsError(f"{where}.{name}: 0 or more, got {getattr(self, name)}")
        for name in ("recon_points", "gen_points"):
            if getattr(self, name) < 100:
                raise ParamsError(f"{where}.{name}: at least 100, got {getattr(self, name)}")


@dataclass(frozen=True)
class Params:
    seed: int = 0
    fetch: FetchParams = field(default_factory=FetchParams)
    watertight: WatertightParams = field(default_factory=WatertightParams)
    sample: SampleParams = field(default_factory=SampleParams)
    compute: ComputeParams = field(default_factory=ComputeParams)
    train_vae: TrainVAEParams = field(default_factory=TrainVAEParams)
    train_dit: TrainDiTParams = field(default_factory=TrainDiTParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)


def _build(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, checking keys and types, recursing into sections."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{where}: a mapping is required, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ParamsError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    values = {name: _coerce(hints[name], raw[name], f"{where}.{name}" if where else name) for name in raw}
    obj = cls(**values)
    check = getattr(obj, "check", None)
    if check is not None:
        check(where)
    return obj


def _describe(hint: Any) -> str:
    """What a value of a scalar parameter type looks like, for error messages."""
    if typing.get_origin(hint) is Literal:
        return f"one of {list(typing.get_args(hint))}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ParamsError(f"{where}: one of {list(allowed)} is required, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        if len(args) == 1:
            return _coerce(args[0], value, where)
        for arg in args:
            try:
                return _coerce(arg, value, where)
            except ParamsError:
                continue
        raise ParamsError(f"{where}: {' or '.join(map(_describe, args))} is required, got {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: a mapping is required, got {value!r}")
        return dict(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{where}: a list is required, got {value!r}")
        (item,) = typing.get_args(hint)[:1]
        return tuple(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{where}: true or false is required, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{where}: an integer is required, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{where}: a number is required, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ParamsError(f"{where}: a string is required, got {value!r}")
        return value
    raise TypeError(f"{where}: unsupported parameter type {hint!r}")


def load_params(path: str | Path | None = "params.yaml") -> Params:
    """Params from a params.yaml; defaults when `path` is None or the file does not exist."""
    if path is None or not Path(path).exists():
        return Params()
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    try:
        return _build(Params, raw, "")
    except ParamsError as exc:
        raise ParamsError(f"{path}: {exc}") from exc


def replace(section: Any, **overrides: Any) -> Any:
    """A copy of a params section with command-line overrides (None means 'not given'), re-checked."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if not given:
        return section
    raw = dataclasses.asdict(section) | given
    return _build(type(section), raw, type(section).__name__)


def section_hash(section: Any, exclude: tuple[str, ...] = ()) -> str:
    """A short stable hash of a params section (without its `exclude` fields): records made under
    other params are redone."""
    fields = {k: v for k, v in dataclasses.asdict(section).items() if k not in exclude}
    blob = json.dumps(fields, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
