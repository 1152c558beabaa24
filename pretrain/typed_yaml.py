"""Typed, strict YAML for configuration files: read YAML that means what it says, apply dotted
``key=value`` overrides, and build a tree of dataclasses checked against their type hints.

Nothing here knows the recipe's schema (``pretrain.recipe`` holds it). Every error is one
``ConfigError`` line starting with the dotted key, e.g. ``optim.lr: expected a float, got 'abc' (str)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import reprlib
import types
from typing import Any, Literal, Mapping, Sequence, Union, get_args, get_origin, get_type_hints

import yaml

from .model.config import ConfigError


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float (YAML 1.1 wants ``1.0e-4``, YAML 1.2 does not),
    and refuses what plain PyYAML would silently read otherwise than written: a key given twice (it
    keeps the last) and YAML 1.1's octal and base-60 numbers (``010`` is 8, ``1:30`` is 90)."""

    def compose_mapping_node(self, anchor: Any) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)
        seen = set()
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue  # a merge (<<) may be overridden by a key of the mapping: that is its purpose
            if (key.tag, key.value) in seen:
                raise yaml.composer.ComposerError(
                    None, None, f"duplicate key {key.value!r}: write each key once (the last would silently "
                    "replace the others)", key.start_mark)
            seen.add((key.tag, key.value))
        return node

    def _refuse_ambiguous_number(self, node: yaml.ScalarNode) -> None:
        text = node.value.replace("_", "")
        if ":" in text or re.fullmatch(r"[-+]?0[0-7]+", text):
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value!r} reads as a YAML 1.1 octal or base-60 number (010 is 8, 1:30 is 90); "
                "write the number in plain decimal, or quote it for a string", node.start_mark)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        self._refuse_ambiguous_number(node)
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # Python refuses to parse an int of more than 4300 digits
            raise yaml.constructor.ConstructorError(
                None, None, f"the number {node.value[:20]}... has too many digits", node.start_mark) from None

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        self._refuse_ambiguous_number(node)
        return super().construct_yaml_float(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _Loader.construct_yaml_float)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that knows the same rule, so it quotes a string such as ``"1e5"`` to keep it a string."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )


def parse_yaml(text: str, context: str) -> Any:
    """``text`` read with ``_Loader``; any failure is one ``ConfigError`` line starting with ``context``."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{context}: {_one_line(exc)}") from None
    except RecursionError:  # PyYAML's parser recurses once per nesting level
        raise ConfigError(f"{context}: nested too deeply") from None


def _one_line(exc: yaml.YAMLError) -> str:
    """PyYAML's message without the quoted source lines it spreads over several lines."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if problem.startswith("but ") and getattr(exc, "context", None):  # "but found another document"
        problem = f"{exc.context}, {problem}"
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"



def dump_yaml(data: Any) -> str:
    """Plain data as YAML that ``parse_yaml`` reads back equal (key order kept)."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


def apply_override(data: dict[str, Any], override: str) -> None:
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\[\d+\]|\.\w+)*", key):
        raise ConfigError(f"{override}: an override looks like section.key=value, e.g. optim.lr=2e-5")
    value = parse_yaml(raw, f"{key}: the override value {_short(raw)} is not valid YAML")
    # "data.ratio[1].text" and "data.ratio.1.text" both give ["data", "ratio", 1, "text"].
    parts: list[str | int] = [
        int(index or name) if (index or name.isdigit()) else name
        for name, index in re.findall(r"(\w+)|\[(\d+)\]", key)
    ]
    node: Any = data
    for depth, part in enumerate(parts):
        here, parent = _dotted(parts[: depth + 1]), _dotted(parts[:depth]) or "the recipe"
        last = depth == len(parts) - 1
        if isinstance(node, list) and isinstance(part, int):
            if part >= len(node):
                raise ConfigError(f"{here}: {parent} is a list of {len(node)} items; use an index below it")
        elif isinstance(node, dict) and isinstance(part, str):
            if not last:
                node.setdefault(part, {})  # a section the file leaves to its defaults
        else:
            raise ConfigError(f"{here}: cannot index {parent} ({type(node).__name__}) with {part!r}")
        if last:
            node[part] = value
        else:
            node = node[part]


def _dotted(parts: Sequence[str | int]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# A wrong value is quoted in its error line, shortened: a long string or a YAML alias bomb (lists
# of aliased lists, 10**9 items for 100 bytes of text) would otherwise be printed whole.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 2, 60, 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4


def _short(value: Any) -> str:
    return _REPR.repr(value)


def _describe(tp: Any) -> str:
    """A type hint in words, for error messages."""
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in get_args(tp))
    if origin is list:
        return "a list"
    if origin is tuple:
        return f"a list of {len(get_args(tp))} items"
    if dataclasses.is_dataclass(tp):
        return "a mapping of keys"
    return {bool: "a bool (true/false)", int: "an int", float: "a float", str: "a string"}.get(tp, str(tp))


def convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the type hint ``tp`` and return it in that type; ``key`` is its dotted key."""
    origin, args = get_origin(tp), get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(value, tp, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if value is not None and len(options) == 1:
            return convert(value, options[0], key)
    elif origin is Literal:
        # Compare types too: YAML's ``true`` must not match a literal 1.
        if any(value == a and type(value) is type(a) for a in args):
            return value
    elif origin is list and isinstance(value, list):
        return [convert(item, args[0], f"{key}[{i}]") for i, item in enumerate(value)]
    elif origin is tuple and isinstance(value, (list, tuple)) and len(value) == len(args):
        return tuple(convert(item, a, f"{key}[{i}]") for i, (item, a) in enumerate(zip(value, args)))
    # bool is a subclass of int in Python; a recipe that says ``true`` for a count is a mistake.
    elif tp is bool and isinstance(value, bool):
        return value
    elif tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key}: expected {_describe(tp)}, got {_short(value)} ({type(value).__name__})")


def _build_dataclass(value: Any, cls: type, key: str) -> Any:
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"{key or 'recipe'}: expected a mapping of keys, got {_short(value)} ({type(value).__name__})")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = get_type_hints(cls)
    for name in value:
        if name not in fields:
            close = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = f"did you mean {close[0]}?" if close else f"valid keys are {', '.join(fields)}"
            raise ConfigError(f"{_join(key, str(name))}: unknown key; {hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in value:
            kwargs[name] = convert(value[name], hints[name], _join(key, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(key, name)}: missing; the recipe must set it")
    return cls(**kwargs)


def to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value
