"""The training objects of a sample-stage output: the thin-shell filter (train_vae.data.min_shell_ratio)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest

from shapeflow.config import ParamsError
from shapeflow.dataset import SampleObject, drop_thin_shells


def objects(*keys: str) -> list[SampleObject]:
    return [SampleObject(key, Path(f"objects/{key}.npz"), "tree", "train") for key in keys]


def watertight_manifest(folder: Path, ratios: dict[str, str], failed: tuple[str, ...] = ()) -> Path:
    """A watertight-stage manifest with these shell_ratio cells (and failed rows, which have none)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, ("key", "path", "status", "shell_ratio"))
        writer.writeheader()
        for key, ratio in ratios.items():
            writer.writerow({"key": key, "path": f"objects/{key}.ply", "status": "ok", "shell_ratio": ratio})
        for key in failed:
            writer.writerow({"key": key, "path": "", "status": "failed", "shell_ratio": ""})
    return folder


def test_objects_below_the_min_shell_ratio_are_left_out_and_the_log_says_how_many(tmp_path, caplog):
    meshes = watertight_manifest(tmp_path / "watertight", {"a": "0.93", "b": "1.999", "c": "2.0", "d": "35.2"})
    with caplog.at_level(logging.INFO, logger="shapeflow.dataset"):
        kept, left_out = drop_thin_shells(objects("a", "b", "c", "d"), meshes, 2.0)
    assert [o.key for o in kept] == ["c", "d"] and [o.key for o in left_out] == ["a", "b"]
    assert "left out 2 of 4 objects whose watertight shell_ratio is below 2 (thin shells)" in caplog.text


def test_min_shell_ratio_zero_keeps_every_object_without_reading_a_manifest(tmp_path):
    given = objects("a", "b")
    assert drop_thin_shells(given, tmp_path / "no-such-folder", 0.0) == (given, [])
    assert drop_thin_shells(given, None, 0.0) == (given, [])


def test_an_object_without_a_shell_ratio_is_kept_with_a_warning(tmp_path, caplog):
    meshes = watertight_manifest(tmp_path / "watertight", {"a": "1.0"}, failed=("b",))
    kept, left_out = drop_thin_shells(objects("a", "b", "c"), meshes, 2.0)
    assert [o.key for o in kept] == ["b", "c"] and [o.key for o in left_out] == ["a"]
    assert "2 of 3 objects have no shell_ratio in" in caplog.text


def test_a_min_shell_ratio_without_the_watertight_output_is_a_params_error_naming_the_option():
    with pytest.raises(ParamsError, match=r"train_vae.data.min_shell_ratio: 2.0 needs .*\(--meshes\)"):
        drop_thin_shells(objects("a"), None, 2.0)
