"""The package's floors (README "Architecture"), checked on every import the code makes, including imports inside
functions: a module imports only from its own floor or the floors below, nothing imports the command line, no
two files import each other through any chain, MLflow is imported only by the Tracker and the logged-model
format, and no Ray or MLflow private module or attribute is used."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"

FLOORS: list[tuple[str, set[str]]] = [
    ("runtime", {"runtime", "cluster", "services", "storage", "epoch_stats", "peak_memory"}),
    ("models", {"models", "model_io", "model_format"}),
    ("data and tasks", {"ingest", "volume_store", "patches", "data", "tasks", "transforms", "sample_data",
                        "evaluation", "degenerate"}),
    ("stages", {"training", "finetune", "transfer", "predict"}),
    ("top", {"cli", "console", "reproduce", "demo", "stores_cli", "predict_cli", "__init__"}),
]
FLOOR = {group: level for level, (_, groups) in enumerate(FLOORS) for group in groups}
MLFLOW_ALLOWED = {"runtime/tracking.py", "model_io/model_format.py"}


def _group(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] != "pipeline":
        return None
    path = PACKAGE.parent.joinpath(*parts)
    if (path / "__init__.py").exists():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").exists() else None


def _imports(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, module, imported name or None) of every import statement in the file, resolved to absolute names."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    inside = PACKAGE in path.parents
    me = ".".join(("pipeline",) + path.relative_to(PACKAGE).with_suffix("").parts) if inside else path.stem
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            out += [(node.lineno, base, a.name) for a in node.names]
    return out


def _edges() -> dict[Path, set[Path]]:
    edges = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        targets = set()
        for _, module, name in _imports(path):
            target = (_module_file(f"{module}.{name}") if name else None) or _module_file(module)
            if target is not None and target != path:
                targets.add(target)
        edges[path] = targets
    return edges


def test_every_module_has_a_floor_and_imports_only_downward():
    edges = _edges()
    unplaced = sorted({_group(p) for p in edges} - set(FLOOR))
    assert not unplaced, f"give these a floor in FLOORS (and the README's Architecture table): {unplaced}"
    upward = [f"{a.relative_to(PACKAGE)} ({FLOORS[FLOOR[_group(a)]][0]}) imports {b.relative_to(PACKAGE)} "
              f"({FLOORS[FLOOR[_group(b)]][0]})"
              for a, targets in edges.items() for b in targets if FLOOR[_group(b)] > FLOOR[_group(a)]]
    assert not upward, upward


def test_no_import_cycle_and_nothing_imports_the_command_line():
    edges = _edges()
    cli = PACKAGE / "cli.py"
    assert not [p for p, targets in edges.items() if cli in targets]
    state: dict[Path, int] = {}  # 1 on the path being walked, 2 done

    def walk(node: Path, trail: list[Path]) -> None:
        state[node] = 1
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(str(p.relative_to(PACKAGE)) for p in cycle))
            if nxt not in state:
                walk(nxt, trail + [nxt])
        state[node] = 2

    for start in edges:
        if start not in state:
            walk(start, [start])


def test_mlflow_only_in_the_tracker_and_the_model_format_and_no_private_internals():
    private = re.compile(r"\b(ray|mlflow)(\.\w+)*\.(_\w+)")
    found = []
    for path in sorted(PACKAGE.rglob("*.py")) + sorted(PACKAGE.parent.joinpath("tests").rglob("*.py")):
        in_package = PACKAGE in path.parents
        for line, module, name in _imports(path):
            top = module.split(".")[0]
            if in_package and top == "mlflow" and str(path.relative_to(PACKAGE)) not in MLFLOW_ALLOWED:
                found.append(f"{path.name}:{line} imports {module}")
            if top in ("ray", "mlflow") and (re.search(r"\._", "." + module) or (name or "").startswith("_")):
                found.append(f"{path.name}:{line} imports a private {module}.{name}")
        text = path.read_text(encoding="utf-8")
        for match in private.finditer(text):
            found.append(f"{path.name}:{text[: match.start()].count(chr(10)) + 1} uses {match.group(0)}")
    assert not found, found
