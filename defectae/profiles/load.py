"""Profile resolution: TOML files and `--set` overrides in, a validated `Profile` out.

A name `DATASET-MODEL` merges, in order: schema defaults, `profiles/datasets/DATASET.toml`,
`profiles/models/MODEL.toml`, the optional pair file `profiles/DATASET-MODEL.toml`,
then `--set section.key=value` and `--root`. Every key remembers which file set it, so
an error names the file and the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import tomli_w

from defectae.errors import DefectaeError
from defectae.files import write_text_atomic
from defectae.profiles.schema import MODEL_SECTIONS, Profile

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PROFILE_FILE = "profile.toml"
CLI = "--set"


def profile_dirs() -> list[Path]:
    """Where profiles are looked up: $DEFECTAE_PROFILES, ./profiles, then the shipped ones."""
    dirs = []
    if env := os.environ.get("DEFECTAE_PROFILES"):
        dirs += [Path(p) for p in env.split(os.pathsep) if p]
    dirs.append(Path.cwd() / "profiles")
    dirs.append(shipped_dir())
    seen, unique = set(), []
    for d in dirs:
        key = d.resolve()
        if key not in seen and d.is_dir():
            seen.add(key)
            unique.append(d)
    return unique


def shipped_dir() -> Path:
    """The profiles that ship with defectae: package data of a wheel, else a checkout's profiles/."""
    packaged = resources.files("defectae") / "_profiles"
    if isinstance(packaged, Path) and packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "profiles"


def _find(kind: str, name: str) -> Path | None:
    for d in profile_dirs():
        p = d / kind / f"{name}.toml" if kind else d / f"{name}.toml"
        if p.is_file():
            return p
    return None


def available(kind: str) -> list[str]:
    """Names of the dataset (`datasets`) or model (`models`) profiles on the search path."""
    names = {p.stem for d in profile_dirs() for p in (d / kind).glob("*.toml")}
    return sorted(names)


def pair_names() -> list[str]:
    """Names of the shipped pair override files `profiles/DATASET-MODEL.toml`."""
    return sorted({p.stem for d in profile_dirs() for p in d.glob("*.toml")})


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file, turning syntax errors into one-line user errors."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise DefectaeError(f"{path}: profile file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise DefectaeError(f"{path}: invalid TOML: {e}") from None


# ----------------------------------------------------------------------------- merging


class _Layers:
    """Merged raw TOML with the file that set each key."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.origin: dict[tuple[str, ...], str] = {}

    def add(self, data: dict[str, Any], source: str, prefix: tuple[str, ...] = ()) -> None:
        target = self.data
        for key in prefix:
            target = target.setdefault(key, {})
        self._merge(target, data, source, prefix)

    def _merge(self, target: dict, data: dict, source: str, path: tuple[str, ...]) -> None:
        for key, value in data.items():
            kpath = path + (key,)
            if (
                isinstance(value, dict)
                and isinstance(target.get(key), dict)
                and kpath != ("model", "args")
            ):
                self._merge(target[key], value, source, kpath)
            elif (
                isinstance(value, dict)
                and kpath == ("model", "args")
                and isinstance(target.get(key), dict)
            ):
                target[key] = {**target[key], **value}
                for k in value:
                    self.origin[kpath + (k,)] = source
                self.origin[kpath] = source
            else:
                target[key] = value
                self.origin[kpath] = source

    def source(self, path: tuple[str, ...]) -> str:
        while path:
            if path in self.origin:
                return self.origin[path]
            path = path[:-1]
        return "profile"


def _split_name(name: str) -> tuple[str, str]:
    candidates = []
    parts = name.split("-")
    for i in range(1, len(parts)):
        ds, model = "-".join(parts[:i]), "-".join(parts[i:])
        if _find("datasets", ds) and _find("models", model):
            candidates.append((ds, model))
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        raise DefectaeError(f"profile '{name}' is ambiguous: {candidates}")
    known = [f"{d}-{m}" for d in available("datasets") for m in available("models")]
    near = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean '{near[0]}'?" if near else "; see `defectae profiles list`"
    raise DefectaeError(
        f"profile '{name}': expected DATASET-MODEL with profiles/datasets/DATASET.toml and "
        f"profiles/models/MODEL.toml{hint}"
    )


def resolve(name: str, sets: list[str] | None = None, root: str | None = None) -> Profile:
    """Resolve a profile name or TOML path plus overrides into a validated `Profile`."""
    layers = _Layers()
    looks_like_path = name.endswith(".toml") or os.sep in name
    if looks_like_path:
        path = Path(name)
        if not path.is_file():
            raise DefectaeError(f"{path}: profile file not found")
        data = read_toml(path)
        base = data.pop("base", None)
        if base is not None:
            if not isinstance(base, str):
                raise DefectaeError(f"{path}: key 'base': expected a profile name string")
            _add_named(layers, base)
        layers.add(data, str(path))
        profile_name = (
            data.get("name", path.stem) if isinstance(data.get("name"), str) else path.stem
        )
        layers.data.pop("name", None)
    else:
        _add_named(layers, name)
        profile_name = name
    for item in sets or []:
        _apply_set(layers, item)
    if root is not None:
        layers.add({"dataset": {"root": root}}, "--root")
    layers.data["name"] = profile_name
    return build(layers.data, layers.source)


def _add_named(layers: _Layers, name: str) -> None:
    ds, model = _split_name(name)
    ds_path, model_path = _find("datasets", ds), _find("models", model)
    assert ds_path and model_path
    ds_data = read_toml(ds_path)
    _only_sections(ds_data, ("dataset",), ds_path)
    ds_data["dataset"] = {**ds_data.get("dataset", {}), "name": ds}
    layers.add(ds_data, str(ds_path))
    model_data = read_toml(model_path)
    _only_sections(model_data, MODEL_SECTIONS, model_path)
    model_data["model"] = {**model_data.get("model", {}), "name": model}
    layers.add(model_data, str(model_path))
    if pair := _find("", name):
        layers.add(read_toml(pair), str(pair))


def _only_sections(data: dict[str, Any], allowed: tuple[str, ...], path: Path) -> None:
    for key in data:
        if key not in allowed:
            near = difflib.get_close_matches(key, allowed, n=1)
            hint = (
                f" (did you mean '{near[0]}'?)"
                if near
                else f"; expected one of {', '.join(allowed)}"
            )
            raise DefectaeError(f"{path}: unknown section '{key}'{hint}")


def _apply_set(layers: _Layers, item: str) -> None:
    if "=" not in item:
        raise DefectaeError(f"{CLI} '{item}': expected section.key=value")
    key, raw = item.split("=", 1)
    path = tuple(p for p in key.strip().split("."))
    if len(path) < 2 or not all(path):
        raise DefectaeError(f"{CLI} '{item}': expected section.key=value")
    hint = _type_at(path)
    value = _parse_value(raw.strip(), hint, item)
    nested: dict[str, Any] = {path[-1]: value}
    for part in reversed(path[:-1]):
        nested = {part: nested}
    layers.add(nested, f"{CLI} {key}")


def _type_at(path: tuple[str, ...]) -> Any:
    """The schema type at a dotted path (Any inside model.args); unknown paths are reported later."""
    cls: Any = Profile
    for part in path:
        if not dataclasses.is_dataclass(cls):
            return Any
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return Any
        cls = hints[part]
    return cls


def _parse_value(raw: str, hint: Any, item: str) -> Any:
    if hint is str or (
        get_origin(hint) is Literal and all(isinstance(a, str) for a in get_args(hint))
    ):
        return raw
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        if hint is Any:
            return raw
        raise DefectaeError(f"{CLI} '{item}': cannot parse '{raw}' as {_type_name(hint)}") from None


# ----------------------------------------------------------------------------- validation


def build(data: dict[str, Any], source: Any = lambda path: "profile") -> Profile:
    """Convert merged raw TOML into a `Profile`, checking keys, types and ranges."""
    return _to_dataclass(Profile, data, (), source)


def section_from_dict(cls: type, name: str, data: Any, source: str) -> Any:
    """One profile section (e.g. TileConfig) from plain data, checked like a profile's."""
    return _to_dataclass(cls, data, (name,), lambda path: source)


def _to_dataclass(cls: type, data: Any, path: tuple[str, ...], source: Any) -> Any:
    where = ".".join(path) or "profile"
    if not isinstance(data, dict):
        raise DefectaeError(f"{source(path)}: key '{where}': expected a table, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            full = ".".join(path + (key,))
            raise DefectaeError(f"{source(path + (key,))}: unknown key '{full}'{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        kpath = path + (name,)
        value = _coerce(hints[name], data[name], kpath, source)
        lo, hi = f.metadata.get("range", (None, None))
        _check_range(value, lo, hi, kpath, source)
        kwargs[name] = value
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, path: tuple[str, ...], source: Any) -> Any:
    where = ".".join(path)

    def bad(expected: str) -> DefectaeError:
        return DefectaeError(f"{source(path)}: key '{where}': expected {expected}, got {value!r}")

    if not isinstance(value, (dict, list, tuple)) or hint is Any:
        if not _all_finite(value):
            raise bad("a finite number (nan and inf are not settings)")
    if dataclasses.is_dataclass(hint):
        return _to_dataclass(hint, value, path, source)
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin is Literal:
        if value not in get_args(hint):
            choices = ", ".join(repr(a) for a in get_args(hint))
            raise bad(f"one of {choices}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if origin is tuple:
        args = get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad(f"a list of {len(args)} {_type_name(args[0])}s")
        return tuple(_coerce(a, v, path, source) for a, v in zip(args, value, strict=True))
    if origin is list:
        (arg,) = get_args(hint)
        if not isinstance(value, list):
            raise bad(f"a list of {_type_name(arg)}s")
        return [_coerce(arg, v, path, source) for v in value]
    if origin is dict:
        _, arg = get_args(hint)
        if not isinstance(value, dict):
            raise bad("a table")
        return {k: _coerce(arg, v, path + (k,), source) for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(hint):
            try:
                return _coerce(arg, value, path, source)
            except DefectaeError:
                continue
        raise bad(_type_name(hint))
    raise TypeError(f"unsupported schema type {hint!r} at {where}")


def _all_finite(value: Any) -> bool:
    """False when a float anywhere in the value (lists and tables included) is nan or infinite."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_all_finite(v) for v in value)
    return True


def _check_range(
    value: Any, lo: float | None, hi: float | None, path: tuple[str, ...], source: Any
) -> None:
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            span = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise DefectaeError(
                f"{source(path)}: key '{'.'.join(path)}': expected a value in {span}, got {value!r}"
            )


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))


# ----------------------------------------------------------------------------- output


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables as dotted keys: {"loss": {"beta": 1}} -> {"loss.beta": 1}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def to_dict(profile: Profile) -> dict[str, Any]:
    """The profile as plain TOML-ready data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(profile)


def from_dict(data: dict[str, Any], source: str = "profile") -> Profile:
    """Rebuild a `Profile` from `to_dict` output (e.g. stored in a checkpoint)."""
    return build(data, lambda path: source)


def to_toml(profile: Profile) -> str:
    """The fully resolved profile as TOML; `resolve()` of this text gives the same profile."""
    return tomli_w.dumps(to_dict(profile))


def write_profile(profile: Profile, directory: str | Path, name: str = PROFILE_FILE) -> Path:
    """Write the resolved profile next to an output so the run can be reproduced exactly."""
    path = Path(directory) / name
    write_text_atomic(path, to_toml(profile))
    return path


def load_written(path: str | Path) -> Profile:
    """Read a profile written by `write_profile`."""
    path = Path(path)
    return build(read_toml(path), lambda p: str(path))
