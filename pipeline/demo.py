"""`make demo`: the whole pipeline end to end on embedded defaults and small sample data.

Each step is the same call the `genesis` command makes, so the demo is also a walk-through
of the command line; it prints each command and, at the end, where to look at the results.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from pipeline.cli import main as genesis

__all__ = ["run_demo"]


def _step(title: str, argv: list[str], allowed=(0,)) -> None:
    print(f"\n=== {title}\n$ genesis {shlex.join(argv)}", flush=True)
    t0 = time.perf_counter()
    code = genesis(argv)
    print(f"--- {title}: exit {code} in {time.perf_counter() - t0:.1f} s", flush=True)
    if code not in allowed:
        raise SystemExit(f"demo step failed: genesis {shlex.join(argv)} exited {code}")


TASK_DATASETS = ("lidc", "pe", "lits", "brats")


def _task_steps(out: Path, luna_store: Path, patch_root: Path, seed: int) -> dict[str, tuple[Path, Path]]:
    """Sample data of the other four task datasets (small), one volume store for them, five task stores."""
    samples = out / "sample_tasks"
    scans = {"lidc": 3, "pe": 6, "lits": 6, "brats": 4}  # enough patients for three splits each
    for name in TASK_DATASETS:
        _step(f"8. sample {name} data in its real layout (small)",
              ["sample-data", str(samples / name), "--dataset", name, "--small", "--seed", str(seed),
               "--scans", str(scans[name])])
    task_store = out / "task_volume_store"
    present = [str(samples / n) for n in TASK_DATASETS if (samples / n).exists()]
    _step("9. convert the task datasets (Dask, 2 workers)", ["convert", *present, "--store", str(task_store),
                                                              "--workers", "2"])
    _step("10. the target tasks", ["tasks", "list"])
    from pipeline.tasks import all_tasks
    from pipeline.volume_store import VolumeStore

    datasets = set(VolumeStore(task_store).catalog().query("status == 'ok'")["dataset"])
    built = {}
    for spec in all_tasks():
        source = luna_store if spec.dataset == "luna16" else task_store
        if spec.dataset != "luna16" and spec.dataset not in datasets:
            print(f"\n=== 11. task {spec.name}: skipped, no {spec.dataset} scans (its sample data was skipped above)")
            continue
        argv = ["patches", "task", spec.name, "--store", str(source), "--out", str(patch_root), "--workers", "2"]
        _step(f"11. the {spec.name.upper()} task patch store", argv, allowed=(0, 1))
        from pipeline.patches.task_extract import extract_task

        path = extract_task(str(source), spec, seed=0, out_root=str(patch_root), progress=False).path
        png = out / "previews" / f"task-{spec.name}.png"
        _step(f"12. preview of the {spec.name.upper()} store", ["patches", "preview", str(path), "--out", str(png)])
        built[spec.name] = (path, png)
    return built


def run_demo(out: Path, scans: int = 4, seed: int = 0) -> None:
    out.mkdir(parents=True, exist_ok=True)
    sample, store = out / "sample_luna16", out / "volume_store"
    t0 = time.perf_counter()
    _step("1. sample chest CT in the LUNA16 layout", ["sample-data", str(sample), "--scans", str(scans),
                                                       "--seed", str(seed)])
    _step("2. convert to the OME-Zarr volume store (Dask, 2 workers)",
          ["convert", str(sample), "--store", str(store), "--workers", "2"])
    _step("3. the catalog", ["stores", "show", str(store)])
    from pipeline.volume_store import VolumeStore

    scan_ids = VolumeStore(store).scan_ids()
    previews = []
    real = [s for s in scan_ids if s.startswith("2.25.")]  # the real lung CT cases, when fetched
    for scan_id in (scan_ids[:1] + real[:1]):
        png = out / "previews" / f"{scan_id}.png"
        _step(f"4. preview of {scan_id}", ["stores", "preview", str(store), scan_id, "--out", str(png)])
        previews.append(png)
    patch_root = out / "patch_stores"
    _step("5. Models Genesis pretraining cubes into a patch store (Dask, 2 workers)",
          ["patches", "pretrain", "--store", str(store), "--out", str(patch_root), "--workers", "2"])
    from pipeline.patches import PatchStore, PretrainPatchConfig, extract_pretrain

    patches = extract_pretrain(str(store), PretrainPatchConfig(), out_root=str(patch_root), progress=False).path
    _step("6. the patch store", ["stores", "show", str(patches)])
    patch_png = out / "previews" / "patches.png"
    _step("7. sample cubes and the corruptions", ["patches", "preview", str(patches), "--out", str(patch_png)])
    task_stores = _task_steps(out, store, patch_root, seed)
    _step("13. every store", ["stores", "list", str(out)])
    db = (out / "mlflow.db").resolve()
    _step("14. tiny Models Genesis pretraining: Ray Train, 2 workers, recorded in MLflow",
          ["pretrain", "--patches", str(patches), "--preset", "tiny", "--workers", "2",
           "--tracking-uri", f"sqlite:///{db}", "--storage-path", str(out / "ray_results")])
    print(f"\n=== demo finished in {time.perf_counter() - t0:.0f} s. Results:")
    print(f"  sample data (LUNA16 layout): {sample}")
    print(f"  volume store:                {store}   (genesis stores show {store})")
    for png in previews:
        print(f"  preview:                     {png}")
    print(f"  patch store:                 {patches}   ({len(PatchStore(patches))} cubes)")
    print(f"  cubes and corruptions:       {patch_png}")
    for name, (path, png) in task_stores.items():
        print(f"  task store {name.upper()}:              {path}   (preview {png})")
    print(f"  checkpoints (Ray Train):     {out / 'ray_results'}")
    print(f"  MLflow runs and models:      .venv/bin/mlflow ui --backend-store-uri sqlite:///{db} --port 5000"
          f"  then open http://127.0.0.1:5000 (model: models:/genesis-pretrained/latest)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="demo_output", type=Path)
    ap.add_argument("--scans", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    run_demo(args.out, args.scans, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
