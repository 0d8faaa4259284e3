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

    The last four fields come from an nnU-Net v2 / MSD `dataset.json` (`pipeline.ingest.nnunet`) and
    travel with the source so that repair reads and checks it exactly as the first conversion did:
    `channel` picks one channel out of a 4-D (MSD) image whose 4th axis must hold `n_channels`;
    `channel_names` (index -> name) and `label_names` (name -> value, or values for a region) are
    what dataset.json says, stored on the scan; a label map holding a value `label_names` does not
    name is refused when it is read. Discovery also sets `label_names` (never `channel_names`) for the
    datasets whose label values are documented (LiTS, BraTS: `sources.DOCUMENTED_LABELS`), so that
    their label maps are checked the same way; `label_authority` says whose names they are.
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
    channel: int | None = None
    n_channels: int | None = None
    channel_names: tuple[tuple[str, str], ...] = ()
    label_names: tuple[tuple[str, int | tuple[int, ...]], ...] = ()

    @property
    def label_values(self) -> tuple[int, ...]:
        """Every label value dataset.json names (regions contribute each of theirs); () = unchecked."""
        values: set[int] = set()
        for _, v in self.label_names:
            values.update(v if isinstance(v, tuple) else (v,))
        return tuple(sorted(values))

    @property
    def from_dataset_json(self) -> bool:
        """Named by an nnU-Net/MSD dataset.json (which always names the channels), not by a documented convention."""
        return bool(self.channel_names)

    @property
    def label_authority(self) -> str:
        """Whose label names `label_names` are, for the one line refusing a value they do not name."""
        if self.from_dataset_json:
            return "dataset.json"
        names = ", ".join(f"{v} {k}" for k, v in self.label_names)
        return f"the {self.dataset} label convention ({names})"

    def dataset_description(self) -> dict | None:
        """What dataset.json says about this scan, as JSON for the scan's attributes; None for other sources
        (a documented convention's label names are checked, not stored: valid scans store what they always did)."""
        if not self.from_dataset_json:
            return None
        return {"channel_names": dict(self.channel_names),
                "labels": {k: list(v) if isinstance(v, tuple) else v for k, v in self.label_names}}
