"""Hydra's config-composition errors as one line that points at the fix.

Hydra reports an unknown group option, an unknown key or a value of the wrong type as a wall of text
(the options, the config search path, OmegaConf's node types). `explain` turns each into one line:
what was given, what is allowed, and the closest allowed choice ("did you mean vae?").
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any, Iterable

from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import BooleanNode, EnumNode, FloatNode, IntegerNode, ListConfig, OmegaConf, StringNode
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from ae_lab.config import SCHEMAS

EXPECTED = {IntegerNode: "an integer", FloatNode: "a number", BooleanNode: "true or false",
            StringNode: "a string", ListConfig: "a list such as [64,32]"}


def closest(given: str, allowed: Iterable[str]) -> str | None:
    """The allowed name nearest to `given` (difflib), or one that `given` begins with or abbreviates."""
    allowed = list(allowed)
    near = difflib.get_close_matches(given, allowed, n=1, cutoff=0.6)
    if near:
        return near[0]
    prefixed = [name for name in allowed if given.startswith(name) or name.startswith(given)]
    return prefixed[0] if prefixed else None


def _did_you_mean(name: str | None) -> str:
    return f" (did you mean {name}?)" if name else ""


def explain(error: BaseException) -> str | None:
    """One line for a composition error of the command line; None for any other error."""
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and error.options:
        group, _, option = error.missing_cfg_file.rpartition("/")
        return (f"{group}={option} is not an option of {group}: choose one of {', '.join(error.options)}"
                f"{_did_you_mean(closest(option, error.options))}")
    sweep = re.match(r"Ambiguous value for argument '([^=']+)=([^']*)'", str(error))
    if sweep:  # a comma list on the command line of a single run
        key, values = sweep.groups()
        return (f"{key}={values} lists {len(values.split(','))} values, which is a sweep: a sweep needs -m "
                f"(python -m ae_lab -m {key}={values} ...)")
    cause = error.__cause__ if isinstance(error, ConfigCompositionException) else error
    if not isinstance(cause, OmegaConfBaseException) or not getattr(cause, "full_key", None):
        return None
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
        return _unknown_key(cause.full_key, cause.parent_node)
    if isinstance(cause, ValidationError):
        return _wrong_value(cause.full_key, cause.value, cause.child_node)
    return None


def _unknown_key(full_key: str, parent: Any) -> str:
    """An unknown key: the closest key of its section, else of another option of its group (a key of
    `noise=masking` given with `noise=none`)."""
    section, _, key = full_key.rpartition(".")
    keys = [str(name) for name in parent.keys()] if parent is not None else []
    where = f"of {section}" if section else "at the top level"
    near = closest(key, keys)
    if near:
        return f"{full_key} is not a key {where} (did you mean {section + '.' if section else ''}{near}?)"
    owners: dict[str, list[str]] = {}
    options = SCHEMAS.get(section, {})
    for option, schema in options.items():
        for field in dataclasses.fields(schema):
            owners.setdefault(field.name, []).append(f"{section}={option}")
    near = closest(key, [name for name in owners if name not in keys])
    if near == key:  # a key of another option: the chosen option's own keys are the likelier fix
        chosen = next((option for option, schema in options.items() if schema is OmegaConf.get_type(parent)), None)
        shared = set.intersection(*({field.name for field in dataclasses.fields(schema)} for schema in options.values()))
        own = [name for name in keys if name not in shared]
        fix = (f"did you mean {section}.{own[0]}? " if len(own) == 1
               else f"its keys are {', '.join(own)}; " if own else "")
        return (f"{full_key} is not a key of {section}={chosen} ({fix}{full_key} is a key of "
                f"{' and '.join(owners[near])})")
    if near:
        return (f"{full_key} is not a key {where} (did you mean {section}.{near}? it is a key of "
                f"{' and '.join(owners[near])})")
    return f"{full_key} is not a key {where}: its keys are {', '.join(keys)}"


def _wrong_value(full_key: str, value: Any, node: Any) -> str:
    """A value of the wrong type: the key and the type (or the choices) it takes."""
    if isinstance(node, EnumNode):
        choices = [member.name for member in node.enum_type]
        return (f"{full_key}={value} is not allowed: {full_key} is one of {', '.join(choices)}"
                f"{_did_you_mean(closest(str(value), choices))}")
    expected = next((text for kind, text in EXPECTED.items() if isinstance(node, kind)), None)
    if expected is None:
        return f"{full_key}={value} is not allowed: {full_key} takes a value of another type"
    return f"{full_key}={value} is not allowed: {full_key} takes {expected}"
