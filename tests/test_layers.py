"""The package's layers: stages are independent of each other, and the lower layers never import the
higher ones (geometry < metrics, models < the stages), so there is no import cycle between them."""

from __future__ import annotations

import pytest
from test_dvc_deps import SRC, imported_modules

PACKAGE = SRC / "shapeflow"


def modules_under(folder: str) -> list:
    return sorted((PACKAGE / folder).glob("*.py"))


@pytest.mark.parametrize("path", modules_under("stages"), ids=lambda p: p.name)
def test_no_stage_imports_another_stage(path):
    others = {m for m in imported_modules(path) if m.startswith("shapeflow.stages.")}
    assert not others, f"{path.name} imports {sorted(others)}: shared code belongs outside stages/"


@pytest.mark.parametrize("path", modules_under("geometry"), ids=lambda p: p.name)
def test_geometry_imports_neither_metrics_nor_models(path):
    above = {m for m in imported_modules(path) if m.split(".")[1] in {"metrics", "models", "stages", "training"}}
    assert not above, f"geometry/{path.name} imports {sorted(above)}"


@pytest.mark.parametrize("path", modules_under("models"), ids=lambda p: p.name)
def test_models_import_no_metrics_training_or_stages(path):
    above = {m for m in imported_modules(path) if m.split(".")[1] in {"metrics", "stages", "training", "inference"}}
    assert not above, f"models/{path.name} imports {sorted(above)}"


def test_metrics_imports_no_models_or_stages():
    above = {m for m in imported_modules(PACKAGE / "metrics.py") if m.split(".")[1] in {"models", "stages", "training"}}
    assert not above, f"metrics.py imports {sorted(above)}"
