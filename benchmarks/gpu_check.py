"""One prepared run on a lent GPU: do the project's CUDA code paths work, agree with the CPU, and how fast are they.

No GPU has run this project before, and a lent machine is held for minutes, so everything is checked in one
call, each section on its own (one failure cannot lose the rest), printing as it goes:

 1. environment: torch/CUDA/cuDNN versions, the device, its memory, the TF32 and cuDNN settings;
 2. pretraining steps of the full U-Net (the `paper` preset's model, 19.1M parameters) through
    `pipeline.training.steps` (build_model, build_optimizer, train_epoch), z,y,x 32x64x64 cubes: fp32 (`paper`)
    and bf16 autocast (`stable`) at the paper's global batch of 6, bf16 at 24 and 48; ms/step, cubes/s, peak
    memory, achieved TFLOP/s, and the same steps with the corruption in the loop (`genesis_pairs`) for the
    data share that MLflow records;
 3. the corruption on the GPU (`corrupt_batch`, tensor path) at batches 6 and 48: ms/batch and its share of the
    step time of 2 (target < 10%); the same BatchParams through the tensor path on CPU and on CUDA, and the
    numpy-drawn params through the compiled CPU kernels and the CUDA tensor path, compared voxel by voxel;
 4. numerical agreement: one set of weights, forward on CPU fp32 / float64 vs CUDA fp32 (TF32 as found and
    off) and CUDA bf16 vs fp32; two training steps' losses and the weights after them, CPU vs CUDA;
 5. fine-tuning steps of the five tasks with their TaskSpec recipe (`pipeline.finetune.config.paper`: cube,
    batch, head, loss, Adam at the task's lr) through `pipeline.finetune.steps.train_epoch`, fp32;
 6. the official-weights layout on CUDA: save_official_layout -> load_official_genesis gives the same outputs,
    the file holds the kernels in the official (x, y, z) order, and the file's own kernels on (x, y, z) cubes
    give our output transposed;
 7. pretraining rows again with cudnn.benchmark on (the project leaves it off), last: its autotuning takes time.

The GPU machine has torch, numpy, numba, scipy, pandas, but none of ray, mlflow, zarr, numcodecs, SimpleITK,
monai, dask, pydicom, ome-zarr: a blocker on `sys.meta_path` refuses those imports in every run, so a run on
this CPU proves the import chain the GPU machine will see (`--check-imports` does only that).

    PYTHONPATH=. python3 benchmarks/gpu_check.py --out $OUT          # full run on the GPU (< 4 min on an H100)
    .venv/bin/python benchmarks/gpu_check.py --device cpu --quick --out /tmp/gpu_check   # every section, tiny
    .venv/bin/python benchmarks/gpu_check.py --check-imports

Writes <out>/gpu_check.txt (the printed log, written as it goes) and <out>/gpu_check.json (every number).
Exit status: 0 every section ok or skipped, 1 a section or one of its measurements failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import gc
import importlib.abc
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

#: Top-level packages the GPU machine does not have.
FORBIDDEN = ("ray", "mlflow", "zarr", "numcodecs", "SimpleITK", "monai", "dask", "distributed", "pydicom",
             "ome_zarr")
SECTIONS = ("environment", "pretrain", "corruption", "agreement", "finetune", "official", "cudnn_benchmark")
#: The issue's target: the data path (corruption) under this share of the step time.
DATA_SHARE_TARGET = 0.10


class ForbiddenImports(importlib.abc.MetaPathFinder):
    """Refuses the packages the GPU machine lacks, so a CPU run fails where the GPU run would."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in FORBIDDEN:
            raise ImportError(f"gpu_check: {fullname!r} is not installed on the GPU machine (blocked here too)")
        return None


def install_blocker() -> None:
    if not any(isinstance(f, ForbiddenImports) for f in sys.meta_path):
        sys.meta_path.insert(0, ForbiddenImports())


def _models() -> dict:
    from pipeline.model_io.official import load_official_genesis, save_official_layout
    from pipeline.models import REFERENCE_PARAMETER_COUNT, UNet3D, count_trainable_parameters

    return dict(REFERENCE_PARAMETER_COUNT=REFERENCE_PARAMETER_COUNT, UNet3D=UNet3D,
                count_trainable_parameters=count_trainable_parameters, load_official_genesis=load_official_genesis,
                save_official_layout=save_official_layout)


def _pretraining() -> dict:
    from pipeline.training import steps as pretrain_steps
    from pipeline.training.config import paper, precision, stable

    return dict(pretrain_steps=pretrain_steps, paper=paper, precision=precision, stable=stable)


def _corruption() -> dict:
    # `pipeline.data` resolves its names lazily, so `genesis_batches` alone loads no zarr
    from pipeline.data.genesis_batches import genesis_pairs
    from pipeline.transforms import apply_batch, batched, corrupt_batch, sample_params

    return dict(genesis_pairs=genesis_pairs, apply_batch=apply_batch, batched=batched, corrupt_batch=corrupt_batch,
                sample_params=sample_params)


def _finetuning() -> dict:
    from pipeline.finetune import steps as finetune_steps
    from pipeline.finetune.config import paper as finetune_paper
    from pipeline.finetune.config import tiny as finetune_tiny
    from pipeline.finetune.init import build_model as finetune_model
    from pipeline.tasks import all_tasks

    return dict(finetune_steps=finetune_steps, finetune_paper=finetune_paper, finetune_tiny=finetune_tiny,
                finetune_model=finetune_model, all_tasks=all_tasks)


#: What the script uses from the project, in groups that fail alone (a machine without numba still runs the
#: model sections); every chain avoids the forbidden packages.
IMPORT_GROUPS = {"models": _models, "pretraining": _pretraining, "corruption (numba)": _corruption,
                 "fine-tuning (pandas)": _finetuning}


def import_pipeline() -> tuple[SimpleNamespace, dict[str, str]]:
    """The project's names the script uses, and the groups that could not be imported (group -> error)."""
    names, errors = {}, {}
    for group, load in IMPORT_GROUPS.items():
        try:
            names.update(load())
        except ImportError as err:
            errors[group] = f"{type(err).__name__}: {err}"
    return SimpleNamespace(**names), errors


def check_imports() -> tuple[dict[str, str], list[str]]:
    """Import what the script uses with the blocker in place: (groups that failed, forbidden modules loaded)."""
    install_blocker()
    _, errors = import_pipeline()
    return errors, sorted(m for m in sys.modules if m.partition(".")[0] in FORBIDDEN)


@dataclass(frozen=True, kw_only=True)
class Sizes:
    """Problem sizes and step counts: the paper's on a GPU, tiny ones for `--quick`."""

    cube: tuple[int, int, int] = (32, 64, 64)
    """Pretraining cube z,y,x (the paper's 64x64x32 x,y,z)."""
    base_channels: int = 32
    pretrain_rows: tuple[tuple[str, bool, int], ...] = (
        ("paper", False, 6), ("stable", False, 6), ("stable", True, 6), ("stable", True, 24), ("stable", True, 48))
    """(preset, bf16, global batch) of each pretraining measurement."""
    benchmark_rows: tuple[tuple[str, bool, int], ...] = (("paper", False, 6), ("stable", True, 6),
                                                         ("stable", True, 48))
    """Rows measured again with cudnn.benchmark on (CUDA only)."""
    corrupt_batches: tuple[int, ...] = (6, 48)
    warmup: int = 3
    steps: int = 10
    corrupt_reps: int = 10
    agree_batch: int = 2
    finetune_preset: str = "paper"
    finetune_steps: int = 6


QUICK = Sizes(cube=(16, 32, 32), base_channels=4, pretrain_rows=(("paper", False, 2), ("stable", True, 4)),
              benchmark_rows=(("stable", True, 2),), corrupt_batches=(2, 4), warmup=1, steps=2, corrupt_reps=2,
              agree_batch=2, finetune_preset="tiny", finetune_steps=1)


class Skipped(Exception):
    """A section that cannot run here (no CUDA)."""


class Report:
    """Prints as it goes, keeps the same lines in <out>/gpu_check.txt and every number in <out>/gpu_check.json."""

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.txt = open(out / "gpu_check.txt", "w", encoding="utf-8")
        self.json_path = out / "gpu_check.json"
        self.data: dict = {"script": "benchmarks/gpu_check.py", "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                           "sections": {}}

    def log(self, line: str = "") -> None:
        print(line, flush=True)
        self.txt.write(line + "\n")
        self.txt.flush()

    def save(self) -> None:
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_plain(self.data), indent=2), encoding="utf-8")
        os.replace(tmp, self.json_path)

    def close(self) -> None:
        self.save()
        self.txt.close()


def _plain(value):
    """JSON-safe copy: NaN/inf as None, tuples as lists, anything else unknown as its str."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return _plain(value.item())
    return str(value)


@contextmanager
def section(report: Report, key: str, title: str, device: torch.device):
    """Runs one section: its record in the JSON, its failure caught, logged and kept, memory freed after."""
    report.log(f"\n== {title}")
    record: dict = report.data["sections"].setdefault(key, {})
    tick = time.perf_counter()
    try:
        yield record
        record.setdefault("status", "ok")
    except Skipped as why:
        record["status"] = f"skipped: {why}"
        report.log(f"   skipped: {why}")
    except Exception as err:  # noqa: BLE001 - one section's failure must not lose the others
        record["status"] = "failed"
        record["error"] = f"{type(err).__name__}: {err}"
        record["traceback"] = traceback.format_exc()
        report.log(f"   FAILED: {record['error']}")
        for line in record["traceback"].rstrip().splitlines()[-12:]:
            report.log(f"   | {line}")
    finally:
        record["seconds"] = round(time.perf_counter() - tick, 2)
        report.log(f"   ({record['status']}, {record['seconds']:.1f} s)")
        report.save()
        free(device)


def attempt(report: Report, record: dict, what: str, fn):
    """One measurement inside a section: its failure (an OOM at batch 48, say) is recorded and the rest goes on."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001
        record.setdefault("errors", {})[what] = f"{type(err).__name__}: {err}"
        record["status"] = "partial"
        report.log(f"   {what}: FAILED {type(err).__name__}: {str(err).splitlines()[0][:300]}")
        return None


# ---------------------------------------------------------------- device helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    """torch.cuda.max_memory_allocated since the last reset, MiB; None on the CPU."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


@contextmanager
def cudnn_benchmark(on: bool):
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


@contextmanager
def tf32_off():
    """fp32 convolutions and matmuls in full fp32, restored after: torch's fp32_precision API where it has one
    (torch >= 2.9; mixing it with the legacy allow_tf32 flags can raise), else the legacy flags."""
    conv, mm = getattr(torch.backends.cudnn, "conv", None), torch.backends.cuda.matmul
    if hasattr(conv, "fp32_precision") and hasattr(mm, "fp32_precision"):
        before = (conv.fp32_precision, mm.fp32_precision)
        conv.fp32_precision = mm.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision, mm.fp32_precision = before
        return
    before = (torch.backends.cudnn.allow_tf32, mm.allow_tf32)
    torch.backends.cudnn.allow_tf32 = mm.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, mm.allow_tf32 = before


def tf32_settings() -> dict:
    """The TF32 switches as found (each read alone: a getter may refuse when the two APIs were mixed)."""
    getters = {"cudnn.conv.fp32_precision": lambda: torch.backends.cudnn.conv.fp32_precision,
               "cuda.matmul.fp32_precision": lambda: torch.backends.cuda.matmul.fp32_precision,
               "cudnn.allow_tf32": lambda: torch.backends.cudnn.allow_tf32,
               "cuda.matmul.allow_tf32": lambda: torch.backends.cuda.matmul.allow_tf32,
               "float32_matmul_precision": torch.get_float32_matmul_precision}
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, get in getters.items():
            try:
                out[name] = get()
            except Exception as err:  # noqa: BLE001 - absent in this torch, or refused
                out[name] = f"unreadable: {type(err).__name__}"
    return out


def volumes(n: int, shape, seed: int, channels: int = 1, device: torch.device | str = "cpu") -> torch.Tensor:
    """(n, channels, D, H, W) float32 in [0, 1]: smooth blobs plus fine noise, like windowed CT (never zeros,
    which can time faster than real data). Drawn on the CPU so every device gets the same values."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n, channels, *(max(2, s // 8) for s in shape)), generator=g)
    smooth = F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=False)
    noisy = smooth + 0.05 * torch.rand(smooth.shape, generator=g)
    return noisy.clamp_(0.0, 1.0).to(device)


def diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    """max |a - b| and ||a - b|| / ||b|| (b the reference), in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return {"max_abs": float((a - b).abs().max()), "rel": float((a - b).norm() / b.norm().clamp_min(1e-300)),
            "nan": bool(torch.isnan(a).any() or torch.isnan(b).any())}


def fmt(v, spec: str = ".1f") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


# ---------------------------------------------------------------- 1. environment


def run_environment(report: Report, record: dict, device: torch.device) -> None:
    try:
        import numba
    except ImportError:
        numba = SimpleNamespace(__version__=None)
    record.update(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                  cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                  numpy=np.__version__, numba=numba.__version__, cpu_count=os.cpu_count(),
                  torch_threads=torch.get_num_threads(), device=str(device),
                  cudnn_benchmark=torch.backends.cudnn.benchmark,
                  cudnn_deterministic=torch.backends.cudnn.deterministic, tf32=tf32_settings())
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        free_b, total_b = torch.cuda.mem_get_info(device)
        record.update(device_name=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                      memory_gib=round(p.total_memory / 2**30, 2), memory_free_gib=round(free_b / 2**30, 2),
                      bf16_supported=torch.cuda.is_bf16_supported())
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,"
                                  "power.draw,temperature.gpu,utilization.gpu", "--format=csv,noheader"],
                                 capture_output=True, text=True, encoding="utf-8", timeout=20)
            record["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.SubprocessError) as err:
            record["nvidia_smi"] = f"unavailable: {err}"
    for k in ("python", "torch", "cuda", "cudnn", "numpy", "numba", "cpu_count", "torch_threads", "device",
              "device_name", "capability", "sm_count", "memory_gib", "memory_free_gib", "bf16_supported",
              "cudnn_benchmark", "tf32", "nvidia_smi"):
        if k in record:
            report.log(f"   {k}: {record[k]}")


# ---------------------------------------------------------------- 2. pretraining


def pretrain_config(P, sizes: Sizes, preset: str, bf16: bool, batch: int, steps: int):
    base = {"paper": P.paper, "stable": P.stable}[preset]()
    return replace(base, base_channels=sizes.base_channels, batch_size=batch, bf16=bf16, steps_per_epoch=steps)


def flops_per_cube(P, sizes: Sizes, device: torch.device) -> float:
    """Forward + backward FLOPs of one pretraining cube (torch's FlopCounterMode on a batch of 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = P.pretrain_steps.build_model(pretrain_config(P, sizes, "paper", False, 2, 1)).to(device)
    x = volumes(2, sizes.cube, seed=99, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        F.mse_loss(model(x), x).backward()
    return counter.get_total_flops() / 2


def pretrain_row(P, sizes: Sizes, device: torch.device, preset: str, bf16: bool, batch: int,
                 flops: float | None) -> dict:
    """Timed pretraining steps of one (preset, precision, batch) through `train_epoch`, on pre-corrupted pairs
    already on the device, then the same number of steps with the corruption in the loop (`genesis_pairs`
    from CPU batches, as the worker does): its data share is `EpochStats.data_share`, what MLflow records."""
    config = pretrain_config(P, sizes, preset, bf16, batch, sizes.steps)
    torch.manual_seed(0)
    model = P.pretrain_steps.build_model(config).to(device)
    optimizer = P.pretrain_steps.build_optimizer(model, config)
    generator = torch.Generator(device=device).manual_seed(0)
    cpu_batches = [volumes(batch, sizes.cube, seed=10 + i) for i in range(2)]
    corrupt = getattr(P, "corrupt_batch", None)  # absent when the corruption could not be imported
    pairs = [corrupt(b.to(device), generator) if corrupt else (b.to(device), b.to(device)) for b in cpu_batches]
    reset_peak(device)
    P.pretrain_steps.train_epoch(model, itertools.cycle(pairs), optimizer, device,
                                 replace(config, steps_per_epoch=sizes.warmup))
    sync(device)
    tick = time.perf_counter()
    stats = P.pretrain_steps.train_epoch(model, itertools.cycle(pairs), optimizer, device, config)
    sync(device)
    seconds = time.perf_counter() - tick
    row = {"preset": preset, "precision": P.precision(config, device.type), "batch": batch,
           "cudnn_benchmark": torch.backends.cudnn.benchmark, "steps": stats.cubes // batch,
           "ms_per_step": 1e3 * seconds / sizes.steps, "cubes_per_s": stats.cubes / seconds,
           "peak_mib": peak_mib(device), "loss": stats.loss}
    if flops:
        row["tflops"] = flops * row["cubes_per_s"] / 1e12
    if corrupt is None:
        return row
    sync(device)
    tick = time.perf_counter()
    e2e = P.pretrain_steps.train_epoch(model, P.genesis_pairs(itertools.cycle(cpu_batches), device, generator),
                                       optimizer, device, config)
    sync(device)
    e2e_seconds = time.perf_counter() - tick
    row.update(e2e_ms_per_step=1e3 * e2e_seconds / sizes.steps, e2e_cubes_per_s=e2e.cubes / e2e_seconds,
               e2e_data_share=e2e.data_share, e2e_peak_mib=peak_mib(device))
    del model, optimizer, pairs
    return row


def run_pretrain(report: Report, record: dict, P, sizes: Sizes, device: torch.device) -> None:
    config = pretrain_config(P, sizes, "paper", False, 6, 1)
    params = P.count_trainable_parameters(P.pretrain_steps.build_model(config))
    record.update(cube_zyx=sizes.cube, base_channels=sizes.base_channels, parameters=params,
                  reference_parameters=P.REFERENCE_PARAMETER_COUNT, warmup_steps=sizes.warmup,
                  timed_steps=sizes.steps, rows=[])
    report.log(f"   U-Net width {sizes.base_channels}: {params:,} trainable parameters "
               f"(reference {P.REFERENCE_PARAMETER_COUNT:,}); cube z,y,x {sizes.cube}; "
               f"{sizes.warmup} warm-up + {sizes.steps} timed steps per row")
    flops = attempt(report, record, "flop count", lambda: flops_per_cube(P, sizes, device))
    record["gflop_per_cube_fwd_bwd"] = flops / 1e9 if flops else None
    report.log(f"   forward+backward: {fmt(record['gflop_per_cube_fwd_bwd'])} GFLOP per cube")
    if device.type != "cuda":
        report.log("   (bf16 rows run in fp32 on the CPU, as the pipeline does)")
    pretrain_rows(report, record, P, sizes, device, sizes.pretrain_rows, bench=False, flops=flops)


ROW_HEADER = (f"   {'preset':7} {'precision':13} {'batch':>5} {'cudnn.bm':>8} {'ms/step':>9} {'cubes/s':>8} "
              f"{'peak MiB':>9} {'TFLOP/s':>8} | {'e2e ms':>8} {'data %':>7} {'row s':>6}")


def pretrain_rows(report: Report, record: dict, P, sizes: Sizes, device: torch.device, rows, bench: bool,
                  flops: float | None) -> None:
    """Measures `rows` of (preset, bf16, batch) into record["rows"], printing each as it comes."""
    report.log(ROW_HEADER)
    record.setdefault("rows", [])
    for preset, bf16, batch in rows:
        tick = time.perf_counter()

        def measure():
            with cudnn_benchmark(bench or torch.backends.cudnn.benchmark):
                return pretrain_row(P, sizes, device, preset, bf16, batch, flops)

        row = attempt(report, record, f"{preset} bf16={bf16} batch={batch} cudnn.benchmark={bench}", measure)
        free(device)
        if row is None:
            continue
        row["row_seconds"] = time.perf_counter() - tick
        record["rows"].append(row)
        report.log(f"   {row['preset']:7} {row['precision']:13} {row['batch']:>5} {str(row['cudnn_benchmark']):>8} "
                   f"{row['ms_per_step']:>9.1f} {row['cubes_per_s']:>8.1f} {fmt(row['peak_mib'], '.0f'):>9} "
                   f"{fmt(row.get('tflops'), '.1f'):>8} | {fmt(row.get('e2e_ms_per_step')):>8} "
                   f"{fmt(100 * row['e2e_data_share'] if 'e2e_data_share' in row else None):>6}% "
                   f"{row['row_seconds']:>6.1f}")
        report.save()


def run_cudnn_benchmark(report: Report, record: dict, P, sizes: Sizes, device: torch.device,
                        pretrain: dict) -> None:
    """The pipeline leaves cudnn.benchmark off; these rows say what turning it on would give (last, since
    its autotuning of every conv shape costs seconds the other sections should not wait for)."""
    if device.type != "cuda":
        raise Skipped("no CUDA")
    flops = pretrain.get("gflop_per_cube_fwd_bwd")
    pretrain_rows(report, record, P, sizes, device, sizes.benchmark_rows, bench=True,
                  flops=flops * 1e9 if flops else None)
    for row in record["rows"]:
        base = step_ms_of(pretrain, row["batch"], row["precision"], preset=row["preset"])
        if base:
            row["speedup_vs_default"] = base / row["ms_per_step"]
            report.log(f"   {row['preset']} {row['precision']} batch {row['batch']}: cudnn.benchmark "
                       f"{base:.1f} -> {row['ms_per_step']:.1f} ms/step (x{row['speedup_vs_default']:.2f})")


# ---------------------------------------------------------------- 3. corruption


def params_on(params, device: torch.device):
    """A BatchParams with every tensor moved to `device`."""
    return replace(params, **{f.name: getattr(params, f.name).to(device) for f in fields(params)
                              if isinstance(getattr(params, f.name), torch.Tensor)})


def step_ms_of(record: dict, batch: int, precision: str, preset: str | None = None) -> float | None:
    """ms/step of the first row of `record` with this batch and precision (and preset, if given)."""
    for row in record.get("rows", []):
        if row["batch"] == batch and row["precision"] == precision and preset in (None, row["preset"]):
            return row["ms_per_step"]
    return None


def time_corruption(P, sizes: Sizes, device: torch.device, batch: int) -> dict:
    x = volumes(batch, sizes.cube, seed=20, device=device)
    generator = torch.Generator(device=device).manual_seed(1)
    for _ in range(2):
        P.corrupt_batch(x, generator)
    reset_peak(device)
    sync(device)
    tick = time.perf_counter()
    for _ in range(sizes.corrupt_reps):
        P.corrupt_batch(x, generator)
    sync(device)
    seconds = (time.perf_counter() - tick) / sizes.corrupt_reps
    return {"batch": batch, "ms_per_batch": 1e3 * seconds, "cubes_per_s": batch / seconds,
            "peak_mib": peak_mib(device)}


def equality_checks(P, sizes: Sizes, device: torch.device) -> dict:
    """(a) one torch-drawn BatchParams through the tensor path on the CPU and on `device`; (b) numpy-drawn
    GenesisParams through the compiled CPU kernels (what `apply` uses) and the tensor path on `device`."""
    batch = sizes.corrupt_batches[0]
    x = volumes(batch, sizes.cube, seed=30)
    out: dict = {"batch": batch, "other_device": str(device)}
    saved = P.batched._CPU_KERNELS
    try:
        P.batched._CPU_KERNELS = False  # the CPU side runs the same tensor code as CUDA
        params = P.batched.sample_batch_params(torch.Generator().manual_seed(5), batch, sizes.cube)
        cpu_out, cpu_target = P.apply_batch(x, params)
        dev_out, dev_target = P.apply_batch(x.to(device), params_on(params, device))
        out["tensor_cpu_vs_device"] = {
            "corrupted": diff(dev_out, cpu_out), "target": diff(dev_target, cpu_target),
            "voxels_differing": int((dev_out.cpu() != cpu_out).sum()), "voxels": cpu_out.numel(),
            "shuffled": int(params.shuffle.sum()), "nonlinear": int(params.nonlinear.sum()),
            "painted": int((params.paint > 0).sum())}
    finally:
        P.batched._CPU_KERNELS = saved
    rng = np.random.default_rng(6)
    drawn = [P.sample_params(rng, sizes.cube) for _ in range(batch)]
    k_out, k_target = P.apply_batch(x, drawn)  # CPU: compiled kernels (_CPU_KERNELS is True)
    saved = P.batched._CPU_KERNELS
    try:
        P.batched._CPU_KERNELS = False  # the tensor path on the device (CUDA takes it anyway; a CPU run too)
        t_out, t_target = P.apply_batch(x.to(device), drawn)
    finally:
        P.batched._CPU_KERNELS = saved
    out["kernels_cpu_vs_tensor_device"] = {"corrupted": diff(t_out, k_out), "target": diff(t_target, k_target)}
    a, b = out["tensor_cpu_vs_device"], out["kernels_cpu_vs_tensor_device"]
    # the project's tests hold the tensor path to atol 1e-5 against the numpy/kernel path, targets exact
    out["ok"] = bool(a["corrupted"]["max_abs"] <= 1e-5 and a["target"]["max_abs"] == 0
                     and b["corrupted"]["max_abs"] <= 1e-5 and b["target"]["max_abs"] == 0)
    return out


def run_corruption(report: Report, record: dict, P, sizes: Sizes, device: torch.device, pretrain: dict) -> None:
    record.update(cube_zyx=sizes.cube, reps=sizes.corrupt_reps, target_share=DATA_SHARE_TARGET, rows=[])
    for batch in sizes.corrupt_batches:
        row = attempt(report, record, f"corrupt_batch batch={batch}",
                      lambda: time_corruption(P, sizes, device, batch))
        if row is None:
            continue
        for precision in ("fp32", "bf16-autocast"):
            step = step_ms_of(pretrain, batch, precision)
            if step:
                row[f"share_{precision}"] = row["ms_per_batch"] / step
        shares = [v for k, v in row.items() if k.startswith("share_")]
        row["target_met"] = max(shares) < DATA_SHARE_TARGET if shares else None
        record["rows"].append(row)
        report.log(f"   corrupt_batch batch {batch:>3} on {device.type}: {row['ms_per_batch']:.2f} ms/batch, "
                   f"{row['cubes_per_s']:.0f} cubes/s, peak {fmt(row['peak_mib'], '.0f')} MiB; share of the step: "
                   + (", ".join(f"{k[6:]} step {100 * v:.1f}%" for k, v in row.items() if k.startswith("share_"))
                      or "no step time")
                   + f" (target < {100 * DATA_SHARE_TARGET:.0f}%: "
                   + {True: "met", False: "NOT met", None: "no step time to compare"}[row["target_met"]] + ")")
    eq = attempt(report, record, "equality", lambda: equality_checks(P, sizes, device))
    if eq is not None:
        record["equality"] = eq
        a, b = eq["tensor_cpu_vs_device"], eq["kernels_cpu_vs_tensor_device"]
        report.log(f"   same BatchParams, tensor path CPU vs {device.type}: corrupted max|d| "
                   f"{a['corrupted']['max_abs']:.3g} ({a['voxels_differing']} of {a['voxels']} voxels differ), "
                   f"target max|d| {a['target']['max_abs']:.3g}; cubes shuffled/nonlinear/painted "
                   f"{a['shuffled']}/{a['nonlinear']}/{a['painted']} of {eq['batch']}")
        report.log(f"   numpy-drawn params, CPU kernels vs {device.type} tensor path: corrupted max|d| "
                   f"{b['corrupted']['max_abs']:.3g}, target max|d| {b['target']['max_abs']:.3g} "
                   f"-> {'AGREE' if eq['ok'] else 'DIFFER'} (atol 1e-5, targets exact)")
        if not eq["ok"]:
            record["status"] = "failed"


# ---------------------------------------------------------------- 4. numerical agreement


def run_agreement(report: Report, record: dict, P, sizes: Sizes, device: torch.device) -> None:
    """One set of weights on the CPU and on `device`: forward outputs, then two training steps."""
    cpu = torch.device("cpu")
    config = pretrain_config(P, sizes, "paper", False, sizes.agree_batch, 1)
    torch.manual_seed(1)
    cpu_model = P.pretrain_steps.build_model(config)
    init = {k: v.clone() for k, v in cpu_model.state_dict().items()}
    dev_model = P.pretrain_steps.build_model(config)
    dev_model.load_state_dict(init)
    dev_model.to(device)
    x = volumes(sizes.agree_batch, sizes.cube, seed=40)
    record.update(batch=sizes.agree_batch, cube_zyx=sizes.cube, device=str(device), tf32=tf32_settings())
    restore = P.pretrain_steps.restore
    ref32 = restore(cpu_model, x, cpu)
    f64_model = P.pretrain_steps.build_model(config)
    f64_model.load_state_dict(init)
    with torch.no_grad():
        f64_model.double().eval()
        ref64 = f64_model(x.double())
    fwd = {"cpu_fp32_vs_cpu_fp64": diff(ref32, ref64)}
    dev32 = restore(dev_model, x, device)
    fwd["device_fp32_vs_cpu_fp32"] = diff(dev32, ref32)
    fwd["device_fp32_vs_cpu_fp64"] = diff(dev32, ref64)
    if device.type == "cuda":
        with tf32_off():
            dev32_strict = restore(dev_model, x, device)
        fwd["device_fp32_no_tf32_vs_cpu_fp64"] = diff(dev32_strict, ref64)
        dev16 = restore(dev_model, x, device, bf16=True)
        fwd["device_bf16_vs_device_fp32"] = diff(dev16, dev32)
        fwd["device_bf16_vs_cpu_fp64"] = diff(dev16, ref64)
    record["forward"] = fwd
    report.log("   (relative error expected: fp32 well under 1e-4, TF32 about 1e-3, bf16 1e-3 to 1e-2)")
    for name, d in fwd.items():
        report.log(f"   forward {name:34}: max|d| {d['max_abs']:.3g}, rel {d['rel']:.3g}"
                   + (" NaN!" if d["nan"] else ""))
    strict = fwd.get("device_fp32_no_tf32_vs_cpu_fp64", fwd["device_fp32_vs_cpu_fp64"])
    record["fp32_agrees"] = strict["rel"] < 1e-4
    # two training steps (the paper's SGD, lr 1.0, momentum 0.9) on the same two pairs, corrupted on the CPU
    generator = torch.Generator().manual_seed(2)
    pairs = [P.corrupt_batch(volumes(sizes.agree_batch, sizes.cube, seed=41 + i), generator) for i in range(2)]
    losses, weights = {}, {}
    for name, dev in (("cpu", cpu), ("device", device)):
        model = P.pretrain_steps.build_model(config)
        model.load_state_dict(init)
        model.to(dev)
        optimizer = P.pretrain_steps.build_optimizer(model, config)
        losses[name] = [P.pretrain_steps.train_epoch(model, iter([(a.to(dev), b.to(dev))]), optimizer, dev,
                                                     config).loss for a, b in pairs]
        weights[name] = torch.cat([p.detach().double().cpu().reshape(-1) for p in model.parameters()])
    steps = {"loss_cpu": losses["cpu"], "loss_device": losses["device"],
             "loss_rel_diff": [abs(a - b) / max(abs(a), 1e-30) for a, b in zip(losses["cpu"], losses["device"])],
             "weights_after": diff(weights["device"], weights["cpu"])}
    record["train_steps"] = steps
    report.log(f"   training step losses (paper SGD) cpu {['%.6g' % v for v in losses['cpu']]} vs {device.type} "
               f"{['%.6g' % v for v in losses['device']]}: rel diff {['%.2g' % v for v in steps['loss_rel_diff']]}")
    report.log(f"   weights after 2 steps: max|d| {steps['weights_after']['max_abs']:.3g}, "
               f"rel {steps['weights_after']['rel']:.3g}")
    bad = [k for k, d in {**fwd, "weights_after": steps["weights_after"]}.items() if d["nan"]]
    if bad or any(not math.isfinite(v) for v in losses["cpu"] + losses["device"]):
        record["status"] = "failed"
        report.log(f"   NaN in {bad or 'the losses'}")
    if not record["fp32_agrees"]:
        record["status"] = "failed"
        report.log(f"   fp32 on {device.type} (TF32 off) differs from the CPU's float64 by rel {strict['rel']:.3g} "
                   f">= 1e-4")


# ---------------------------------------------------------------- 5. fine-tuning


def finetune_row(P, sizes: Sizes, device: torch.device, spec) -> dict:
    make = {"paper": P.finetune_paper, "tiny": P.finetune_tiny}[sizes.finetune_preset]
    config = make(spec)
    batch, shape = config.batch_size, tuple(config.input_size)
    torch.manual_seed(0)
    model = P.finetune_model(config).to(device)
    loss_fn = P.finetune_steps.loss_function(config)
    optimizer = P.finetune_steps.build_optimizer(model, config)
    data = []
    for i in range(2):  # CPU tensors, as `pipeline.finetune.data.batches` yields them
        x = volumes(batch, shape, seed=50 + i, channels=config.in_channels)
        if config.kind == "classification":
            y = (torch.arange(batch) % 2).float()[:, None]
        else:
            y = (x[:, :1] > 0.55).float()
        data.append((x, y))
    reset_peak(device)
    P.finetune_steps.train_epoch(model, itertools.islice(itertools.cycle(data), sizes.warmup), optimizer,
                                 loss_fn, device)
    sync(device)
    tick = time.perf_counter()
    stats = P.finetune_steps.train_epoch(model, itertools.islice(itertools.cycle(data), sizes.finetune_steps),
                                         optimizer, loss_fn, device)
    sync(device)
    seconds = time.perf_counter() - tick
    row = {"task": spec.name, "kind": config.kind, "head": spec.head, "loss": spec.loss, "preset": config.preset,
           "input_zyx": shape, "in_channels": config.in_channels, "batch": batch, "lr": config.lr,
           "base_channels": config.base_channels, "parameters": P.count_trainable_parameters(model),
           "ms_per_step": 1e3 * seconds / sizes.finetune_steps, "cubes_per_s": stats.cubes / seconds,
           "peak_mib": peak_mib(device), "loss_value": stats.loss}
    del model, optimizer
    return row


def run_finetune(report: Report, record: dict, P, sizes: Sizes, device: torch.device) -> None:
    record.update(preset=sizes.finetune_preset, precision="fp32", warmup_steps=sizes.warmup,
                  timed_steps=sizes.finetune_steps, rows=[])
    report.log(f"   preset {sizes.finetune_preset}, fp32, {sizes.warmup} warm-up + {sizes.finetune_steps} timed steps; "
               f"inputs from CPU tensors (the loader's)")
    report.log(f"   {'task':5} {'kind':14} {'head/loss':22} {'input z,y,x':13} {'batch':>5} {'params':>11} "
               f"{'ms/step':>9} {'cubes/s':>8} {'peak MiB':>9}")
    for spec in P.all_tasks():
        row = attempt(report, record, f"finetune {spec.name}", lambda: finetune_row(P, sizes, device, spec))
        free(device)
        if row is None:
            continue
        record["rows"].append(row)
        report.log(f"   {row['task']:5} {row['kind']:14} {row['head'] + '/' + row['loss']:22} "
                   f"{'x'.join(map(str, row['input_zyx'])):13} {row['batch']:>5} {row['parameters']:>11,} "
                   f"{row['ms_per_step']:>9.1f} {row['cubes_per_s']:>8.1f} {fmt(row['peak_mib'], '.0f'):>9}")
        report.save()


# ---------------------------------------------------------------- 6. official layout


def run_official(report: Report, record: dict, P, sizes: Sizes, device: torch.device) -> None:
    torch.manual_seed(3)
    model = P.UNet3D(base_channels=sizes.base_channels).to(device)
    x = volumes(2, sizes.cube, seed=60, device=device)
    restore = P.pretrain_steps.restore
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        path = Path(tmp) / "genesis_official_layout.pt"
        P.save_official_layout(model, path)
        raw = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        loaded = P.load_official_genesis(path).to(device)
        as_stored = P.load_official_genesis(path, axes="zyx").to(device)  # the file's (x, y, z) kernels as they are
    key = "down_tr64.ops.0.conv1.weight"
    native = model.state_dict()
    record["file_kernel_is_xyz"] = bool(torch.equal(raw[f"module.{key}"], native[key].cpu().permute(0, 1, 4, 3, 2)))
    record["state_dict_identical"] = all(torch.equal(v, native[k]) for k, v in loaded.state_dict().items())
    ours = restore(model, x, device)
    record["round_trip_output"] = diff(restore(loaded, x, device), ours)
    # the official model on (x, y, z) cubes: its output, transposed back, is ours
    with tf32_off():
        ours_strict = restore(model, x, device)
        official = restore(as_stored, x.permute(0, 1, 4, 3, 2), device).permute(0, 1, 4, 3, 2)
    record["xyz_model_on_xyz_cube_vs_ours"] = diff(official, ours_strict)
    record["ok"] = bool(record["file_kernel_is_xyz"] and record["state_dict_identical"]
                        and record["round_trip_output"]["max_abs"] <= 1e-6
                        and record["xyz_model_on_xyz_cube_vs_ours"]["max_abs"] <= 1e-4)
    report.log(f"   file kernels in (x, y, z) order: {record['file_kernel_is_xyz']}; state dict identical after "
               f"save -> load on {device.type}: {record['state_dict_identical']}")
    report.log(f"   outputs after the round trip: max|d| {record['round_trip_output']['max_abs']:.3g}")
    report.log(f"   file's own kernels on the (x, y, z) cube, transposed back, vs ours (TF32 off): max|d| "
               f"{record['xyz_model_on_xyz_cube_vs_ours']['max_abs']:.3g}, "
               f"rel {record['xyz_model_on_xyz_cube_vs_ours']['rel']:.3g} -> {'OK' if record['ok'] else 'MISMATCH'}")
    if not record["ok"]:
        record["status"] = "failed"


# ---------------------------------------------------------------- main


def summary(report: Report) -> None:
    s = report.data["sections"]
    report.log("\n== summary")
    for key, rec in s.items():
        report.log(f"   {key:15} {rec.get('status', '?'):28} {rec.get('seconds', 0):6.1f} s")
    rows = s.get("pretrain", {}).get("rows", [])
    if rows:
        report.log("   pretrain ms/step (cubes/s, peak MiB): " + "; ".join(
            f"{r['preset']} {r['precision']}{' cudnn.bm' if r['cudnn_benchmark'] else ''} b{r['batch']} "
            f"{r['ms_per_step']:.1f} "
            f"({r['cubes_per_s']:.0f}, {fmt(r['peak_mib'], '.0f')})" for r in rows))
    rows = s.get("corruption", {}).get("rows", [])
    if rows:
        report.log("   corruption ms/batch (share of step): " + "; ".join(
            f"b{r['batch']} {r['ms_per_batch']:.2f} ("
            + ", ".join(f"{k[6:]} {100 * v:.1f}%" for k, v in r.items() if k.startswith("share_")) + ")"
            for r in rows))
    rows = s.get("finetune", {}).get("rows", [])
    if rows:
        report.log("   finetune ms/step (cubes/s): " + "; ".join(
            f"{r['task']} {r['ms_per_step']:.1f} ({r['cubes_per_s']:.0f})" for r in rows))
    report.log(f"   total {report.data.get('total_seconds', 0):.1f} s; numbers in {report.json_path}")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="folder for gpu_check.txt and gpu_check.json")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                    help="auto: cuda when available (default)")
    ap.add_argument("--quick", action="store_true", help="tiny widths and sizes, 1-2 steps each (a smoke test)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {','.join(SECTIONS)}")
    ap.add_argument("--check-imports", action="store_true",
                    help="only import what the script uses with the forbidden packages blocked, and exit")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.check_imports:
        errors, leaked = check_imports()
        for group, err in errors.items():
            print(f"gpu_check --check-imports: FAILED: {group}: {err}", file=sys.stderr)
        if errors:
            return 1
        if leaked:
            print(f"gpu_check --check-imports: FAILED: forbidden modules loaded: {leaked}", file=sys.stderr)
            return 1
        print(f"gpu_check --check-imports: ok (blocked {', '.join(FORBIDDEN)}; none loaded)")
        return 0
    if args.out is None:
        print("gpu_check: --out DIR is required (where gpu_check.txt and gpu_check.json go)", file=sys.stderr)
        return 2
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        print(f"gpu_check: --sections: unknown {unknown}; choose from {','.join(SECTIONS)}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda: torch sees no CUDA device (torch "
              f"{torch.__version__}); use --device cpu --quick for a smoke test", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    sizes = QUICK if args.quick else Sizes()
    if args.quick and device.type == "cpu":
        # a smoke test on a shared CPU: with more threads than free cores torch's thread barriers spin (a 2-core
        # machine under load ran this 3x slower on 2 threads than on 1); the GPU machine keeps all its threads
        torch.set_num_threads(1)
    install_blocker()
    report = Report(args.out)
    report.data.update(device=str(device), quick=args.quick, sizes=sizes.__dict__, argv=sys.argv[1:])
    report.log(f"gpu_check: device {device}, {'quick' if args.quick else 'full'} sizes, sections {','.join(wanted)}")
    tick = time.perf_counter()
    P = SimpleNamespace()
    with section(report, "imports", "imports (forbidden packages blocked)", device) as rec:
        t = time.perf_counter()
        P, errors = import_pipeline()
        rec["import_seconds"] = round(time.perf_counter() - t, 2)
        leaked = sorted(m for m in sys.modules if m.partition(".")[0] in FORBIDDEN)
        rec["forbidden_loaded"] = leaked
        report.log(f"   pipeline modules imported in {rec['import_seconds']:.1f} s; "
                   f"forbidden loaded: {leaked or 'none'}")
        if errors:
            rec.update(status="partial", errors=errors)
            for group, err in errors.items():
                report.log(f"   {group}: FAILED {err} (the sections that need it will fail)")
    s = report.data["sections"]
    if "environment" in wanted:
        with section(report, "environment", "1. environment", device) as rec:
            run_environment(report, rec, device)
    if "pretrain" in wanted:
        with section(report, "pretrain", "2. pretraining steps (pipeline.training.steps)", device) as rec:
            run_pretrain(report, rec, P, sizes, device)
    if "corruption" in wanted:
        with section(report, "corruption", "3. corruption on the device (corrupt_batch)", device) as rec:
            run_corruption(report, rec, P, sizes, device, s.get("pretrain", {}))
    if "agreement" in wanted:
        with section(report, "agreement", "4. numerical agreement CPU vs device", device) as rec:
            if device.type != "cuda" and not args.quick:
                raise Skipped("no CUDA")
            run_agreement(report, rec, P, sizes, device)
    if "finetune" in wanted:
        with section(report, "finetune", "5. fine-tuning steps of the five tasks (pipeline.finetune.steps)",
                     device) as rec:
            run_finetune(report, rec, P, sizes, device)
    if "official" in wanted:
        with section(report, "official", "6. official-weights layout round trip", device) as rec:
            run_official(report, rec, P, sizes, device)
    if "cudnn_benchmark" in wanted:
        with section(report, "cudnn_benchmark", "7. pretraining steps with cudnn.benchmark on", device) as rec:
            run_cudnn_benchmark(report, rec, P, sizes, device, s.get("pretrain", {}))
    report.data["total_seconds"] = round(time.perf_counter() - tick, 1)
    summary(report)
    report.close()
    return 1 if any(r.get("status") in ("failed", "partial") for r in s.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
