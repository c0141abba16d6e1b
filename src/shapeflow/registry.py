"""The trained models in MLflow: logged as MLflow models (pyfunc, with a signature and their config)
and registered as `shapeflow-vae` and `shapeflow-dit`, so versions can be compared in the Model
Registry and loaded by URI (`shapeflow generate --model models:/shapeflow-dit/3`); the dataset a
training read logged as its run's input.

What each model takes and gives: shapeflow/pyfunc_model.py (logged with it, MLflow's models
from code, so loading one unpickles nothing).

The model folders travel as the model's artifacts (`artifacts/vae`, `artifacts/dit`), in the same
layout the stages write, so `load_model_folders` gives what `ShapePipeline.load` reads, without
unpickling anything.
"""

from __future__ import annotations

import os
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
import yaml

from shapeflow import manifest as mf
from shapeflow import tracking
from shapeflow.interrupts import uninterrupted

VAE_MODEL = "shapeflow-vae"
DIT_MODEL = "shapeflow-dit"
MODEL_PATH = "mlflow-model"  # the model's folder among its run's artifacts
REQUIREMENTS = ("torch", "numpy", "scipy", "trimesh", "pymcubes", "safetensors", "pyyaml", "mlflow")


def _mlflow():
    import mlflow

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", tracking.DEFAULT_TRACKING_URI))
    return mlflow


def _requirements() -> list[str]:
    out = []
    for name in REQUIREMENTS:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(name)
    return out


def vae_input(grid_resolution: int) -> str:
    """What the registered VAE reads: point clouds, or (grid family) truncated SDF grids of that side."""
    if grid_resolution:
        return f"truncated SDF grids (B, {grid_resolution}, {grid_resolution}, {grid_resolution})"
    return "point clouds (B, N, 6)"


def vae_signature(num_latents: int, latent_dim: int, grid_resolution: int = 0):
    """grid_resolution: 0 for the VecSet family (points and normals in), else the grid family's side."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    if grid_resolution:
        shape, name = (-1, grid_resolution, grid_resolution, grid_resolution), "grid_sdf"
    else:
        shape, name = (-1, -1, 6), "points_normals"
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), shape, name)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_latents, latent_dim), "latents")]),
    )


def dit_signature(steps: int, guidance: float, resolution: int):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "category", required=False), ColSpec("long", "seed")]),
        outputs=Schema(
            [
                ColSpec("string", "category"),
                ColSpec("long", "seed"),
                ColSpec("long", "faces"),
                ColSpec("boolean", "watertight"),
                ColSpec("binary", "glb"),
            ]
        ),
        params=ParamSchema(
            [
                ParamSpec("steps", "long", steps),
                ParamSpec("guidance", "double", guidance),
                ParamSpec("resolution", "long", resolution),
            ]
        ),
    )


def register(
    run_id: str, name: str, artifacts: dict[str, Path], signature, description: str, scores: dict[str, float]
) -> str:
    """Log the model folders `artifacts` as an MLflow model in run `run_id` and register it as a new
    version of `name`, tagged with the run's final scores; -> the version."""
    with uninterrupted():  # a few seconds of writes to the tracking store (interrupts module)
        return _register(run_id, name, artifacts, signature, description, scores)


def _register(
    run_id: str, name: str, artifacts: dict[str, Path], signature, description: str, scores: dict[str, float]
) -> str:
    mlflow = _mlflow()
    package = Path(__file__).resolve().parent
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=MODEL_PATH,
            python_model=str(package / "pyfunc_model.py"),  # models from code: nothing pickled
            model_config={"kind": "generator" if name == DIT_MODEL else "vae"},
            artifacts={key: str(path) for key, path in artifacts.items()},
            signature=signature,
            code_paths=[str(package)],
            pip_requirements=_requirements(),
        )
    client = mlflow.MlflowClient()
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, description=description)
    version = mlflow.register_model(info.model_uri, name)  # links the version to the logged model and run
    client.update_model_version(name, version.version, description=description)
    for key, value in scores.items():  # tag names take no '@': 'val_f@0.02' -> 'val_f_0.02'
        client.set_model_version_tag(name, version.version, tracking.metric_name(key), f"{value:.6g}")
    return str(version.version)


def log_dataset(run_id: str, samples: Path, context: str = "training") -> None:
    """The sample-stage manifest a training read, as its run's input (name, DVC hash as digest)."""
    import pandas as pd

    mlflow = _mlflow()
    manifest = Path(samples) / mf.MANIFEST
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    digest = tracking.dvc_hash(samples) or mf.file_sha256(manifest)
    dataset = mlflow.data.from_pandas(
        frame, source=str(Path(samples).resolve()), name=Path(samples).name, digest=digest[:36]
    )
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    # Through the client: the training's run is still going, and leaving a fluent `start_run` block
    # would mark it FINISHED.
    entry = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
    with uninterrupted():
        mlflow.MlflowClient().log_inputs(run_id, datasets=[entry])


def load_model_folders(model_uri: str) -> dict[str, Path]:
    """The model folders (vae, and dit for a generator) of a logged or registered model, downloaded:
    `models:/shapeflow-dit/3`, `models:/shapeflow-dit@champion`, `runs:/<id>/mlflow-model`."""
    mlflow = _mlflow()
    try:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=model_uri, dst_path=tempfile.mkdtemp(prefix="shapeflow-model-")
            )
        )
    except mlflow.exceptions.MlflowException as exc:
        raise FileNotFoundError(f"{model_uri} (tracking {mlflow.get_tracking_uri()}): {exc.message}") from None
    spec = yaml.safe_load((local / "MLmodel").read_text())
    listed = (spec.get("flavors", {}).get("python_function", {}) or {}).get("artifacts", {}) or {}
    folders = {}
    for key, entry in listed.items():
        path = (local / entry["path"]).resolve()
        if not path.is_relative_to(local.resolve()):
            raise ValueError(f"{model_uri}: artifact {key!r} points outside the model ({entry['path']})")
        folders[key] = path
    if "vae" not in folders:
        raise ValueError(f"{model_uri}: not a shapeflow model (its artifacts are {sorted(folders)})")
    return folders
