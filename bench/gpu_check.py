"""The GPU paths, checked on a CUDA machine: what the stages pick there by themselves, and that it
computes what the CPU path computes.

- precision: `precision: auto` (train_vae, train_dit) resolves to bf16, and the Accelerator that the
  stages make puts the model on cuda and runs its layers in bf16 under `accelerator.autocast()`;
- attention: which scaled_dot_product_attention kernel each attention model's loss runs under that autocast
  (read off the profiler: flash, memory-efficient, cuDNN or math), and how far the bf16 loss is from
  the float32 one;
- training: optimiser steps of each family's VAE and of the DiT on each family's latents through that
  Accelerator (`accelerator.backward`): the loss stays finite and falls;
- decode: the hierarchical decoder on cuda against the CPU on a thin rod and on a ball with a fin
  steeper than the margin assumes, which only surface following finds (same signs, same mesh), and
  the query chunk it sizes from the free memory;
- optional back-ends: whether spconv (a CUDA build) and cubvh are importable here.

    python bench/gpu_check.py --json OUT.json

Prints JSON and a table (check, ok, detail); exits 1 when a check fails, 2 without a CUDA device.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from pathlib import Path

from _table import print_table

SDPA_OPS = {  # profiler op name -> the kernel family it runs
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "memory-efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "cpu flash",
}


def models(device: str) -> dict:
    """name -> (model, loss()) for each family's VAE (local preset) and the DiT (tiny) on each family's
    latents, on sphere batches as bench_vae.py makes them."""
    import torch
    from bench_dit import LATENTS, train_params
    from bench_vae import sphere_batch, sphere_grids

    from shapeflow.config import VAELossParams
    from shapeflow.models import families
    from shapeflow.models.dit import DiT, dit_config
    from shapeflow.stages.train_dit import training_losses
    from shapeflow.stages.train_vae import LOSSES

    out = {}
    for family in ("vecset", "grid"):
        torch.manual_seed(0)
        config = families.vae_config(family, "local")
        model = families.build_vae(config).to(device)
        data = sphere_batch(8, device)
        if family == "grid":
            data |= sphere_grids(8, config.resolution, device)
        out[f"{family} VAE"] = (model, lambda m=model, d=data, f=family: LOSSES[f](m, d, VAELossParams())["loss"])
    for latents in ("vecset", "grid"):
        torch.manual_seed(0)
        config = dit_config("tiny", {"num_classes": 8, **LATENTS[latents]})
        model = DiT(config).to(device)
        with torch.no_grad():  # adaLN-zero starts with a zero output at any precision: give it weights
            for param in model.parameters():
                if not param.any():
                    param.normal_(0.0, 0.02)
        x = torch.randn(16, config.num_tokens, config.latent_dim, device=device)
        y = torch.randint(0, 8, (16,), device=device)
        params = train_params(latents)

        def loss(m=model, x=x, y=y, null=config.null_label, p=params):
            return training_losses(m, (x, y), p, null, None)["loss"]

        out[f"DiT on {latents} latents"] = (model, loss)
    return out


def check_precision() -> dict:
    import torch

    from shapeflow.training import make_accelerator, pick_precision

    accelerator = make_accelerator("auto", 1, 0)
    layer = torch.nn.Linear(8, 8).to(accelerator.device)
    with accelerator.autocast():
        dtype = layer(torch.randn(2, 8, device=accelerator.device)).dtype
    detail = f"auto -> {pick_precision('auto')}, device {accelerator.device}, linear under autocast -> {dtype}"
    ok = pick_precision("auto") == "bf16" and accelerator.device.type == "cuda" and dtype == torch.bfloat16
    return {"check": "precision auto", "ok": ok, "detail": detail}


def check_attention(name: str, model, loss, device: str = "cuda") -> dict:
    """The SDPA kernels the loss runs under bf16 autocast; the bf16 loss against the float32 one
    (same seed, so the same noise and times)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    def run(autocast: bool) -> float:
        torch.manual_seed(1)
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            return float(loss())

    run(True)  # warm-up
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        bf16 = run(True)
    kernels = sorted({SDPA_OPS[e.key] for e in prof.key_averages() if e.key in SDPA_OPS})
    fp32 = run(False)
    relative = abs(bf16 - fp32) / max(abs(fp32), 1e-12)
    ok = bool(kernels) and "math" not in kernels and math.isfinite(bf16) and relative < 0.05
    detail = f"sdpa kernels: {', '.join(kernels) or 'none seen'}; loss bf16 {bf16:.5f} fp32 {fp32:.5f}"
    return {"check": f"attention: {name}", "ok": ok, "detail": detail, "kernels": kernels, "relative": relative}


def check_training(name: str, model, loss, steps: int) -> dict:
    """`steps` AdamW steps through the stages' Accelerator; the loss of the last fifth against the first."""
    import torch

    from shapeflow.training import make_accelerator

    accelerator = make_accelerator("auto", 1, 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    values = []
    tic = time.perf_counter()
    for _ in range(steps):
        with accelerator.autocast():
            value = loss()
        accelerator.backward(value)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        values.append(float(value.detach()))  # float() waits for the device
    seconds = time.perf_counter() - tic
    fifth = max(steps // 5, 1)
    first, last = sum(values[:fifth]) / fifth, sum(values[-fifth:]) / fifth
    ok = all(math.isfinite(v) for v in values) and last < first
    detail = f"{steps} steps in {seconds:.1f} s, loss {first:.4f} -> {last:.4f}"
    return {"check": f"training: {name}", "ok": ok, "detail": detail, "losses": values}


def thin_rod(q):  # radius 0.003 along x: a part thinner than a cell at every level
    import torch

    return torch.maximum(q[:, 1:].norm(dim=-1) - 0.003, q[:, 0].abs() - 0.7)


def finned_ball(q):  # a ball with a fin 0.008 thick, four times a distance: found by surface following
    import torch

    ball = q.norm(dim=-1) - 0.4
    fin = ((q - q.new_tensor([0.6, 1 / 64, 0.0])).abs() - q.new_tensor([0.3, 0.004, 0.2])).max(dim=-1).values
    return 4 * torch.minimum(ball, fin)


def check_decode(resolution: int) -> dict:
    import torch

    from shapeflow.geometry import decode

    decode.decode_grid(thin_rod, 64, device="cuda")  # warm-up
    parts, ok = [], True
    for field in (thin_rod, finned_ball):
        tic = time.perf_counter()
        cpu = decode.decode_grid(field, resolution)
        cpu_s = time.perf_counter() - tic
        torch.cuda.synchronize()
        tic = time.perf_counter()
        gpu = decode.decode_grid(field, resolution, device="cuda")
        gpu_s = time.perf_counter() - tic
        differ = int(((cpu < 0) != (gpu < 0)).sum())
        faces = (len(decode.grid_to_mesh(cpu).faces), len(decode.grid_to_mesh(gpu).faces))
        ok &= differ == 0 and faces[0] == faces[1] > 0
        times = f"cpu {cpu_s:.2f} s gpu {gpu_s:.2f} s"
        parts.append(f"{field.__name__}: {differ} signs differ, faces cpu {faces[0]} gpu {faces[1]}, {times}")
    chunk = decode.default_chunk("cuda")
    ok &= chunk > decode.CPU_CHUNK
    detail = f"{resolution}^3 " + "; ".join(parts) + f"; chunk {chunk:,} queries (cpu {decode.CPU_CHUNK:,})"
    return {"check": "decode on cuda", "ok": ok, "detail": detail}


def check_backends() -> dict:
    import torch

    from shapeflow.geometry import sdf

    found = {name: importlib.util.find_spec(name) is not None for name in ("spconv", "cubvh")}
    detail = ", ".join(f"{k} {'present' if v else 'absent'}" for k, v in found.items())
    detail += f"; sdf back-end auto -> {'cuda' if sdf.cuda_available() else 'cpu'}"
    if found["spconv"]:
        import spconv.pytorch as spconv

        coords = torch.unique(torch.randint(0, 32, (2000, 3)), dim=0)
        indices = torch.cat([torch.zeros(len(coords), 1, dtype=torch.long), coords], 1).int().cuda()
        tensor = spconv.SparseConvTensor(torch.randn(len(coords), 16).cuda(), indices, [32] * 3, 1)
        conv = spconv.SubMConv3d(16, 16, 3, indice_key="k").cuda()
        conv(tensor).features.sum().backward()
        detail += "; spconv SubMConv3d forward and backward ran on cuda"
    # Informational: the project runs without either (gather in torch; the CPU distance back-end).
    return {"check": "optional back-ends", "ok": True, "detail": detail, **found}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="training steps per model")
    parser.add_argument("--resolution", type=int, default=256, help="decode check resolution")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "gpu_check.json")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    rows = [{"check": "device", "ok": True, "detail": f"{torch.cuda.get_device_name()}, torch {torch.__version__}"}]

    def attempt(label: str, fn, *fn_args) -> None:
        try:
            rows.append(fn(*fn_args))
        except Exception as exc:  # one failed check must not hide the others
            rows.append({"check": label, "ok": False, "detail": f"{type(exc).__name__}: {exc}"})
        print(f"{rows[-1]['check']}: {'ok' if rows[-1]['ok'] else 'FAILED'}: {rows[-1]['detail']}", flush=True)

    attempt("precision auto", check_precision)
    for name, (model, loss) in models("cuda").items():
        if name != "grid VAE":  # convolutions and an MLP: no attention
            attempt(f"attention: {name}", check_attention, name, model, loss)
    for name, (model, loss) in models("cuda").items():
        attempt(f"training: {name}", check_training, name, model, loss, args.steps)
    attempt("decode on cuda", check_decode, args.resolution)
    attempt("optional back-ends", check_backends)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print(json.dumps([{k: v for k, v in r.items() if k != "losses"} for r in rows], indent=2))
    print()
    print_table(["check", "ok", "detail"], [[r["check"], "yes" if r["ok"] else "NO", r["detail"]] for r in rows])
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
