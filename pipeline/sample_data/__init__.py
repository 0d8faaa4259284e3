"""Offline sample data in the LUNA16 layout: procedural chest CT phantoms and two real lung CTs.

- `phantom`: pure numpy core (`PhantomConfig`, `draw_phantom`, `render_phantom`).
- `luna16_layout`: MetaImage + annotations.csv/candidates.csv writer.
- `pyradiomics_cases`: the lung1/lung2 cases of the pyradiomics-bhklab 3.1.4 sdist.
- `make`: `make_sample_data`, everything at once, for `genesis sample-data`; `write_luna16_sample`, phantoms only.
"""

from .luna16_layout import (ANNOTATIONS_HEADER, CANDIDATES_HEADER, CandidateRecord, NoduleRecord,
                            SampleSummary, ScanRecord, read_manifest)
from .make import make_sample_data, write_luna16_sample
from .phantom import (PRESETS, Phantom, PhantomConfig, PhantomParams, default_config, draw_phantom,
                      generate_phantom, render_phantom, tiny_config)

__all__ = [
    "ANNOTATIONS_HEADER", "CANDIDATES_HEADER", "CandidateRecord", "NoduleRecord", "PRESETS",
    "Phantom", "PhantomConfig", "PhantomParams", "SampleSummary", "ScanRecord", "default_config",
    "draw_phantom", "generate_phantom", "make_sample_data", "read_manifest", "render_phantom",
    "tiny_config", "write_luna16_sample",
]
