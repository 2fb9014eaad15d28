"""Strict typed configuration: YAML text -> frozen dataclasses, `--set key=value` overrides, and the keys where
two configurations differ. The machinery under medtricks.recipe, which holds the schema (the dataclasses) and the
loaders.

Written here rather than with pydantic or dacite: about 140 lines, no dependency, and every error worded for a
recipe user (the dotted key, the value, the expected type or the valid keys).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any

import yaml

from medtricks.errors import RecipeError, short


def plain(value):
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` (int, float, str, bool, dict, tuple[str, ...], X | None,
    a nested dataclass) and return it in that type; raise RecipeError naming the key otherwise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return coerce(value, inner, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(f"recipe key '{key}' must be a mapping of {field_names(tp)}, got {short(value)}.")
        return build_dataclass(tp, value, key)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise RecipeError(f"recipe key '{key}' must be a list, got {short(value)}.")
        (inner, _) = typing.get_args(tp)
        return tuple(coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is float and (isinstance(value, int | float) and not isinstance(value, bool)
                        or isinstance(value, str) and _FLOAT.fullmatch(value.strip())):  # YAML 1.1: 1e-3 is a str
        if not math.isfinite(float(value)):
            raise RecipeError(f"recipe key '{key}' = {short(value)}: give a finite number.")
        return float(value)
    if tp is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # class names such as 0..4 for DR grades
    if tp is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise RecipeError(f"recipe key '{key}' must be a mapping, got {short(value)}.")
        if origin is dict:
            _, inner = typing.get_args(tp)
            return {str(k): coerce(v, inner, f"{key}.{k}") for k, v in value.items()}
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool) and not -2**32 < value < 2**32:
        # no count or seed of a recipe is this large; torch's samplers fail past 2^63 with a traceback
        raise RecipeError(f"recipe key '{key}' = {short(value)} is out of range: give a whole number below 2^32.")
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise RecipeError(f"recipe key '{key}' = {short(value)} has the wrong type: expected {_type_name(tp)}.")


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def build_dataclass(cls, raw: dict, prefix: str = ""):
    """Build the frozen dataclass `cls` from a mapping, strictly: unknown keys and wrong types are errors."""
    hints = typing.get_type_hints(cls)
    names = field_names(cls)
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise RecipeError(f"unknown recipe key '{full}'; valid keys here: {', '.join(names)}.")
        kwargs[key] = coerce(value, hints[key], full)
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in kwargs]
    if missing:
        where = ", ".join(f"'{prefix}.{name}'" if prefix else f"'{name}'" for name in missing)
        raise RecipeError(f"recipe key {where} is required here.")
    return cls(**kwargs)


MAX_DEPTH = 32  # nesting of a YAML value; a recipe needs 4 (tricks.bn_reset[0].stages[0])


class _RepeatedKey(Exception):
    """A key given twice in one mapping (raised by _UniqueKeyLoader, named by parse_yaml)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, list | dict):
                continue  # unhashable: construct_mapping names it
            if key in seen:
                raise _RepeatedKey(f"the key {short(key)} is given twice in one section (line "
                                   f"{key_node.start_mark.line + 1}); keep one.")
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, where: str):
    """YAML text as plain data (safe_load), refusing what a recipe never needs and an attacker could use: aliases
    (`*name`: a few lines of nested aliases expand to billions of items, "billion laughs"), nesting deeper than
    MAX_DEPTH (PyYAML's composer recurses once per level: RecursionError) and a key given twice in one mapping
    (the last one would win silently).

    Raises:
        RecipeError: invalid YAML, an alias, deep nesting or a repeated key, naming `where`.
    """
    try:
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise RecipeError(f"{where}: uses the YAML alias *{event.anchor}; write the value out instead "
                                  f"(aliases can expand without bound).")
            depth += isinstance(event, yaml.CollectionStartEvent) - isinstance(event, yaml.CollectionEndEvent)
            if depth > MAX_DEPTH:
                raise RecipeError(f"{where}: nests lists or mappings more than {MAX_DEPTH} deep (line "
                                  f"{event.start_mark.line + 1}); a recipe needs a handful of levels.")
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except _RepeatedKey as exc:
        raise RecipeError(f"{where}: {exc}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{where}: not valid YAML ({short(str(exc), 300)}).") from exc


def set_key(raw: dict, assignment: str) -> None:
    """Apply one `--set a.b.c=value` override in place; the value is parsed as YAML (`null` turns a trick off)."""
    if "=" not in assignment:
        raise RecipeError(f"--set {short(assignment)}: expected KEY=VALUE, e.g. --set data.image_size=128.")
    key, text = assignment.split("=", 1)
    parts = key.strip().split(".")
    value = parse_yaml(text, f"--set {short(assignment)}")
    node = raw
    for part in parts[:-1]:
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise RecipeError(f"--set {short(assignment)}: '{part}' is not a section.")
        node = node[part]
    if value is None and parts[0] == "tricks":
        node.pop(parts[-1], None)  # a trick is on when present: null removes it
    else:
        node[parts[-1]] = value


def recipe_differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two plain-data recipes (Recipe.to_dict(), recipe.yaml) differ, e.g. ["train.lr"]."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in dict.fromkeys([*a, *b])
                for k in recipe_differences(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else str(key))]
    return [] if a == b else [prefix or "(top level)"]
