"""Patch stores: Models Genesis pretraining cubes and the target tasks' cubes, from a volume store.

Import from the defining module (nothing is re-exported here, so reading a store never pays for the extraction
code): `pipeline.patches.store` (PatchStore, reading), `pipeline.patches.config` (PretrainPatchConfig),
`pipeline.patches.extract` (extract_pretrain), `pipeline.patches.task_extract` (extract_task),
`pipeline.patches.outcome` (ExtractionResult). The build protocol itself is `pipeline.runtime.build`.
"""
