"""The inference pipelines' pieces that need no trained model."""

from __future__ import annotations

import numpy as np

from shapeflow.geometry.decode import decode_mesh
from shapeflow.geometry.mesh import is_watertight_shape
from shapeflow.inference import within_box


def test_a_sample_field_below_zero_beyond_the_normalisation_box_still_closes():
    # A slab through the whole grid, negative out to the grid's edge along x and z, as a decoded
    # field can be just past a shape that touches the box. Held to the box (what ShapePipeline.to_mesh
    # does), the mesh closes at +-0.95 and is unchanged inside it; as it is, it is capped at the grid's
    # edge, +-1.
    slab = lambda q: q[:, 1].abs() - 0.2  # noqa: E731
    raw = decode_mesh(slab, 64)
    assert is_watertight_shape(raw) and np.allclose(raw.bounds, [[-1, -0.2, -1], [1, 0.2, 1]], atol=0.02)
    mesh = decode_mesh(within_box(slab), 64)
    assert is_watertight_shape(mesh) and mesh.volume > 0
    lo, hi = mesh.bounds
    assert np.allclose(lo, [-0.95, -0.2, -0.95], atol=0.02) and np.allclose(hi, [0.95, 0.2, 0.95], atol=0.02)
    assert abs(mesh.volume - 1.9 * 0.4 * 1.9) < 0.02
