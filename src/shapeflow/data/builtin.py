"""Procedural shape families: the offline default dataset.

Every object is built from primitives (boxes, rods, tori, surfaces of revolution) whose proportions
are drawn from a per-object random generator, so the dataset needs no network and is reproducible
bit for bit. The category is the class label of the conditional generator trained downstream, so the
families are meant to be told apart at a glance: a chair never looks like a shelf.

Objects imitate how real assets are made rather than how a clean solid would be: a clean object is a
union of closed, outward-oriented parts that overlap where they join (chair legs poke into the seat)
and are never merged. A share of the objects also carries typical asset defects (holes, flipped or
duplicated faces, zero-area triangles, loose pieces, extra intersecting parts) so that the watertight
stage is exercised on the failure modes it exists for.

Conventions of the generated meshes:
- Y is up and the front of a chair faces +Z (the glTF convention of Objaverse assets).
- Objects are deliberately not normalised: the longest side is drawn from `SCALE_RANGE` and the
  bounding-box centre from `OFFSET_RANGE`, so the downstream normalisation is always exercised.
- Families are designed with the longest side about 1 and no wall, board, leg or spoke thinner
  than 0.025 of it, which is at least ~0.04 in normalised units (longest side 1.9): more than two
  voxels of a 128^3 grid over [-1, 1]^3. Rims, girdles and culets are cut square, not to knife edges.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import trimesh
from scipy.interpolate import PchipInterpolator

CATEGORIES: tuple[str, ...] = ("chair", "table", "mug", "vase", "lamp", "shelf", "bottle", "ring")

# Canonical order of application: deletions first, so that later additions (duplicated rows,
# zero-area triangles) are never deleted again and every recorded defect stays in the mesh.
DEFECTS: tuple[str, ...] = (
    "holes",
    "separate_pieces",
    "overlapping_parts",
    "flipped_faces",
    "duplicate_faces",
    "degenerate_faces",
)

# Longest side of a generated object and range of its bounding-box centre (per axis).
SCALE_RANGE: tuple[float, float] = (0.5, 3.0)
OFFSET_RANGE: tuple[float, float] = (-2.0, 2.0)
_BOX_SUBDIVISIONS = 2  # a box has 12 triangles; two 1-to-4 subdivisions give 192
_ROUND_SECTIONS = 48  # segments around big surfaces of revolution (mug, vase, table top)
_THIN_SECTIONS = 16  # segments around legs, poles and spokes
_PROFILE_POINTS = 36  # samples along a random profile curve
_DEFECT_COUNT_WEIGHTS = (0.6, 0.3, 0.1)  # how many defects a defective object carries: 1, 2, 3
QUANTUM = 2.0**-16  # vertex coordinates are written as multiples of this (about 1.5e-5; see quantise)

Part = trimesh.Trimesh
Family = Callable[[np.random.Generator], list[Part]]


@dataclass(frozen=True)
class BuiltinObject:
    """One generated object: its mesh exactly as generated, defects included."""

    name: str
    category: str
    mesh: trimesh.Trimesh
    defects: tuple[str, ...]


# ----------------------------------------------------------------------------------------------
# Primitives. Each returns a closed, outward-oriented part in design space (Z up, longest side ~1).
# ----------------------------------------------------------------------------------------------


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


def _outward(mesh: Part) -> Part:
    """Flip a closed part wound inside out (revolve's winding follows the direction of the profile)."""
    if mesh.volume < 0:
        mesh.invert()
    return mesh


def _box(low: Sequence[float], high: Sequence[float], transform: np.ndarray | None = None) -> Part:
    """An axis-aligned box between two corners, subdivided so that it has enough faces to punch holes in."""
    mesh = trimesh.creation.box(bounds=np.array([low, high], dtype=float))
    for _ in range(_BOX_SUBDIVISIONS):
        mesh = mesh.subdivide()
    if transform is not None:
        mesh.apply_transform(transform)
    return mesh


def _rod(
    start: Sequence[float], end: Sequence[float], radius: float, sections: int = _THIN_SECTIONS
) -> Part:
    """A capped cylinder between two points."""
    segment = np.array([start, end], dtype=float)  # (2, 3)
    return trimesh.creation.cylinder(radius=radius, segment=segment, sections=sections)


def _post(x: float, y: float, z0: float, z1: float, width: float, round_: bool) -> Part:
    """A vertical leg or post: a square box or a round rod of the given width."""
    if round_:
        return _rod((x, y, z0), (x, y, z1), width / 2)
    half = width / 2
    return _box((x - half, y - half, z0), (x + half, y + half, z1))


def _lathe(profile: np.ndarray, sections: int = _ROUND_SECTIONS) -> Part:
    """Surface of revolution about Z of a (radius, height) profile closed by the axis or by itself."""
    return _outward(trimesh.creation.revolve(profile, sections=sections))


def _sphere(centre: Sequence[float], radius: float) -> Part:
    mesh = trimesh.creation.icosphere(subdivisions=2, radius=radius)
    mesh.apply_translation(centre)
    return mesh


def _arc_tube(major: float, minor: float, start: float, stop: float, arc_sections: int = 24) -> Part:
    """A capped section of a torus in the XZ plane, centred at the origin, from angle `start` to `stop`.

    trimesh can only cap a partial revolve through shapely, which is not a dependency, so the sweep is
    written out: rings of `_THIN_SECTIONS` vertices along the arc, side quads, and a fan at each end.
    """
    phi = np.linspace(start, stop, arc_sections + 1)  # (A,)
    theta = np.linspace(0.0, 2 * np.pi, _THIN_SECTIONS, endpoint=False)  # (R,)
    radial = np.stack([np.cos(phi), np.zeros_like(phi), np.sin(phi)], axis=1)  # (A, 3)
    side = np.array([0.0, 1.0, 0.0])
    rings = (major + minor * np.cos(theta))[None, :, None] * radial[:, None, :] + (
        minor * np.sin(theta)
    )[None, :, None] * side  # (A, R, 3)
    n_arc, n_ring = rings.shape[:2]
    vertices = np.concatenate([rings.reshape(-1, 3), major * radial[[0, -1]]])  # (A*R + 2, 3)

    i, j = np.meshgrid(np.arange(n_arc - 1), np.arange(n_ring), indexing="ij")
    a, b = i * n_ring + j, i * n_ring + (j + 1) % n_ring  # ring i, neighbours j and j+1
    c, d = a + n_ring, b + n_ring  # the same on ring i+1
    quads = np.concatenate([np.stack([a, c, d], -1), np.stack([a, d, b], -1)]).reshape(-1, 3)
    first, last = len(vertices) - 2, len(vertices) - 1
    k = np.arange(n_ring)
    start_cap = np.stack([np.full(n_ring, first), k, (k + 1) % n_ring], axis=1)  # wound against the side
    end_ring = (n_arc - 1) * n_ring
    stop_cap = np.stack([np.full(n_ring, last), end_ring + (k + 1) % n_ring, end_ring + k], axis=1)
    faces = np.concatenate([quads, start_cap, stop_cap])
    return _outward(trimesh.Trimesh(vertices, faces, process=False))


def _smooth_radius(knots: Sequence[float], radii: Sequence[float], samples: np.ndarray) -> np.ndarray:
    """A smooth radius curve through knots; PCHIP does not overshoot the radii of neighbouring knots."""
    return PchipInterpolator(np.asarray(knots), np.asarray(radii))(samples)


def _inner_wall(z: np.ndarray, outer: np.ndarray, wall: float, floor: float | None = None) -> np.ndarray:
    """Inner side, as (radius, height) points from bottom to top, of a wall `wall` thick along its normal.

    The inner curve is the outer one moved inwards radially by `wall / cos(slope)`, which keeps the
    thickness where the wall leans; sharing the outer curve's heights, it cannot fold over itself.
    Its ends are the outer ends moved along the inward normal, so rims are square to the wall instead
    of knife edges; with `floor`, the bottom end is instead where the wall meets a flat floor.
    """
    slope = np.gradient(outer, z)  # dr/dz, (N,)
    stretch = np.sqrt(1.0 + slope**2)
    inner = outer - wall * stretch  # (N,)
    square = np.stack([outer - wall / stretch, z + wall * slope / stretch], axis=1)  # (N, 2)
    low = square[0] if floor is None else np.array([np.interp(floor, z, inner), floor])
    high = square[-1]
    between = (z > low[1]) & (z < high[1])
    return np.concatenate([[low], np.stack([inner[between], z[between]], axis=1), [high]])


def _vessel_profile(z: np.ndarray, outer: np.ndarray, wall: float, floor: float) -> np.ndarray:
    """Profile of an open-topped vessel: outer wall up, rim, inner wall down to a flat floor, axis."""
    inner = _inner_wall(z, outer, wall, floor)
    return np.concatenate([[[0.0, 0.0]], np.stack([outer, z], axis=1), inner[::-1], [[0.0, floor]]])


def _heights(top: float, bottom: float = 0.0) -> np.ndarray:
    return np.linspace(bottom, top, _PROFILE_POINTS)  # (N,)


def _rotation_z(angle: float) -> np.ndarray:
    return trimesh.transformations.rotation_matrix(angle, [0.0, 0.0, 1.0])


# ----------------------------------------------------------------------------------------------
# Families. Each returns the parts of one object in design space: Z up, front towards -Y,
# longest side about 1, nothing thinner than 0.025.
# ----------------------------------------------------------------------------------------------


def _chair(rng: np.random.Generator) -> list[Part]:
    width, depth = _uniform(rng, 0.40, 0.60), _uniform(rng, 0.38, 0.58)
    seat_z, seat_t = _uniform(rng, 0.38, 0.50), _uniform(rng, 0.035, 0.07)
    back_h, back_t = _uniform(rng, 0.30, 0.55), _uniform(rng, 0.03, 0.06)
    leg, inset = _uniform(rng, 0.035, 0.07), _uniform(rng, 0.005, 0.04)
    round_legs = bool(rng.random() < 0.5)
    parts = [_box((-width / 2, -depth / 2, seat_z - seat_t), (width / 2, depth / 2, seat_z))]
    leg_x, leg_y = width / 2 - inset - leg / 2, depth / 2 - inset - leg / 2
    joint_z = seat_z - seat_t / 2  # legs reach halfway into the seat
    parts += _four_legs(leg_x, leg_y, joint_z, leg, round_legs)
    top_z = seat_z + back_h
    low_z = seat_z - 0.75 * seat_t  # the back starts deeper in the seat than the legs end
    if rng.random() < 0.4:  # a solid panel, set in a little from the seat's edges
        side, rear = _uniform(rng, 0.003, 0.015), _uniform(rng, 0.003, 0.015)
        low = (-width / 2 + side, depth / 2 - rear - back_t, low_z)
        parts.append(_box(low, (width / 2 - side, depth / 2 - rear, top_z)))
        back_y = depth / 2 - rear - back_t / 2
    else:  # the rear legs continue up as posts, joined by a rail and slats
        parts += [_post(sx * leg_x, leg_y, low_z, top_z, leg, round_legs) for sx in (-1, 1)]
        parts += _chair_rail_and_slats(rng, leg_x, leg_y, low_z, top_z)
        back_y = leg_y
    if rng.random() < 0.35:
        arm_z = seat_z + min(_uniform(rng, 0.18, 0.26), back_h - 0.1)
        parts += _chair_arms(rng, leg_x, leg_y, back_y, low_z, arm_z)
    return parts


def _four_legs(x: float, y: float, top: float, width: float, round_: bool) -> list[Part]:
    """Legs at (+-x, +-y) from the floor up to `top`."""
    return [_post(sx * x, sy * y, 0.0, top, width, round_) for sx in (-1, 1) for sy in (-1, 1)]


def _chair_rail_and_slats(
    rng: np.random.Generator, post_x: float, y: float, bottom: float, top: float
) -> list[Part]:
    """A top rail between the rear posts (a little below their tops) and vertical slats under it."""
    rail_h, slat_t = _uniform(rng, 0.06, 0.14), _uniform(rng, 0.025, 0.04)
    rail_top = top - _uniform(rng, 0.005, 0.03)
    parts = [_box((-post_x, y - slat_t / 2, rail_top - rail_h), (post_x, y + slat_t / 2, rail_top))]
    n_slats = int(rng.integers(2, 6))
    slat_w = _uniform(rng, 0.03, max(0.031, min(0.07, 0.6 * post_x / n_slats)))
    for x in np.linspace(-post_x, post_x, n_slats + 2)[1:-1]:
        high = (x + slat_w / 2, y + slat_t / 2, rail_top - rail_h / 2)
        parts.append(_box((x - slat_w / 2, y - slat_t / 2, bottom), high))
    return parts


def _chair_arms(
    rng: np.random.Generator, leg_x: float, leg_y: float, back_y: float, bottom: float, arm_z: float
) -> list[Part]:
    """Armrests above the legs: each a board from the front leg back into the backrest, on a post."""
    arm_w, arm_t = _uniform(rng, 0.04, 0.07), _uniform(rng, 0.03, 0.05)
    front = -leg_y - arm_w / 2 - _uniform(rng, 0.0, 0.04)
    parts = []
    for sx in (-1, 1):
        x = sx * leg_x
        parts.append(_box((x - arm_w / 2, front, arm_z), (x + arm_w / 2, back_y, arm_z + arm_t)))
        parts.append(_post(x, -leg_y, bottom, arm_z + arm_t / 2, 0.8 * arm_w, False))
    return parts


def _table(rng: np.random.Generator) -> list[Part]:
    height, top_t = _uniform(rng, 0.45, 0.78), _uniform(rng, 0.03, 0.07)
    if rng.random() < 0.35:
        return _round_table(rng, height, top_t)
    width = _uniform(rng, 0.7, 1.0)
    depth = width * _uniform(rng, 0.45, 0.9)
    leg, inset = _uniform(rng, 0.04, 0.08), _uniform(rng, 0.005, 0.08)
    round_legs = bool(rng.random() < 0.5)
    parts = [_box((-width / 2, -depth / 2, height - top_t), (width / 2, depth / 2, height))]
    leg_x, leg_y = width / 2 - inset - leg / 2, depth / 2 - inset - leg / 2
    joint_z = height - top_t / 2
    parts += _four_legs(leg_x, leg_y, joint_z, leg, round_legs)
    # Boards between the legs end a quarter leg inside them, short of the leg's axis, so that boards
    # meeting in one leg never share a vertex.
    end_x, end_y = leg_x - leg / 4, leg_y - leg / 4
    if rng.random() < 0.5:  # apron: boards under the top, running between the legs
        apron_h, apron_t = _uniform(rng, 0.05, 0.1), _uniform(rng, 0.025, 0.035)
        z0, z1 = height - top_t - apron_h, height - top_t * _uniform(rng, 0.55, 0.8)
        half = apron_t / 2
        parts += [_box((-end_x, y - half, z0), (end_x, y + half, z1)) for y in (-leg_y, leg_y)]
        parts += [_box((x - half, -end_y, z0), (x + half, end_y, z1)) for x in (-leg_x, leg_x)]
    if rng.random() < 0.3:  # a lower shelf held between the legs
        shelf_z, shelf_t = height * _uniform(rng, 0.12, 0.3), _uniform(rng, 0.025, 0.04)
        parts.append(_box((-end_x, -end_y, shelf_z), (end_x, end_y, shelf_z + shelf_t)))
    return parts


def _round_table(rng: np.random.Generator, height: float, top_t: float) -> list[Part]:
    """A round top on a central column that stands on a disc or on radiating feet."""
    radius, column_r = _uniform(rng, 0.3, 0.5), _uniform(rng, 0.035, 0.07)
    base_t = _uniform(rng, 0.03, 0.06)
    parts = [
        _rod((0, 0, height - top_t), (0, 0, height), radius, _ROUND_SECTIONS),
        _rod((0, 0, base_t / 2), (0, 0, height - top_t / 2), column_r, _ROUND_SECTIONS // 2),
    ]
    foot_len = radius * _uniform(rng, 0.5, 0.9)
    if rng.random() < 0.5:
        parts.append(_rod((0, 0, 0), (0, 0, base_t), foot_len, _ROUND_SECTIONS))
        return parts
    foot_w = _uniform(rng, 0.04, 0.07)
    n_feet = int(rng.integers(3, 5))
    for k in range(n_feet):  # feet start inside the column, off its axis, so that they share no face
        spin = _rotation_z(2 * np.pi * k / n_feet)
        parts.append(_box((0.5 * column_r, -foot_w / 2, 0.0), (foot_len, foot_w / 2, base_t), spin))
    return parts


def _mug(rng: np.random.Generator) -> list[Part]:
    """A cup (wall and bottom in one closed solid) and a partial-torus handle sunk into the wall."""
    height, radius = _uniform(rng, 0.6, 1.0), _uniform(rng, 0.25, 0.4)
    wall, floor = _uniform(rng, 0.03, 0.06), _uniform(rng, 0.04, 0.08)
    z = _heights(height)
    body = _lathe(_vessel_profile(z, np.full_like(z, radius), wall, floor))
    tube_r = _uniform(rng, 0.03, 0.055)
    centre_z = height * _uniform(rng, 0.45, 0.55)
    room = min(centre_z - floor, height - centre_z) - tube_r - 0.02  # keep the handle on the wall
    major = min(height * _uniform(rng, 0.22, 0.36), room)
    # The arc ends inside the wall, at its mid-radius, and its centre sits outside the wall.
    wall_mid = radius - wall / 2
    offset = major * _uniform(rng, 0.1, 0.45)
    end = np.arccos(-offset / major)  # angle where the arc meets the wall, in (pi/2, pi)
    handle = _arc_tube(major, tube_r, -end, end)
    handle.apply_translation((wall_mid + offset, 0.0, centre_z))
    return [body, handle]


def _vase(rng: np.random.Generator) -> list[Part]:
    """A hollow vessel with a random foot, belly, neck and lip, as one closed solid."""
    height, belly = _uniform(rng, 0.7, 1.0), _uniform(rng, 0.18, 0.32)
    wall, floor = _uniform(rng, 0.028, 0.045), _uniform(rng, 0.04, 0.08)
    knots = (0.0, _uniform(rng, 0.25, 0.5), _uniform(rng, 0.65, 0.85), 1.0)
    foot, neck, lip = _uniform(rng, 0.45, 0.8), _uniform(rng, 0.3, 0.7), _uniform(rng, 0.45, 0.95)
    radii = belly * np.array([foot, 1.0, neck, lip])
    radii = np.maximum(radii, wall + 0.04)  # keep an opening at the neck
    z = _heights(height)
    outer = _smooth_radius(np.array(knots) * height, radii, z)
    return [_lathe(_vessel_profile(z, outer, wall, floor))]


def _lamp(rng: np.random.Generator) -> list[Part]:
    """A base, a pole, a bulb and an open shade held by spokes from the pole."""
    height = _uniform(rng, 0.7, 1.0)
    base_r, base_t = _uniform(rng, 0.12, 0.22), _uniform(rng, 0.03, 0.07)
    pole_r, spoke_r = _uniform(rng, 0.015, 0.03), _uniform(rng, 0.0125, 0.02)
    shade_h, wall = height * _uniform(rng, 0.22, 0.36), _uniform(rng, 0.025, 0.04)
    shade_bottom = _uniform(rng, 0.16, 0.3)
    shade_top = shade_bottom * _uniform(rng, 0.45, 1.0)
    parts = [_lamp_base(rng, base_r, base_t)]
    z = _heights(height, height - shade_h)
    middle = 0.5 * (shade_bottom + shade_top) * _uniform(rng, 0.92, 1.1)
    outer = _smooth_radius((z[0], 0.5 * (z[0] + z[-1]), z[-1]), (shade_bottom, middle, shade_top), z)
    inner = _inner_wall(z, outer, wall)  # (M, 2)
    parts.append(_lathe(np.concatenate([np.stack([outer, z], 1), inner[::-1], [[outer[0], z[0]]]])))
    spoke_z = height - 2 * spoke_r
    parts.append(_rod((0, 0, base_t / 2), (0, 0, spoke_z + 1.5 * spoke_r), pole_r))
    spoke_end = float(np.interp(spoke_z, inner[:, 1], inner[:, 0])) + wall / 2  # halfway into the wall
    n_spokes = int(rng.integers(2, 5))
    for k in range(n_spokes):  # spokes start inside the pole, off its axis: opposite ones share no face
        direction = np.array([np.cos(2 * np.pi * k / n_spokes), np.sin(2 * np.pi * k / n_spokes), 0.0])
        start, tip = 0.5 * pole_r * direction, spoke_end * direction
        parts.append(_rod(start + (0, 0, spoke_z), tip + (0, 0, spoke_z), spoke_r))
    bulb_r = min(_uniform(rng, 0.04, 0.08), 0.5 * float(inner[:, 0].min()))
    parts.append(_sphere((0, 0, spoke_z - bulb_r), bulb_r))
    return parts


def _lamp_base(rng: np.random.Generator, radius: float, thickness: float) -> Part:
    """A flat disc, a square plate or a low dome."""
    style = int(rng.integers(3))
    if style == 0:
        return _rod((0, 0, 0), (0, 0, thickness), radius, _ROUND_SECTIONS)
    if style == 1:
        half = radius * 0.85
        return _box((-half, -half, 0.0), (half, half, thickness))
    rim = max(0.5 * thickness, 0.025)  # a vertical rim, so that the dome does not thin out to a knife edge
    z = _heights(rim + 1.5 * thickness, rim)
    r = _smooth_radius((z[0], rim + thickness, z[-1]), (radius, 0.8 * radius, 0.35 * radius), z)
    return _lathe(np.concatenate([[[0.0, 0.0]], [[radius, 0.0]], np.stack([r, z], 1), [[0.0, z[-1]]]]))


def _shelf(rng: np.random.Generator) -> list[Part]:
    """Two side panels, boards between them and, often, a back panel.

    Boards and back are set in a little from the panels' outer faces, as cabinet makers do, so that
    no two parts share a face plane where they meet.
    """
    width, height = _uniform(rng, 0.45, 1.0), _uniform(rng, 0.6, 1.0)
    depth, board = _uniform(rng, 0.2, 0.4), _uniform(rng, 0.025, 0.045)
    outer = width / 2
    parts = [_box((-outer, -depth / 2, 0.0), (-outer + board, depth / 2, height))]
    parts.append(_box((outer - board, -depth / 2, 0.0), (outer, depth / 2, height)))
    plinth = rng.random() < 0.4
    bottom = _uniform(rng, 0.04, 0.1) if plinth else _uniform(rng, 0.005, 0.02)
    top = height - _uniform(rng, 0.005, 0.03)
    n_boards = int(rng.integers(3, 7))
    levels = np.linspace(bottom, top - board, n_boards)  # (B,) lower faces of the boards
    levels[1:-1] += rng.uniform(-0.15, 0.15, n_boards - 2) * (levels[1] - levels[0])
    front = -depth / 2 + _uniform(rng, 0.005, 0.03)
    board_x = outer - board / 2  # boards reach halfway into the side panels
    if rng.random() < 0.6:
        back_t, rear = _uniform(rng, 0.025, 0.035), _uniform(rng, 0.003, 0.015)
        back_x = outer - board * _uniform(rng, 0.3, 0.7)
        back_top = height - _uniform(rng, 0.005, 0.03)
        low = (-back_x, depth / 2 - rear - back_t, bottom)
        parts.append(_box(low, (back_x, depth / 2 - rear, back_top)))
        board_back = depth / 2 - rear - back_t / 2  # boards reach halfway into the back panel
    else:
        board_back = depth / 2 - _uniform(rng, 0.005, 0.03)
    parts += [_box((-board_x, front, z), (board_x, board_back, z + board)) for z in levels]
    return parts


def _bottle(rng: np.random.Generator) -> list[Part]:
    """A solid bottle (body, shoulder, neck) and a cap sleeved over the neck."""
    height, body_r = _uniform(rng, 0.75, 1.0), _uniform(rng, 0.12, 0.22)
    neck_r = max(body_r * _uniform(rng, 0.25, 0.5), 0.03)
    cap_h = _uniform(rng, 0.05, 0.1)
    neck_top = height - 0.4 * cap_h
    body_top = height * _uniform(rng, 0.4, 0.65)
    shoulder_top = body_top + height * _uniform(rng, 0.1, 0.22)
    knots = (0.0, 0.04 * height, body_top, shoulder_top, neck_top)
    radii = (body_r * _uniform(rng, 0.82, 0.95), body_r, body_r * _uniform(rng, 0.92, 1.08), neck_r, neck_r)
    z = _heights(neck_top)
    r = _smooth_radius(knots, radii, z)
    body = _lathe(np.concatenate([[[0.0, 0.0]], np.stack([r, z], 1), [[0.0, neck_top]]]))
    cap_r = neck_r * _uniform(rng, 1.1, 1.3)
    cap = _rod((0, 0, neck_top - 0.6 * cap_h), (0, 0, height), cap_r, _ROUND_SECTIONS // 2)
    return [body, cap]


def _ring(rng: np.random.Generator) -> list[Part]:
    """An upright band (a torus, optionally widened along its axis), often with a set gem on top."""
    major, minor = _uniform(rng, 0.3, 0.42), _uniform(rng, 0.035, 0.08)
    widen = _uniform(rng, 1.0, 2.2)
    stand_up = trimesh.transformations.rotation_matrix(np.pi / 2, [0.0, 1.0, 0.0])  # axis Z -> X
    band = trimesh.creation.torus(major, minor, _ROUND_SECTIONS, _THIN_SECTIONS)
    band.apply_transform(stand_up @ np.diag([1.0, 1.0, widen, 1.0]))
    if rng.random() < 0.4:
        return [band]
    setting_r = _uniform(rng, 0.05, 0.1)
    setting_top = major + minor + _uniform(rng, 0.02, 0.06)
    setting = _rod((0, 0, major), (0, 0, setting_top), setting_r, _ROUND_SECTIONS // 2)
    girdle = setting_r * _uniform(rng, 1.1, 1.6)
    pavilion, crown = girdle * _uniform(rng, 0.6, 1.0), girdle * _uniform(rng, 0.3, 0.6)
    band_h = girdle * _uniform(rng, 0.1, 0.2)  # the girdle band and the flat culet avoid knife edges
    z0 = setting_top - 0.5 * pavilion  # the lower half of the gem sits in the setting
    z1, z2 = z0 + pavilion, z0 + pavilion + band_h
    top = z2 + crown
    profile = [[0.0, z0], [0.3 * girdle, z0], [girdle, z1], [girdle, z2], [0.65 * girdle, top], [0.0, top]]
    gem = _lathe(np.array(profile), sections=int(rng.integers(6, 13)))
    return [band, setting, gem]


_FAMILIES: dict[str, Family] = {
    "chair": _chair,
    "table": _table,
    "mug": _mug,
    "vase": _vase,
    "lamp": _lamp,
    "shelf": _shelf,
    "bottle": _bottle,
    "ring": _ring,
}


def _place(vertices: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Turn design space (Z up) into Y up, then give the object a random size and position."""
    vertices = vertices[:, [0, 2, 1]] * np.array([1.0, 1.0, -1.0])  # (x, y, z) -> (x, z, -y)
    low, high = vertices.min(axis=0), vertices.max(axis=0)
    longest = _uniform(rng, *SCALE_RANGE)
    centre = rng.uniform(*OFFSET_RANGE, size=3)
    return (vertices - 0.5 * (low + high)) * (longest / float((high - low).max())) + centre


def make_shape(category: str, rng: np.random.Generator) -> trimesh.Trimesh:
    """A clean object of `category`: closed, outward-oriented parts, overlapping but not merged."""
    family = _FAMILIES.get(category)
    if family is None:
        raise ValueError(f"builtin: unknown category {category!r}; known: {', '.join(CATEGORIES)}")
    parts = trimesh.util.concatenate(family(rng))  # stacked, nothing welded
    return trimesh.Trimesh(_place(np.asarray(parts.vertices), rng), parts.faces, process=False)


# ----------------------------------------------------------------------------------------------
# Defects. Each maps (vertices, faces, rng) to new arrays and never touches its inputs.
# ----------------------------------------------------------------------------------------------

Arrays = tuple[np.ndarray, np.ndarray]


def _extent(vertices: np.ndarray) -> float:
    return float(np.ptp(vertices, axis=0).max())


def _patch(
    vertices: np.ndarray, faces: np.ndarray, rng: np.random.Generator, share: tuple[float, float]
) -> np.ndarray:
    """Indices of a compact patch of faces around a random face, inside that face's connected piece.

    The patch never covers its whole piece (unless the piece is a single face): removing or flipping a
    whole closed part would leave a mesh that is still closed or still consistently wound, which is
    not the defect being recorded.
    """
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    labels = trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(faces))
    seed = int(rng.integers(len(faces)))
    members = np.flatnonzero(labels == labels[seed])  # (M,)
    size = int(round(_uniform(rng, *share) * len(members)))
    size = max(1, min(size, len(members) - 1))
    centroids = vertices[faces[members]].mean(axis=1)  # (M, 3)
    distance = np.linalg.norm(centroids - vertices[faces[seed]].mean(axis=0), axis=1)
    return members[np.argsort(distance, kind="stable")[:size]]


def _holes(vertices: np.ndarray, faces: np.ndarray, rng: np.random.Generator) -> Arrays:
    """Delete a patch of faces (the vertices stay, unreferenced, as in many exported assets)."""
    keep = np.ones(len(faces), dtype=bool)
    keep[_patch(vertices, faces, rng, (0.01, 0.06))] = False
    return vertices, faces[keep]


def _flipped_faces(vertices: np.ndarray, faces: np.ndarray, rng: np.random.Generator) -> Arrays:
    faces = faces.copy()
    patch = _patch(vertices, faces, rng, (0.02, 0.2))
    faces[patch] = faces[patch][:, ::-1]
    return vertices, faces


def _duplicate_faces(vertices: np.ndarray, faces: np.ndarray, rng: np.random.Generator) -> Arrays:
    patch = _patch(vertices, faces, rng, (0.01, 0.1))
    return vertices, np.concatenate([faces, faces[patch]])


def _degenerate_faces(vertices: np.ndarray, faces: np.ndarray, rng: np.random.Generator) -> Arrays:
    """Append zero-area triangles on existing edges: some repeat a vertex, some add the edge midpoint."""
    count = int(rng.integers(2, 17))
    picked = faces[rng.integers(len(faces), size=count)]  # (C, 3)
    a, b = picked[:, 0], picked[:, 1]
    repeated = np.stack([a, b, b], axis=1)[: count // 2]
    a, b = a[count // 2 :], b[count // 2 :]
    midpoints = 0.5 * (vertices[a] + vertices[b])  # (C/2, 3)
    new = len(vertices) + np.arange(len(a))
    collinear = np.stack([a, new, b], axis=1)
    return np.concatenate([vertices, midpoints]), np.concatenate([faces, repeated, collinear])


def _separate_pieces(vertices: np.ndarray, faces: np.ndarray, rng: np.random.Generator) -> Arrays:
    """Either crack a patch off (unweld its vertices and nudge it away) or add a loose little part."""
    if rng.random() < 0.6:
        return _crack(vertices, faces, rng)
    return _loose_part(vertices, faces, rng)


def _crack(vertices: np.ndarray, faces: np.ndarray, rng: np.random.Generator) -> Arrays:
    """Give a patch its own copies of its vertices and move them off along the patch's mean normal.

    The gap (0.1 % to 3 % of the object) is far above any welding tolerance, so the patch stays a
    separate piece even after vertices are merged; where it came from an opening remains.
    """
    faces = faces.copy()
    patch = _patch(vertices, faces, rng, (0.05, 0.25))
    used, local = np.unique(faces[patch], return_inverse=True)
    normals = trimesh.triangles.normals(vertices[faces[patch]])[0]  # (P, 3) for non-degenerate faces
    direction = normals.sum(axis=0)
    if np.linalg.norm(direction) < 1e-9:
        direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    gap = _extent(vertices) * _uniform(rng, 1e-3, 3e-2)
    faces[patch] = len(vertices) + local.reshape(-1, 3)
    return np.concatenate([vertices, vertices[used] + gap * direction]), faces


def _loose_part(vertices: np.ndarray, faces: np.ndarray, rng: np.random.Generator) -> Arrays:
    """A small closed blob floating just outside the bounding box, like a stray bolt."""
    low, high = vertices.min(axis=0), vertices.max(axis=0)
    size = _extent(vertices) * _uniform(rng, 0.04, 0.1)
    centre = rng.uniform(low, high)
    axis, side = int(rng.integers(3)), int(rng.integers(2))
    centre[axis] = high[axis] + 2 * size if side else low[axis] - 2 * size
    part = _random_primitive(rng, centre, size)
    return trimesh.util.append_faces([vertices, part.vertices], [faces, part.faces])


def _overlapping_parts(vertices: np.ndarray, faces: np.ndarray, rng: np.random.Generator) -> Arrays:
    """An extra closed part centred on the surface, so that it cuts through it, left unmerged."""
    areas = trimesh.triangles.area(vertices[faces])  # (F,)
    face = int(rng.choice(len(faces), p=areas / areas.sum()))
    centre = vertices[faces[face]].mean(axis=0)
    part = _random_primitive(rng, centre, _extent(vertices) * _uniform(rng, 0.06, 0.18))
    return trimesh.util.append_faces([vertices, part.vertices], [faces, part.faces])


def _random_primitive(rng: np.random.Generator, centre: np.ndarray, size: float) -> Part:
    """A randomly rotated box, rod or sphere of about `size` across, centred at `centre`."""
    kind = int(rng.integers(3))
    if kind == 0:
        part = _box(-0.5 * size * rng.uniform(0.6, 1.0, 3), 0.5 * size * rng.uniform(0.6, 1.0, 3))
    elif kind == 1:
        part = _rod((0, 0, -0.5 * size), (0, 0, 0.5 * size), 0.5 * size * _uniform(rng, 0.3, 0.6))
    else:
        part = _sphere((0, 0, 0), 0.5 * size)
    rotation = trimesh.transformations.random_rotation_matrix(rand=rng.random(3))
    rotation[:3, 3] = centre
    part.apply_transform(rotation)
    return part


_DEFECT_FUNCTIONS: dict[str, Callable[[np.ndarray, np.ndarray, np.random.Generator], Arrays]] = {
    "holes": _holes,
    "separate_pieces": _separate_pieces,
    "overlapping_parts": _overlapping_parts,
    "flipped_faces": _flipped_faces,
    "duplicate_faces": _duplicate_faces,
    "degenerate_faces": _degenerate_faces,
}


def apply_defects(
    mesh: trimesh.Trimesh, rng: np.random.Generator, names: Sequence[str] | None = None
) -> tuple[trimesh.Trimesh, tuple[str, ...]]:
    """Return a damaged copy of `mesh` and the names of the defects applied, in `DEFECTS` order.

    Without `names`, one to three distinct defects are drawn from `rng`; with `names`, exactly those
    are applied (the tests use this to check each defect on its own).
    """
    if names is None:
        count = int(rng.choice(len(_DEFECT_COUNT_WEIGHTS), p=_DEFECT_COUNT_WEIGHTS)) + 1
        names = [DEFECTS[i] for i in rng.choice(len(DEFECTS), size=count, replace=False)]
    unknown = sorted(set(names) - set(DEFECTS))
    if unknown:
        raise ValueError(f"builtin: unknown defect(s) {unknown}; known: {', '.join(DEFECTS)}")
    if len(mesh.faces) == 0:
        raise ValueError("builtin: cannot apply defects to a mesh without faces")
    wanted = set(names)
    applied = tuple(name for name in DEFECTS if name in wanted)
    vertices, faces = np.asarray(mesh.vertices), np.asarray(mesh.faces)
    for name in applied:
        vertices, faces = _DEFECT_FUNCTIONS[name](vertices, faces, rng)
    return trimesh.Trimesh(vertices, faces, process=False), applied


# ----------------------------------------------------------------------------------------------
# The dataset.
# ----------------------------------------------------------------------------------------------


def _object_rng(seed: int, category: str, index: int) -> np.random.Generator:
    """The generator of one object; crc32, unlike hash(), numbers a category alike in every run."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(category.encode()), index]))


def _carries_defects(index: int, share: float) -> bool:
    """Whether object `index` is damaged: spreads the damaged objects evenly along the index.

    The first n objects always hold floor(n * share + 1/2) damaged ones (the nearest whole number to
    n * share) and the answer for an index never depends on how many objects there are, so growing
    `per_category` leaves the earlier objects as they were.
    """
    return bool(np.floor((index + 1) * share + 0.5) > np.floor(index * share + 0.5))


def _is_whole(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_arguments(per_category: int, defect_share: float, seed: int) -> None:
    if not _is_whole(per_category) or per_category < 0:
        raise ValueError(f"builtin: per_category must be a whole number >= 0, got {per_category!r}")
    if not 0.0 <= float(defect_share) <= 1.0:
        raise ValueError(f"builtin: defect_share must lie in [0, 1], got {defect_share!r}")
    if not _is_whole(seed) or seed < 0:
        raise ValueError(f"builtin: seed must be a whole number >= 0, got {seed!r}")


def generate_builtin(per_category: int, defect_share: float, seed: int) -> Iterator[BuiltinObject]:
    """Yield `per_category` objects of every category, category by category, index by index.

    Each object draws from its own generator seeded by (seed, category, index), so it does not
    depend on how many objects come before or after it.
    """
    _check_arguments(per_category, defect_share, seed)
    for category in CATEGORIES:
        for index in range(per_category):
            rng = _object_rng(int(seed), category, index)
            mesh, defects = make_shape(category, rng), ()
            if _carries_defects(index, float(defect_share)):
                mesh, defects = apply_defects(mesh, rng)
            yield BuiltinObject(f"{category}-{index:04d}", category, mesh, defects)


def quantise(vertices: np.ndarray) -> np.ndarray:
    """Coordinates rounded to multiples of QUANTUM (float64, exact).

    The shapes come from trigonometry and matrix products, whose last bits differ between CPUs and
    maths libraries; rounded to a grid some 10^11 times coarser than those differences, the same
    object gives the same numbers on any machine (unless a value falls within a few ulps of a
    rounding boundary, about 1 in 10^11 per coordinate)."""
    return np.round(np.asarray(vertices, dtype=np.float64) / QUANTUM) * QUANTUM


def export_bytes(mesh: trimesh.Trimesh) -> bytes:
    """Binary little-endian PLY of the face array as given and the vertices quantised.

    Written by hand instead of through trimesh's exporter so that the bytes depend on nothing but the
    arrays (no library version in a comment, no processing): their sha256 is the object's key, and
    with it the object's split, so the bytes must be the same on every machine (`quantise`).
    Vertices are stored as doubles so that loading them back gives the very same numbers.
    """
    vertices = np.ascontiguousarray(quantise(mesh.vertices), dtype="<f8")  # (V, 3)
    faces = np.asarray(mesh.faces, dtype=np.int64)  # (F, 3)
    if faces.size and (faces.min() < 0 or faces.max() >= len(vertices)):
        raise ValueError(f"builtin: face indices out of range [0, {len(vertices)}) in the mesh to export")
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"element vertex {len(vertices)}\n"
        "property double x\nproperty double y\nproperty double z\n"
        f"element face {len(faces)}\n"
        "property list uchar int vertex_indices\nend_header\n"
    ).encode("ascii")
    records = np.empty(len(faces), dtype=[("count", "u1"), ("indices", "<i4", (3,))])
    records["count"] = 3
    records["indices"] = faces
    return header + vertices.tobytes() + records.tobytes()
