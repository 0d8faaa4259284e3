"""`--help` a person can use (issue 19, part 2): every option of every command line has a help line, with its default
where it has one (and no "(default: None)" noise where None means something the help says), positional arguments
are written as the README writes them, every subcommand's help ends with examples that parse, `genesis transfer
show --help` is show's own help, and `--verbose` reaches `pipeline.console` for the commands that start Ray."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import cli, console, stores_cli
from pipeline.runtime.help_format import HelpFormatter, Parser, default_text, shows_default
from pipeline.services import __main__ as services
from pipeline.services import dask_tls

REPO = Path(__file__).resolve().parents[1]
VERBOSE_COMMANDS = ("pretrain", "finetune", "transfer", "reproduce")
HIDDEN = {("genesis transfer", "show")}
"""Arguments deliberately left out of the help: transfer's older `transfer [options] show RUN_ID` spelling, which
`genesis transfer show --help` documents."""


def _walk(parser: argparse.ArgumentParser):
    """The parser and every subcommand's parser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _walk(sub)


def _all_parsers() -> list[argparse.ArgumentParser]:
    return [*_walk(cli.build_parser()), cli.transfer_show_parser(), *_walk(services.build_parser()),
            *_walk(dask_tls.build_parser()), *_walk(stores_cli.build_parser())]


def _arguments(parser: argparse.ArgumentParser):
    """The parser's own arguments, less -h and the subcommand choice."""
    return [a for a in parser._actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def _leaves() -> list[argparse.ArgumentParser]:
    return [p for p in _all_parsers()
            if not any(isinstance(a, argparse._SubParsersAction) for a in p._actions)]


@pytest.fixture
def wide(monkeypatch):
    """One line per option: argparse wraps to the terminal's COLUMNS."""
    monkeypatch.setenv("COLUMNS", "2000")


def _option_line(help_text: str, action: argparse.Action) -> str:
    """The option's entry in the help: its line, and the next one where a long invocation put the help there."""
    head = ", ".join(action.option_strings) if action.option_strings else action.metavar
    lines = help_text.splitlines()
    at = [i for i, ln in enumerate(lines)
          if ln.startswith("  ") and (ln.strip().startswith(head + " ") or ln.strip() == head)]
    assert len(at) == 1, (head, help_text)
    follow = lines[at[0] + 1] if at[0] + 1 < len(lines) else ""
    return lines[at[0]] + (" " + follow.strip() if follow.startswith("    ") else "")


def test_the_walk_sees_every_command_line():
    progs = {p.prog for p in _all_parsers()}
    assert {"genesis", "genesis convert", "genesis stores verify", "genesis patches task", "genesis transfer",
            "genesis transfer show", "genesis predict", "genesis weights import", "python -m pipeline.services env",
            "python -m pipeline.services.dask_tls start-worker", "python -m pipeline.stores_cli verify"} <= progs
    assert len(progs) >= 35, sorted(progs)


def test_every_argument_of_every_command_line_has_a_help_line():
    missing, hidden = [], set()
    for parser in _all_parsers():
        for action in _arguments(parser):
            if action.help is argparse.SUPPRESS:
                hidden.add((parser.prog, action.dest))
            elif not (action.help or "").strip():
                missing.append(f"{parser.prog} {action.option_strings or action.dest}")
    assert not missing, missing
    assert hidden == HIDDEN


def test_defaults_are_shown_where_an_option_has_one_and_said_where_it_is_none(wide):
    unsaid = []
    for parser in _leaves():
        text = parser.format_help()
        assert "(default: None)" not in text and "(default: False)" not in text, parser.prog
        for action in _arguments(parser):
            if action.help is argparse.SUPPRESS:
                continue
            line = _option_line(text, action)
            if shows_default(action):  # a real default: written beside the help, as a user would type it
                assert "default" in line and default_text(action.default) in line, (parser.prog, line)
            elif action.default is None and action.option_strings and not action.required:
                if "default" not in line:  # None must mean something the help says ("default: every task")
                    unsaid.append(f"{parser.prog} {line.strip()}")
    assert not unsaid, "\n".join(unsaid)
    # the defaults the issue names, as `genesis X --help` prints them
    workers = _option_line(_help(["convert"]), _action(["convert"], "--workers"))
    assert workers.split()[-2:] == ["(default:", "2)"]
    assert "(default: 32,64,64" not in _help(["patches", "pretrain"])  # the help writes it itself, once
    assert "(default: 100)" in _option_line(_help(["patches", "pretrain"]), _action(["patches", "pretrain"],
                                                                                   "--border-yx"))


def _sub(path: list[str]) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    for word in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


def _help(path: list[str]) -> str:
    return _sub(path).format_help()


def _action(path: list[str], option: str) -> argparse.Action:
    return next(a for a in _sub(path)._actions if option in a.option_strings)


def test_the_formatter_prints_real_defaults_only():
    p = Parser(prog="x")
    p.add_argument("--none", help="none given (default: every task)")
    p.add_argument("--flag", action="store_true", help="a flag")
    p.add_argument("--size", default=(32, 64, 64), help="a cube")
    p.add_argument("--rate", default="5%", help="a share")
    p.add_argument("--own", default=3, help="three (default 3, the reference's)")
    text = " ".join(p.format_help().split())
    assert "none given (default: every task) --flag" in text and "a flag --size" in text
    assert "a cube (default: 32,64,64)" in text and "a share (default: 5%)" in text
    assert "three (default 3, the reference's)" in text and "(default: 3)" not in text
    assert isinstance(p._get_formatter(), HelpFormatter)
    sub = p.add_subparsers().add_parser("sub", epilog="examples:\n  x sub\n  x sub --n 1")
    sub.add_argument("--n", type=int, default=2, help="n")
    assert "n (default: 2)" in sub.format_help() and sub.format_help().endswith("examples:\n  x sub\n  x sub --n 1\n")


def _examples(parser: argparse.ArgumentParser) -> list[str]:
    """The lines of the "examples:" block that ends `parser`'s help; fails when there is none."""
    lines = parser.format_help().rstrip("\n").splitlines()
    assert "examples:" in lines, f"{parser.prog}: no examples:\n" + "\n".join(lines[-5:])
    block = lines[len(lines) - lines[::-1].index("examples:"):]
    assert block and all(ln.startswith("  ") and ln.strip() for ln in block), (parser.prog, block)
    return [ln.split("  #")[0].strip() for ln in block]


_PARSE = {"genesis": cli.parse_args, "python -m pipeline.services": services.build_parser().parse_args,
          "python -m pipeline.services.dask_tls": dask_tls.build_parser().parse_args,
          "python -m pipeline.stores_cli": stores_cli.build_parser().parse_args}


def test_every_subcommands_help_ends_with_examples_that_parse():
    checked = 0
    for parser in _all_parsers():
        commands = _examples(parser)
        assert any(c.startswith(parser.prog + " ") or c == parser.prog for c in commands) or parser.prog in _PARSE, \
            (parser.prog, commands)
        for command in commands:
            words = shlex.split(command)
            prog = max((p for p in _PARSE if command.startswith(p + " ")), key=len, default=None)
            if words[0] == "make":
                assert words[1] in (REPO / "Makefile").read_text(encoding="utf-8"), command
                continue
            assert prog, command
            try:
                _PARSE[prog](words[len(prog.split()):])
            except SystemExit as exc:
                pytest.fail(f"example of {parser.prog} does not parse (exit {exc.code}): {command}")
            checked += 1
    assert checked >= 60


def test_positional_arguments_are_written_as_the_readme_writes_them():
    positionals = {}
    for parser in _all_parsers():
        for action in _arguments(parser):
            if not action.option_strings and action.help is not argparse.SUPPRESS:
                positionals[(parser.prog, action.dest)] = action.metavar
    assert all(m and m == m.upper() for m in positionals.values()), positionals
    assert {positionals[k] for k in (("genesis stores preview", "store"), ("genesis stores preview", "scan_id"),
                                     ("genesis stores list", "root"), ("genesis transfer show", "run_id"),
                                     ("genesis convert", "sources"), ("genesis patches preview", "patch_store"),
                                     ("genesis patches task", "task"), ("genesis tasks init", "dataset"),
                                     ("genesis sample-data", "dir"), ("genesis weights import", "file"))} == {
        "STORE", "SCAN_ID", "ROOT", "RUN_ID", "SOURCE", "PATCHSTORE", "TASK", "DATASET_DIR", "DIR", "FILE"}
    usage = _sub(["stores", "preview"]).format_usage()
    assert "STORE SCAN_ID" in usage and "store scan_id" not in usage


def test_transfer_show_help_is_shows_own(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["transfer", "show", "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    assert out.startswith("usage: genesis transfer show RUN_ID [--tracking-uri URI]\n"), out
    assert "--tasks" not in out and "--patches" not in out and "RUN_ID" in out and "examples:" in out
    # the grid's own help points at it, and still is the grid's
    with pytest.raises(SystemExit):
        cli.main(["transfer", "--help"])
    grid = capsys.readouterr().out
    assert "genesis transfer show RUN_ID" in grid and "--tasks" in grid and "show RUN_ID ..." not in grid
    # --debug before the command is genesis's own option and still picks show's parser
    args = cli.parse_args(["--debug", "transfer", "show", "a" * 32, "--tracking-uri", "sqlite:///x.db"])
    assert (args.command, args.show, args.tracking_uri, args.debug) == ("transfer", ["show", "a" * 32],
                                                                       "sqlite:///x.db", True)
    # the grid parses exactly as before
    grid_args = cli.parse_args(["transfer", "--patches", "p", "--tasks", "ncc", "--seeds", "0,1"])
    assert (grid_args.show, grid_args.tasks, grid_args.seeds, grid_args.patches) == ([], "ncc", (0, 1), ["p"])


def test_transfer_show_without_a_run_id_is_one_usage_line():
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "transfer", "show"], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("genesis transfer show: error:") and "RUN_ID" in lines[0], \
        done.stderr


def test_verbose_is_offered_where_ray_starts_and_reaches_the_console(monkeypatch):
    for command in VERBOSE_COMMANDS:
        (action,) = [a for a in _sub([command])._actions if "--verbose" in a.option_strings]
        assert action.help == cli.VERBOSE_HELP and action.default is False
    assert cli.VERBOSE_HELP.startswith("show Ray's and MLflow's own console output (Tune's status tables")
    for command in ("convert", "stores", "tasks", "predict", "sample-data"):  # no Ray, no option
        assert not any("--verbose" in a.option_strings for p in _walk(_sub([command])) for a in p._actions)
    seen = []
    monkeypatch.setattr(cli, "_pretrain", lambda args: seen.append(console.verbose()) or 0)
    before = console.verbose()
    assert cli.main(["pretrain", "--patches", "p", "--verbose"]) == 0
    assert cli.main(["pretrain", "--patches", "p"]) == 0
    assert seen == [True, before] and console.verbose() == before  # on for its command only
