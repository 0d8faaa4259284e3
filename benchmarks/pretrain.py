"""Pretraining data path and throughput: loader memory, batch diversity, cubes/s.

Prints, on a demo-like store (phantom scans in the LUNA16 layout, subsets 0-4 train):
  the training loader in a fresh process on one core, global batch 6, one worker, 3 epochs of the
  train split, no corruption: cubes/s, peak RSS (and on a store 10x larger: flat is the target,
  < 500 MB on the demo store), distinct scans per batch (target >= 5.5 of 6), measured on the
  cubes actually served (each cube looked up by its bytes);
  cubes/s and the data share of step time of `tiny` pretraining on CPU with 1 and 2 Ray workers;
  in one process, per batch: loader + corruption time against the model step for `tiny` on CPU and,
  when a GPU is present, for the full U-Net at 64x64x32 (z,y,x 32,64,64) (target: data < 10%).

`--quick` runs every step on the smallest data (7 tiny phantoms, 16x16x16 cubes, 2 steps; Ray pretraining
1 epoch of 2 steps) in about a minute: a check that the benchmark still runs, not a measurement (its targets
are not judged).

    .venv/bin/python benchmarks/pretrain.py [--patches PATCHSTORE] [--scans 12] [--steps 10] [--quick] [--work DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

BATCH = 6


def loader(patches: str, batch: int, rank: int = 0, world: int = 1):
    """The worker's training loader (`batch` is the global batch)."""
    from pipeline.data import CubeStreamConfig, PatchCubes
    from pipeline.training.config import paper

    return PatchCubes(patches, CubeStreamConfig(split="train", seed=0, batch_size=batch,
                                                buffer_size=paper().read_block), rank=rank, world_size=world)


def loader_batches(patches: str, batch: int, epoch: int, rank: int = 0, world: int = 1):
    """The worker's training batches (B, 1, D, H, W) of one epoch, before corruption."""
    ds = loader(patches, batch, rank, world)
    ds.set_epoch(epoch)
    yield from ds.batches()


def peak_rss() -> int:
    """This process's peak RSS in bytes. Not getrusage's ru_maxrss: Linux keeps that across exec, so a child
    started by a big parent reports the parent's size (this benchmark's first version measured ~980 MB for
    any loader that way); VmHWM belongs to the process's own memory map."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_loader(patches: str, epochs: int = 3) -> dict:
    """Run in a fresh process: peak RSS counts only what the loader needs."""
    import numcodecs
    import zarr

    torch.set_num_threads(1)
    zarr.config.set({"threading.max_workers": 1})
    numcodecs.blosc.set_nthreads(1)
    n = 0
    served = []
    t0 = time.perf_counter()
    for epoch in range(epochs):
        for b in loader_batches(patches, BATCH, epoch):
            n += b.shape[0]
            served.append([_digest(c.numpy()) for c in b])
    seconds = time.perf_counter() - t0
    return {"cubes": n, "seconds": seconds, "peak_rss": peak_rss(),
            "served": served,
            "loader_scans": [loader(patches, BATCH).scans_per_batch(e).tolist() for e in range(epochs)]}


def _digest(cube) -> str:
    """A cube's identity across processes (Python's hash() of bytes is salted per process)."""
    return hashlib.blake2b(np.ascontiguousarray(cube, dtype=np.float32).tobytes(), digest_size=8).hexdigest()


def served_scans_per_batch(patches: str, served: list[list[int]]) -> np.ndarray:
    """Distinct scans in each served batch, each cube identified by its bytes."""
    from pipeline.patches.store import PatchStore

    store = PatchStore(patches)
    idx = store.index
    rows = store.rows("train")
    scan_of = dict(zip(idx["row"], idx["scan_id"]))
    reader = getattr(store, "read_cubes", store.read)
    lookup = {}
    for i in range(0, len(rows), 64):
        part = rows[i:i + 64]
        for r, c in zip(part, reader(part)):
            lookup[_digest(c)] = scan_of[r]
    return np.array([len({lookup[h] for h in b}) for b in served])


def step_vs_data(patches: str, base_channels: int, batch: int, device: str, steps: int, bf16: bool) -> dict:
    from pipeline.data import genesis_pairs
    from pipeline.training.config import PretrainConfig
    from pipeline.training.steps import build_model, build_optimizer

    dev = torch.device(device)
    cfg = PretrainConfig(base_channels=base_channels, batch_size=batch, optimizer="adam", lr=1e-3, bf16=bf16)
    model = build_model(cfg).to(dev)
    opt = build_optimizer(model, cfg)
    gen = torch.Generator(device=dev).manual_seed(0)

    def batches():
        epoch = 0
        while True:
            yield from loader_batches(patches, batch, epoch)
            epoch += 1

    pairs = genesis_pairs(batches(), dev, gen)
    data_s = step_s = 0.0
    for i in range(steps + 2):
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        x, y = next(pairs)
        sync()
        t1 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16 and dev.type == "cuda"):
            out = model(x)
        loss = torch.nn.functional.mse_loss(out.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync()
        t2 = time.perf_counter()
        if i >= 2:  # warm-up
            data_s += t1 - t0
            step_s += t2 - t1
    return {"data_ms": 1000 * data_s / steps, "step_ms": 1000 * step_s / steps,
            "cubes_per_s": steps * batch / (data_s + step_s)}


def _loader_in_subprocess(patches: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure-loader", patches], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


QUICK_SCANS = 7  # spread over subset0-9: 4 train, 1 validation, 2 test scans (pretraining validates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patches", help="an existing pretraining patch store (default: build one from phantoms)")
    ap.add_argument("--scans", type=int, default=None, help=f"phantom scans (default 12; --quick {QUICK_SCANS})")
    ap.add_argument("--steps", type=int, default=None, help="steps timed per measurement (default 10; --quick 2)")
    ap.add_argument("--quick", action="store_true", help="every step on the smallest data: a smoke run, not figures")
    ap.add_argument("--work", type=Path, help="work in DIR and keep it (default: a temporary folder, removed)")
    ap.add_argument("--measure-loader", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure_loader:
        print(json.dumps(measure_loader(args.measure_loader)))
        return
    quick = args.quick
    scans = args.scans or (QUICK_SCANS if quick else 12)
    steps = args.steps or (2 if quick else 10)
    if scans < 1 or steps < 1:
        ap.error(f"--scans and --steps must be >= 1, got {scans} and {steps}")
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_common import verdict, work_folder
    from patches import grow_store, quick_cubes, quick_phantom

    with work_folder(args.work, "genesis-bench-pretrain-") as work:
        patches = args.patches
        if not patches:
            from pipeline.patches.config import PretrainPatchConfig
            from pipeline.patches.extract import extract_pretrain
            from pipeline.sample_data import make_sample_data
            from pipeline.volume_store.convert import convert

            make_sample_data(work / "data", n_scans=scans, seed=0, include_real=False,
                             config=quick_phantom() if quick else None)
            convert([str(work / "data")], str(work / "vs"), workers=2, progress=False)
            patches = str(extract_pretrain(str(work / "vs"), quick_cubes() if quick else PretrainPatchConfig(),
                                           out_root=str(work / "ps"), progress=False).path)
        from pipeline.patches.store import PatchStore

        store = PatchStore(patches)
        train = store.index[store.index["split"] == "train"]
        print(f"store: {len(store)} cubes, train split {len(train)} cubes from {train['scan_id'].nunique()} scans "
              f"({'x'.join(map(str, store.cubes.shape[2:]))})")

        small = _loader_in_subprocess(patches)
        shutil.rmtree(work / "big", ignore_errors=True)
        grow_store(Path(patches), work / "big", 10)
        big = _loader_in_subprocess(str(work / "big"))
        scans = served_scans_per_batch(patches, small["served"])
        ratio = big["peak_rss"] / small["peak_rss"]
        print(f"loader, 1 core, global batch {BATCH}, 1 worker, {small['cubes']} cubes (3 epochs of the train split): "
              f"{small['cubes'] / small['seconds']:.0f} cubes/s")
        print(f"loader peak RSS: {small['peak_rss'] / 1e6:.0f} MB (target < 500) "
              f"{verdict(small['peak_rss'] < 500e6, quick)}; store 10x larger: {big['peak_rss'] / 1e6:.0f} MB, "
              f"ratio {ratio:.2f} (target: flat) {verdict(ratio < 1.2, quick)}")
        print(f"distinct scans per batch of {BATCH} (served cubes): mean {scans.mean():.2f} (target >= 5.5) "
              f"{verdict(scans.mean() >= 5.5, quick)}; batches with <= 3 scans: "
              f"{100 * np.mean(scans <= 3):.0f}%; histogram {np.bincount(scans, minlength=BATCH + 1)[1:].tolist()}; "
              f"the loader's own count (PatchCubes.scans_per_batch): "
              f"{np.mean(np.concatenate(small['loader_scans'])):.2f}")

        import logging

        import mlflow  # noqa: F401 - mlflow sets its loggers' level on import: quieten them after it

        from pipeline.cluster import ensure_ray
        from pipeline.training.config import tiny
        from pipeline.training.pretrain import pretrain

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # "Creating initial MLflow database tables..."
        ensure_ray(log_to_driver=False)  # the figures, not the Ray workers' logs
        for workers in (1, 2):
            cfg = tiny().with_overrides(epochs=1 if quick else 2, steps_per_epoch=steps, val_cubes=4)
            res = pretrain(patches, cfg, workers=workers, tracking_uri=f"sqlite:///{work}/mlflow.db",
                           storage_path=str(work / "ray"), system_metrics=False, register_as="bench")
            m = res.metrics
            print(f"tiny pretraining, {workers} Ray worker(s), CPU: {m['cubes_per_s']:7.1f} cubes/s "
                  f"(epoch {m['epoch_seconds']:.1f} s, data {100 * m['data_share']:.0f}% of it; global batch "
                  f"{cfg.batch_size}, {cfg.batch_size // workers} per worker)")
        t = tiny()
        r = step_vs_data(patches, t.base_channels, t.batch_size, "cpu", steps, bf16=False)
        print(f"tiny, 1 process, CPU, batch {t.batch_size}: data {r['data_ms']:.1f} ms vs step {r['step_ms']:.1f} ms "
              f"per batch = {100 * r['data_ms'] / r['step_ms']:.1f}%")
        if torch.cuda.is_available():
            r = step_vs_data(patches, 32, 6, "cuda", steps, bf16=True)
            ok = r["data_ms"] < 0.1 * r["step_ms"]
            print(f"full U-Net (19.1M), {torch.cuda.get_device_name()}, bf16, batch 6, cubes "
                  f"{'x'.join(map(str, store.cubes.shape[2:]))}: "
                  f"{r['cubes_per_s']:.0f} cubes/s; data {r['data_ms']:.1f} ms vs step {r['step_ms']:.1f} ms = "
                  f"{100 * r['data_ms'] / r['step_ms']:.1f}% (target < 10%) {verdict(ok, quick)}")
        else:
            print("GPU: not available on this machine (full-model bf16 figure and the <10% data target need one)")


if __name__ == "__main__":
    main()
