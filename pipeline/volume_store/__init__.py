"""The volume store: scans as OME-Zarr images plus a Parquet catalog (see storage_schemas/).

Import from the defining module (nothing is re-exported here): `pipeline.volume_store.store` (VolumeStore and
its errors), `pipeline.volume_store.convert` (convert, ConversionSummary), `pipeline.volume_store.settings`
(ConvertSettings), `pipeline.volume_store.tables` (read_table), `pipeline.volume_store.errors`.
"""
