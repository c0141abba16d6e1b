"""The software preview renderer."""

from __future__ import annotations

import trimesh

from shapeflow.render import render


def test_preview_render_shows_the_shape_and_is_blank_without_one():
    sphere = render(trimesh.creation.icosphere(subdivisions=3, radius=0.5), size=64)
    empty = render(trimesh.Trimesh(), size=64)
    assert (empty == 255).all()
    painted = (sphere != 255).any(axis=-1)
    assert 0.15 < painted.mean() < 0.6 and painted[32, 32] and not painted[0, 0]
