"""Command-line flags derived from the load generator's config models, so that each default, type,
choice list and help text is written once, on the model field (LoadProfile, ServeBenchConfig), and
`bench serve`, `bench throughput`, `bench latency` and `bench compare` take them from there."""
from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _plain(annotation: Any) -> Any:
    """`X | None` -> X; a union of several types (e.g. `int | str`: a number or a distribution) -> str."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        return kinds[0] if len(kinds) == 1 else str
    return annotation


def _kind_kwargs(model: type[BaseModel], name: str) -> dict:
    """type, choices or action from the field's annotation."""
    kind = _plain(model.model_fields[name].annotation)
    if typing.get_origin(kind) is Literal:
        return {"choices": list(typing.get_args(kind))}
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    if kind in (int, float, str):
        return {"type": kind}
    raise TypeError(f"{model.__name__}.{name}: no flag type for {model.model_fields[name].annotation}; "
                    "give one in `custom`")


def add_model_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, model: type[BaseModel],
                    names: list[str], custom: dict[str, dict] | None = None) -> None:
    """`--field-name` for each field in `names`, its default and help from the field; `custom[name]`
    replaces what the annotation gives (a narrower type or choice list, nargs; a default only where
    the flag's form differs from the field's, e.g. KEY:MS strings for a dict)."""
    custom = custom or {}
    for name in names:
        field = model.model_fields[name]
        kwargs = {"dest": name, "default": field.get_default(call_default_factory=True), "help": field.description}
        kwargs |= custom[name] if name in custom else _kind_kwargs(model, name)
        parser.add_argument(flag_name(name), **kwargs)
