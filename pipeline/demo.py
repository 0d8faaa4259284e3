"""`make demo`: the whole pipeline end to end on embedded defaults and small sample data.

The demo is `genesis reproduce --preset tiny` (`pipeline.reproduce`) on sample data with the demo's settings (one
seed, label fractions 0.5 and 1.0, ECC on each of its three folds), plus previews of what the data steps made.
On 2 CPU cores: 28 fine-tunings (NCC, NCS, LCS, BMS: 2 inits x 2 fractions; ECC: 2 inits x 2 fractions x 3
folds), about 7 minutes in all. One seed keeps it short: the rows of the tasks without folds have one run each
(their p-value column says n<2); ECC's rows pool three folds, so they get a t-test. Each step is the same call the
`genesis` command makes (printed as that command), so the demo is also a walk-through of the command line; at the
end it prints the transfer table and where to look at the results.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.console import tolerant_streams
from pipeline.reproduce import SAMPLE_SCANS, ReproduceConfig, StepFailed, Stores, Walkthrough, reproduce
from pipeline.runtime.paths import output_file, shared_path

__all__ = ["run_demo", "demo_config"]


def demo_config(out: Path, scans: int = 4, seed: int = 0) -> ReproduceConfig:
    """Reproduce's tiny preset on sample data, sized for a laptop: one seed, two label fractions, every ECC fold
    (`test_fold=None`)."""
    return ReproduceConfig(out=Path(out), preset="tiny", seeds=(0,), label_fractions=(0.5, 1.0), test_fold=None,
                           sample_seed=seed, sample_scans={**SAMPLE_SCANS, "luna16": scans})


def _show(store: Path) -> None:
    """`genesis stores show STORE`."""
    from pipeline.stores_cli import show_store

    print(show_store(str(store)))


def _scan_preview(store: Path, scan_id: str, png: Path) -> None:
    """`genesis stores preview STORE SCAN_ID --out PNG`."""
    from pipeline.volume_store.preview import render_preview

    print(render_preview(str(store), scan_id, output_file(str(png), "--out")))


def _patch_preview(store: Path, png: Path) -> None:
    """`genesis patches preview STORE --out PNG`."""
    from pipeline.patches.preview import render_patch_preview

    print(render_patch_preview(shared_path(str(store), "PATCHSTORE"), output_file(str(png), "--out")))


def _tasks_table() -> None:
    """`genesis tasks list`."""
    from pipeline.tasks.registry import tasks_table

    print(tasks_table())


def _list(root: Path) -> None:
    """`genesis stores list ROOT`."""
    from pipeline.stores_cli import list_stores

    print(list_stores(str(root)))


def _previews(steps: Walkthrough, out: Path) -> tuple[list[Path], Callable]:
    """The stores' catalogs and pictures, drawn once the stores exist: each the stage of the `genesis` command
    printed for it."""
    pngs: list[Path] = []

    def draw(stores: Stores) -> None:
        from pipeline.volume_store.store import VolumeStore

        steps.run("the LUNA16 volume store's catalog", ["stores", "show", str(stores.volumes)],
                  lambda: _show(stores.volumes))
        scan_ids = VolumeStore(stores.volumes).scan_ids()
        real = [s for s in scan_ids if s.startswith("2.25.")]  # the real lung CT cases, when fetched
        for scan_id in scan_ids[:1] + real[:1]:
            png = out / "previews" / f"{scan_id}.png"
            steps.run(f"preview of scan {scan_id}", ["stores", "preview", str(stores.volumes), scan_id, "--out",
                                                      str(png)], lambda: _scan_preview(stores.volumes, scan_id, png))
            pngs.append(png)
        steps.run("the pretraining patch store", ["stores", "show", str(stores.pretrain)],
                  lambda: _show(stores.pretrain))
        png = out / "previews" / "patches.png"
        steps.run("sample cubes and the corruptions", ["patches", "preview", str(stores.pretrain), "--out", str(png)],
                  lambda: _patch_preview(stores.pretrain, png))
        pngs.append(png)
        steps.run("the target tasks", ["tasks", "list"], _tasks_table)
        for task, path in stores.tasks.items():
            png = out / "previews" / f"task-{task}.png"
            steps.run(f"preview of the {task.upper()} task store", ["patches", "preview", str(path), "--out", str(png)],
                      lambda: _patch_preview(path, png))
            pngs.append(png)
        steps.run("every store", ["stores", "list", str(out)], lambda: _list(out))

    return pngs, draw


def run_demo(out: Path, scans: int = 4, seed: int = 0) -> int:
    config = demo_config(out, scans, seed)
    print(f"genesis demo: one seed ({', '.join(map(str, config.seeds))}), label fractions "
          f"{', '.join(f'{f:g}' for f in config.label_fractions)}, "
          + ("ECC on every fold of its store (3 for PE-CAD; the table pools them)" if config.test_fold is None else
             f"ECC on ONE fold only (test fold {config.test_fold})"), flush=True)
    steps = Walkthrough()
    pngs, draw = _previews(steps, Path(out))
    try:
        result = reproduce(config, steps=steps, after_stores=draw)
    except (StepFailed, ValueError) as err:  # a failed fine-tuning is not one: it is a row of the table
        raise SystemExit(f"demo failed: {err}") from err
    s = result.stores
    print(f"\n=== demo finished in {result.seconds:.0f} s. The transfer table:\n")
    print(result.report())
    print("\nResults:")
    for name, root in s.datasets.items():
        print(f"  sample data {name:<8} {root}")
    print(f"  volume stores:        {s.volumes}, {s.task_volumes}   (genesis stores show STORE)")
    print(f"  pretraining cubes:    {s.pretrain}")
    for task, path in s.tasks.items():
        print(f"  task store {task.upper()}:       {path}")
    for png in pngs:
        print(f"  preview:              {png}")
    print(f"  checkpoints (Ray):    {Path(out) / 'ray_results'}")
    print(f"  transfer results:     {result.transfer.results_dir}")
    print(f"  models: {result.pretrained} (pretrained here), genesis-<task>@champion (best fine-tuned per task); "
          f"load one with `from pipeline import load_model; load_model(URI, tracking_uri={config.uri!r})`")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_output", type=Path)
    ap.add_argument("--scans", type=int, default=4, help="sample LUNA16 scans")
    ap.add_argument("--seed", type=int, default=0, help="sample data seed")
    args = ap.parse_args(argv)
    tolerant_streams()
    return run_demo(args.out, args.scans, args.seed)


if __name__ == "__main__":
    sys.exit(main())
