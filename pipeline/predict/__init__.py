"""`genesis predict`: a fine-tuned model applied to new scans, with the task file and preprocessing it carries.

model_card.py (what a logged model says about how it is applied: `load_model_card`), inputs.py (files, folders,
DICOM series, volume-store scans -> cases of channels), apply.py (the array core: one case's channels in LPS ->
probabilities, candidate cubes -> scores), run.py (the I/O layer: read, predict, write label maps and
predictions.json). The command's parser is `pipeline/predict_cli.py`.

Nothing is imported here: import from the submodule that defines a name.
"""
