"""Shape metrics as pure functions (definitions in the README's Conventions section).

Distances are Euclidean (not squared) in normalised units, nearest neighbours through KD-trees, so
memory stays O(N) however many points are compared.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from shapeflow.geometry.sampling import sample_surface

DEFAULT_POINTS = 10_000


def nearest_distances(points_a: np.ndarray, points_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distance from each a to its nearest b, distance from each b to its nearest a)."""
    a_to_b, _ = cKDTree(points_b).query(points_a, workers=-1)
    b_to_a, _ = cKDTree(points_a).query(points_b, workers=-1)
    return a_to_b, b_to_a


def chamfer_distance(points_a: np.ndarray, points_b: np.ndarray) -> float:
    """CD = (mean_a min_b |a - b| + mean_b min_a |a - b|) / 2."""
    a_to_b, b_to_a = nearest_distances(points_a, points_b)
    return float(0.5 * (a_to_b.mean() + b_to_a.mean()))


def fscore(pred: np.ndarray, ref: np.ndarray, tau: float) -> float:
    """Harmonic mean of precision (share of pred within tau of ref) and recall (the converse)."""
    pred_to_ref, ref_to_pred = nearest_distances(pred, ref)
    precision = float((pred_to_ref < tau).mean())
    recall = float((ref_to_pred < tau).mean())
    if precision + recall == 0.0:
        return 0.0
    return 2.0 * precision * recall / (precision + recall)


def mesh_chamfer(mesh_a, mesh_b, n: int = DEFAULT_POINTS, seed: int = 0) -> float:
    """Chamfer distance between two trimesh surfaces, `n` uniform points on each."""
    rng = np.random.default_rng(seed)
    a, _ = sample_surface(mesh_a, n, rng)
    b, _ = sample_surface(mesh_b, n, rng)
    return chamfer_distance(a, b)
