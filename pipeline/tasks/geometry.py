"""World millimetres <-> voxel indices of a stored scan (LPS, arrays in z, y, x), and the frames cubes are cut in.

Candidates tables (LUNA16, PE-CAD) give world coordinates (x, y, z) in mm. A stored scan keeps
ITK's geometry in its `genesis` attributes: spacing and origin in (z, y, x), direction as ITK's
row-major 3x3 over (x, y, z). ITK maps index to world as origin + D @ (spacing * index) in
(x, y, z); this inverts that exactly, so a non-identity direction and any origin are handled.

Vessel-oriented cubes (ECC, Tajbakhsh et al.'s vessel-oriented image representation) are cut in
a frame whose first cube axis follows the vessel: `vessel_frame` builds it in world mm (so it is
orthonormal whatever the scan's spacing) and `cube_steps` turns it into voxel-index steps.
A task grid resized in-plane (LCS at the reference's 256 x 256) gets its own geometry from
`resized_geometry`, so every position in mm stays right on the resized voxels.
"""

from __future__ import annotations

import numpy as np

__all__ = ["world_to_index", "index_to_world", "direction_problem", "vessel_frame", "cube_steps",
           "resized_geometry", "numbers_text", "outside_volume"]

_MIN_LENGTH = 1e-6
"""A direction shorter than this has no direction (the unit-length rule is checked where tables are stored)."""


def _geometry(attrs: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    spacing_xyz = np.asarray(attrs["spacing"], dtype=float)[::-1]
    origin_xyz = np.asarray(attrs["origin"], dtype=float)[::-1]
    direction = np.asarray(attrs["direction"], dtype=float).reshape(3, 3)
    return spacing_xyz, origin_xyz, direction


def world_to_index(points_xyz_mm: np.ndarray, attrs: dict) -> np.ndarray:
    """(n, 3) world (x, y, z) mm -> (n, 3) continuous voxel indices (z, y, x) of the stored scan."""
    spacing, origin, direction = _geometry(attrs)
    p = np.atleast_2d(np.asarray(points_xyz_mm, dtype=float)) - origin[None, :]
    index_xyz = np.linalg.solve(direction, p.T).T / spacing[None, :]
    return index_xyz[:, ::-1]


def index_to_world(index_zyx: np.ndarray, attrs: dict) -> np.ndarray:
    """(n, 3) voxel indices (z, y, x) -> (n, 3) world (x, y, z) mm."""
    spacing, origin, direction = _geometry(attrs)
    idx = np.atleast_2d(np.asarray(index_zyx, dtype=float))[:, ::-1]
    return origin[None, :] + (direction @ (idx * spacing[None, :]).T).T


def direction_problem(direction_xyz) -> str | None:
    """Why a vessel direction cannot orient a cube (not three finite numbers, or zero length), else None.

    The one rule behind the up-front refusals at `genesis convert` and `genesis patches task`."""
    try:
        d = np.asarray(direction_xyz, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        return f"is not three numbers: {direction_xyz!r}"
    if d.size != 3:
        return f"has {d.size} components, not 3"
    if not np.all(np.isfinite(d)):
        return "is not finite"
    if float(np.linalg.norm(d)) < _MIN_LENGTH:
        return "has zero length"
    return None


def vessel_frame(direction_xyz, attrs: dict) -> np.ndarray:
    """(3, 3) world unit vectors (x, y, z components) of the cube's axes, rows in cube order (z, y, x).

    The rule (deterministic, and the identity frame of the scan when the vessel runs along its z axis):
    - cube z = the vessel direction, normalised; its sign carries no meaning in the table, so it is
      made to point along the scan's z axis (increasing slice index), or its y, then x axis when it
      lies across them: the cube is the same whichever sign the table gives.
    - cube x = the scan's x axis made orthogonal to cube z (Gram-Schmidt), and cube y = z x x; when
      the vessel lies within 45 degrees of the scan's x axis, cube y = the scan's y axis made
      orthogonal to cube z instead, and cube x = y x z.
    The frame is right-handed (x, y, z) as the scan's own axes are, so no cube is a mirror image.
    """
    problem = direction_problem(direction_xyz)
    if problem:
        raise ValueError(f"vessel direction {tuple(np.asarray(direction_xyz).reshape(-1).tolist())} {problem}")
    _, _, direction = _geometry(attrs)
    axes = direction / np.linalg.norm(direction, axis=0, keepdims=True)  # columns: scan x, y, z in world
    ax, ay, az = axes[:, 0], axes[:, 1], axes[:, 2]
    w = np.asarray(direction_xyz, dtype=float).reshape(3)
    w = w / np.linalg.norm(w)
    for a in (az, ay, ax):
        dot = float(w @ a)
        if abs(dot) > 1e-9:
            w = w if dot > 0 else -w
            break
    if abs(float(w @ ax)) <= np.sqrt(0.5):
        ex = ax - (ax @ w) * w
        ex /= np.linalg.norm(ex)
        ey = np.cross(w, ex)
    else:
        ey = ay - (ay @ w) * w
        ey /= np.linalg.norm(ey)
        ex = np.cross(ey, w)
    return np.stack([w, ey, ex])


def cube_steps(frame_world: np.ndarray, steps_mm, attrs: dict) -> np.ndarray:
    """(3, 3) voxel-index displacement (z, y, x) of one step along each cube axis (rows z, y, x).

    `steps_mm` is the sampling step per cube axis; a world vector v is the index vector
    solve(D, v) / spacing, exactly the inverse of ITK's mapping."""
    spacing, _, direction = _geometry(attrs)
    world = np.asarray(frame_world, dtype=float) * np.asarray(steps_mm, dtype=float)[:, None]
    index_xyz = np.linalg.solve(direction, world.T).T / spacing[None, :]
    return index_xyz[:, ::-1]


def resized_geometry(attrs: dict, shape_zyx, new_shape_zyx) -> dict:
    """`attrs` for the same scan resampled from `shape_zyx` to `new_shape_zyx` voxels over the same extent.

    New voxel j covers old voxels [j r - 1/2, (j + 1) r - 1/2] (r = old / new per axis, the rule of
    area and half-pixel linear resizing), so its centre is old index j r + (r - 1) / 2: spacing
    becomes spacing x r and the origin moves to old index (r - 1) / 2. The direction is unchanged."""
    ratio = np.asarray(shape_zyx, dtype=float) / np.asarray(new_shape_zyx, dtype=float)
    out = dict(attrs)
    out["spacing"] = [float(s) for s in np.asarray(attrs["spacing"], dtype=float) * ratio]
    origin_xyz = index_to_world((ratio - 1) / 2, attrs)[0]
    out["origin"] = [float(v) for v in origin_xyz[::-1]]
    return out


def numbers_text(values, decimals: int | None = None) -> str:
    """"(1e+308, -17.1367, 40)": numbers for a message, each in general format (six significant digits, an
    exponent when large: a coordinate of 1e308 is "1e+308", never 309 digits), integers as plain ints (never
    "np.int64(40)"); `decimals` rounds first (voxel positions to a tenth)."""
    out = []
    for v in np.asarray(values).reshape(-1).tolist():
        if isinstance(v, (bool, int)):
            out.append(str(int(v)))
        else:
            v = float(v)
            out.append(f"{round(v, decimals) if decimals is not None and np.isfinite(v) else v:g}")
    return f"({', '.join(out)})"


def outside_volume(point_xyz_mm, centre_zyx, shape_zyx) -> str | None:
    """Why a candidate at world `point_xyz_mm` (x, y, z), voxel `centre_zyx` of a volume of `shape_zyx`, cannot
    be cut (not finite, or outside the volume by more than half a voxel), in one readable line; None when inside."""
    centre = np.asarray(centre_zyx, dtype=float).reshape(-1)
    shape = np.asarray(shape_zyx).reshape(-1)
    if np.all(np.isfinite(centre)) and np.all(centre >= -0.5) and np.all(centre <= shape - 0.5):
        return None
    return (f"candidate at {numbers_text(point_xyz_mm)} mm (x, y, z) is voxel {numbers_text(centre, 1)} (z, y, x), "
            f"outside the volume of shape {numbers_text([int(v) for v in shape])}")
