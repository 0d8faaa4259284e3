"""Benchmarks must not rot: each script's `--quick` mode runs here as a user runs it, and its figures are checked.

A quick run does every step of its benchmark on the smallest data; what it prints is a smoke figure, never a
timing target (nothing here asserts a speed). Each test checks the exit status, that every figure line is
there, and that the numbers in it are sane (positive rates, counts that add up, targets marked not judged).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


def run_bench(script: str, *args: str, timeout: int = 300) -> str:
    """Run benchmarks/<script> in a fresh process; its stdout (+ stderr) when it exits 0, else fail showing both."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join the test session's Ray
    env.update(TQDM_DISABLE="1", PYTHONHASHSEED="0")
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, (f"{script} {' '.join(args)} exited {proc.returncode}\n--- stdout\n"
                                  f"{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc.stdout


def figure(out: str, pattern: str) -> float:
    """The number the regex `pattern` captures (group 1) in the benchmark's output; fails naming the pattern."""
    m = re.search(pattern, out, re.MULTILINE)
    assert m, f"no line matches {pattern!r} in:\n{out}"
    return float(m.group(1))


def load_script(name: str):
    """benchmarks/<name>.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))  # its own sibling imports (patches, reference_genesis)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


# ---- the 10x store of the loader-memory figures

def test_grown_store_is_a_valid_patch_store(tmp_path):
    """The 10x store is assembled through the build path: every shard passes verify, rows repeat the source."""
    from pipeline.cli import main
    from pipeline.patches.extract import extract_pretrain
    from pipeline.patches.store import PatchStore
    from pipeline.sample_data import make_sample_data
    from pipeline.volume_store.convert import convert

    bench = load_script("patches")
    make_sample_data(tmp_path / "data", n_scans=2, seed=0, include_real=False, config=bench.quick_phantom())
    assert convert([str(tmp_path / "data")], str(tmp_path / "vs"), workers=1, progress=False).ok
    src = PatchStore(extract_pretrain(str(tmp_path / "vs"), bench.quick_cubes(), out_root=str(tmp_path / "ps"),
                                      workers=1, progress=False).path)
    n = len(src)
    assert n > 0
    big = tmp_path / "big"
    bench.grow_store(src.path, big, 3)
    grown = PatchStore(big)
    assert len(grown) == 3 * n and grown.cubes.shape == (3 * n,) + src.cubes.shape[1:]
    assert all(status == "ok" for status, _, _ in grown.verify()), grown.verify()
    assert main(["stores", "verify", str(big)]) == 0
    rows = np.arange(n)
    for k in range(3):
        np.testing.assert_array_equal(grown.read_cubes(rows + k * n), src.read_cubes(rows))
    idx = grown.index
    assert idx["row"].tolist() == list(range(3 * n))
    assert idx["scan_id"].iloc[:n].tolist() == src.index["scan_id"].tolist()
    assert idx["scan_id"].iloc[2 * n:].tolist() == [s + "#2" for s in src.index["scan_id"]]
    assert grown.attrs["counts"] == {s: 3 * c for s, c in src.attrs["counts"].items()}
    assert grown.key != src.key and grown.cube_encoding == src.cube_encoding
    with pytest.raises(ValueError, match="already exists"):
        bench.grow_store(src.path, big, 2)


# ---- each benchmark's quick mode

def test_convert_quick(tmp_path):
    out = run_bench("convert.py", "--quick", "--work", str(tmp_path))
    assert figure(out, r"^sample: (\d+) scans") == 2
    for label in (r"\(a\) floor: read \+ compress, 1 process", r"\(a'\) floor \+ checksum \+ pyramid levels",
                  r"\(b\) genesis convert --workers 1", r"\(c\) genesis convert --workers 2"):
        assert figure(out, label + r"\s*:\s+[\d.]+ s\s+([\d.]+) MB/s") > 0
    assert figure(out, r"^\(d\) rerun over the finished store\s*:\s+([\d.]+) s") >= 0
    assert figure(out, r"^peak memory of one task above its worker's idle RSS: ([\d.]+) MB") > 0
    assert "PASS" not in out and "MISS" not in out and out.count("(quick: not judged)") == 4


def test_patches_quick(tmp_path):
    out = run_bench("patches.py", "--quick", "--bucket", "--work", str(tmp_path))
    n = figure(out, r"^patch store: (\d+) cubes of 16x16x16 from 2 phantom scans")
    assert n > 0
    assert 0 < figure(out, r"^store MB per cube\s*:.* ratio ([\d.]+)") < 1  # int16 smaller than float32
    assert "decoded cubes bit-identical" in out
    for workers in (1, 2):
        assert figure(out, rf"^extraction, {workers} Dask worker\(s\)\s*:\s+([\d.]+) cubes/s") > 0
    assert figure(out, r"^loader, 1 core, no corruption\s*:\s+([\d.]+) cubes/s") > 0
    assert figure(out, r"^loader \+ corrupt_batch, 1 core, B=6\s*:\s+([\d.]+) cubes/s") > 0
    assert figure(out, r"^10x store\s*:\s+(\d+) cubes") == 10 * n
    assert re.search(r"^10x store .*verify: index and \d+ shards ok", out, re.MULTILINE)
    m = re.search(r"^loader peak RSS, whole store streamed: (\d+) cubes (\d+) MB; (\d+) cubes (\d+) MB; "
                  r"ratio ([\d.]+)", out, re.MULTILINE)
    assert m, out
    one, one_mb, ten, ten_mb, ratio = map(float, m.groups())
    assert 0 < one <= n and 10 * n - 6 < ten <= 10 * n  # whole batches of 6 of the store and of the 10x store
    assert one_mb > 0 and ten_mb > 0 and ratio > 0
    assert "PASS" not in out and "MISS" not in out

    # --bucket: the store built into moto's S3 server (started by the benchmark), read back by the loader
    assert figure(out, r"^extraction into s3://, 2 Dask workers\s*:\s+([\d.]+) cubes/s") > 0
    for label in ("store", "10x store"):
        m = re.search(rf"^loader, 1 core, {label} \((\d+) shards\), epochs 1-2: local disk\s+([\d.]+) cubes/s, "
                      r"s3://\s+([\d.]+) cubes/s = \d+% of local \(target >= 70%\) \(quick: not judged\); "
                      r"([\d.]+) GET/s", out, re.MULTILINE)
        assert m and all(float(v) > 0 for v in m.groups()), (label, out)
    assert figure(out, r"^loader peak RSS from s3://, whole store: \d+ cubes \d+ MB; \d+ cubes \d+ MB; "
                  r"ratio ([\d.]+)") > 0


def test_transforms_quick():
    out = run_bench("transforms.py", "--quick")
    assert figure(out, r"(\d+) cubes for \(a\)/\(b\)") == 4
    for row in (r"\(a\) reference \(Python loops\)", r"\(b\) corrupt, numpy, 1 thread",
                r"\(c\) corrupt_batch, CPU, batch 2"):
        assert figure(out, rf"^{row}.*?\s([\d.]+) ms/cube") > 0
    assert re.search(r"^\(d\) corrupt_batch, ", out, re.MULTILINE)
    assert "PASS" not in out and "MISS" not in out


def test_reference_corruption_is_seeded_and_keeps_the_cube_shape():
    """benchmarks/reference_genesis.py, the baseline of transforms.py: one pair per cube, reproducible by seed."""
    import random

    ref = load_script("reference_genesis")
    cube = np.random.default_rng(0).random((1, 32, 64, 64), dtype=np.float32)
    pairs = [ref.reference_corrupt(cube.copy(), random.Random(3), np.random.default_rng(3)) for _ in range(2)]
    (x, y), (x2, y2) = pairs
    assert x.shape == y.shape == cube.shape
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(np.sort(y, axis=None), np.sort(cube, axis=None))  # the target: the cube, flipped


def test_gpu_check_quick_on_cpu(tmp_path):
    out = run_bench("gpu_check.py", "--device", "cpu", "--quick", "--out", str(tmp_path))
    assert "gpu_check: device cpu, quick sizes" in out
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    status = {name: s["status"] for name, s in report["sections"].items()}
    assert status.pop("cudnn_benchmark").startswith("skipped")  # CUDA only
    assert set(status.values()) == {"ok"}, status
    assert figure(out, r"^   pretrain ms/step .*?paper fp32 b2 ([\d.]+)") > 0
    assert figure(out, r"^   finetune ms/step .*?ecc ([\d.]+)") > 0


def test_task_patches_quick(tmp_path):
    """Five tasks, each on its small sample: sample, convert, builds with 1 and 2 workers, the memory check."""
    out = run_bench("task_patches.py", "--quick", "--work", str(tmp_path), timeout=400)
    assert re.search(r"^task\s+scans\s+cases\s+cubes\s+1w s\s+1w c/s\s+2w s\s+2w c/s\s+2w/1w", out, re.MULTILINE)
    built = re.findall(r"^(ncc|ncs|ecc|lcs|bms)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)",
                       out, re.MULTILINE)
    skipped = re.findall(r"^(ncc|ncs|ecc|lcs|bms)\s+skipped: (.*)$", out, re.MULTILINE)
    # only a sample whose real material cannot be fetched here may be skipped (LIDC's and BraTS's, from PyPI)
    assert {t for t, _ in skipped} <= {"ncs", "bms"}, skipped
    assert sorted(t for t, *_ in built) + sorted(t for t, _ in skipped) == sorted(["ncc", "ncs", "ecc", "lcs", "bms"])
    assert {"ncc", "ecc", "lcs"} <= {t for t, *_ in built}
    for task, scans, cases, cubes, s1, r1, s2, r2 in built:
        assert int(scans) > 0 and int(cases) > 0 and int(cubes) > 0, task
        assert float(r1) > 0 and float(r2) > 0, task
    assert "FAILED" not in out and "PASS" not in out and "MISS" not in out


@pytest.mark.slow  # starts a local Ray and pretrains twice (1 and 2 Ray workers): about 1.5-2.5 min on 2 cores
def test_pretrain_quick(tmp_path):
    out = run_bench("pretrain.py", "--quick", "--work", str(tmp_path), timeout=480)
    cubes = figure(out, r"^store: (\d+) cubes, train split \d+ cubes from \d+ scans \(16x16x16\)")
    assert cubes > 0
    assert figure(out, r"^loader, 1 core, global batch 6, .*: ([\d.]+) cubes/s") > 0
    assert figure(out, r"^loader peak RSS: (\d+) MB") > 0
    assert figure(out, r"^loader peak RSS: .*store 10x larger: (\d+) MB") > 0
    assert 1 <= figure(out, r"^distinct scans per batch of 6 \(served cubes\): mean ([\d.]+)") <= 6
    for workers in (1, 2):
        assert figure(out, rf"^tiny pretraining, {workers} Ray worker\(s\), CPU:\s+([\d.]+) cubes/s") > 0
    assert figure(out, r"^tiny, 1 process, CPU, batch \d+: data ([\d.]+) ms vs step") > 0
    assert "PASS" not in out and "MISS" not in out


def test_scale_quick(tmp_path):
    """Two tiny CT phantoms through convert, extraction, the loader and `stores show/verify`, on local disk and
    on the local S3 server the benchmark starts: every row of the table is there with sane figures on both
    backends, and the bucket store holds the same bytes per scan as the folder."""
    out = run_bench("scale.py", "--quick", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
                    timeout=300)
    assert re.search(r"^scale: N = 2 chest-CT phantoms of 128x128 x 36\.\.44 slices", out, re.MULTILINE), out
    assert figure(out, r"^source MB per scan\s+([\d.]+)") > 1  # 128 x 128 x >= 36 int16 voxels
    assert 36 <= figure(out, r"^mean slices per scan\s+([\d.]+)") <= 44
    for row in ("floor read\\+compress, 1 process, MB/s", "floor read\\+compress, 2 processes, MB/s"):
        assert figure(out, rf"^{row}\s+([\d.]+)") > 0
    local = {"convert, 1 worker, MB/s": 0, "  / floor \\(1 process\\)": 0, "convert, 2 workers, MB/s": 0,
             "  / floor \\(2 processes\\)": 0, "convert, 2 workers, s/scan": 0, "worker peak RSS, 1 worker, MB": 0,
             "worker peak RSS, 2 workers, MB": 0, "extraction, 2 workers, cubes/s": 0,
             "extraction, s/scan": 0, "loader, 1 core, cubes/s": 0, "loader peak RSS, MB": 0,
             "stores show, s": 0, "stores verify, s": 0, "store MB per scan": 0}
    for row in local:
        assert figure(out, rf"^{row}\s+local\s+([\d.]+)x?$") > 0, row
    assert figure(out, r"^task peak above idle, MB\s+local\s+([\d.]+)$") >= 0
    assert figure(out, r"^machine load \(1-min average, max seen\)\s+local\s+([\d.]+)$") >= 0
    assert figure(out, r"^store MB per scan\s+local\s+([\d.]+)$") < figure(out, r"^source MB per scan\s+([\d.]+)")
    s3_rows = re.findall(r"^(.+?)\s+s3\s+(\S+)$", out, re.MULTILINE)
    assert len(s3_rows) == len(local) + 2, s3_rows  # with the task peak and the machine load
    assert "not supported yet" not in out, out  # every step runs on a bucket too
    assert all(float(v.rstrip("x")) >= 0 for _, v in s3_rows), s3_rows
    for what in ("conversion MB/s", "loader cubes/s", "extraction cubes/s"):
        assert figure(out, rf"^  bucket / disk, {what}, N=2: ([\d.]+)") > 0
    assert figure(out, r"^store MB per scan\s+s3\s+([\d.]+)$") == figure(out, r"^store MB per scan\s+local\s+([\d.]+)$")
    assert "  local conversion / floor, 1 worker(s), N=2:" in out
    assert "PASS" not in out and "MISS" not in out
    saved = json.loads((tmp_path / "out" / "scale_quick.json").read_text())
    assert saved["local"]["2"]["cubes"] > 0 and saved["common"]["2"]["source_mb"] > 0
    assert (tmp_path / "out" / "scale_quick.txt").read_text().strip() == out.split("--- after N=2 ---\n")[1].strip()
    assert not (tmp_path / "work" / "s3:").exists()  # no s3:// URL ever lands on disk as a relative path


def test_object_backends_quick():
    """obstore and fsspec/s3fs under Zarr against the benchmark's own moto server: four positive figures each."""
    out = run_bench("object_backends.py", "--quick", timeout=180)
    assert re.search(r"^object backends under zarr 3\.", out, re.MULTILINE), out
    for row in ("write whole array, MB/s", "read whole array, MB/s", "random cubes, 1 at a time/s",
                "random cubes, 8 at a time/s"):
        m = re.search(rf"^{row}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x$", out, re.MULTILINE)
        assert m, (row, out)
        assert all(float(v) > 0 for v in m.groups())
