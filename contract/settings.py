"""Settings as data: frozen dataclasses whose fields are command-line flags with environment-variable twins.

    @dataclass(frozen=True)
    class BatchSettings:
        max_batch_size: int = setting(64, "rows per onnxruntime run, at most", minimum=1)

        def __post_init__(self) -> None:
            check_settings(self)

A field made by `setting` is defined once: its type, default, help line and bounds. From that one
definition come the flag (`--max-batch-size`), the environment variable (`VAE_MAX_BATCH_SIZE` for the
server's prefix `VAE_`), the parsing of text by the field's type (int, float, str, bool, Path, a Literal's
choices, `X | None`), the range check, `--help` and the generated reference table (`reference_table`).
A field made by `section(Cls)` nests another settings dataclass: its settings stay flat on the command line
and in the environment, and appear as a group in `--help`. Both the server and the trainer use this module.

A flag wins over its variable, the variable over the base (the defaults, or a saved run's config).
A bad value raises `SettingError`; `from_sources` words it with the flag and variable it came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import string
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_NONE = ("", "none")


class SettingError(ValueError):
    """A setting's value is malformed or out of range.

    The message names settings as `{field_name}` placeholders and other data as keyword values; `str()`
    fills in the bare field names, `worded(name_of)` the names a user typed, e.g.
    `--max-batch-size (VAE_MAX_BATCH_SIZE)`.
    """

    def __init__(self, template: str, **values: Any) -> None:
        self.template = template
        self.values = values
        super().__init__(self.worded(lambda name: name))

    def worded(self, name_of: Callable[[str], str]) -> str:
        fields = {name for _, name, _, _ in string.Formatter().parse(self.template) if name} - set(self.values)
        return self.template.format(**{name: name_of(name) for name in fields}, **self.values)


@dataclasses.dataclass(frozen=True)
class _Setting:
    help: str
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None  # exclusive lower bound
    flag: str | None = None  # default: --field-name
    env: str | None = None  # default: the prefix + FIELD_NAME
    metavar: str | None = None
    shown_default: str | None = None  # how --help and the reference show the default, where str() is unclear


def setting(
    default: Any,
    help: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    flag: str | None = None,
    env: str | None = None,
    metavar: str | None = None,
    shown_default: str | None = None,
) -> Any:
    """A dataclass field that is a setting, its bounds checked by `check_settings`.

    `minimum` and `maximum` are inclusive, `above` exclusive (a learning rate must be above 0).
    """
    meta = _Setting(help, minimum, maximum, above, flag, env, metavar, shown_default)
    return dataclasses.field(default=default, metadata={"setting": meta})


def section(cls: type[Any], title: str) -> Any:
    """A dataclass field holding a nested settings dataclass (its defaults unless given)."""
    return dataclasses.field(default_factory=cls, metadata={"section": title})


@dataclasses.dataclass(frozen=True)
class Spec:
    """One setting as the command line sees it: where it lives, its type and how it is spelled."""

    name: str  # the field name, unique over all sections
    path: tuple[str, ...]  # section field names leading to it, e.g. ("batching",)
    kind: Any  # the resolved type hint
    default: Any
    meta: _Setting
    section_title: str

    @property
    def flag(self) -> str:
        return self.meta.flag or "--" + self.name.replace("_", "-")

    def env(self, prefix: str) -> str:
        return self.meta.env or prefix + self.name.upper()

    @property
    def optional(self) -> bool:
        return _is_optional(self.kind)

    @property
    def base_kind(self) -> Any:
        """The type without `| None`."""
        if not self.optional:
            return self.kind
        return next(arg for arg in typing.get_args(self.kind) if arg is not type(None))

    @property
    def choices(self) -> tuple[str, ...]:
        base = self.base_kind
        return tuple(typing.get_args(base)) if typing.get_origin(base) is Literal else ()

    @property
    def metavar(self) -> str:
        if self.meta.metavar:
            return self.meta.metavar
        if self.choices:
            return "{" + ",".join(self.choices) + "}"
        return {int: "N", float: "X", Path: "PATH"}.get(self.base_kind, "TEXT")

    def shown_default(self) -> str:
        if self.meta.shown_default is not None:
            return self.meta.shown_default
        if isinstance(self.default, bool):
            return "on" if self.default else "off"
        return "none" if self.default is None else str(self.default)

    def parse(self, text: str) -> Any:
        """The value of `text` for this setting; ValueError naming what was expected."""
        stripped = text.strip()
        if self.optional and stripped.lower() in _NONE:
            return None
        base = self.base_kind
        if base is bool:
            if stripped.lower() in _TRUE:
                return True
            if stripped.lower() in _FALSE:
                return False
            raise ValueError("is not true or false")
        if base is int:
            try:
                return int(stripped)
            except ValueError:
                raise ValueError("is not an integer") from None
        if base is float:
            try:
                return float(stripped)
            except ValueError:
                raise ValueError("is not a number") from None
        if base is Path:
            return Path(stripped)
        return stripped  # str and Literal choices (checked by check_settings)


def _is_optional(kind: Any) -> bool:
    return typing.get_origin(kind) in (types.UnionType, typing.Union) and type(None) in typing.get_args(kind)


def specs(cls: type[Any], _path: tuple[str, ...] = (), _title: str = "") -> Iterator[Spec]:
    """Every setting of `cls` and its sections, in declaration order."""
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        if "section" in item.metadata:
            yield from specs(hints[item.name], (*_path, item.name), item.metadata["section"])
        elif "setting" in item.metadata:
            yield Spec(item.name, _path, hints[item.name], item.default, item.metadata["setting"], _title)


def check_settings(instance: Any) -> None:
    """Check every setting of `instance` (not its sections) against its type, bounds and choices."""
    for spec in specs(type(instance)):
        if spec.path:
            continue
        value = getattr(instance, spec.name)
        if value is None and spec.optional:
            continue
        if spec.choices and value not in spec.choices:
            choices = ", ".join(spec.choices)
            raise SettingError(
                f"{{{spec.name}}} must be one of {{choices}}, got {{value!r}}", choices=choices, value=value
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise SettingError(f"{{{spec.name}}} must be a finite number, got {{value}}", value=value)
        low, high, above = spec.meta.minimum, spec.meta.maximum, spec.meta.above
        if above is not None and value <= above:
            raise SettingError(f"{{{spec.name}}} must be > {{above}}, got {{value}}", above=_number(above), value=value)
        if low is not None and value < low:
            raise SettingError(f"{{{spec.name}}} must be >= {{low}}, got {{value}}", low=_number(low), value=value)
        if high is not None and value > high:
            raise SettingError(f"{{{spec.name}}} must be <= {{high}}, got {{value}}", high=_number(high), value=value)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def build(cls: type[T], values: Mapping[str, Any]) -> T:
    """An instance of `cls` from flat setting names (sections are filled in), defaults for the rest."""
    known = {spec.name: spec for spec in specs(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise TypeError(f"{cls.__name__} has no setting {', '.join(unknown)}")
    return _build(cls, values, ())


def _build(cls: type[Any], values: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for item in dataclasses.fields(cls):
        if "section" in item.metadata:
            kwargs[item.name] = _build(hints[item.name], values, (*path, item.name))
        elif item.name in values:
            kwargs[item.name] = values[item.name]
    return cls(**kwargs)


def replace(instance: T, **values: Any) -> T:
    """`instance` with some settings changed, by flat name (`replace(config, max_batch_size=8)`)."""
    return build(type(instance), {**flat(instance), **values})


def flat(instance: Any) -> dict[str, Any]:
    """Every setting's value by flat name."""
    result = {}
    for spec in specs(type(instance)):
        owner = instance
        for name in spec.path:
            owner = getattr(owner, name)
        result[spec.name] = getattr(owner, spec.name)
    return result


def to_json(instance: Any) -> dict[str, Any]:
    """`flat(instance)` with paths as strings: what a run or a server writes down."""
    return {name: str(value) if isinstance(value, Path) else value for name, value in flat(instance).items()}


def build_parser(cls: type[Any], env_prefix: str, **parser_args: Any) -> argparse.ArgumentParser:
    """One flag per setting, grouped by section; unset flags are absent from the parsed namespace."""
    parser = argparse.ArgumentParser(formatter_class=argparse.RawDescriptionHelpFormatter, **parser_args)
    groups: dict[str, Any] = {}
    for spec in specs(cls):
        group = parser
        if spec.section_title:
            if spec.section_title not in groups:
                groups[spec.section_title] = parser.add_argument_group(spec.section_title)
            group = groups[spec.section_title]
        text = f"{spec.meta.help} [env {spec.env(env_prefix)}, default {spec.shown_default()}]"
        if spec.base_kind is bool:
            group.add_argument(
                spec.flag, dest=spec.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text
            )
        else:
            group.add_argument(
                spec.flag,
                dest=spec.name,
                default=argparse.SUPPRESS,
                metavar=spec.metavar,
                help=text,
            )
    return parser


def from_sources(
    cls: type[T],
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    env_prefix: str,
    base: Mapping[str, Any] | None = None,
) -> T:
    """`cls` from parsed flags, then environment variables, then `base` (flat names), then the defaults.

    Raises SettingError worded with the flag and variable of the setting that is wrong.
    """
    values: dict[str, Any] = dict(base or {})
    by_name = {spec.name: spec for spec in specs(cls)}
    for spec in by_name.values():
        variable = spec.env(env_prefix)
        if spec.name in flags:
            raw, source = flags[spec.name], spec.flag
        elif variable in environ:
            raw, source = environ[variable], variable
        else:
            continue
        if isinstance(raw, bool):  # --flag / --no-flag
            values[spec.name] = raw
            continue
        try:
            values[spec.name] = spec.parse(raw)
        except ValueError as exc:
            raise SettingError("{source}={raw!r} {problem}", source=source, raw=raw, problem=exc) from None
    try:
        return build(cls, values)
    except SettingError as exc:
        raise SettingError(exc.worded(lambda name: _source(by_name[name], env_prefix))) from None


def _source(spec: Spec, env_prefix: str) -> str:
    return f"{spec.flag} ({spec.env(env_prefix)})"


def reference_table(cls: type[Any], env_prefix: str) -> str:
    """A markdown table of every setting (section, flag, variable, default, meaning), from the definitions."""
    lines = ["| flag | variable | default | meaning |", "| --- | --- | --- | --- |"]
    section_title = None
    for spec in specs(cls):
        if spec.section_title and spec.section_title != section_title:
            section_title = spec.section_title
            lines.append(f"| **{section_title}** | | | |")
        meaning = spec.meta.help.replace("|", "\\|")
        if spec.choices and not all(choice in spec.meta.help for choice in spec.choices):
            meaning += f" (one of: {', '.join(spec.choices)})"
        bounds = [f"> {_number(spec.meta.above)}"] if spec.meta.above is not None else []
        bounds += [f">= {_number(spec.meta.minimum)}"] if spec.meta.minimum is not None else []
        bounds += [f"<= {_number(spec.meta.maximum)}"] if spec.meta.maximum is not None else []
        if bounds:
            meaning += f" [{', '.join(bounds)}]"
        lines.append(f"| `{spec.flag}` | `{spec.env(env_prefix)}` | `{spec.shown_default()}` | {meaning} |")
    return "\n".join(lines) + "\n"
