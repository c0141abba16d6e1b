"""Models on disk: model.safetensors plus config.json ({format, config, meta}), and `ModelConfig`, the
base of the model configs that config.json holds."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors.torch import load_file, save_file

from shapeflow.manifest import atomic_path, atomic_write_text

WEIGHTS = "model.safetensors"
CONFIG = "config.json"

C = TypeVar("C", bound="ModelConfig")
M = TypeVar("M", bound=torch.nn.Module)


class ModelConfig:
    """Base of a model's config, a frozen dataclass: checked on the way in, a plain dict on the way
    out, and named presets with some fields replaced."""

    KIND: ClassVar[str]  # the model's name in error messages: 'VAE', 'DiT'

    def check(self) -> None:
        """Raise a ValueError naming the field that is out of range."""

    def check_at_least_one(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[C], raw: Mapping[str, Any]) -> C:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown {cls.KIND} config key(s) {unknown}; known: {sorted(known)}")
        config = cls(**raw)
        config.check()
        return config

    @classmethod
    def from_preset(cls: type[C], presets: Mapping[str, C], preset: str, overrides: Mapping[str, Any] | None) -> C:
        """A named preset with some fields replaced; raises ValueError naming a bad preset or key."""
        if preset not in presets:
            raise ValueError(f"unknown {cls.KIND} preset {preset!r}; known: {sorted(presets)}")
        return cls.from_dict(presets[preset].to_dict() | dict(overrides or {}))


def save(model: torch.nn.Module, folder: str | Path, fmt: str, meta: Mapping[str, Any] | None) -> None:
    """The model's state and its config (`model.config`) in `folder`, each file written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": fmt})
    body = {"format": fmt, "config": model.config.to_dict(), "meta": dict(meta or {})}
    atomic_write_text(folder / CONFIG, json.dumps(body, indent=2) + "\n")


def load(
    folder: str | Path, fmt: str, how_to_make: str, build: Callable[[dict[str, Any]], M], device: torch.device | str
) -> M:
    """The model saved by `save` in `folder`: `build(config)` with the saved weights, on `device`, in
    eval mode. A clear error when a file is missing or of another format; `how_to_make` ends the
    missing-file message, e.g. 'train the VAE first (dvc repro train_vae)'."""
    folder = Path(folder)
    for name in (WEIGHTS, CONFIG):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: missing; {how_to_make}")
    body = json.loads((folder / CONFIG).read_text())
    if body.get("format") != fmt:
        raise ValueError(f"{folder / CONFIG}: format {body.get('format')!r}, expected {fmt!r}")
    model = build(body["config"])
    model.load_state_dict(load_file(str(folder / WEIGHTS)))
    return model.to(device).eval()
