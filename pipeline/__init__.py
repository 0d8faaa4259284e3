"""Genesis Pipeline.

`from pipeline import load_model` loads any model of the pipeline by URI (`pipeline.model_io.load`); it is imported on
first use, so `import pipeline` stays cheap (no torch, no MLflow).
"""

__all__ = ["load_model"]


def __getattr__(name: str):
    if name == "load_model":
        from pipeline.model_io.load import load_model

        return load_model
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
