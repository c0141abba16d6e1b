"""shapeflow compare: finished runs of either VAE family side by side, from what their stages wrote."""

from __future__ import annotations

import json
import struct

import pytest

from shapeflow import compare
from shapeflow.cli import main as cli_main
from shapeflow.models import families


def workspace(root, family, *, cd, evaluated=True):
    """A workspace as the stages leave it: a saved tiny VAE of `family`, train_vae's reports and,
    when `evaluated`, the evaluate stage's metrics and wall times."""
    model = families.build_vae(families.vae_config(family, "tiny"))
    families.save_vae(
        model, root / "models" / "vae", {"preset": "tiny", "steps": 300, "mlflow_run_id": f"{family}0" * 4}
    )
    reports = root / "reports" / "train_vae"
    reports.mkdir(parents=True)
    (reports / "metrics.json").write_text(json.dumps({"steps": 300}))
    (reports / "loss.csv").write_text("step,loss,samples_per_s\n10,0.5,2.0\n20,0.4,4.0\n30,0.3,3.0\n")
    if evaluated:
        (root / "eval").mkdir()
        recon = {"objects": 3, "cd": cd, "f@0.01": 0.7, "f@0.02": 0.9, "nc": 0.88, "iou_volume": 0.8}
        generation = {"samples": 4, "watertight_share": 1.0, "category_match_common": 0.5, "mmd_cd": 0.1}
        (root / "eval" / "metrics.json").write_text(
            json.dumps({"split": "test", "recon": recon, "generation": generation})
        )
        timings = {"recon_objects": 3, "recon_s": 30.0, "recon_decode_s": 2.5, "samples": 4, "generation_s": 20.0}
        (root / "eval" / "run.json").write_text(json.dumps({"mlflow_run_id": "e" * 32, "timings": timings}))
        (root / "models" / "dit").mkdir()
        generator = {"t_shift": families.T_SHIFT[family], "classes": []}
        (root / "models" / "dit" / "generator.json").write_text(json.dumps(generator))
    return model


def cells(table: str, row: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {row} |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def test_two_families_side_by_side_with_sizes_throughput_and_figures(tmp_path):
    vecset = workspace(tmp_path / "a", "vecset", cd=0.012)
    grid = workspace(tmp_path / "b", "grid", cd=0.009, evaluated=False)
    report = tmp_path / "ycb.json"
    report.write_text(json.dumps({"mesh_dir": "/data/ycb", "mean": {"objects": 78, "f@0.02": 0.87}, "decode_s": 4.0}))
    runs = compare.compare([f"vecset={tmp_path / 'a'}", f"grid={tmp_path / 'b'}"], [f"vecset={report}"])
    table = compare.markdown(runs)
    assert cells(table, "VAE family") == ["vecset", "grid"]
    count = [sum(p.numel() for p in m.parameters()) for m in (vecset, grid)]
    assert cells(table, "VAE parameters") == [f"{n:,}" for n in count]
    side = grid.config.latent_side
    assert cells(table, "latent size (tokens × channels)")[1] == (
        f"{side}³ × {grid.config.latent_dim} = {side**3 * grid.config.latent_dim:,}"
    )
    assert cells(table, "train_vae samples/s (median)") == ["3", "3"]
    assert cells(table, "recon, test split: CD") == ["0.012", "–"]
    assert cells(table, "recon, test split: seconds a shape") == ["2.5", "–"]
    assert cells(table, "recon, ycb: F@0.02") == ["0.87", "–"]
    assert cells(table, "generation: seconds a sample (scoring included)") == ["5", "–"]
    assert cells(table, "train_dit time shift (flow.t_shift)") == ["1", "–"]
    assert cells(table, "MLflow run, train_vae") == ["vecset0v", "grid0gri"]
    # What the unevaluated run lacks is said, not guessed.
    assert f"grid ({tmp_path / 'b'}) lacks: models/dit/ema/model.safetensors, reports/train_dit/metrics.json" in table
    assert compare.as_json(runs)["runs"][0]["recon, test split: F@0.02"] == 0.9


def test_bad_runs_and_files_are_named_errors(tmp_path, capsys):
    workspace(tmp_path / "a", "vecset", cd=0.01)
    with pytest.raises(ValueError, match="expected LABEL=PATH"):
        compare.compare([str(tmp_path / "a")], [])
    with pytest.raises(NotADirectoryError, match="not a folder"):
        compare.compare([f"x={tmp_path / 'nowhere'}"], [])
    with pytest.raises(ValueError, match="given twice"):
        compare.compare([f"a={tmp_path / 'a'}", f"a={tmp_path / 'a'}"], [])
    with pytest.raises(ValueError, match="no run labelled 'b'"):
        compare.compare([f"a={tmp_path / 'a'}"], [f"b={tmp_path / 'r.json'}"])
    (tmp_path / "a" / "eval" / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"eval/metrics.json: unreadable"):
        compare.compare([f"a={tmp_path / 'a'}"], [])
    # A weights file whose header claims to be huge is refused before anything is read.
    weights = tmp_path / "a" / "models" / "vae" / "model.safetensors"
    weights.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(ValueError, match="not a safetensors file"):
        compare.safetensors_parameters(weights)
    # Through the command line: exit status 2 and the reason, no table.
    assert cli_main(["compare", f"a={tmp_path / 'a'}"]) == 2
    out = capsys.readouterr()
    assert "shapeflow compare: error:" in out.err and "|" not in out.out
