"""Reading CT/MRI archives (LUNA16 MetaImage, DICOM series, NIfTI, NRRD, zips) into LPS volumes."""

from pipeline.ingest.read import checksum, fingerprint, read_source
from pipeline.ingest.scan_source import ScanSource
from pipeline.ingest.sources import Discovery, SourceError, TableSource, discover
from pipeline.ingest.volume import Volume, to_lps, volume_from_image

__all__ = ["Discovery", "ScanSource", "SourceError", "TableSource", "Volume", "checksum", "discover",
           "fingerprint", "read_source", "to_lps", "volume_from_image"]
