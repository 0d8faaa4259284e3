"""The README leads a newcomer and its links hold: the contents list is the user's path in order, every relative
link of README.md and docs/*.md reaches a file of the repository (and a heading, when it names one), nothing points
outside the repository, and docs/cli.md is the parser's help, complete and regenerated (so it cannot rot)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"

USER_PATH = ["The demo", "Reading the results", "Your own data", "Pretraining at full size on a GPU", "On a cluster",
             "Stores and their contracts", "Stores in a bucket", "Reliability", "Differences from the reference"]
"""The sections a user walks, in this order (issue 19 section 1); each heading starts with its entry."""

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
LINK = re.compile(r"(?<!!)\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
NOTES_OUTSIDE = re.compile(r"\.\./shared|shared/DESIGN\.md|MODELS_GENESIS\.md|shared/STYLE\.md")
"""The project's design notes live beside the checkout, not in a clone: nothing may send a reader there."""


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code spans, where a `[x](y)` is text, not a link."""
    text = FENCE.sub("", text)
    return re.sub(r"(`+)(?:(?!\1).)+?\1", "", text, flags=re.S)


def slug(title: str, seen: dict[str, int]) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped (word characters, '-' and spaces kept), spaces to
    '-'; a repeated anchor gets -1, -2, ..."""
    base = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
    n = seen.get(base, 0)
    seen[base] = n + 1
    return base if n == 0 else f"{base}-{n}"


def headings(path: Path) -> list[tuple[int, str, str]]:
    """(level, title, anchor) of every heading of a Markdown file, code blocks left out."""
    seen: dict[str, int] = {}
    return [(len(m.group(1)), m.group(2), slug(m.group(2), seen))
            for m in HEADING.finditer(FENCE.sub("", path.read_text(encoding="utf-8")))]


def links(path: Path) -> list[str]:
    return [m.group("target") for m in LINK.finditer(prose(path.read_text(encoding="utf-8")))]


def cli_reference():
    spec = importlib.util.spec_from_file_location("cli_reference", DOCS / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_slug_follows_githubs_rules():
    seen: dict[str, int] = {}
    assert slug("Transfer grid (`genesis transfer`, `jobs/transfer.py`)", seen) == \
        "transfer-grid-genesis-transfer-jobstransferpy"
    assert slug("The demo: `make demo`", seen) == "the-demo-make-demo"
    assert slug("Fine-tuning one task", seen) == "fine-tuning-one-task"
    assert [slug("Notes", seen), slug("Notes", seen)] == ["notes", "notes-1"]


def test_contents_is_the_users_path_in_order():
    text = README.read_text(encoding="utf-8")
    level_two = [(title, anchor) for level, title, anchor in headings(README) if level == 2]
    assert level_two[0][0] == "Contents", "the README's first section is its contents list"
    contents = text.split("## Contents", 1)[1].split("\n## ", 1)[0]
    entries = re.findall(r"^\d+\. \[(?P<text>[^\]]+)\]\(#(?P<anchor>[^)]+)\)", contents, re.M)
    assert len(entries) == len(USER_PATH), f"the contents list numbers the {len(USER_PATH)} steps: {entries}"
    by_anchor = dict((anchor, title) for title, anchor in level_two)
    for (_, anchor), step in zip(entries, USER_PATH):
        assert anchor in by_anchor, f"contents entry #{anchor} names no section of the README"
        assert by_anchor[anchor].startswith(step), f"#{anchor} is {by_anchor[anchor]!r}, the path's step is {step!r}"
    # the path comes first: right after the contents, before any reference material
    assert [anchor for _, anchor in level_two[1:1 + len(USER_PATH)]] == [anchor for _, anchor in entries]
    assert text.index("## Contents") < 40 * 80, "the contents list is near the top"


def link_problems(page: Path, root: Path) -> list[str]:
    """What is wrong with the links of `page`: not relative, outside `root`, no such file, no such heading."""
    problems = []
    for target in links(page):
        if re.match(r"https?://", target):
            continue  # a web page, not a path of the checkout
        where = f"{page.relative_to(root)}: ({target})"
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("/"):
            problems.append(f"{where} is not a relative link")
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.is_relative_to(root):
            problems.append(f"{where} points outside the repository")
        elif not file.exists():
            problems.append(f"{where}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in {a for _, _, a in headings(file)}:
            problems.append(f"{where}: {file.relative_to(root)} has no heading #{anchor}")
    return problems


def test_every_link_resolves_inside_the_repository():
    problems = [problem for page in pages() for problem in link_problems(page, REPO)]
    assert not problems, "\n".join(problems)


def test_the_link_check_finds_broken_links(tmp_path):
    """The check above is not vacuous: each kind of bad link is named, a good one is not."""
    repo = tmp_path / "repo"
    (repo / "docs").mkdir(parents=True)
    (tmp_path / "outside.md").write_text("# Outside\n", encoding="utf-8")
    (repo / "docs" / "a.md").write_text("# A page\n\n## The part (`x`)\n", encoding="utf-8")
    page = repo / "README.md"
    page.write_text("# Top\n[ok](docs/a.md#the-part-x) [here](#top) [web](https://example.org) `[code](nowhere.md)`\n"
                    "[gone](docs/b.md) [anchor](docs/a.md#the-whole) [up](../outside.md) [abs](file:///etc/passwd)\n"
                    "```\n[fenced](nowhere.md)\n```\n", encoding="utf-8")
    found = link_problems(page.resolve(), repo.resolve())
    assert len(found) == 4, found
    assert [f.split(": (", 1)[1].split(")", 1)[0] for f in found] == \
        ["docs/b.md", "docs/a.md#the-whole", "../outside.md", "file:///etc/passwd"]


def test_no_path_points_outside_the_repository():
    problems = []
    for page in pages():
        for token in re.findall(r"(?<![\w.])(?:\.\./)+[\w./-]*", page.read_text(encoding="utf-8")):
            if not (page.parent / token).resolve().is_relative_to(REPO):
                problems.append(f"{page.relative_to(REPO)}: {token}")
    assert not problems, "outside the repository:\n" + "\n".join(problems)


def test_nothing_sends_a_reader_to_the_design_notes_outside_the_repository():
    """The design notes beside the checkout are not in a clone; docs/design.md is the repository's copy."""
    problems = []
    texts = [p for folder in ("pipeline", "jobs", "deploy", "tests", "benchmarks", "storage_schemas", "docs")
             for p in (REPO / folder).rglob("*") if p.suffix in (".py", ".md", ".yaml", ".sh", ".json", ".txt")]
    for path in [*texts, README, REPO / "Makefile", *REPO.glob("*.yaml")]:
        if path == Path(__file__).resolve() or "__pycache__" in path.parts:
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if NOTES_OUTSIDE.search(line):
                problems.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not problems, "refers to notes outside the repository (docs/design.md is ours):\n" + "\n".join(problems)


def test_the_synopsis_names_every_command_and_where_the_options_are():
    synopsis = README.read_text(encoding="utf-8").split("## The command line", 1)[1].split("\n## ", 1)[0]
    assert "docs/cli.md" in synopsis
    lines = [line.strip() for line in synopsis.splitlines()]
    ref = cli_reference()
    leaves = [path for path, parser in ref.tree() if len(path) > 1 and not ref.has_subcommands(parser)]
    missing = [" ".join(path) for path in leaves if not any(line.startswith(" ".join(path) + " ") for line in lines)]
    assert not missing, f"the README's synopsis lacks {missing}"


def missing_from_reference(text: str) -> list[str]:
    """Each command without its section in a docs/cli.md text, and each long option missing from its section."""
    ref = cli_reference()
    sections = dict(re.findall(r"^## (genesis[^\n]*)\n(.*?)(?=^## |\Z)", text, re.M | re.S))
    missing = []
    for path, parser in ref.tree():
        name = " ".join(path)
        if name not in sections:
            missing.append(f"section {name}")
            continue
        missing += [f"{name} {opt}" for opt in sorted(ref.long_options(parser))
                    if not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", sections[name])]
    return missing


def test_cli_md_holds_every_long_option_of_every_subcommand():
    missing = missing_from_reference((DOCS / "cli.md").read_text(encoding="utf-8"))
    assert not missing, f"docs/cli.md lacks: {missing} (run .venv/bin/python docs/cli_reference.py)"


def test_the_option_check_finds_what_a_page_lacks():
    """The check above is not vacuous: a page without one option, or without a command's section, is caught."""
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    transfer = text.split("\n## genesis transfer\n", 1)[1].split("\n## ", 1)[0]
    assert "genesis transfer --per-trial" in missing_from_reference(
        text.replace(transfer, transfer.replace("--per-trial", "--per-triad")))
    assert "section genesis tasks init" in missing_from_reference(text.replace("## genesis tasks init\n", "## x\n"))


def test_cli_md_is_what_the_generator_writes_now():
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    assert text == cli_reference().render(), "docs/cli.md is out of date: run .venv/bin/python docs/cli_reference.py"
