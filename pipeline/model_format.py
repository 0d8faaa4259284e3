"""The pyfunc loader module that logged models name (`loader_module: pipeline.model_format` in their MLmodel).

Why it exists: every model logged so far names this module, and MLflow imports it by that name to load one, so
it stays, as a shim over the safe format's one home, `pipeline.model_io.model_format`. Import from there.
"""

from pipeline.model_io.model_format import *  # noqa: F401,F403
from pipeline.model_io.model_format import _load_pyfunc  # noqa: F401 - MLflow's entry point (loader_module)
