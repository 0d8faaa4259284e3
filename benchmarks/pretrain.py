"""Pretraining throughput, and whether the data path keeps up with the model.

Prints:
  cubes/s of `tiny` pretraining on CPU with 1 and 2 Ray workers (last epoch of a short run);
  in one process, per batch: loader + corruption time against the model step (forward, backward,
  optimizer) for `tiny` on CPU and, when a GPU is present, for the full U-Net at 64x64x32 (z,y,x
  32,64,64) with bf16 autocast and corruption on the GPU (target: data < 10% of step time).

    .venv/bin/python benchmarks/pretrain.py [--patches PATCHSTORE] [--scans 6] [--steps 10]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch


def step_vs_data(patches: str, base_channels: int, batch: int, device: str, steps: int, bf16: bool) -> dict:
    from torch.utils.data import DataLoader

    from pipeline.data import CubeStreamConfig, PatchCubes, genesis_pairs
    from pipeline.training.config import PretrainConfig
    from pipeline.training.steps import build_model, build_optimizer

    dev = torch.device(device)
    cfg = PretrainConfig(base_channels=base_channels, batch_size=batch, optimizer="adam", lr=1e-3, bf16=bf16)
    model = build_model(cfg).to(dev)
    opt = build_optimizer(model, cfg)
    ds = PatchCubes(patches, CubeStreamConfig(split="all", buffer_size=64), rank=0, world_size=1)
    gen = torch.Generator(device=dev).manual_seed(0)

    def batches():
        while True:
            yield from DataLoader(ds, batch_size=batch, drop_last=True)

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patches")
    ap.add_argument("--scans", type=int, default=6)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="genesis-bench-pretrain-"))
    try:
        patches = args.patches
        if not patches:
            from pipeline.patches import extract_pretrain
            from pipeline.sample_data import make_sample_data
            from pipeline.volume_store import convert

            make_sample_data(work / "data", n_scans=args.scans, seed=0, include_real=False)
            convert([str(work / "data")], str(work / "vs"), workers=2, progress=False)
            patches = str(extract_pretrain(str(work / "vs"), out_root=str(work / "ps"), progress=False).path)
        from pipeline.training.config import tiny
        from pipeline.training.pretrain import pretrain

        for workers in (1, 2):
            cfg = tiny().with_overrides(epochs=2, steps_per_epoch=args.steps, val_pairs=4)
            res = pretrain(patches, cfg, workers=workers, tracking_uri=f"sqlite:///{work}/mlflow.db",
                           storage_path=str(work / "ray"), system_metrics=False, register_as="bench")
            m = res.metrics
            print(f"tiny pretraining, {workers} Ray worker(s), CPU: {m['cubes_per_s']:7.1f} cubes/s "
                  f"(epoch {m['epoch_seconds']:.1f} s, data {100 * m['data_seconds'] / m['epoch_seconds']:.0f}% of it)")
        t = tiny()
        r = step_vs_data(patches, t.base_channels, t.batch_size, "cpu", args.steps, bf16=False)
        print(f"tiny, 1 process, CPU, batch {t.batch_size}: data {r['data_ms']:.1f} ms vs step {r['step_ms']:.1f} ms "
              f"per batch = {100 * r['data_ms'] / r['step_ms']:.1f}%")
        if torch.cuda.is_available():
            r = step_vs_data(patches, 32, 6, "cuda", args.steps, bf16=True)
            ok = r["data_ms"] < 0.1 * r["step_ms"]
            print(f"full U-Net (19.1M), {torch.cuda.get_device_name()}, bf16, batch 6, cubes 32x64x64: "
                  f"{r['cubes_per_s']:.0f} cubes/s; data {r['data_ms']:.1f} ms vs step {r['step_ms']:.1f} ms = "
                  f"{100 * r['data_ms'] / r['step_ms']:.1f}% (target < 10%) {'PASS' if ok else 'MISS'}")
        else:
            print("GPU: not available on this machine (full-model bf16 figure and the <10% data target need one)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
