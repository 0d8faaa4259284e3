"""The volume store: scans as OME-Zarr images plus a Parquet catalog (see storage_schemas/)."""

from pipeline.volume_store.convert import ConversionSummary, convert
from pipeline.volume_store.settings import ConvertSettings
from pipeline.volume_store.store import (ScanNotFoundError, StoreError, StoreIntegrityError, StoreLockedError,
                                         VolumeStore)
from pipeline.volume_store.tables import read_table

__all__ = ["ConversionSummary", "ConvertSettings", "ScanNotFoundError", "StoreError", "StoreIntegrityError",
           "StoreLockedError", "VolumeStore", "convert", "read_table"]
