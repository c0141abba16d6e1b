"""The MLflow pyfunc model of a registered shapeflow model (MLflow's "models from code": this file is
logged with the model and run to load it; shapeflow.registry logs it). `kind` in the model config:

- `vae`: point clouds (float32 (B, N, 6): surface points in the normalised frame and their normals)
  or, for a grid-family VAE, truncated SDF grids (float32 (B, R, R, R)) in, the posterior-mean
  latents (B, M, C) out.
- `generator`: rows of (category, seed) in, one shape per row out: category, seed, faces, watertight
  and the mesh as GLB bytes; params steps, guidance, resolution.
"""

from __future__ import annotations

import io
from typing import Any

import mlflow.pyfunc
import numpy as np
from mlflow.models import set_model

GENERATE_DEFAULTS = {"steps": 50, "guidance": 2.0, "resolution": 128}


class ShapeflowModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.kind = (context.model_config or {}).get("kind", "vae")
        if self.kind == "generator":
            from shapeflow.inference import ShapePipeline

            self.pipeline = ShapePipeline.load(context.artifacts["dit"], context.artifacts["vae"], "cpu")
        else:
            from shapeflow.models.families import load_vae

            self.vae = load_vae(context.artifacts["vae"], "cpu")

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        return self.generate(model_input, params) if self.kind == "generator" else self.encode(model_input)

    def encode(self, model_input) -> np.ndarray:
        import torch

        from shapeflow.models.families import family_of

        grid = family_of(self.vae) == "grid"
        if isinstance(model_input, dict):  # a named tensor input arrives as {name: array}
            model_input = model_input["grid_sdf" if grid else "points_normals"]
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        if grid:
            side = self.vae.config.resolution
            if x.shape[1:] != (side, side, side):
                raise ValueError(f"expected (batch, {side}, {side}, {side}) grids, got shape {tuple(x.shape)}")
            with torch.no_grad():
                return self.vae.encode(x[:, None]).mode().numpy()
        if x.ndim != 3 or x.shape[-1] != 6:
            raise ValueError(f"expected (batch, points, 6) points and normals, got shape {tuple(x.shape)}")
        with torch.no_grad():
            return self.vae.encode(x[..., :3], x[..., 3:]).mode().numpy()

    def generate(self, model_input, params: dict[str, Any] | None):
        import pandas as pd

        from shapeflow.geometry.mesh import is_watertight_shape

        p = GENERATE_DEFAULTS | (params or {})
        rows = []
        for record in pd.DataFrame(model_input).to_dict("records"):
            category = record.get("category") or None
            ((_, mesh),) = self.pipeline.generate(
                1, category, int(p["steps"]), float(p["guidance"]), int(record["seed"]), int(p["resolution"])
            )
            buffer = io.BytesIO()
            mesh.export(buffer, file_type="glb")
            rows.append(
                {
                    "category": category or "",
                    "seed": int(record["seed"]),
                    "faces": len(mesh.faces),
                    "watertight": bool(is_watertight_shape(mesh)),
                    "glb": buffer.getvalue(),
                }
            )
        return pd.DataFrame(rows)


set_model(ShapeflowModel())
