"""Model I/O in one room: everything that turns a model into files and files back into a model.

- `official`: the published Genesis checkpoint layout (`Genesis_Chest_CT.pt`) and its (x, y, z) kernel axes.
- `state_dicts`: prefix stripping, the strict key/shape comparison, reading a bare state-dict file.
- `model_format`: the safe logged form (architecture JSON + safetensors) that MLflow models are written in.
- `load`: `load_model(uri)`, any model of the project by URI, and `load_model_state`.
- `weights`: `genesis weights import`, an external checkpoint into the model registry.

Nothing is imported here: import from the module that defines a name (`from pipeline.model_io.load import
load_model`), so a package import never drags in the whole room.
"""
