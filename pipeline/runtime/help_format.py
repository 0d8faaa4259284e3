"""argparse help a person can use: each option's default beside its help line, and descriptions and "examples:"
blocks printed as written.

It lives in `runtime` because every command line shares it: `genesis` at the top, and the service launchers
(`python -m pipeline.services`, `python -m pipeline.services.dask_tls`), which sit in runtime themselves.
"""

from __future__ import annotations

import argparse

__all__ = ["HelpFormatter", "Parser", "default_text", "examples", "shows_default"]


def shows_default(action: argparse.Action) -> bool:
    """Whether `action`'s default is worth printing: a value the option really takes when it is not given. Not a
    flag's False (nargs 0: --repair, --help), not None (its meaning belongs in the help text: "default: every task"),
    not a suppressed default, and not a required positional (it has no default)."""
    if action.nargs == 0 or action.default is None or action.default is argparse.SUPPRESS:
        return False
    return bool(action.option_strings) or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)


def default_text(value: object) -> str:
    """A default as a user types it: a tuple (32, 64, 64) as 32,64,64, a path as written."""
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """ArgumentDefaultsHelpFormatter without its noise: it would print "(default: None)" beside options whose None
    means something the help already says, "(default: False)" beside every flag, and a tuple as Python writes it.
    A help text that already names its default ("default 0,1,2: ...") is left as written. Descriptions and epilogs
    keep their line breaks, so the examples read as commands."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not shows_default(action) or "default" in text.lower():
            return text
        # argparse %-formats the help (%(prog)s, %(default)s): a literal % in the default must be doubled
        return f"{text} (default: {default_text(action.default).replace('%', '%%')})"


def examples(*commands: str) -> str:
    """An epilog that ends a subcommand's help: "examples:" and the commands, one per line."""
    return "examples:\n" + "\n".join(f"  {c}" for c in commands)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help uses `HelpFormatter`, and whose subcommands' help does too: argparse builds a
    subcommand's parser with the parent's class but not its formatter, so the class carries the formatter."""

    def __init__(self, *args, formatter_class: type[argparse.HelpFormatter] = HelpFormatter, **kwargs) -> None:
        super().__init__(*args, formatter_class=formatter_class, **kwargs)
