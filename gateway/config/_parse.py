"""Reading settings into dataclasses, typed by their annotations; shared by settings and spec.

A field's type comes from `typing.get_type_hints`, and each type has one
reader, chosen once when a class's schema is made (at import). A field whose
type has no reader (a set, a nested list, a union of two types) stops the
import with TypeError naming it, so a new field can never be read as a string
by accident. A `tuple[SomeDataclass, ...]` field is an array of tables (`[[notify]]`),
each table built and checked by its dataclass's own schema.

Why not pydantic-settings: the messages are part of the contract (tests and
operators read them), and pydantic's own ("Input should be a valid integer")
name neither the file nor the environment variable; its environment parsing
would want JSON for tuples. Reproducing these messages on top of it would cost
more code than this module, and one more dependency for every install.

Values come typed (TOML, command-line flags) or as text (environment
variables). A typed value must already have the field's type: a quoted "256"
for an integer, 2.9 for an integer or 5 for a boolean is refused with the
setting's name rather than guessed at (int(2.9) would quietly serve 2). Text is
parsed. Ranges and choices are checked by each class's `__post_init__`, so a
value is checked the same way whether it was read or built in code.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError

MIB = 1 << 20
INT32_MAX = (1 << 31) - 1

# (value, is_text) -> the field's value; raises ValueError naming what was expected.
Reader = Callable[[Any, bool], Any]


def check_choice(name: str, value: object, choices: Any) -> None:
    """Refuse a value that is not one of a Literal type's values."""
    allowed = typing.get_args(choices)
    if value not in allowed:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(str, allowed))}")


def check_choices(obj: Any, prefix: str = "") -> None:
    """Check every Literal field of a dataclass instance, so that no choice can go unchecked."""
    for name, hint in _choice_fields(obj.__class__):
        check_choice(f"{prefix}{name}", getattr(obj, name), hint)


@functools.cache  # a pure function of the class; get_type_hints is slow enough to matter in tests
def _choice_fields(cls: Any) -> tuple[tuple[str, Any], ...]:
    return tuple((n, h) for n, h in typing.get_type_hints(cls).items() if typing.get_origin(h) is typing.Literal)


def check_number(
    name: str, value: float, low: float | None = None, high: float | None = None, *, above: bool = False
) -> None:
    """Refuse NaN, infinity and values outside [low, high] ((low, high] with above), naming setting and value.

    Messages start with the setting's name: load_settings relies on that to say
    which file or environment variable set the refused value.
    """
    fits = math.isfinite(value)
    fits = fits and (low is None or (value > low if above else value >= low))
    fits = fits and (high is None or value <= high)
    if not fits:
        raise ConfigError(f"{name}: must be {_expected_range(low, high, above)}, got {value!r}")


def _expected_range(low: float | None, high: float | None, above: bool) -> str:
    if low is None and high is None:
        return "a finite number"
    if high is None:
        return f"{'>' if above else '>='} {low:g}"
    if low is None:
        return f"<= {high:g}"
    return f"in ({low:g}, {high:g}]" if above else f"in {low:g}..{high:g}"


def shown(value: Any, limit: int = 120) -> str:
    """A value for an error message, cut short: a refused setting may be huge."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


# ---------------------------------------------------------------- one reader per type


def _read_int(value: Any, text: bool) -> int:
    if text:
        try:
            return int(value)
        except ValueError:
            raise ValueError("an integer") from None
    if type(value) is not int:  # bool is an int subclass, and 2.9 is no integer
        raise ValueError("an integer")
    return value


def _read_float(value: Any, text: bool) -> float:
    if isinstance(value, bool) or not (text or isinstance(value, int | float)):
        raise ValueError("a number")
    try:
        number = float(value)
    except ValueError:
        raise ValueError("a number") from None
    if not math.isfinite(number):
        raise ValueError("a finite number")
    return number


def _read_bool(value: Any, text: bool) -> bool:
    if text:
        if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError("true or false")
        return bool(value.lower() in ("1", "true", "yes"))
    if not isinstance(value, bool):
        raise ValueError("true or false")
    return value


def _read_str(value: Any, text: bool) -> str:
    if not isinstance(value, str):
        raise ValueError("a string (in quotes)")
    return value


def _read_path(value: Any, text: bool) -> Path:
    if not text and not isinstance(value, str | Path):
        raise ValueError("a path (a string)")
    return Path(value)


_SCALARS: dict[Any, Reader] = {int: _read_int, float: _read_float, bool: _read_bool, str: _read_str, Path: _read_path}


def _enum_reader(kind: type[enum.Enum]) -> Reader:
    values = [member.value for member in kind]

    def read(value: Any, text: bool) -> enum.Enum:
        for member in kind:
            if (type(value) is type(member.value) and value == member.value) or (text and value == str(member.value)):
                return member
        raise ValueError(f"one of {', '.join(map(str, values))}")

    return read


def _union_reader(kinds: tuple[Any, ...]) -> Reader:
    """One of several scalar types (`str | float`, for an array such as ["start", 25]).

    A typed value is read by the reader of its own type (an integer counts as a number);
    text tries each type in the order written, so a number wins over a string."""
    readers = [(kind, _SCALARS[kind]) for kind in kinds]
    expected = " or ".join(_KIND_NAMES.get(kind, kind.__name__) for kind in kinds)

    def read(value: Any, text: bool) -> Any:
        for kind, reader in readers:
            if text:
                try:
                    return reader(value, True)
                except ValueError:
                    continue
            fits = type(value) is kind or (kind is float and type(value) is int)
            if fits:
                return reader(value, False)
        raise ValueError(expected)

    return read


_KIND_NAMES = {str: "a string (in quotes)", float: "a number", int: "an integer", bool: "true or false"}


def _scalar_reader(hint: Any, where: str) -> Reader:
    if hint in _SCALARS:
        return _SCALARS[hint]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = typing.get_args(hint)
        if all(kind in _SCALARS for kind in members):
            return _union_reader(members)
    if typing.get_origin(hint) is typing.Literal:
        # The type of the choices is read here; which choice, by check_choices.
        kinds = {type(choice) for choice in typing.get_args(hint)}
        if len(kinds) == 1 and next(iter(kinds)) in _SCALARS:
            return _SCALARS[next(iter(kinds))]
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return _enum_reader(hint)
    raise TypeError(f"{where}: settings of type {hint!r} cannot be read (add a reader in gateway/config/_parse.py)")


def _sequence_reader(container: type, item: Reader) -> Reader:
    """An array in TOML; comma-separated text in an environment variable."""

    def read(value: Any, text: bool) -> Any:
        if text:
            return container(item(part.strip(), True) for part in value.split(",") if part.strip())
        if not isinstance(value, list | tuple):
            raise ValueError("an array")
        return container(item(part, False) for part in value)

    return read


def _table_reader(item: Reader) -> Reader:
    def read(value: Any, text: bool) -> dict[str, Any]:
        if text or not isinstance(value, Mapping):
            raise ValueError("a table")
        return {str(key): item(part, False) for key, part in value.items()}

    return read


def reader_for(hint: Any, where: str) -> Reader:
    """The reader of a field's type; TypeError for a type no reader knows."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        kinds = [arg for arg in args if arg is not type(None)]
        if len(kinds) == 1:  # X | None: TOML has no null, and an unset flag never gets here
            return reader_for(kinds[0], where)
    elif origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _sequence_reader(tuple, _scalar_reader(args[0], where))
    elif origin is list and len(args) == 1:
        return _sequence_reader(list, _scalar_reader(args[0], where))
    elif origin in (Mapping, dict) and len(args) == 2 and args[0] is str:
        return _table_reader(_scalar_reader(args[1], where))
    return _scalar_reader(hint, where)


# ---------------------------------------------------------------- a class's fields, read


@dataclass(frozen=True, slots=True)
class Schema:
    """How to read one settings dataclass: a reader per field, a schema per section (a nested table)."""

    cls: type
    readers: Mapping[str, Reader]
    sections: Mapping[str, Schema]
    # Arrays of tables (`[[policy.checks]]`): a field typed tuple[SomeDataclass, ...].
    table_arrays: Mapping[str, Schema] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, settings_class: type) -> Schema:
        readers: dict[str, Reader] = {}
        sections: dict[str, Schema] = {}
        table_arrays: dict[str, Schema] = {}
        for name, hint in typing.get_type_hints(settings_class).items():
            item = _table_array_item(hint)
            if dataclasses.is_dataclass(hint) and isinstance(hint, type):
                sections[name] = Schema.of(hint)
            elif item is not None:
                table_arrays[name] = Schema.of(item)
            else:
                readers[name] = reader_for(hint, f"{settings_class.__name__}.{name}")
        return cls(settings_class, readers, sections, table_arrays)

    def names(self) -> list[str]:
        return sorted([*self.readers, *self.sections, *self.table_arrays])

    def unknown(self, key: str, prefix: str = "") -> ConfigError:
        return ConfigError(f"unknown setting {prefix}{key} (known: {', '.join(self.names())})")

    def knows(self, key: str) -> bool:
        """Whether `key` is a field read on its own (not a section): a value or an array of tables."""
        return key in self.readers or key in self.table_arrays

    def read(self, shown_as: str, key: str, value: Any, *, text: bool = False) -> Any:
        """One field's value; ConfigError naming it (`shown_as`) when the value has the wrong type."""
        items = self.table_arrays.get(key)
        if items is not None:
            if text:  # a table does not fit on one line of an environment variable
                raise ConfigError(f"{shown_as}: an array of tables goes in the config file ([[{key}]]), not here")
            # "FILE: notify": the origin leads the whole message, the field names the table's place.
            origin, _, field = shown_as.rpartition(": ")
            try:
                return items.build_array(value, field)
            except ConfigError as exc:
                raise ConfigError(f"{origin}: {exc}" if origin else str(exc)) from None
        try:
            return self.readers[key](value, text)
        except ValueError as exc:
            raise ConfigError(f"{shown_as}: expected {exc}, got {shown(value)}") from None

    def build(self, data: Mapping[str, Any], prefix: str = "") -> Any:
        """An instance from a TOML table; unknown keys are refused (a typo must not fall back to a default)."""
        return self.cls(**self.values(data, prefix))

    def values(self, data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        """The fields of an instance, read from a TOML table (unknown keys refused), before the
        class's own checks run."""
        for key in sorted(data):
            if key not in self.readers and key not in self.sections and key not in self.table_arrays:
                raise self.unknown(key, prefix)
        values: dict[str, Any] = {}
        for key, value in data.items():
            section = self.sections.get(key)
            items = self.table_arrays.get(key)
            if items is not None:
                values[key] = items.build_array(value, f"{prefix}{key}")
            elif section is None:
                values[key] = self.read(f"{prefix}{key}", key, value)
            elif isinstance(value, Mapping):
                values[key] = section.build(value, f"{prefix}{key}.")
            else:
                raise ConfigError(f"{prefix}{key}: expected a table, got {value!r}")
        return values

    def build_array(self, value: Any, where: str) -> tuple[Any, ...]:
        """A tuple of instances from an array of tables, each named by its index.

        An item's own checks (its __post_init__) name its fields alone (`url: ...`): they
        cannot know where the item sits, so its place (`policy.checks[1].`) is added here."""
        if not isinstance(value, list | tuple) or not all(isinstance(item, Mapping) for item in value):
            raise ConfigError(f"{where}: expected an array of tables ([[{where}]] sections), got {shown(value)}")
        built = []
        for index, item in enumerate(value):
            place = f"{where}[{index}]"
            values = self.values(item, f"{place}.")
            try:
                built.append(self.cls(**values))
            except ConfigError as exc:
                raise ConfigError(f"{place}.{exc}") from None
        return tuple(built)


def _table_array_item(hint: Any) -> type | None:
    """The dataclass of a tuple[SomeDataclass, ...] field (an array of tables); None for any other type."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis:
        item = args[0]
        if dataclasses.is_dataclass(item) and isinstance(item, type):
            return item
    return None


def read_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc}") from None
