"""Text views of stores for `genesis stores show|list` (volume stores now, patch stores alike).

A store is a folder or an `s3://BUCKET/PREFIX` (`pipeline.storage.objects`): kinds, sizes and listings are
read through its Tree, and a location that cannot be used (bad URL, refused credentials, dead endpoint,
missing bucket) is a StorageError (one line, exit 2) before anything else.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pandas as pd

from pipeline.console import EXIT_BUSY
from pipeline.storage.objects import open_tree

__all__ = ["show_store", "list_stores", "store_kind", "dir_size", "verify_command", "build_parser"]


def store_kind(path) -> str | None:
    """The `genesis.kind` of the store at `path` (a folder, URL or Tree), None when it is not a store."""
    try:
        data = open_tree(path).read("zarr.json")
    except (OSError, IsADirectoryError):
        return None
    try:
        meta = json.loads(data.decode("utf-8"))
        return meta.get("attributes", {}).get("genesis", {}).get("kind")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None


def dir_size(path) -> int:
    """Bytes of every file (object) under `path` (a folder, URL or Tree)."""
    tree = open_tree(path)
    if tree.local is None:
        return sum(o.size for o in tree.list(""))
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass
    return total


def _fmt_list(v) -> str:
    if v is None or (isinstance(v, float) and pd.isna(v)):
        return ""
    try:
        return "x".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)
    except TypeError:
        return str(v)


def show_store(path: str, all_columns: bool = False) -> str:
    """The catalog of a volume store as a table, with a one-line header."""
    from pipeline.volume_store.errors import StoreError
    from pipeline.volume_store.store import VolumeStore

    open_tree(path).check()
    kind = store_kind(path)
    if kind == "volume-store":
        store = VolumeStore(path)
        cat = store.catalog()
        n_ok = int((cat["status"] == "ok").sum())
        head = (f"volume store {path}: {len(cat)} scans ({n_ok} ok, {len(cat) - n_ok} failed), "
                f"{dir_size(path) / 1e6:.1f} MB, created {store.attrs['created_at']}")
        if store.is_local:
            scans = Path(path) / "scans"
            on_disk = sum(1 for p in scans.iterdir() if p.is_dir()) if scans.is_dir() else 0
            if on_disk != n_ok:
                head += (f"\nwarning: {on_disk} scan folders on disk but {n_ok} ok rows in the catalog; "
                         f"check with `genesis stores verify {path}`")
        else:
            head += _bucket_folders_warning(store, cat, path)
        if cat.empty:
            return head
        if not all_columns:
            cat = cat[["scan_id", "status", "dataset", "subset", "modality", "shape", "spacing", "labels", "error"]].copy()
        for col in ("shape", "spacing", "origin", "labels", "source_direction"):
            if col in cat:
                cat[col] = cat[col].map(_fmt_list)
        cat["error"] = cat["error"].fillna("")
        with pd.option_context("display.max_rows", None, "display.max_colwidth", 70, "display.width", 250):
            return head + "\n" + cat.to_string(index=False)
    if kind == "patch-store":
        from pipeline.patches.store import PatchStore

        ps = PatchStore(path)
        a = ps.attrs
        idx = ps.index
        head = (f"patch store {path}: key {a['key']}, {a['purpose']}, {a['n_cubes']} cubes "
                f"{'x'.join(map(str, a['cube_shape']))} (z,y,x), {dir_size(path) / 1e6:.1f} MB, created {a['created_at']}\n"
                f"from volume store {a['volume_store']['path']}\nconfig: {json.dumps(a['config'], sort_keys=True)}")
        if a["skipped_scans"]:
            head += f"\nskipped {len(a['skipped_scans'])} scans: " + "; ".join(
                f"{s['scan_id']}: {s['reason']}" for s in a["skipped_scans"])
        if ps.is_task:
            return head + "\n" + _task_store_view(ps)
        per_scan = idx.groupby(["scan_id", "split"], dropna=False).agg(
            cubes=("row", "size"), rows=("row", lambda r: f"{r.min()}-{r.max()}"),
            dense=("dense_fraction", "mean")).reset_index()
        with pd.option_context("display.max_rows", None, "display.width", 250):
            return head + "\n" + per_scan.to_string(index=False)
    raise StoreError(f"{path} is not a store (no genesis store attributes in {path}/zarr.json)")


def _task_store_view(ps) -> str:
    """Per case: patient, split, cubes and positives; then failed candidates, if any."""
    idx = ps.index
    per_case = idx.groupby(["case_id", "patient_id", "split"], dropna=False).agg(
        cubes=("row", "size"), positives=("label", "sum"), rows=("row", lambda r: f"{r.min()}-{r.max()}")).reset_index()
    scans = ps.scans
    whole = scans[scans["n_cubes"] == 0][["case_id", "patient_id", "split"]].assign(cubes=0, positives=0, rows="whole volume")
    table = pd.concat([per_case, whole], ignore_index=True).sort_values(["split", "case_id"])
    lines = [f"task {ps.attrs['task']}: channels {','.join(ps.attrs.get('channels', []))}, "
             f"labels per split {json.dumps(ps.attrs.get('label_counts', {}))}"]
    with pd.option_context("display.max_rows", None, "display.width", 250, "display.max_colwidth", 70):
        lines.append(table.to_string(index=False))
    failed = ps.attrs.get("failed_items") or []
    if failed:
        lines.append(f"failed {len(failed)} items:")
        lines += [f"  {f['scan_id']} {f['item']}: {f['reason']}" for f in failed]
    return "\n".join(lines)


def _bucket_folders_warning(store, cat: pd.DataFrame, path: str) -> str:
    """In a bucket each ok row names its scan's folder (`path`: the committed version, scans/<id>@<8 hex>): a
    warning line when one of them is missing or a folder under scans/ is named by none (a version being written
    now, or left by a killed run: its next `genesis convert` removes it), else "". One listing, no record read."""
    from pipeline.volume_store.store import safe_scan_id

    present = {n for n in store.tree.listdir("scans") if n != "zarr.json"}
    ok = cat[cat["status"] == "ok"]
    paths = ok["path"] if "path" in ok else [None] * len(ok)
    named = {(p if isinstance(p, str) and p.startswith("scans/") else f"scans/{safe_scan_id(s)}")[len("scans/"):]
             for s, p in zip(ok["scan_id"], paths)}
    missing, extra = len(named - present), len(present - named)
    if not missing and not extra:
        return ""
    said = ([f"{missing} ok rows name a scan folder that is missing"] if missing else []) + (
        [f"{extra} scan folders no ok row names (a conversion writing them now, or one killed: its next run "
         "removes them)"] if extra else [])
    return f"\nwarning: {'; '.join(said)}; check with `genesis stores verify {path}`"


def list_stores(root: str) -> str:
    """Every store found under `root` (a folder or an s3:// prefix; four levels deep), one line each."""
    tree = open_tree(root)
    if tree.local is None:
        tree.check()
        rows = []
        level = [tree]
        for _depth in range(5):
            nxt = []
            for t in level:
                kind = store_kind(t)
                if kind:
                    rows.append(_summary_row(t.url, kind))
                    continue
                nxt += [t.child(n) for n in t.listdir("") if not n.startswith(".") and n != "zarr.json"]
            level = nxt
        if not rows:
            return f"no stores under {root}"
        return pd.DataFrame(rows).to_string(index=False)
    rows = []
    for dirpath, dirnames, _ in os.walk(root):
        depth = Path(dirpath).relative_to(root).parts
        kind = store_kind(dirpath)
        if kind:
            rows.append(_summary_row(dirpath, kind))
            dirnames[:] = []
            continue
        dirnames[:] = [d for d in sorted(dirnames) if not d.startswith(".")] if len(depth) < 4 else []
    if not rows:
        return f"no stores under {root}"
    return pd.DataFrame(rows).to_string(index=False)


def _summary_row(path: str, kind: str) -> dict:
    meta = json.loads(open_tree(path).read("zarr.json").decode("utf-8"))["attributes"]["genesis"]
    row = {"kind": kind, "path": path, "key": meta.get("key", ""), "size_mb": round(dir_size(path) / 1e6, 1),
           "items": "", "config": "", "created": meta.get("created_at", "")}
    if kind == "volume-store":
        from pipeline.volume_store.store import VolumeStore

        cat = VolumeStore(path).catalog()
        row["items"] = f"{int((cat['status'] == 'ok').sum())} scans"
        row["config"] = ",".join(sorted(set(cat["dataset"].dropna())))
    elif kind == "patch-store":
        from pipeline.patches.config import PretrainPatchConfig
        from pipeline.patches.store import PatchStore

        ps = PatchStore(path)
        row["items"] = f"{ps.attrs['n_cubes']} cubes"
        cfg = dict(ps.attrs["config"])
        if ps.is_task:
            row["config"] = (f"task {ps.attrs['task']} ({ps.purpose}) "
                             f"{'x'.join(map(str, ps.attrs['cube_shape']))} seed {cfg.get('seed')}")
        else:
            row["config"] = f"{ps.attrs['purpose']} " + PretrainPatchConfig(
                **{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}).summary()
    return row


def verify_patch_store(store: str, repair: bool) -> int:
    """`genesis stores verify PATCH_STORE`: the index and every array (every shard present, every chunk
    passing its CRC32C), one line each. Patch stores are derived data: nothing is repaired in place,
    a damaged one is rebuilt from its volume store."""
    from pipeline.patches.store import PatchStore

    ps = PatchStore(store)
    results = ps.verify()
    for status, part, detail in results:
        print(f"{status:<8}  {part}  {detail}".rstrip(), flush=True)
    whole = all(status == "ok" for status, _, _ in results)
    counts: dict[str, int] = {}
    for status, _, _ in results:
        counts[status] = counts.get(status, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    rebuild = (f"remove it and rebuild it with `genesis patches {'task ' + ps.attrs['task'] if ps.is_task else 'pretrain'}"
               f" --store {ps.attrs['volume_store']['path']} ...` (patch stores are not repaired in place)")
    print(f"{store}: patch store, {summary}; {'whole' if whole else 'NOT whole: ' + rebuild}")
    if repair and whole:
        print("nothing to repair")
    return 0 if whole else 1


def verify_command(store: str, repair: bool, progress: bool = True) -> int:
    """`genesis stores verify STORE [--repair]`: one line per scan (`ok|damaged|missing|repaired|failed
    <scan id>  <detail>`) and a summary; 0 only when the store is whole, 1 otherwise, 3 when --repair finds the
    store being written by another process. A patch store is
    verified too (`verify_patch_store`). Raises StoreError for a path that is not a store."""
    import sys

    from pipeline.volume_store.errors import StoreError, StoreLockedError
    from pipeline.volume_store.verify import verify_store

    open_tree(store).check()
    kind = store_kind(store)
    if kind == "patch-store":
        return verify_patch_store(store, repair)
    if kind != "volume-store":
        raise StoreError(f"{store} is not a volume store or patch store (no genesis store attributes in "
                         f"{store}/zarr.json)")
    try:
        checks, problems = verify_store(store, repair=repair, progress=progress)
    except StoreLockedError as exc:  # --repair: another process writes the store
        print(f"genesis stores verify: {exc}", file=sys.stderr)
        return EXIT_BUSY
    counts: dict[str, int] = {}
    for c in checks:
        counts[c.status] = counts.get(c.status, 0) + 1
    for p in problems:
        print(f"store     {p}")
    whole = not problems and all(c.status in ("ok", "repaired") for c in checks)
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no scans"
    print(f"{store}: {summary}; {'whole' if whole else 'NOT whole'}"
          + ("" if whole or repair else f" (repair with `genesis stores verify {store} --repair`)"))
    return 0 if whole else 1


def build_parser() -> argparse.ArgumentParser:
    """`python -m pipeline.stores_cli verify STORE [--repair] [--no-progress]`: `genesis stores verify` without the
    rest of the command line (what a cluster job or a cron entry runs)."""
    from pipeline.runtime.help_format import Parser, examples

    prog = "python -m pipeline.stores_cli"
    ap = Parser(prog=prog, description="check a store without the rest of the genesis command line",
                epilog=examples(f"{prog} verify demo_output/volume_store"))
    sub = ap.add_subparsers(dest="command", required=True)
    text = "check every array and table of a store, as `genesis stores verify` does"
    v = sub.add_parser("verify", help=text, description=text,
                       epilog=examples(f"{prog} verify demo_output/volume_store",
                                       f"{prog} verify demo_output/volume_store --repair --no-progress"))
    v.add_argument("store", metavar="STORE", help="a volume store or a patch store")
    v.add_argument("--repair", action="store_true",
                   help="volume stores: reconvert a damaged or missing scan from its source where that is unchanged, "
                        "else mark it failed; then rebuild the catalog (patch stores are rebuilt, never repaired)")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


if __name__ == "__main__":  # python -m pipeline.stores_cli verify STORE [--repair] [--no-progress]
    import sys

    args = build_parser().parse_args()
    from pipeline.patches.store import PatchStoreError
    from pipeline.runtime.errors import UsageError
    from pipeline.volume_store.errors import StoreError

    try:
        sys.exit(verify_command(args.store, args.repair, progress=not args.no_progress))
    except (StoreError, PatchStoreError, UsageError) as exc:
        print(f"genesis stores verify: error: {exc}", file=sys.stderr)
        sys.exit(2)
