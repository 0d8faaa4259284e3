"""What a patch-store build says it did: `ExtractionResult`, and the one error every build meets alike."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.patches.store import PatchStore

__all__ = ["ExtractionResult", "NoCubesError", "found"]


class NoCubesError(RuntimeError):
    """No scan (case) gave a cube: every rerun with these settings fails the same way."""


@dataclass
class ExtractionResult:
    path: Path | str
    """The store: a Path on disk, its s3:// URL in a bucket."""
    key: str
    reused: bool
    n_cubes: int = 0
    counts: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)  # [{"scan_id", "reason"}]
    seconds: float = 0.0
    failed: list = field(default_factory=list)  # [{"scan_id", "item", "reason"}]: candidates that gave no cube
    tasks: list = field(default_factory=list)  # per case/scan extracted by this run: n, seconds, task_peak_bytes,
    # pid, started (a worker's first task also pays its one-time set-up: imports, thread pools)
    whole_volume: int = 0  # task stores: test cases kept whole (in scans.parquet) for sliding-window evaluation
    phases: dict = field(default_factory=dict)  # seconds: plan, cluster start, cases, assemble, finish
    notes: list = field(default_factory=list)  # what a user must know about the store (pretraining: validation
    # on training cubes), printed as warnings
    padded: list = field(default_factory=list)  # mr pretraining: [{"scan_id", "padding"}], scans shorter than the
    # crop on some axis, padded with the normalised background

    def report(self) -> str:
        verb = "reused existing" if self.reused else "built"
        lines = [f"{verb} patch store {self.path} (key {self.key}): {self.n_cubes} cubes "
                 + ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
                 + (f" (+ {self.whole_volume} whole test scans)" if self.whole_volume else "")
                 + f" in {self.seconds:.1f} s"]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} scans:")
            lines += [f"  {s['scan_id']}: {s['reason']}" for s in self.skipped]
        if self.padded:
            lines.append(f"padded {len(self.padded)} scans shorter than the crop with background (0), (before, "
                         f"after) voxels per axis z, y, x:")
            lines += [f"  {p['scan_id']}: {p['padding']}" for p in self.padded]
        lines += [f"WARNING: {n}" for n in self.notes]
        if self.failed:
            lines.append(f"failed {len(self.failed)} items:")
            lines += [f"  {f['scan_id']} {f['item']}: {f['reason']}" for f in self.failed]
        return "\n".join(lines)


def found(final: Path | str, key: str, t0: float, reused: bool) -> ExtractionResult:
    """The published store at `final` as a result (`reused`: found, not built by this run); a task store's
    failed items and whole test cases too."""
    ps = PatchStore(final)
    return ExtractionResult(path=final, key=key, reused=reused, n_cubes=len(ps), counts=ps.attrs["counts"],
                            skipped=ps.attrs["skipped_scans"], seconds=time.perf_counter() - t0,
                            failed=ps.attrs.get("failed_items", []),
                            whole_volume=int((ps.scans["n_cubes"] == 0).sum()) if ps.is_task else 0,
                            notes=[n for n in [(ps.attrs.get("validation") or {}).get("note")] if n] + list(ps.attrs.get("warnings") or []),
                            padded=(ps.attrs.get("recipe") or {}).get("padded_scans", []))
