"""The volume store a patch-store build reads, refused up front when nothing could be built from it."""

from __future__ import annotations

from pipeline.volume_store.errors import StoreError
from pipeline.volume_store.store import CATALOG, VolumeStore

__all__ = ["source_catalog"]


def source_catalog(vstore: VolumeStore):
    """The volume store's catalog, refused (StoreError: exit 2) when it is missing or lists no converted scan: a
    build over it would only say that no scan gave a cube."""
    path = vstore.root / CATALOG
    if not path.is_file():
        raise StoreError(f"{vstore.root}: its {CATALOG} is missing; rebuild it from the scans' records with "
                         f"`genesis stores verify {vstore.root} --repair`")
    catalog = vstore.catalog()
    if not (catalog["status"] == "ok").any():
        raise StoreError(f"{vstore.root}: {CATALOG} lists no converted scan ({len(catalog)} rows, none ok; see "
                         f"`genesis stores show {vstore.root}`)")
    return catalog
