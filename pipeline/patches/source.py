"""The volume store a patch-store build reads, refused up front when nothing could be built from it, and which
of its scans (one modality) and which recipe a pretraining store samples."""

from __future__ import annotations

import dataclasses

import pandas as pd

from pipeline.patches.config import PretrainPatchConfig, recipe_of_modality
from pipeline.runtime.errors import UsageError
from pipeline.volume_store.errors import StoreError
from pipeline.volume_store.store import CATALOG, VolumeStore

__all__ = ["source_catalog", "resolve_recipe"]


def source_catalog(vstore: VolumeStore):
    """The volume store's catalog, refused (StoreError: exit 2) when it is missing or lists no converted scan: a
    build over it would only say that no scan gave a cube."""
    if not vstore.tree.exists(CATALOG):  # a folder on disk or a prefix in a bucket
        raise StoreError(f"{vstore.root}: its {CATALOG} is missing; rebuild it from the scans' records with "
                         f"`genesis stores verify {vstore.root} --repair`")
    catalog = vstore.catalog()
    if not (catalog["status"] == "ok").any():
        raise StoreError(f"{vstore.root}: {CATALOG} lists no converted scan ({len(catalog)} rows, none ok; see "
                         f"`genesis stores show {vstore.root}`)")
    return catalog


def _modalities(catalog) -> dict[str, int]:
    """Converted scans per modality (as stored; a scan without one counts as OT), most first."""
    ok = catalog[catalog["status"] == "ok"]
    names = ok["modality"].fillna("OT") if "modality" in ok else pd.Series(["OT"] * len(ok), index=ok.index)
    counts = names.astype(str).value_counts()
    return {str(k): int(v) for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))}


def _listed(counts: dict[str, int]) -> str:
    return ", ".join(f"{m} ({n} scan{'s' if n != 1 else ''})" for m, n in counts.items())


def resolve_recipe(vstore: VolumeStore, catalog, config: PretrainPatchConfig):
    """(catalog rows of the scans to sample, config with its recipe and modality resolved).

    The scans: those of `config.modality` (case-insensitive), or all when the store holds one modality; a
    store that mixes modalities without a pick is refused (UsageError, exit 2, naming the modalities and their
    counts), as is a pick that matches no scan. The recipe: an explicit "ct" or "mr" as given, "auto" from the
    modality (CT -> ct, anything else -> mr)."""
    counts = _modalities(catalog)
    if config.modality is not None:
        want = config.modality.strip().upper()
        picked = [m for m in counts if m.upper() == want]
        if not picked:
            raise UsageError(f"{vstore.root}: --modality {config.modality} matches no converted scan; the store "
                             f"holds {_listed(counts)}")
        names = catalog["modality"].fillna("OT").astype(str) if "modality" in catalog else None
        catalog = catalog[names.str.upper() == want] if names is not None else catalog
        modality = picked[0]
    elif len(counts) > 1:
        raise UsageError(f"{vstore.root}: the store mixes modalities: {_listed(counts)}; pretraining draws the "
                         f"cubes of one modality: pick it with --modality NAME (e.g. --modality {next(iter(counts))})")
    else:
        modality = next(iter(counts))
    recipe = recipe_of_modality(modality) if config.recipe == "auto" else config.recipe
    return catalog, dataclasses.replace(config, recipe=recipe, modality=modality)
