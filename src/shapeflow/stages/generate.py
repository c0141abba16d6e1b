"""`shapeflow generate`: sample shapes from a trained DiT and VAE into a folder of meshes and a preview.

OUT gets sample_<i>.glb and .obj per shape, preview.png and samples.json (category, faces, whether
watertight, seed). The same seed gives the same shapes.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from shapeflow import config, registry
from shapeflow.inference import ShapePipeline
from shapeflow.render import write_samples


def run(
    dit: Path, vae: Path, out: Path, g: config.GenerateParams, n: int, category: str | None, seed: int, ema: bool = True
) -> list[dict[str, Any]]:
    """n shapes (all `category`, or the DiT's categories in turn) written to `out`; samples.json's rows."""
    if n < 1:
        raise config.ParamsError(f"--n: at least 1, got {n}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipeline = ShapePipeline.load(dit, vae, device, ema=ema)
    try:
        pipeline.labels(n, category)
    except ValueError as exc:
        raise config.ParamsError(str(exc)) from exc
    results = pipeline.generate(n, category, g.steps, g.guidance, seed, g.resolution)
    return write_samples(results, out, seed)


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("generate", help="sample shapes from the trained DiT: meshes (glb, obj) and a preview PNG")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--n", type=int, default=8, help="how many shapes (default: %(default)s)")
    p.add_argument("--category", help="category to ask for (default: the categories in turn)")
    p.add_argument(
        "--guidance", type=float, help="classifier-free guidance scale (default: train_dit.generate.guidance)"
    )
    p.add_argument("--steps", type=int, help="Euler steps (default: train_dit.generate.steps)")
    p.add_argument(
        "--resolution", type=int, help="decode grid points per axis (default: train_dit.generate.resolution)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="noise seed; the same seed gives the same shapes (default: %(default)s)"
    )
    p.add_argument("--dit", type=Path, default=Path("models/dit"), help="train_dit output (default: %(default)s)")
    p.add_argument("--vae", type=Path, default=Path("models/vae"), help="train_vae output (default: %(default)s)")
    p.add_argument(
        "--model",
        help="a DiT from MLflow instead of --dit/--vae: models:/shapeflow-dit/<version>, models:/shapeflow-dit@<alias> "
        "or runs:/<run id>/mlflow-model (the tracking server is $MLFLOW_TRACKING_URI)",
    )
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA ones")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    params = config.load_params(args.params)
    g = config.replace(params.train_dit.generate, steps=args.steps, guidance=args.guidance, resolution=args.resolution)
    dit, vae = args.dit, args.vae
    if args.model:
        folders = registry.load_model_folders(args.model)
        if "dit" not in folders:
            raise config.ParamsError(f"--model {args.model}: a VAE, not a DiT (use a {registry.DIT_MODEL} version)")
        dit, vae = folders["dit"], folders["vae"]
    rows = run(dit, vae, args.out, g, args.n, args.category, args.seed, ema=not args.raw)
    tight = sum(r["watertight"] for r in rows)
    print(f"generate: {len(rows)} shapes in {args.out} ({tight} watertight), preview {args.out / 'preview.png'}")
    return 0
