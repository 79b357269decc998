"""Job specs: YAML in, a validated and resolved dict out.

The JSON Schema ``schemas/job.schema.json`` is the source of truth: every key,
its type and its default.  :func:`load_spec` reads the YAML, applies
``--set key.path=value`` overrides, validates (an unknown key is an error; the
message names the key path and what was expected), fills the defaults and
resolves relative paths against the directory of the spec file.

>>> spec = load_spec("jobs/example_folder.yaml", overrides=["dataset.shard_size=64"])
>>> spec["dataset"]["shard_size"]
64
"""

from __future__ import annotations

import copy
import difflib
import itertools
import os
from pathlib import Path

import jsonschema
import yaml

from audit.data import formats, fs, resources
from audit.data.jobspec import DatasetSpec, JobSpec
from audit.engine.heads import resolve_target
from audit.engine.models import MODEL_SUFFIXES, PREPROCESS_MODES, check_preprocess
from audit.errors import AuditError

# keys holding paths, resolved against the spec file's directory
_PATH_KEYS = (("model", "path"), ("model", "weights"), ("dataset", "path"), ("output",))
MAX_SPEC_BYTES = 1 << 20  # a job spec is a few hundred bytes; 1 MiB holds 10^4 class names
MAX_ALIAS_NODES = 1000  # YAML nodes that aliases may add beyond the document's own (an alias bomb adds 10^9)
MAX_SHOWN = 60  # characters of a value shown in an error message
MAX_MESSAGE = 400  # characters of a whole spec error


def job_schema() -> dict:
    return resources.schema("job")


# ----------------------------------------------------------------------------
# reading and overrides
# ----------------------------------------------------------------------------


def _cut(text: str, limit: int = MAX_SHOWN) -> str:
    """``text`` cut to ``limit`` characters (``...`` at the end when cut)."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(value, limit: int = MAX_SHOWN) -> str:
    """``repr(value)`` cut to ``limit`` characters: error messages never render an unbounded value."""
    shown = repr(value) if not isinstance(value, (dict, list)) or len(value) < 64 else \
        f"<{type(value).__name__} of {len(value)} items>"
    return _cut(shown, limit)


def _expanded_nodes(node, memo: dict, budget: int) -> int:
    """Nodes of ``node`` with every alias expanded, stopping at ``budget`` + 1 (no expansion is built)."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = budget + 1  # a node reached again while it is counted: a recursive alias
    if isinstance(node, yaml.SequenceNode):
        kids = node.value
    elif isinstance(node, yaml.MappingNode):
        kids = [n for pair in node.value for n in pair]
    else:
        kids = []
    total = 1
    for kid in kids:
        total += _expanded_nodes(kid, memo, budget)
        if total > budget:
            break
    memo[key] = min(total, budget + 1)
    return memo[key]


def _unique_nodes(node, seen: set) -> int:
    if id(node) in seen:
        return 0
    seen.add(id(node))
    kids = node.value if isinstance(node, yaml.SequenceNode) else (
        [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
    return 1 + sum(_unique_nodes(k, seen) for k in kids)


class NotYaml(AuditError):
    """Text that is not valid YAML (a ``--set`` value is then taken as a plain string)."""


def safe_yaml(text: str, what: str):
    """YAML text as Python values, with aliases bounded before anything is built.

    The document is composed into nodes (aliases shared, not copied); its
    size with every alias expanded is counted without expanding it, and a
    document that aliases would grow by more than :data:`MAX_ALIAS_NODES`
    nodes (an alias bomb), or that nests too deep, is refused in one line.

    Raises:
        NotYaml: not valid YAML (an :class:`AuditError`).
        AuditError: nested too deep, or too many aliased nodes.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        unique = _unique_nodes(node, set())
        budget = unique + MAX_ALIAS_NODES
        if _expanded_nodes(node, {}, budget) > budget:
            raise AuditError(f"{what}: YAML aliases expand to more than {MAX_ALIAS_NODES} extra nodes "
                             "(an alias bomb?); write the values out")
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise NotYaml(f"{what}: not valid YAML{where}: {_cut(problem, 200)}") from None
    except RecursionError:
        raise AuditError(f"{what}: YAML nested too deeply") from None
    except (ValueError, OverflowError) as e:  # e.g. an integer of more than 4300 digits
        raise NotYaml(f"{what}: a value YAML cannot read: {_cut(e, 120)}") from None
    finally:
        loader.dispose()


def read_yaml(path) -> dict:
    """The job spec file as a mapping, refused in one line when too big, not YAML or an alias bomb.

    Raises:
        AuditError: missing, over :data:`MAX_SPEC_BYTES`, not valid YAML, or not a mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise AuditError(f"job spec not found: {p}")
    with open(p, "rb") as f:
        raw = f.read(MAX_SPEC_BYTES + 1)
    if len(raw) > MAX_SPEC_BYTES:
        raise AuditError(f"{p}: a job spec is at most {MAX_SPEC_BYTES // 1024} KiB; this one is larger")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AuditError(f"{p}: not UTF-8 text (byte {e.start})") from None
    doc = safe_yaml(text, str(p))
    if not isinstance(doc, dict):
        raise AuditError(f"{p}: a job spec is a YAML mapping (name:, model:, dataset:, ...)")
    return doc


def apply_overrides(doc: dict, overrides) -> dict:
    """Apply ``key.path=value`` strings; the value is parsed as YAML (``64``, ``[a, b]``, ``null``)."""
    doc = copy.deepcopy(doc)
    for item in overrides or ():
        key, sep, raw = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise AuditError(f"--set expects key.path=value, got {_short(str(item))}")
        if len(raw) > MAX_SPEC_BYTES:
            raise AuditError(f"--set {_cut(key)}: the value is longer than {MAX_SPEC_BYTES // 1024} KiB")
        try:
            value = safe_yaml(raw, f"--set {_cut(key)}") if raw.strip() else None
        except NotYaml:
            value = raw
        parts = key.split(".")
        node = doc
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise AuditError(f"--set {_cut(key)}: {_cut('.'.join(parts[:i + 1]))} is not a mapping")
            node = nxt
        node[parts[-1]] = value
    return doc


# ----------------------------------------------------------------------------
# validation with readable messages
# ----------------------------------------------------------------------------


def _where(path) -> str:
    out = ""
    for p in path:
        p = p if isinstance(p, int) else _cut(p, 40)  # a key may be any length
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _describe(schema: dict) -> str:
    """A few words for what a (sub)schema accepts."""
    if "const" in schema:
        return repr(schema["const"])
    if "enum" in schema:
        return "one of " + ", ".join(repr(v) for v in schema["enum"])
    for key in ("oneOf", "anyOf"):
        if key in schema:
            return " or ".join(_describe(s) for s in schema[key])
    typ = schema.get("type")
    types = typ if isinstance(typ, list) else [typ]
    words = []
    for t in types:
        if t == "array":
            n = schema.get("minItems")
            item = _plural(_describe(schema["items"])) if schema.get("items") else "values"
            if n and n == schema.get("maxItems"):
                words.append(f"a list of {n} {item}")
            else:
                words.append(f"a list of {item}")
        elif t == "integer" or t == "number":
            rng = []
            if "minimum" in schema:
                rng.append(f">= {schema['minimum']}")
            if "exclusiveMinimum" in schema:
                rng.append(f"> {schema['exclusiveMinimum']}")
            if "maximum" in schema:
                rng.append(f"<= {schema['maximum']}")
            words.append(("an integer" if t == "integer" else "a number") + (" " + " and ".join(rng) if rng else ""))
        elif t == "null":
            words.append("null")
        elif t == "string":
            words.append("a string")
        elif t == "boolean":
            words.append("true or false")
        elif t == "object":
            keys = list(schema.get("properties", {}))
            words.append(f"a mapping of {', '.join(keys)}" if keys else "a mapping")
        elif t:
            words.append(str(t))
    return " or ".join(words) or "a valid value"


def _plural(words: str) -> str:
    for a, b in (("an integer", "integers"), ("a number", "numbers"), ("a string", "strings"),
                 ("a mapping", "mappings"), ("one of ", "values among ")):
        if words.startswith(a):
            return b + words[len(a):]
    return words


def _message(err) -> str:
    where = _where(err.absolute_path)
    v = err.validator
    if v in ("oneOf", "anyOf") and isinstance(err.instance, dict):
        # a mapping where one alternative takes a mapping: what is wrong inside it
        inside = [c for c in err.context if c.validator not in ("type", "const", "enum")]
        if inside:
            return _message(inside[0])
    if v == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed)) if isinstance(err.instance, dict) else []
        if extra and allowed:
            hint = difflib.get_close_matches(extra[0], allowed, n=1)
            did = f"did you mean {hint[0]!r}? " if hint else ""
            return (f"unknown key {_where([*err.absolute_path, extra[0]])!r}; {did}"
                    f"expected one of: {', '.join(allowed)}")
        return f"{where}: {_describe(err.schema.get('additionalProperties', {}))} expected, got {_short(err.instance)}"
    if v == "required":
        missing = err.message.split("'")[1] if "'" in err.message else err.message
        return f"missing required key {_where([*err.absolute_path, missing])!r}"
    if v == "pattern":
        return (f"{where}: bad name {_short(err.instance)}: use lower-case letters, digits and _ "
                "(it becomes a column name)")
    shown = _short(err.instance)
    if v in ("oneOf", "anyOf", "type", "enum", "const", "minItems", "maxItems", "minimum", "maximum",
             "exclusiveMinimum", "minLength", "items", "uniqueItems"):
        if v == "uniqueItems":
            return f"{where}: the list has duplicates: {shown}"
        return f"{where}: expected {_describe(err.schema)}, got {shown}"
    return f"{where}: {_cut(err.message, MAX_SHOWN * 2)}"


def validate(doc: dict) -> None:
    """Raise :class:`AuditError` naming the first problem (key path and what was expected)."""
    validator = jsonschema.Draft202012Validator(job_schema())
    errors = list(itertools.islice(validator.iter_errors(doc), 200))  # a long bad list: the first ones do
    if not errors:
        return
    # shallowest first: an unknown section is reported before what is inside it
    errors.sort(key=lambda e: (len(e.absolute_path), str(list(e.absolute_path))))
    msg = _cut(_message(errors[0]), MAX_MESSAGE)
    raise AuditError(f"spec error: {msg}")


def numeric_bounds(schema: dict | None = None) -> dict[str, tuple]:
    """{key path: (lowest, highest)} of every numeric knob of the job schema (docs/jobs.md, "Bounds").

    The lowest is written ``> x`` for an exclusive minimum; ``[]`` in a path
    stands for a list's items, ``*`` for any key of a mapping.
    """
    out: dict[str, tuple] = {}

    def walk(node, path):
        if not isinstance(node, dict):
            return
        types = node.get("type")
        types = types if isinstance(types, list) else [types]
        if {"integer", "number"} & set(types):
            low = f"> {node['exclusiveMinimum']}" if "exclusiveMinimum" in node else node.get("minimum")
            out[path] = (low, node.get("maximum"))
        for key, sub in node.get("properties", {}).items():
            walk(sub, f"{path}.{key}" if path else key)
        for alt in node.get("oneOf", []) + node.get("anyOf", []):
            walk(alt, path)
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{path}.*")

    walk(schema or job_schema(), "")
    return out


def fill_defaults(doc: dict, schema: dict | None = None) -> dict:
    """Copy of ``doc`` with every missing key that has a default in the schema."""
    schema = schema or job_schema()
    out = copy.deepcopy(doc)

    def walk(node, sch):
        for key, sub in sch.get("properties", {}).items():
            if key not in node:
                if "default" in sub:
                    node[key] = copy.deepcopy(sub["default"])
                elif sub.get("type") == "object" and "properties" in sub:
                    node[key] = {}
            if isinstance(node.get(key), dict) and "properties" in sub:
                walk(node[key], sub)

    walk(out, schema)
    return out


# ----------------------------------------------------------------------------
# the whole thing
# ----------------------------------------------------------------------------


def _resolve(p, base: Path) -> str:
    if fs.is_uri(str(p)):  # s3://, gs://, abfs://: as written
        return str(p)
    q = Path(os.path.expanduser(str(p)))
    return str(q if q.is_absolute() else (base / q).resolve())


def load_spec(spec, overrides=(), base_dir=None) -> JobSpec:
    """Read, override, validate, default and resolve a job spec.

    ``spec`` is a path to a YAML file or a dict (then relative paths resolve
    against ``base_dir``, default the current directory).  Relative paths in
    the file resolve against the file's directory; a path given in
    ``overrides`` (``--set output=results/x``) against the current directory.  Returns a
    :class:`audit.data.jobspec.JobSpec` (validated once, absolute paths, every default
    filled in); ``spec.to_dict()`` is what ``job.json`` holds.

    Raises:
        AuditError: the first mistake, as one line naming its key.
    """
    if isinstance(spec, JobSpec):
        spec = spec.to_dict()
    if isinstance(spec, dict):
        doc = copy.deepcopy(spec)
        base = Path(base_dir or os.getcwd()).resolve()
        default_name = "job"
    else:
        doc = read_yaml(spec)
        base = Path(base_dir or Path(spec).resolve().parent)
        default_name = Path(spec).stem
    doc = apply_overrides(doc, overrides)
    validate(doc)
    doc = fill_defaults(doc)
    doc.setdefault("name", default_name)
    # paths written in the spec are relative to its directory; paths given
    # with --set on the command line are relative to the current directory
    from_cli = {str(o).partition("=")[0].strip() for o in overrides or ()}
    cwd = Path(os.getcwd())
    keys_list = list(_PATH_KEYS)
    if formats.get(doc["dataset"]["format"]).masks_is_path:
        keys_list.append(("dataset", "masks"))
    for keys in keys_list:
        node = doc
        for k in keys[:-1]:
            node = node[k]
        if node.get(keys[-1]):
            node[keys[-1]] = _resolve(node[keys[-1]], cwd if ".".join(keys) in from_cli else base)
    try:
        check(doc)
    except AuditError as e:
        if len(str(e)) > MAX_MESSAGE:  # a path or name of any length: the line stays one line
            raise AuditError(_cut(str(e), MAX_MESSAGE)) from None
        raise
    return JobSpec.from_dict(doc)


def check(doc: dict) -> None:
    """Checks the schema cannot express; each failure is one line naming the key.

    Args:
        doc: the spec, already validated against the schema, paths resolved.

    Raises:
        AuditError: the first mistake found, as one line naming its key.
    """
    _check_model(doc["model"])
    _check_dataset(doc)
    _check_explain(doc["explain"])
    _check_resources(doc["resources"])
    _check_output(doc["output"])


def _check_model(m: dict) -> None:
    if bool(m.get("path")) == bool(m.get("application")):
        raise AuditError("spec error: model: give exactly one of 'path' (a .keras or .h5 file) or 'application'")
    if m.get("path") and not fs.exists(m["path"]):
        raise AuditError(f"spec error: model.path: model file not found: {m['path']}")
    if m.get("path") and fs.is_uri(m["path"]):
        if Path(m["path"]).suffix not in MODEL_SUFFIXES:
            raise AuditError(f"spec error: model.path: expected a .keras or .h5 file, got {m['path']}")
    elif m.get("path") and (os.path.isdir(m["path"]) or Path(m["path"]).suffix not in MODEL_SUFFIXES):
        # the same rule as audit.engine.models.load_model, found before any Ray actor starts
        raise AuditError(f"spec error: model.path: expected a .keras or .h5 file, got {m['path']}"
                         + (" (a directory, e.g. a SavedModel, which Keras 3 cannot open layer by layer: "
                            "save the model with model.save('m.keras'))"
                            if os.path.isdir(m["path"]) else ""))
    if m.get("weights") and not os.path.isfile(m["weights"]):
        raise AuditError(f"spec error: model.weights: file not found: {m['weights']}")

    if m["preprocess"] not in PREPROCESS_MODES:
        try:
            check_preprocess(m["preprocess"])
        except AuditError as e:
            raise AuditError(f"spec error: model.preprocess: {e}") from None


def _check_dataset(doc: dict) -> None:
    ds = doc["dataset"]
    if not fs.exists(ds["path"]):
        raise AuditError(f"spec error: {fs.not_found(ds['path'], 'dataset.path')}")
    formats.get(ds["format"]).check(DatasetSpec.from_partial(ds))
    if ds.get("classes"):  # the same rule as the Explainer: class names first, then indices
        try:
            resolve_target(doc["explain"]["target"], list(ds["classes"]), len(ds["classes"]))
        except AuditError as e:
            raise AuditError(f"spec error: explain.target: {e}") from None


def _check_explain(explain: dict) -> None:
    grid = explain.get("token_grid")
    if grid and grid[0] * grid[1] < 2:
        raise AuditError(f"spec error: explain.token_grid: {list(grid)} is one cell; a map needs h x w > 1")
    for name, box in explain["regions"].items():
        if not (box[0] < box[2] and box[1] < box[3]):
            raise AuditError(f"spec error: explain.regions.{name}: expected x0 < x1 and y0 < y1, got {box}")


def _check_output(output) -> None:
    if fs.is_uri(str(output)):
        return  # a bucket: checked by the job before anything is written (audit.data.io.check_output)
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise AuditError(f"spec error: output: {out} exists and is not a directory")
    for parent in out.parents:  # the first existing ancestor must be a folder we can create in
        if parent.exists():
            if not parent.is_dir():
                raise AuditError(f"spec error: output: {parent} is not a directory, cannot create {out}")
            if not out.exists() and not os.access(parent, os.W_OK | os.X_OK):
                raise AuditError(f"spec error: output: cannot create {out}: {parent} is not writable")
            break


def _check_resources(res: dict) -> None:
    """``actors: {min, max}`` in order; an accelerator type with GPUs to go with it."""
    actors = res["actors"]
    if isinstance(actors, dict) and actors.get("min", 1) > actors["max"]:
        raise AuditError(f"spec error: resources.actors: min ({actors['min']}) is more than max ({actors['max']})")
    gpa = res["gpus_per_actor"]
    if res.get("accelerator_type") and (gpa == "auto" or not gpa):
        raise AuditError("spec error: resources.accelerator_type needs resources.gpus_per_actor > 0 "
                         f"(a number, not {gpa!r}): the actors ask for GPUs of that type")
