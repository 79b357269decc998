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
import os
from pathlib import Path

from audit.errors import AuditError

# keys holding paths, resolved against the spec file's directory
_PATH_KEYS = (("model", "path"), ("model", "weights"), ("dataset", "path"), ("output",))


def job_schema() -> dict:
    from audit.data import resources

    return resources.schema("job")


# ----------------------------------------------------------------------------
# reading and overrides
# ----------------------------------------------------------------------------


def read_yaml(path) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise AuditError(f"job spec not found: {p}")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise AuditError(f"{p}: not valid YAML{where}: {problem}") from None
    if not isinstance(doc, dict):
        raise AuditError(f"{p}: a job spec is a YAML mapping (name:, model:, dataset:, ...)")
    return doc


def apply_overrides(doc: dict, overrides) -> dict:
    """Apply ``key.path=value`` strings; the value is parsed as YAML (``64``, ``[a, b]``, ``null``)."""
    import yaml

    doc = copy.deepcopy(doc)
    for item in overrides or ():
        key, sep, raw = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise AuditError(f"--set expects key.path=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        parts = key.split(".")
        node = doc
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise AuditError(f"--set {key}: {'.'.join(parts[:i + 1])} is not a mapping")
            node = nxt
        node[parts[-1]] = value
    return doc


# ----------------------------------------------------------------------------
# validation with readable messages
# ----------------------------------------------------------------------------


def _where(path) -> str:
    out = ""
    for p in path:
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
        return f"{where}: {_describe(err.schema.get('additionalProperties', {}))} expected, got {err.instance!r}"
    if v == "required":
        missing = err.message.split("'")[1] if "'" in err.message else err.message
        return f"missing required key {_where([*err.absolute_path, missing])!r}"
    if v == "pattern":
        return (f"{where}: bad name {err.instance!r}: use lower-case letters, digits and _ "
                "(it becomes a column name)")
    shown = repr(err.instance)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    if v in ("oneOf", "anyOf", "type", "enum", "const", "minItems", "maxItems", "minimum", "maximum",
             "exclusiveMinimum", "minLength", "items", "uniqueItems"):
        if v == "uniqueItems":
            return f"{where}: the list has duplicates: {shown}"
        return f"{where}: expected {_describe(err.schema)}, got {shown}"
    return f"{where}: {err.message}"


def validate(doc: dict) -> None:
    """Raise :class:`AuditError` naming the first problem (key path and what was expected)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(job_schema())
    errors = list(validator.iter_errors(doc))
    if not errors:
        return
    # shallowest first: an unknown section is reported before what is inside it
    errors.sort(key=lambda e: (len(e.absolute_path), str(list(e.absolute_path))))
    raise AuditError(f"spec error: {_message(errors[0])}")


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
    from audit.data import fs

    if fs.is_uri(str(p)):  # s3://, gs://, abfs://: as written
        return str(p)
    q = Path(os.path.expanduser(str(p)))
    return str(q if q.is_absolute() else (base / q).resolve())


def load_spec(spec, overrides=(), base_dir=None) -> dict:
    """Read, override, validate, default and resolve a job spec.

    ``spec`` is a path to a YAML file or a dict (then relative paths resolve
    against ``base_dir``, default the current directory).  Relative paths in
    the file resolve against the file's directory; a path given in
    ``overrides`` (``--set output=results/x``) against the current directory.  Returns a plain
    dict (JSON-serialisable) with absolute paths and every default filled in.
    """
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
    if doc["dataset"]["format"] == "folder":
        keys_list.append(("dataset", "masks"))
    for keys in keys_list:
        node = doc
        for k in keys[:-1]:
            node = node[k]
        if node.get(keys[-1]):
            node[keys[-1]] = _resolve(node[keys[-1]], cwd if ".".join(keys) in from_cli else base)
    check(doc)
    return doc


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
    from audit.data import fs

    if m.get("path") and not fs.exists(m["path"]):
        raise AuditError(f"spec error: model.path: model file not found: {m['path']}")
    from audit.engine.models import MODEL_SUFFIXES, PREPROCESS_MODES

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
        from audit.engine.models import check_preprocess

        try:
            check_preprocess(m["preprocess"])
        except AuditError as e:
            raise AuditError(f"spec error: model.preprocess: {e}") from None


def _check_dataset(doc: dict) -> None:
    from audit.data import fs

    ds = doc["dataset"]
    if not fs.exists(ds["path"]):
        raise AuditError(f"spec error: {fs.not_found(ds['path'], 'dataset.path')}")
    fmt = ds["format"]
    if fmt in ("folder",) and not fs.is_dir(ds["path"]):
        raise AuditError(f"spec error: dataset.path: format 'folder' needs a directory, got {ds['path']}")
    if fmt == "manifest" and not fs.is_file(ds["path"]):
        raise AuditError(f"spec error: dataset.path: format 'manifest' needs a CSV file, got {ds['path']}")
    if fmt == "folder" and ds.get("masks") and not fs.is_dir(ds["masks"]):
        raise AuditError(f"spec error: dataset.masks: not a directory: {ds['masks']}")
    if ds.get("classes"):  # the same rule as the Explainer: class names first, then indices
        from audit.engine.heads import resolve_target

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
    from audit.data import fs

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
