"""The five Models Genesis target tasks (MedIA 2021, Table 4; keras/downstream_tasks of the reference).

Values are the reference's where it states them (../shared/MODELS_GENESIS.md sections 3-4); where it is
silent the choice is ours and says so in `notes`.
"""

from __future__ import annotations

from pipeline.tasks.spec import Intensity, Optimisation, Published, Sampling, SplitRule, TaskSpec

__all__ = ["BUILTIN_TASKS"]

CT_WINDOW = Intensity(kind="window", low=-1000.0, high=1000.0)
SEG_METRICS = ("keras_mean_iou", "dice", "iou", "hausdorff95")

NCC = TaskSpec(
    name="ncc", title="lung nodule false-positive reduction", kind="classification", dataset="luna16",
    modality="CT", data_layout="LUNA16: subsetK/<seriesuid>.mhd + candidates.csv (or candidates_V2.csv)",
    intensity=CT_WINDOW, cube_size=(32, 64, 64),
    sampling=Sampling(kind="candidates", table="candidates", negatives_per_positive=10.0),
    split=SplitRule(kind="luna16_subsets"),
    head="encoder-gap-dense", loss="bce",
    optimisation=Optimisation(lr=1e-3, patience=10, batch_size=24),
    metrics=("auc",), evaluation="cubes",
    published=Published(metric="AUC", scratch=(94.25, 5.07), medicalnet=(95.80, 0.51), genesis=(98.07, 0.59)),
    notes="LUNA16 has ~550k negatives for ~1.5k positives; negatives are subsampled to 10 per positive "
          "per split by default (seeded, recorded; `--negative-ratio all` keeps every candidate).",
)

NCS = TaskSpec(
    name="ncs", title="lung nodule segmentation", kind="segmentation", dataset="lidc", modality="CT",
    data_layout="LIDC-IDRI/<patient>/<study>/<series>/*.dcm + the LIDC XML per series (consensus at 50%)",
    intensity=CT_WINDOW, cube_size=(32, 64, 64),
    sampling=Sampling(kind="objects", label="nodules", per_object=2, jitter=(4, 8, 8), negatives_per_scan=0),
    split=SplitRule(kind="patient_seeded", fractions=(0.5, 0.4, 0.1)),
    optimisation=Optimisation(lr=1e-3, patience=50, batch_size=16),
    metrics=SEG_METRICS, evaluation="cubes",
    published=Published(metric="Keras mean_iou", scratch=(74.05, 1.97), medicalnet=(75.68, 0.32),
                        genesis=(77.41, 0.40)),
    notes="Split fractions follow the reference's cube counts (4,082 / 3,126 / 852), drawn by patient.",
)

ECC = TaskSpec(
    name="ecc", title="pulmonary embolism false-positive reduction", kind="classification", dataset="pe",
    modality="CT", data_layout="PE-CAD as storage_schemas/PE_CAD_LAYOUT.md: <case>.mhd, pe_candidates.csv, pe_folds.csv",
    intensity=CT_WINDOW, cube_size=(64, 64, 64),
    sampling=Sampling(kind="candidates", table="pe_candidates", negatives_per_positive=None),
    split=SplitRule(kind="folds", n_folds=3, test_fold=1),
    head="encoder-gap-dense", loss="bce",
    optimisation=Optimisation(lr=1e-3, patience=38, batch_size=24),
    metrics=("auc",), evaluation="cubes",
    published=Published(metric="AUC", scratch=(80.36, 3.58), medicalnet=(86.43, 1.44), genesis=(87.20, 2.87)),
    notes="The paper's cubes are vessel-oriented; the candidates' vessel direction is kept in the index, "
          "cubes are axis-aligned (reorientation is not applied).",
)

LCS = TaskSpec(
    name="lcs", title="liver segmentation", kind="segmentation", dataset="lits", modality="CT",
    data_layout="LiTS 2017: volume-K.nii + segmentation-K.nii (1 liver, 2 tumour; target liver incl. tumour)",
    intensity=CT_WINDOW, cube_size=(32, 64, 64),
    sampling=Sampling(kind="pos_neg", label="segmentation", per_scan=16, pos=1.0, neg=1.0, whole_volume_test=True),
    split=SplitRule(kind="index_ranges", ranges=((0, 99), (100, 114), (115, 129))),
    optimisation=Optimisation(lr=1e-2, patience=20, batch_size=16),
    metrics=SEG_METRICS, evaluation="whole_volume",
    published=Published(metric="Keras mean_iou", scratch=(79.76, 5.42), medicalnet=(85.52, 0.58),
                        genesis=(85.10, 2.15)),
)

BMS = TaskSpec(
    name="bms", title="brain tumour segmentation", kind="segmentation", dataset="brats", modality="MR",
    data_layout="BraTS 2018: HGG|LGG/Brats18_*/Brats18_*_{flair,t1,t1ce,t2,seg}.nii.gz (target: labels > 0)",
    intensity=Intensity(kind="percentile", low=0.5, high=99.5), cube_size=(32, 64, 64),
    sampling=Sampling(kind="pos_neg", label="seg", per_scan=16, pos=1.0, neg=1.0, crop_size=(50, 100, 100),
                      whole_volume_test=True),
    split=SplitRule(kind="patient_seeded", fractions=(0.586, 0.081, 0.333)),
    channels=("flair",),
    optimisation=Optimisation(lr=1e-3, patience=30, batch_size=16),
    metrics=SEG_METRICS, evaluation="whole_volume",
    published=Published(metric="Keras mean_iou", scratch=(59.87, 4.04), medicalnet=(66.09, 1.35),
                        genesis=(67.96, 1.29)),
    notes="The reference's code does not state which sequence it used; FLAIR alone by default (whole tumour "
          "is most visible there), any of flair,t1,t1ce,t2 as channels. Split fractions follow 167/23/95 of 285.",
)

BUILTIN_TASKS = (NCC, NCS, ECC, LCS, BMS)
