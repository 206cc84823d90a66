"""Field tables: each object's fields declared once, on its dataclass.

A field is declared with :func:`field` in the dataclass body: JSON name,
kind of value (with its bounds), default, one-line doc. :class:`Schema`
reads those declarations and from them parses a JSON object into the
dataclass, writes ``to_json`` and renders the documentation table, so that
a name, default or bound cannot disagree between code and docs.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = [
    "REQUIRED",
    "Field",
    "Kind",
    "Schema",
    "SchemaError",
    "UnknownField",
    "Wrong",
    "field",
    "like",
    "show",
]

_KEY = "threshold.schema"
_SHOW_LIMIT = 60


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


#: The default of a field that must be given.
REQUIRED: Any = _Required()


def show(value: object, limit: int = _SHOW_LIMIT) -> str:
    """Show a (possibly hostile) value as JSON, on one line, cut to ``limit``."""
    try:
        text = json.dumps(value, ensure_ascii=True, allow_nan=True)
    except (TypeError, ValueError, RecursionError):
        if isinstance(value, int):
            # Past sys.get_int_max_str_digits() even repr() raises.
            text = f"an integer of {value.bit_length()} bits"
        else:
            text = type(value).__name__
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


class SchemaError(ValueError):
    """A value does not fit its field; the field and entry are data.

    ``field`` is the JSON name (``"ServiceToLocalAddrMap.web"``,
    ``"ManagementAllowedCommonNames[1]"`` inside a value), ``index`` the
    position of the entry in a list; ``str()`` is one line with both.
    """

    def __init__(
        self, message: str, field: str | None = None, index: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.index = index

    def _text(self) -> str:
        if self.field is None:
            return self.message
        return f'field "{self.field}": {self.message}'

    def __str__(self) -> str:
        if self.index is None:
            return self._text()
        return f"entry {self.index}: {self._text()}"

    def _copy(self, field: str | None, index: int | None) -> SchemaError:
        return SchemaError(self.message, field, index)

    def within(self, name: str) -> SchemaError:
        """This error of a value inside field ``name`` (its ``field`` is a suffix)."""
        return self._copy(name + (self.field or ""), self.index)

    def at(self, index: int) -> SchemaError:
        """This error, for the entry ``index`` of a list."""
        return self._copy(self.field, index)


class Wrong(SchemaError):
    """A value that is not what the field expects: "expected X, got Y"."""

    def __init__(
        self,
        expected: str,
        value: object,
        field: str | None = None,
        index: int | None = None,
    ) -> None:
        super().__init__(f"expected {expected}, got {show(value)}", field, index)
        self.expected = expected
        self.value = value

    def _copy(self, field: str | None, index: int | None) -> SchemaError:
        return Wrong(self.expected, self.value, field, index)


class UnknownField(SchemaError):
    """A key the object does not have; ``hint`` may suggest the right one."""

    def __init__(self, key: object, hint: str = "", index: int | None = None) -> None:
        super().__init__(f"unknown field {show(key)}{hint}", str(key), index)
        self.key = key
        self.hint = hint

    def _text(self) -> str:
        return self.message

    def _copy(self, field: str | None, index: int | None) -> SchemaError:
        return UnknownField(self.key, self.hint, index)


class Kind:
    """What values a field takes: the check, the JSON form, the doc words.

    ``check`` takes a decoded JSON value (or the attribute of an object
    being built) and returns the attribute's value, or raises
    :class:`SchemaError`; it must accept its own results unchanged.
    """

    #: Ends "expected ..., got ..." in error messages.
    expected = "a value"
    #: The Type column of the documentation tables.
    doc = "value"

    def check(self, value: object, base_dir: str | None = None) -> Any:
        return value

    def to_json(self, value: Any) -> object:
        return value

    def wrong(self, value: object) -> Wrong:
        return Wrong(self.expected, value)


@dataclasses.dataclass(frozen=True)
class Field:
    """One field: JSON name, kind, default, documentation.

    ``json`` None: a setting that no JSON object sets (documented as
    fixed). ``attr`` is filled in by :class:`Schema` from the dataclass;
    ``""`` for a field that is accepted and ignored.
    """

    json: str | None
    kind: Kind
    default: Any = REQUIRED
    doc: str = ""
    aliases: tuple[str, ...] = ()
    nullable: bool = False
    default_doc: str | None = None
    attr: str = ""

    @property
    def name(self) -> str:
        """The name errors and docs use for this field."""
        return self.json if self.json is not None else self.attr

    def check(self, value: object, given_as: str, base_dir: str | None) -> Any:
        """Check one value, the error naming the JSON name it was given as."""
        if value is None and (self.nullable or self.default is None):
            return None
        try:
            return self.kind.check(value, base_dir)
        except Wrong as e:
            if self.nullable and e.field is None:
                raise Wrong(f"{e.expected} or null", e.value, given_as) from None
            raise e.within(given_as) from None
        except SchemaError as e:
            raise e.within(given_as) from None


def _dataclass_field(spec: Field) -> Any:
    if spec.default is REQUIRED:
        return dataclasses.field(metadata={_KEY: spec})
    default = spec.default
    if getattr(type(default), "__hash__", None) is None:
        return dataclasses.field(default_factory=lambda: default, metadata={_KEY: spec})
    return dataclasses.field(default=default, metadata={_KEY: spec})


def field(
    json: str | None,
    kind: Kind,
    default: Any = REQUIRED,
    *,
    doc: str,
    aliases: Iterable[str] = (),
    nullable: bool = False,
    default_doc: str | None = None,
) -> Any:
    """Declare a dataclass attribute as a schema field (the one place it is)."""
    spec = Field(json, kind, default, doc, tuple(aliases), nullable, default_doc)
    return _dataclass_field(spec)


def like(spec: Field, **changes: Any) -> Any:
    """Declare an attribute as the field ``spec`` of another object, changed.

    For settings that one object passes on to another (a config file's
    session settings): name, default and doc stay in one place.
    """
    return _dataclass_field(dataclasses.replace(spec, attr="", **changes))


def _table_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


class Schema:
    """The fields of one dataclass, read from its :func:`field` declarations.

    ``checked_by_init``: the dataclass calls :meth:`validate` in its
    ``__post_init__`` (objects also built from Python values), so
    :meth:`parse` leaves the checks to the constructor instead of running
    them twice. ``ignore_unknown``: keys not in the table are skipped (wire
    messages that later versions extend). ``ignored``: fields still
    accepted and checked, but no longer used.
    """

    def __init__(
        self,
        cls: type,
        *,
        checked_by_init: bool = False,
        ignore_unknown: bool = False,
        ignored: Iterable[Field] = (),
    ) -> None:
        self.cls = cls
        self.checked_by_init = checked_by_init
        self.ignore_unknown = ignore_unknown
        fields = []
        for f in dataclasses.fields(cls):
            spec = f.metadata.get(_KEY)
            if spec is not None:
                fields.append(dataclasses.replace(spec, attr=f.name))
        self.fields: tuple[Field, ...] = tuple(fields) + tuple(
            dataclasses.replace(f, attr="") for f in ignored
        )
        self._by_attr = {f.attr: f for f in self.fields if f.attr}
        self.names: tuple[str, ...] = tuple(
            name for f in self.fields if f.json for name in (f.json, *f.aliases)
        )

    def __getitem__(self, attr: str) -> Field:
        """The field of attribute ``attr``."""
        return self._by_attr[attr]

    def unknown(self, key: object) -> UnknownField:
        """The error for ``key``, suggesting the closest known name."""
        hint = ""
        if isinstance(key, str):
            close = difflib.get_close_matches(key, self.names, n=1)
            if close:
                hint = f' (did you mean "{close[0]}"?)'
        return UnknownField(key, hint)

    def collect(
        self, obj: Mapping[Any, Any], base_dir: str | None = None
    ) -> tuple[dict[str, Any], set[str]]:
        """Check a decoded JSON object field by field.

        Returns the attribute values (defaults for absent fields) and the
        attributes that were given. A null counts as absent where the field
        is nullable.
        """
        if not self.ignore_unknown:
            for key in obj:
                if key not in self.names:
                    raise self.unknown(key)
        values: dict[str, Any] = {}
        present: set[str] = set()
        for f in self.fields:
            if f.json is None:
                continue
            given = [
                (name, obj[name])
                for name in (f.json, *f.aliases)
                if name in obj and not (f.nullable and obj[name] is None)
            ]
            if not given:
                if f.default is REQUIRED:
                    raise SchemaError("required field is missing", f.json)
                if f.attr:
                    values[f.attr] = f.default
                continue
            checked = []
            for name, value in given:
                if self.checked_by_init:
                    checked.append(value)
                else:
                    checked.append(f.check(value, name, base_dir))
            for (name, _), value in zip(given[1:], checked[1:], strict=True):
                if value != checked[0]:
                    raise SchemaError(
                        f'differs from "{given[0][0]}" ({show(value)} and'
                        f" {show(checked[0])}); give only one",
                        name,
                    )
            if f.attr:
                values[f.attr] = checked[0]
                present.add(f.attr)
        return values, present

    def as_given(self, error: SchemaError, obj: Mapping[Any, Any]) -> SchemaError:
        """``error`` from the constructor, naming the alias ``obj`` used."""
        for f in self.fields:
            if f.attr and f.name == error.field and f.json not in obj:
                for alias in f.aliases:
                    if alias in obj:
                        return error._copy(alias, error.index)
        return error

    def build(self, obj: Mapping[Any, Any], values: dict[str, Any]) -> Any:
        """Make the dataclass from :meth:`collect`'s values (and others)."""
        try:
            return self.cls(**values)
        except SchemaError as e:
            raise self.as_given(e, obj) from None

    def parse(
        self,
        obj: Mapping[Any, Any],
        base_dir: str | None = None,
        **extra: Any,
    ) -> Any:
        """Parse a decoded JSON object into the dataclass, or raise SchemaError."""
        values, _ = self.collect(obj, base_dir)
        values.update(extra)
        return self.build(obj, values)

    def parse_entry(
        self,
        value: object,
        where: str,
        base_dir: str | None = None,
        expected: str = "an object",
    ) -> Any:
        """Parse one object nested in a list or map of a field.

        Its errors name ``where`` (``[0]``, ``.web``) before its own field, so
        the caller only adds the enclosing field's name.
        """
        if isinstance(value, self.cls):
            return value
        if not isinstance(value, Mapping):
            raise Wrong(expected, value, where)
        try:
            return self.parse(value, base_dir)
        except UnknownField as e:
            raise SchemaError(e.message, where) from None
        except SchemaError as e:
            raise e.within(f"{where}." if e.field else where) from None

    def validate(self, instance: object) -> None:
        """Check (and normalise) every field of ``instance``, in place.

        For ``__post_init__`` of frozen dataclasses built from Python values.
        """
        for f in self.fields:
            if not f.attr:
                continue
            value = getattr(instance, f.attr)
            checked = f.check(value, f.name, None)
            if checked is not value:
                object.__setattr__(instance, f.attr, checked)

    def to_json(self, instance: object) -> dict[str, Any]:
        """The object with its JSON field names, in table order."""
        return {
            f.json: f.kind.to_json(getattr(instance, f.attr))
            for f in self.fields
            if f.json is not None and f.attr
        }

    def markdown(self, describe: Callable[[Field], str] | None = None) -> str:
        """The documentation table: field, type, default, meaning."""
        rows = ["| Field | Type | Default | Meaning |", "|---|---|---|---|"]
        for f in self.fields:
            name = f"`{f.json}`" if f.json else f"`{f.attr}` (fixed)"
            kind = f.kind.doc + (", or null" if f.nullable else "")
            doc = describe(f) if describe is not None else f.doc
            rows.append(f"| {name} | {kind} | {_default_doc(f)} | {_table_cell(doc)} |")
            for alias in f.aliases:
                rows.append(
                    f"| `{alias}` | {kind} | | Another name for `{f.json}`."
                    " Giving both with different values is an error. |"
                )
        return "\n".join(rows) + "\n"


def _default_doc(f: Field) -> str:
    if f.default_doc is not None:
        return f.default_doc
    if f.default is REQUIRED:
        return "required"
    value = f.kind.to_json(f.default) if f.default is not None else None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{json.dumps(value)}`"
