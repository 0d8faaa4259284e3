"""A scan in memory: voxels in (z, y, x) plus the geometry that places them in LPS world space.

Everything downstream (stores, patches, training) uses (z, y, x) order, the order of the numpy
array SimpleITK hands out. Geometry vectors here are therefore (z, y, x) too; only
`direction` and `source_direction` keep ITK's own row-major 3x3 layout over (x, y, z), because
that is how every tool (ITK, 3D Slicer, MetaImage headers) prints them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

__all__ = ["Volume", "to_lps", "volume_from_image", "check_geometry", "IDENTITY"]

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass
class Volume:
    """Voxels and geometry of one scan after reorientation to LPS."""

    voxels: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    source_direction: tuple[float, ...]
    modality: str
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    identifiers: dict[str, str] = field(default_factory=dict)
    label_attrs: dict[str, dict] = field(default_factory=dict)
    """Per-label metadata (JSON-serialisable), stored under "genesis" in the label group's attributes."""

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.voxels.shape)  # type: ignore[return-value]


def check_geometry(image: sitk.Image, what: str) -> None:
    """Refuse geometry no scan can have, whatever format it came from: spacing that is not a
    positive finite number, an origin or direction that is not finite, a singular direction.

    Readers differ in what they let through (one keeps inf, another turns it into 0), so the
    image ITK decoded is checked here in addition to the header checks.
    """
    spacing, origin, direction = image.GetSpacing(), image.GetOrigin(), image.GetDirection()
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"{what}: spacing {tuple(spacing)} must be positive finite numbers")
    if not all(np.isfinite(v) for v in origin):
        raise ValueError(f"{what}: origin {tuple(origin)} is not finite")
    n = image.GetDimension()
    matrix = np.asarray(direction, dtype=float).reshape(n, n)
    if not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix)) < 1e-6:
        raise ValueError(f"{what}: direction {tuple(direction)} is not a finite, invertible matrix")


def to_lps(image: sitk.Image) -> sitk.Image:
    """Reorient to LPS (direction closest to identity) by permuting/flipping axes; voxels are not resampled.

    Already-LPS images are returned as they are, so the common case costs no copy.
    """
    direction = np.asarray(image.GetDirection(), dtype=float)
    if np.allclose(direction, IDENTITY, atol=1e-6):
        return image
    return sitk.DICOMOrient(image, "LPS")


def volume_from_image(image: sitk.Image, modality: str, labels: dict[str, sitk.Image] | None = None,
                      identifiers: dict[str, str] | None = None,
                      label_attrs: dict[str, dict] | None = None) -> Volume:
    """Turn a SimpleITK image (and label maps on the same grid) into an LPS `Volume`."""
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 3-D image, got {image.GetDimension()}-D with size {image.GetSize()}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"expected one value per voxel, got {image.GetNumberOfComponentsPerPixel()} components")
    source_direction = tuple(float(v) for v in image.GetDirection())
    oriented = to_lps(image)
    out_labels = {}
    for name, label in (labels or {}).items():
        _check_same_grid(image, label, name)
        out_labels[name] = sitk.GetArrayFromImage(to_lps(label))
    voxels = sitk.GetArrayFromImage(oriented)
    return Volume(
        voxels=voxels,
        spacing=tuple(float(v) for v in reversed(oriented.GetSpacing())),  # type: ignore[arg-type]
        origin=tuple(float(v) for v in reversed(oriented.GetOrigin())),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in oriented.GetDirection()),
        source_direction=source_direction,
        modality=modality,
        labels=out_labels,
        identifiers=dict(identifiers or {}),
        label_attrs={k: v for k, v in (label_attrs or {}).items() if k in out_labels},
    )


def _check_same_grid(image: sitk.Image, label: sitk.Image, name: str) -> None:
    problems = []
    if image.GetSize() != label.GetSize():
        problems.append(f"size {label.GetSize()} vs image {image.GetSize()}")
    for what, a, b in [("spacing", label.GetSpacing(), image.GetSpacing()),
                       ("origin", label.GetOrigin(), image.GetOrigin()),
                       ("direction", label.GetDirection(), image.GetDirection())]:
        if not np.allclose(a, b, rtol=1e-4, atol=1e-3):
            problems.append(f"{what} {tuple(round(v, 4) for v in a)} vs image {tuple(round(v, 4) for v in b)}")
    if problems:
        raise ValueError(f"label map '{name}' is not on the image's grid: " + "; ".join(problems))
