"""The command line sits on top of the package: the names it gives runs come from a static tree below it, the
options several subcommands share come from one place each, and `genesis reproduce` runs the stages themselves
(never the command line), ending each step as its command would."""

from __future__ import annotations

import argparse

import pytest

from pipeline.cli import build_parser
from pipeline.reproduce import StepFailed, Walkthrough
from pipeline.runtime.tracking import COMMANDS, entry_point


def _tree(parser: argparse.ArgumentParser) -> dict:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {name: _tree(sub) for name, sub in action.choices.items()}
    return {}


def test_the_parsers_subcommand_tree_is_the_static_one_runs_are_named_by():
    assert _tree(build_parser()) == COMMANDS
    assert entry_point(["genesis", "patches", "task", "ncc", "--store", "s"]) == "genesis patches task"


def test_shared_options_keep_each_subcommands_own_defaults():
    parse = build_parser().parse_args
    runs = {"pretrain": parse(["pretrain", "--patches", "p"]),
            "finetune": parse(["finetune", "--task", "ncc", "--patches", "p"]),
            "transfer": parse(["transfer", "--patches", "p"])}
    assert {c: a.experiment for c, a in runs.items()} == {"pretrain": "genesis-pretraining",
                                                          "finetune": "genesis-finetune",
                                                          "transfer": "genesis-transfer"}
    assert {c: a.max_failures for c, a in runs.items()} == {"pretrain": 3, "finetune": 1, "transfer": 1}
    assert (runs["pretrain"].workers, runs["finetune"].workers) == (2, 1)
    for args in runs.values():
        assert (args.ray_address, args.tracking_uri, args.storage_path, args.name) == (None,) * 4
    dask = [parse(["convert", "src", "--store", "s"]), parse(["patches", "pretrain", "--store", "v"]),
            parse(["patches", "task", "ncc", "--store", "v"])]
    assert all((a.workers, a.dask_scheduler, a.no_progress) == (2, None, False) for a in dask)


def test_a_reproduce_step_ends_as_its_command_would(capsys):
    steps = Walkthrough()
    done = steps.run("a stage", ["tasks", "list"], lambda: "result")
    assert (done.code, done.result, done.error) == (0, "result", None)

    def no_case():
        raise RuntimeError("no usable case")

    left_out = steps.run("a task store", ["patches", "task", "ncc", "--store", "v"], no_case, allowed=(0, 1))
    assert left_out.code == 1 and isinstance(left_out.error, RuntimeError) and left_out.result is None
    out, err = capsys.readouterr()
    assert "=== 1. a stage\n$ genesis tasks list\n--- 1. a stage: exit 0 in" in out
    assert "$ genesis patches task ncc --store v\n--- 2. a task store: exit 1 in" in out
    assert err == "genesis patches task: failed: RuntimeError: no usable case\n"

    def bad_input():
        raise ValueError("--store v: is a file")

    with pytest.raises(StepFailed, match=r"^genesis convert src --store v exited 2$"):
        steps.run("convert", ["convert", "src", "--store", "v"], bad_input)
    assert capsys.readouterr().err == "genesis convert: error: --store v: is a file\n"
    with pytest.raises(StepFailed, match="exited 1$"):
        steps.run("pretrain", ["pretrain", "--patches", "p"], lambda: "failed", lambda _: 1)
