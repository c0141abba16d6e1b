"""Weights on disk: model.safetensors plus config.json ({format, config, meta}), shared by every model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from shapeflow.manifest import atomic_path, atomic_write_text

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save(model: torch.nn.Module, folder: str | Path, fmt: str, config: dict[str, Any], meta: dict[str, Any] | None) -> None:
    """The model's state and its config in `folder`, each file written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": fmt})
    body = {"format": fmt, "config": config, "meta": dict(meta or {})}
    atomic_write_text(folder / CONFIG, json.dumps(body, indent=2) + "\n")


def load(folder: str | Path, fmt: str, how_to_make: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, state dict on the CPU) saved by `save` in `folder`; a clear error when a file is
    missing or of another format. `how_to_make` ends the missing-file message, e.g. 'dvc repro train_vae'."""
    folder = Path(folder)
    for name in (WEIGHTS, CONFIG):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: missing; {how_to_make}")
    body = json.loads((folder / CONFIG).read_text())
    if body.get("format") != fmt:
        raise ValueError(f"{folder / CONFIG}: format {body.get('format')!r}, expected {fmt!r}")
    return body["config"], load_file(str(folder / WEIGHTS))
