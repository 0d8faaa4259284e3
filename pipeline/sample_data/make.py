"""`make_sample_data`: the entry behind `genesis sample-data DIR [--scans N] [--seed S]`, and
`write_luna16_sample`, the same build with phantoms only."""

from __future__ import annotations

import shutil
from pathlib import Path

from .luna16_layout import (SampleSummary, check_sample_args, check_target, phantom_request,
                            prepare_build_dir, publish, write_manifest, write_phantom_scans,
                            write_tables)
from .phantom import PhantomConfig
from .pyradiomics_cases import write_real_scans

REAL_SUBSET = 0
"""The LUNA16 subset the two real lung CTs go to: subset0 is a training subset of the reference's split (subsets 0-4
train, 5-6 validation, 7-9 test), so pretraining learns from them and NCC trains on their tumours; in a test subset
they were only scored, and NCC's test AUC ranked two real-CT tumours against phantom candidates the model had never
seen the like of."""


def make_sample_data(out_dir, n_scans: int = 4, seed: int = 0, include_real: bool = True, *,
                     config: PhantomConfig | None = None, n_subsets: int = 10,
                     real_subset: int = REAL_SUBSET, cache_dir=None, overwrite: bool = False) -> SampleSummary:
    """Write a small LUNA16-layout data set to out_dir, offline.

    n_scans procedural chest CT phantoms (seeded, byte-identical for a seed) spread over
    subset0..subset{n_subsets-1}, plus, with include_real, the two real lung CT cases of the
    pyradiomics-bhklab sdist in subset{real_subset} (downloaded once into cache_dir; skipped with
    a reason in `summary.real_status` when pip cannot fetch it). The whole sample appears at once
    when complete; rerunning with the same arguments reuses it.
    """
    config = PhantomConfig() if config is None else config
    check_sample_args(n_scans, seed, n_subsets)
    if not isinstance(real_subset, int) or isinstance(real_subset, bool) or real_subset < 0:
        raise ValueError(f"real_subset={real_subset!r}: must be an int >= 0")
    out_dir = Path(out_dir)
    request = phantom_request(n_scans, seed, config, n_subsets)
    if include_real:
        request["real_subset"] = real_subset
    existing = check_target(out_dir, request, overwrite)
    if existing is not None:
        return existing
    build = prepare_build_dir(out_dir)
    try:
        scans = write_phantom_scans(build, n_scans=n_scans, seed=seed, config=config,
                                    n_subsets=n_subsets)
        real_status = "not requested"
        if include_real:
            real, real_status = write_real_scans(build, subset=real_subset, cache_dir=cache_dir)
            scans += real
        write_tables(build, scans)
        write_manifest(build, scans, request, real_status)
        publish(build, out_dir)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return SampleSummary(out_dir=out_dir, scans=tuple(scans), request=request,
                         real_status=real_status)


def write_luna16_sample(out_dir, *, n_scans: int = 4, seed: int = 0,
                        config: PhantomConfig | None = None, n_subsets: int = 10,
                        overwrite: bool = False) -> SampleSummary:
    """Write n_scans procedural chest CTs to out_dir in the LUNA16 layout.

    Reruns with the same arguments reuse the finished sample; other arguments need overwrite=True
    (and out_dir must hold a sample made here, so no user folder is ever deleted). The same build as
    `make_sample_data`, without the real cases.
    """
    return make_sample_data(out_dir, n_scans=n_scans, seed=seed, include_real=False, config=config,
                            n_subsets=n_subsets, overwrite=overwrite)
