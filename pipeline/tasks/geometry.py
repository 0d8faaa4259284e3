"""World millimetres <-> voxel indices of a stored scan (LPS, arrays in z, y, x).

Candidates tables (LUNA16, PE-CAD) give world coordinates (x, y, z) in mm. A stored scan keeps
ITK's geometry in its `genesis` attributes: spacing and origin in (z, y, x), direction as ITK's
row-major 3x3 over (x, y, z). ITK maps index to world as origin + D @ (spacing * index) in
(x, y, z); this inverts that exactly, so a non-identity direction and any origin are handled.
"""

from __future__ import annotations

import numpy as np

__all__ = ["world_to_index", "index_to_world"]


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
