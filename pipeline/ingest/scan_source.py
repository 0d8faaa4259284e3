"""`ScanSource`: where one scan comes from and how to read it, the record passed from discovery to the readers.

It lives apart from discovery (`sources`) so that the readers (`dicom`, `read`) and the DICOM
grouping that discovery calls can all name it without importing one another in a circle.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ScanSource"]


@dataclass(frozen=True)
class ScanSource:
    """Where one scan comes from, and how to read it.

    `kind` is one of: metaimage, image (NIfTI/NRRD/MHA), dicom, and the zip variants
    metaimage-zip and dicom-zip where `archive` is the zip and `files` are member names.
    """

    scan_id: str
    kind: str
    dataset: str
    files: tuple[str, ...]
    source_path: str
    archive: str | None = None
    subset: str | None = None
    modality: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    identifiers: tuple[tuple[str, str], ...] = ()
    problem: str | None = None
