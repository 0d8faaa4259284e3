"""YAML read as plain data with no anchors and no aliases: the one reader of task files, for the task layer and
for the task file a logged model carries.

A task file has no use for anchors (&a) or aliases (*a), and an alias is how a 300-byte file becomes a structure of
millions of nodes ("billion laughs"): harmless while shared, but every error message or copy expands it. This
module imports only `yaml`, so it travels with every logged model (`model_format.BUNDLED_FILES`)."""

from __future__ import annotations

import yaml

__all__ = ["NoAliasLoader", "safe_yaml"]


class NoAliasLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses anchors and aliases."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            kind = "alias *" if isinstance(event, yaml.AliasEvent) else "anchor &"
            raise yaml.composer.ComposerError(None, None, f"{kind}{event.anchor} is not allowed in a task file",
                                              event.start_mark)
        return super().compose_node(parent, index)


def safe_yaml(text: str):
    """Plain data of one YAML document, read with `NoAliasLoader` (no anchors, no aliases, nothing built)."""
    loader = NoAliasLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
