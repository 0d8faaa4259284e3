"""The bottom floor: what every stage may use and what uses no stage.

- `errors`: UsageError, the deterministic errors and the one-line failure reason (exit codes: `pipeline.console`,
  the CLI's, shared with reproduce and the demo).
- `paths`: folders and files that will be written, checked before the work starts.
- `net`: host:port parsing, the TCP probe and the argparse types every command line shares.
- `tracking`: the `Tracker`, built once from a URI; the only module (besides the logged-model format) that talks
  to MLflow.
- `driver`: the one Ray Train driver (checks, run, ensure Ray, fit, record the outcome).
- `build`: the one publish-once store build (content key, lock, reuse, resume, publish).
- `hooks`: test-only hooks, inert unless GENESIS_TEST_HOOKS=1.

Nothing here imports from another floor of `pipeline` except `pipeline.models`/`pipeline.model_io.model_format` (the safe
format a Tracker logs models in), so any stage can import it without a cycle.
"""
