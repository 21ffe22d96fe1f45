"""JSON Schemas checked before they are compiled: bounded in size, and never compiled into a grammar
whose output could break the schema as written.

xgrammar takes an ``enum`` or ``const`` and ignores the ``type`` beside it, so
``{"type": "boolean", "enum": ["True", "False"]}`` (16 of BFCL's 3,101 real functions have one)
would produce ``"True"``, which the schema forbids. Here every enum value that the subschema's own
other keywords reject is dropped; a subschema left with no value can never be satisfied. Then an
optional property holding it is left out of the grammar (outputs omit it, and still validate), an
``anyOf``/``oneOf`` branch is dropped, an array whose items are impossible can only be empty, and
anything else is a 400 naming the keyword's path.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from typing import Any

import jsonschema

from engine.errors import InvalidRequestError

# Keywords xgrammar's JSON Schema grammar enforces (strictly: additional properties are closed and
# properties come in the declared order, which every document it writes satisfies), and annotations.
ENFORCED = frozenset({
    "type", "properties", "required", "additionalProperties", "minProperties", "maxProperties", "items",
    "prefixItems", "minItems", "maxItems", "enum", "const", "anyOf", "oneOf", "$ref", "$defs",
    "definitions", "minLength", "maxLength", "pattern", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "multipleOf", "format", "unevaluatedProperties", "unevaluatedItems", "uniqueItems"})  # (the last: when false)
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment", "$anchor",
                         "deprecated", "readOnly", "writeOnly", "contentMediaType", "contentEncoding", "strict"})
# Keywords that constrain one kind of value: xgrammar applies them only where the subschema is of
# that kind (its type, or properties / items, which xgrammar reads as object / array).
KIND_KEYWORDS = {"string": ("minLength", "maxLength", "pattern", "format"),
                 "number": ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"),
                 "array": ("minItems", "maxItems", "uniqueItems"),
                 "object": ("minProperties", "maxProperties", "required")}
# Formats xgrammar checks exactly; date, time, date-time and ipv4 (xgrammar's admit 2024-02-31, second
# 60 at any minute, 01.2.3.4) become the exact patterns below.
EXACT_FORMATS = frozenset({"email", "uuid", "uri"})  # (its ipv6 and hostname are loose at the edges)
_YEAR = "([1-9][0-9]{3}|0[1-9][0-9]{2}|00[1-9][0-9]|000[1-9])"  # 0001-9999, as Python's date
_LEAP_YEAR = "([0-9]{2}(0[48]|[2468][048]|[13579][26])|([2468][048]|[13579][26]|0[48])00)"
_DATE = (f"({_YEAR}-((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)|"
         f"02-(0[1-9]|1[0-9]|2[0-8]))|{_LEAP_YEAR}-02-29)")
# (xgrammar 0.2.9 misreads an optional group "(\\.[0-9]{1,6})?": it admits "418Z"; "(|...)" it reads right)
_TIME = "([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](|\\.[0-9]{1,6})(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
_OCTET = "(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
FORMAT_PATTERNS = {"date": f"^{_DATE}$", "time": f"^{_TIME}$", "date-time": f"^{_DATE}T{_TIME}$",
                   "ipv4": f"^{_OCTET}(\\.{_OCTET}){{3}}$"}

# Keywords that constrain a value on their own, against which enum/const values are checked.
LOCAL_KEYWORDS = ("type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minLength",
                  "maxLength", "pattern", "minItems", "maxItems", "uniqueItems", "minProperties", "maxProperties")
SUBSCHEMA_MAPS = ("$defs", "definitions", "patternProperties", "dependentSchemas")
SUBSCHEMA_LISTS = ("allOf", "prefixItems")  # (anyOf and oneOf: each branch may be dropped)
SUBSCHEMAS = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
              "unevaluatedItems", "unevaluatedProperties", "additionalItems")


@dataclass(frozen=True)
class SchemaLimits:
    """What one schema may hold; each bounds the grammar's size and its compile time."""

    max_bytes: int = 256 * 1024
    max_depth: int = 64  # nested subschemas
    max_enum: int = 4096  # values in one enum
    max_properties: int = 1024  # properties of one object


class Unsatisfiable(Exception):
    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


class OverLimit(Exception):
    pass


def checked_schema(schema: Any, param: str, limits: SchemaLimits = SchemaLimits(), best_effort: bool = False) -> Any:
    """The schema to compile: ``schema`` with contradicting enum values and impossible optional
    properties removed and exact patterns for the formats xgrammar checks loosely (a copy; the
    caller's is untouched). Raises InvalidRequestError naming ``param`` and the path inside it for a
    schema over a limit, one no document satisfies, or (unless ``best_effort``) one with a keyword
    the grammar cannot enforce."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(param, f"{param}: not valid JSON: {exc}") from None
    if not isinstance(schema, (dict, bool)):
        raise InvalidRequestError(param, f"{param}: a JSON Schema is an object or a boolean")
    try:
        size = len(json.dumps(schema))
        if size > limits.max_bytes:
            raise OverLimit(f"the schema is {size} bytes, over the limit of {limits.max_bytes}")
        schema = copy.deepcopy(schema)
        _check(schema, "", 0, limits)
    except RecursionError:
        raise InvalidRequestError(param, f"{param}: the schema nests deeper than the limit of {limits.max_depth} "
                                         "levels") from None
    except Unsatisfiable as exc:
        raise InvalidRequestError(param, f"{param}: no JSON document satisfies the schema: at "
                                         f"{exc.path or '(root)'}, {exc.reason}") from None
    except OverLimit as exc:
        raise InvalidRequestError(param, f"{param}: {exc}") from None
    unenforced = [] if best_effort else unenforced_keywords(schema)
    if unenforced:
        raise InvalidRequestError(param, f"{param}: the grammar cannot enforce {', '.join(unenforced[:5])}; remove "
                                         "it, or set strict: false to accept output that may break it")
    return schema


def unenforced_keywords(schema: Any, path: str = "") -> list[str]:
    """JSON pointers of the keywords xgrammar's grammar would not enforce (it ignores them, or,
    for a loose format, admits text the format forbids): measured on xgrammar 0.2.9 by
    tests/test_schema_keywords.py."""
    if not isinstance(schema, dict):
        return []
    found = [f"{path}/{key}" for key in schema if key not in ENFORCED and key not in ANNOTATIONS
             and not key.startswith("x-")]  # (OpenAPI's extensions annotate)
    if schema.get("uniqueItems") is True:
        found.append(f"{path}/uniqueItems")
    if "multipleOf" in schema and not (schema.get("type") == "integer" and isinstance(schema["multipleOf"], int)):
        found.append(f"{path}/multipleOf")
    if "pattern" in schema:
        found += [f"{path}/{key}" for key in ("minLength", "maxLength") if key in schema]  # xgrammar drops the length
    if "format" in schema and schema["format"] not in EXACT_FORMATS:
        found.append(f"{path}/format")
    if isinstance(schema.get("oneOf"), list) and not _disjoint(schema["oneOf"]):
        found.append(f"{path}/oneOf")  # read as anyOf: a document matching two branches would pass
    kinds = _kinds(schema)
    found += [f"{path}/{key}" for kind, keys in KIND_KEYWORDS.items() if kind not in kinds for key in keys
              if key in schema]
    declared = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    if isinstance(schema.get("required"), list) and not set(schema["required"]) <= set(declared):
        found.append(f"{path}/required")  # a required name with no property schema is never written
    for parent, key, where in _subschemas(schema, path, (*SUBSCHEMA_LISTS, "anyOf", "oneOf"),
                                          (*SUBSCHEMA_MAPS, "properties")):
        found += unenforced_keywords(parent[key], where)
    return found


def _declared_types(schema: Any) -> set[str] | None:
    kind = schema.get("type") if isinstance(schema, dict) else None
    return {kind} if isinstance(kind, str) else set(kind) if isinstance(kind, list) else None


def _kinds(schema: dict) -> set[str]:
    """The kinds of value a subschema's grammar writes, as far as kind keywords go."""
    kinds = _declared_types(schema) or set()
    kinds |= {"object"} if {"properties", "additionalProperties"} & schema.keys() else set()
    kinds |= {"array"} if {"items", "prefixItems"} & schema.keys() else set()
    return kinds | {"number"} if "integer" in kinds else kinds


def _infer_kind(schema: dict) -> None:
    """A subschema with no type whose kind keywords are of one kind only gets that type: its other
    values are valid too, but a grammar that writes only this kind always satisfies the schema."""
    if "type" in schema or {"enum", "const", "$ref", "anyOf", "oneOf", "allOf", "not"} & schema.keys():
        return
    kinds = {kind for kind, keys in KIND_KEYWORDS.items() if any(key in schema for key in keys)} | _kinds(schema)
    if len(kinds) == 1:
        schema["type"] = kinds.pop()


def _subschemas(schema: dict, path: str, lists: tuple[str, ...], maps: tuple[str, ...]) -> list[tuple[Any, Any, str]]:
    """(container, key, JSON pointer) of each subschema under SUBSCHEMAS and the ``lists`` / ``maps`` keywords."""
    children = [(schema, key, f"{path}/{key}") for key in SUBSCHEMAS if key in schema]
    children += [(schema[key], i, f"{path}/{key}/{i}") for key in lists if isinstance(schema.get(key), list)
                 for i in range(len(schema[key]))]
    children += [(schema[key], name, f"{path}/{key}/{name}") for key in maps if isinstance(schema.get(key), dict)
                 for name in schema[key]]
    return children


def _disjoint(branches: list[Any]) -> bool:
    """True when no value can match two branches: each pair differs in type (integer within number)
    or in the values its const/enum allows."""
    def types(branch: Any) -> set[str] | None:
        kinds = _declared_types(branch)
        return kinds | {"integer"} if kinds and "number" in kinds else kinds

    def values(branch: Any) -> list | None:
        if not isinstance(branch, dict):
            return None
        if "const" in branch:
            return [branch["const"]]
        return branch["enum"] if isinstance(branch.get("enum"), list) else None

    for i, a in enumerate(branches):
        for b in branches[i + 1:]:
            ta, tb, va, vb = types(a), types(b), values(a), values(b)
            if ta is not None and tb is not None and not ta & tb:
                continue
            if va is not None and vb is not None and not any(json.dumps(x) == json.dumps(y) for x in va for y in vb):
                continue
            return False
    return True


def _check(schema: Any, path: str, depth: int, limits: SchemaLimits) -> None:
    """Normalize ``schema`` in place; raises Unsatisfiable when it accepts nothing."""
    if schema is False:
        raise Unsatisfiable(path, "the schema is `false`")
    if not isinstance(schema, dict):
        return
    if depth > limits.max_depth:
        raise OverLimit(f"the schema nests deeper than the limit of {limits.max_depth} levels")
    _check_values(schema, path, limits)
    _infer_kind(schema)
    if schema.get("format") in FORMAT_PATTERNS and not {"pattern", "minLength", "maxLength"} & schema.keys():
        schema["pattern"] = FORMAT_PATTERNS[schema.pop("format")]
    for parent, key, where in _subschemas(schema, path, SUBSCHEMA_LISTS, SUBSCHEMA_MAPS):
        if isinstance(parent[key], dict):  # `false` is meaningful here (no more items, no other keys)
            try:
                _check(parent[key], where, depth + 1, limits)
            except Unsatisfiable:
                if key != "items" or schema.get("minItems", 0) > 0:
                    raise
                del schema["items"]  # no item can exist: only the empty array
                schema["maxItems"] = 0
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            _keep_satisfiable_branches(schema, key, path, depth, limits)
    if isinstance(schema.get("properties"), dict):
        _check_properties(schema, path, depth, limits)


def _check_values(schema: dict, path: str, limits: SchemaLimits) -> None:
    """enum/const against the subschema's own value keywords (a validator only where one is there:
    a meta-schema check per subschema would cost seconds on a schema of a thousand properties)."""
    if "const" not in schema and "enum" not in schema:
        return
    local = {k: schema[k] for k in LOCAL_KEYWORDS if k in schema}
    try:
        validator = jsonschema.Draft202012Validator(local)
        validator.check_schema(local)
    except jsonschema.SchemaError:
        return  # a malformed keyword is xgrammar's to report
    if "const" in schema and not _valid(validator, schema["const"]):
        raise Unsatisfiable(f"{path}/const", f"const {json.dumps(schema['const'])} contradicts {json.dumps(local)}")
    if isinstance(schema.get("enum"), list):
        values = schema["enum"]
        if len(values) > limits.max_enum:
            raise OverLimit(f"the enum at {path}/enum has {len(values)} values, over the limit of {limits.max_enum}")
        kept = [v for v in values if _valid(validator, v)]
        if not kept:
            reason = "the enum is empty" if not values else f"every enum value contradicts {json.dumps(local)}"
            raise Unsatisfiable(f"{path}/enum", reason)
        schema["enum"] = kept


def _valid(validator: jsonschema.Draft202012Validator, value: Any) -> bool:
    try:
        return validator.is_valid(value)
    except re.error:  # a pattern Python cannot read (xgrammar may): keep the value
        return True


def _keep_satisfiable_branches(schema: dict, key: str, path: str, depth: int, limits: SchemaLimits) -> None:
    kept, last_error = [], None
    for i, branch in enumerate(schema[key]):
        try:
            _check(branch, f"{path}/{key}/{i}", depth + 1, limits)
            kept.append(branch)
        except Unsatisfiable as exc:
            last_error = exc
    if not kept:
        raise last_error or Unsatisfiable(f"{path}/{key}", f"{key} is empty")
    schema[key] = kept


def _check_properties(schema: dict, path: str, depth: int, limits: SchemaLimits) -> None:
    """An impossible optional property is left out, unless other keys may appear (then its name could
    come back with any value, so the object itself is impossible)."""
    properties = schema["properties"]
    if len(properties) > limits.max_properties:
        raise OverLimit(f"the object at {path or '(root)'} has {len(properties)} properties, over the limit of "
                         f"{limits.max_properties}")
    required = set(schema.get("required") or [])
    closed = schema.get("additionalProperties", False) is False and not schema.get("patternProperties")
    for name in list(properties):
        try:
            _check(properties[name], f"{path}/properties/{name}", depth + 1, limits)
        except Unsatisfiable:
            if name in required or not closed:
                raise
            del properties[name]
