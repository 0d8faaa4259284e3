"""MetaImage (.mhd + .raw), the LUNA16 format, with the header checked before SimpleITK reads it.

SimpleITK's own errors for a bad MetaImage are long ITK traces, and it opens whatever data
file a header names; `headers.check_header_file` parses the header as ITK does first, so the
usual archive damage (a truncated .raw, a missing data file, a header that is not MetaImage)
and hostile headers (a data file outside the scan's folder) become one-line reasons.
"""

from __future__ import annotations


import SimpleITK as sitk

from pipeline.ingest.archive import read_zip_scan
from pipeline.ingest.headers import check_header_file
from pipeline.ingest.limits import DEFAULT_MAX_SCAN_BYTES
from pipeline.ingest.sources import ScanSource

__all__ = ["check_metaimage", "read_metaimage_image", "read_checked_image"]


def check_metaimage(path: str, max_scan_bytes: int = DEFAULT_MAX_SCAN_BYTES) -> list[str]:
    """Validate a MetaImage header and its data file; return the files that make up the image."""
    return check_header_file(path, max_scan_bytes)[1]


def read_checked_image(path: str, max_scan_bytes: int = DEFAULT_MAX_SCAN_BYTES) -> sitk.Image:
    """Any image file, checked for its format first (`read.read_image`)."""
    from pipeline.ingest.read import read_image

    return read_image(path, max_scan_bytes)


def read_metaimage_image(source: ScanSource, max_scan_bytes: int = DEFAULT_MAX_SCAN_BYTES) -> sitk.Image:
    """Read a MetaImage from disk, or from a zip through a private temporary folder."""
    if source.archive is None:
        return read_checked_image(source.files[0], max_scan_bytes)
    return read_zip_scan(source, max_scan_bytes, read_checked_image, prefix="genesis-mhd-")
