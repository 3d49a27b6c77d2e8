"""JSON and YAML mappings read strictly: a key given twice in one mapping is an error, not "last wins"."""

from __future__ import annotations

import json

import yaml


class DuplicateKey(ValueError):
    """A mapping names the same key twice."""


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(f"key {key!r} appears twice in one mapping; keep one")
        out[key] = value
    return out


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load (no tags that run code) that refuses duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise DuplicateKey(
                    f"key {key!r} appears twice in one mapping (line {key_node.start_mark.line + 1}); keep one"
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse_mapping_text(text: str, json_format: bool):
    """json.loads / yaml.safe_load, refusing duplicate keys (DuplicateKey, a ValueError)."""
    if json_format:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
