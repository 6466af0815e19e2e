"""CLI flags made from the config's own definitions: one definition per option (config.py), used by YAML,
`key=value` overrides, these flags and the Python API.

`sections(cfg=(AuditConfig, fields), ...)` gives a command one flag per field of each config section (`--max-new-
tokens` for `max_new_tokens`, with the field's default and description) and passes the command the validated
section object instead; a bad value is an error naming its flag. `flag` and `described` make single flags.
"""

from __future__ import annotations

import functools
import inspect
import typing
from typing import Annotated, Literal, Optional

import typer
from pydantic import BaseModel, ValidationError

from ..config import DataConfig
from .common import fail

# the data options a data-reading command takes as flags (train-only keys and file lists stay in the config)
DATA_FLAGS = ("format", "template", "max_length", "truncation", "loss_on", "prompt_loss_weight", "strip", "task_map",
              "task_field", "skip_invalid", "dedup", "train_reasoning", "tools")


def _decls(name: str, decls: tuple[str, ...]) -> tuple[str, ...]:
    return decls or (f"--{name.replace('_', '-')}",)


def _default(field):
    return field.default_factory() if field.default_factory else field.default


def flag(section: type[BaseModel], name: str, *decls: str, **kwargs):
    """A typer option whose default and help are the config field's own."""
    field = section.model_fields[name]
    return typer.Option(_default(field), *_decls(name, decls), help=field.description, **kwargs)


def described(section: type[BaseModel], name: str, *decls: str, **kwargs):
    """The same for an `Annotated` option (the default goes in the signature)."""
    return typer.Option(*_decls(name, decls), help=section.model_fields[name].description, **kwargs)


def _cli_type(annotation):
    """The type typer parses a field's flag as: Literal choices as str (pydantic checks the choice)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        return str
    if type(None) in args and len(args) == 2:
        inner = _cli_type(next(a for a in args if a is not type(None)))
        return Optional[inner]
    return annotation


def build(section: type[BaseModel], values: dict, fixed: dict | None = None) -> BaseModel:
    """The section from flag values (plus `fixed` values the command sets), validated; errors name the flag."""
    try:
        return section(**values, **(fixed or {}))
    except ValidationError as e:
        raise ValueError("; ".join(f"--{'.'.join(map(str, err['loc'])).replace('_', '-')}: {err['msg']}"
                                   if err["loc"] else err["msg"].removeprefix("Value error, ")
                                   for err in e.errors())) from None


def sections(**spec: tuple[type[BaseModel], tuple[str, ...]] | tuple[type[BaseModel], tuple[str, ...], dict]):
    """Decorator: for each `arg=(Section, fields[, fixed])`, one flag per field, and the command called with
    `arg=Section(**flags, **fixed)`. Field names must be unique across the sections of one command."""
    def wrap(fn):
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name not in spec]
        added = []
        for section, fields, *_ in spec.values():
            for name in fields:
                f = section.model_fields[name]
                flag_name = name.replace("_", "-")
                decls = (f"--{flag_name}/--no-{flag_name}",) if f.annotation is bool else ()  # both ways
                added.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=_default(f),
                                               annotation=Annotated[_cli_type(f.annotation),
                                                                    described(section, name, *decls)]))

        @functools.wraps(fn)
        def command(**kwargs):
            try:
                built = {arg: build(section, {n: kwargs.pop(n) for n in fields}, *rest)
                         for arg, (section, fields, *rest) in spec.items()}
            except ValueError as e:
                fail(str(e))
            return fn(**kwargs, **built)

        params = own + added
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command
    return wrap


CACHE_FLAGS = ("cache", "cache_dir", "num_workers")  # commands that read prepared data (data prepare, inspect)


def data_flags(fixed: dict | None = None, skip: tuple[str, ...] = (), cache: bool = False) -> tuple:
    """The `sections` entry of the data options: every data flag except `skip` and those `fixed` by the command
    (with `cache`, the prepared-data flags too)."""
    fixed = fixed or {}
    names = DATA_FLAGS + (CACHE_FLAGS if cache else ())
    return (DataConfig, tuple(n for n in names if n not in fixed and n not in skip), fixed)
