"""Loading profiles files, with errors that point at a line and column.

The YAML is composed into nodes first (so every value keeps its position), then
constructed into plain data and validated by the pydantic schema; each pydantic
error location is walked back down the node tree to find where to point.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from lmwatch.profiles.schema import LOCATED_ERROR, UNITS_REQUIRED, ProfileSet

DEFAULT_SOURCE = "<embedded default profiles>"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_NULL_TAG = "tag:yaml.org,2002:null"


@dataclass(frozen=True, slots=True)
class ProfileProblem:
    """One thing wrong with a profiles file, and where (1-based line and column)."""

    file: str
    line: int | None
    column: int | None
    path: str  # e.g. `profiles[1].max_blackout`; empty for the file as a whole
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "path": self.path,
            "message": self.message,
        }


class ProfileError(Exception):
    """A profiles file that cannot be used; `problems` says every reason found."""

    def __init__(self, problems: Sequence[ProfileProblem]) -> None:
        self.problems: list[ProfileProblem] = list(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))


def load_profiles(path: Path | str) -> ProfileSet:
    """Read and validate a profiles file; raise `ProfileError` if it is unusable."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as error:
        raise ProfileError([unreadable(source, error)]) from None
    return load_profiles_bytes(raw, source=source)


def unreadable(source: str, error: OSError) -> ProfileProblem:
    """The problem for a file that cannot be read at all."""
    return ProfileProblem(source, None, None, "", f"cannot read: {error.strerror or error}")


def load_profiles_bytes(raw: bytes, source: str = "<bytes>") -> ProfileSet:
    """Validate a profiles file's content (UTF-8 YAML)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
        message = "is not UTF-8 text"
        raise ProfileError([ProfileProblem(source, line, column, "", message)]) from None
    return load_profiles_text(text, source=source)


def load_profiles_text(text: str, source: str = "<text>") -> ProfileSet:
    """Validate profiles given as YAML text; `source` names it in problems."""
    root = _compose(text, source)
    data = _construct(root)
    try:
        return ProfileSet.model_validate(data, context={UNITS_REQUIRED: True})
    except ValidationError as error:
        raise ProfileError(_problems(error, root, source)) from None


def default_profiles_text() -> str:
    """The profiles file shipped with lmwatch (also the example to start from)."""
    return resources.files("lmwatch").joinpath("data/profiles.yaml").read_text("utf-8")


def load_default_profiles() -> ProfileSet:
    return load_profiles_text(default_profiles_text(), source=DEFAULT_SOURCE)


# --- YAML -------------------------------------------------------------------------


def _compose(text: str, source: str) -> yaml.Node:
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as error:
        raise ProfileError([_yaml_problem(error, source)]) from None
    except yaml.YAMLError as error:  # unmarked: rare (e.g. a reader error)
        raise ProfileError([ProfileProblem(source, None, None, "", str(error))]) from None
    finally:
        loader.dispose()
    if root is None or (isinstance(root, yaml.ScalarNode) and root.tag == _NULL_TAG):
        message = "the file is empty: it needs a top-level 'profiles:' list"
        raise ProfileError([ProfileProblem(source, 1, 1, "", message)])
    duplicates = list(_duplicate_keys(root, source))
    if duplicates:
        raise ProfileError(duplicates)
    return root


def _construct(root: yaml.Node) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_document(root)
    finally:
        loader.dispose()


def _yaml_problem(error: yaml.MarkedYAMLError, source: str) -> ProfileProblem:
    mark = error.problem_mark or error.context_mark
    message = error.problem or "is not valid YAML"
    if error.context:
        message += f" ({error.context}"
        if error.context_mark is not None and error.context_mark is not mark:
            message += f" started at line {error.context_mark.line + 1}"
        message += ")"
    if "\\t" in message or "\t" in message:
        message += "; indent with spaces, YAML does not allow tabs there"
    if mark is None:
        return ProfileProblem(source, None, None, "", message)
    return ProfileProblem(source, mark.line + 1, mark.column + 1, "", message)


def _duplicate_keys(root: yaml.Node, source: str) -> Iterator[ProfileProblem]:
    """A key written twice in one mapping: YAML would keep the last one silently."""
    seen_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, tuple[str | int, ...]]] = [(root, ())]
    while stack:
        node, path = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], yaml.Node] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE_TAG:
                    earlier = first.setdefault((key.tag, key.value), key)
                    if earlier is not key:
                        yield ProfileProblem(
                            source,
                            key.start_mark.line + 1,
                            key.start_mark.column + 1,
                            _format_path((*path, key.value)),
                            f"key {key.value!r} appears twice in the same mapping (first at "
                            f"line {earlier.start_mark.line + 1}); the second would silently "
                            "replace the first",
                        )
                label = key.value if isinstance(key, yaml.ScalarNode) else "?"
                stack.append((value, (*path, label)))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, (*path, index)) for index, item in enumerate(node.value))


# --- pydantic errors onto nodes ---------------------------------------------------


def _problems(error: ValidationError, root: yaml.Node, source: str) -> list[ProfileProblem]:
    details = error.errors()
    problems: list[ProfileProblem] = []
    for detail in details:
        loc = tuple(detail["loc"])
        if detail["type"] == "too_short" and any(
            other is not detail and tuple(other["loc"])[: len(loc)] == loc for other in details
        ):
            continue  # pydantic's echo of an item that failed: the item's error says more
        if detail["type"] == LOCATED_ERROR:
            loc += tuple((detail.get("ctx") or {}).get("at", ()))
        want_key = detail["type"] == "extra_forbidden"
        node, path = _locate(root, loc, want_key=want_key)
        mark = node.start_mark
        problem = ProfileProblem(
            source, mark.line + 1, mark.column + 1, _format_path(path), _message(detail, loc, node)
        )
        if problem not in problems:
            problems.append(problem)
    problems.sort(key=lambda p: (p.line or 0, p.column or 0))
    return problems


def _locate(
    root: yaml.Node, loc: tuple[int | str, ...], *, want_key: bool
) -> tuple[yaml.Node, list[str | int]]:
    """The node an error location names, and the part of the location that exists.

    Components that name nothing in the file (union member tags) are skipped; a
    missing field's name is kept in the path while the position stays on its parent.
    """
    node = root
    key_node: yaml.Node | None = None
    path: list[str | int] = []
    for position, component in enumerate(loc):
        last = position == len(loc) - 1
        if component == "[key]":
            if key_node is not None:
                node = key_node
            continue
        if isinstance(node, yaml.MappingNode):
            entry = _find_key(node, component)
            if entry is None:
                if last:
                    path.append(component)
                continue
            key_node, value_node = entry
            node = key_node if (last and want_key) else value_node
            path.append(component)
        elif isinstance(node, yaml.SequenceNode) and isinstance(component, int):
            if 0 <= component < len(node.value):
                node = node.value[component]
                path.append(component)
            key_node = None
    return node, path


def _find_key(node: yaml.MappingNode, name: int | str) -> tuple[yaml.Node, yaml.Node] | None:
    for key, value in reversed(node.value):  # YAML semantics: the last one wins
        if isinstance(key, yaml.ScalarNode) and key.value == str(name):
            return key, value
    return None


def _format_path(path: Sequence[str | int]) -> str:
    out = ""
    for component in path:
        if isinstance(component, int):
            out += f"[{component}]"
        elif component.isidentifier():
            out += f".{component}" if out else component
        else:
            out += f"[{component!r}]"
    return out


def _shown(node: yaml.Node) -> str:
    if isinstance(node, yaml.ScalarNode):
        return "nothing" if node.tag == _NULL_TAG else repr(node.value)
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return "a mapping"


def _message(detail: ErrorDetails, loc: tuple[int | str, ...], node: yaml.Node) -> str:
    kind = detail["type"]
    ctx = detail.get("ctx") or {}
    name = loc[-1] if loc else ""
    shown = _shown(node)
    if kind in ("value_error", "assertion_error"):
        message = str(ctx.get("error", detail["msg"]))
        return message or detail["msg"]
    if kind == "missing":
        return f"required field {name!r} is missing"
    if kind == "extra_forbidden":
        return _unknown_field(str(name), loc[:-1])
    if kind == "string_type":
        hint = f"; put it in quotes if you mean the text {shown}" if shown[:1] == "'" else ""
        return f"expected text, got {shown}{hint}"
    if kind in ("bool_type", "bool_parsing"):
        return f"expected true or false, got {shown}"
    if kind in ("enum", "literal_error"):
        return f"expected {ctx.get('expected', 'one of the listed values')}, got {shown}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        if not loc:
            return f"expected a mapping with a top-level 'profiles:' list, got {shown}"
        return f"expected a mapping (key: value lines), got {shown}"
    if kind in ("tuple_type", "list_type"):
        return f"expected a list, got {shown}"
    if kind == "too_short" and loc == ("profiles",):
        return "no profiles: the list needs at least one profile"
    if kind == "greater_than_equal":
        return f"must not be negative, got {shown}"
    if kind == "greater_than":
        return f"must be more than {ctx.get('gt', 0)}, got {shown}"
    if kind == LOCATED_ERROR:
        return detail["msg"]
    message = detail["msg"]
    return message[:1].lower() + message[1:]


def _unknown_field(name: str, parent: tuple[int | str, ...]) -> str:
    fields = _fields_at(parent)
    if not fields:
        return f"unknown field {name!r}"
    close = difflib.get_close_matches(name, fields, n=1)
    if close:
        return f"unknown field {name!r} (did you mean {close[0]!r}?)"
    return f"unknown field {name!r} (known fields: {', '.join(fields)})"


def _fields_at(loc: tuple[int | str, ...]) -> list[str]:
    """The field names of the schema model at `loc`, if it names one."""
    model: type[BaseModel] | None = ProfileSet
    for component in loc:
        if model is None:
            return []
        if isinstance(component, int):
            continue
        field = model.model_fields.get(component)
        model = _model_in(field.annotation) if field is not None else None
    return list(model.model_fields) if model is not None else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _model_in(typing.get_args(annotation)[0])
    if origin in (tuple, list, typing.Union, types.UnionType):
        for argument in typing.get_args(annotation):
            found = _model_in(argument)
            if found is not None:
                return found
    return None
