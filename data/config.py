"""The repo's one command-line parser: `--key=value` flags into a config dataclass, and configs passed between files.

train.py, eval.py, browse.py and the data/ scripts each declare their options as a dataclass whose fields have plain
typed defaults (bool, int, float, str: "" means unset) and call `parse_config(Config, sys.argv[1:], PRESETS)`:
defaults, then a named preset, then the flags; `--help` lists every option with its default. It lives in data/ and
imports nothing of the repo, so every file, core or data/, can use it without an import circle.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, fields

BOOLS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def _convert(key: str, value: str, typ: type):
    """'--key=value' text -> the type of the field's default (a bool from true/false, 1/0 or yes/no)."""
    try:
        return BOOLS[value.lower()] if typ is bool else typ(value)
    except (KeyError, ValueError):
        raise SystemExit(f"--{key} expects {'true or false' if typ is bool else typ.__name__}, got {value!r}") from None


def parse_config(cls, argv: list[str], presets: dict[str, dict] | None = None):
    """Defaults <- `--preset=NAME` <- `--key=value` overrides (typed). Unknown keys stop with the closest matches."""
    presets = presets or {}
    if any(a in ("-h", "--help") for a in argv):
        print(f"options (--key=value), with defaults; presets: {', '.join(presets) or 'none'}")
        for f in fields(cls):
            print(f"  --{f.name}={getattr(cls(), f.name)!r}")
        raise SystemExit(0)
    overrides: dict[str, str] = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"expected --key=value, got {arg!r}")
        k, v = arg[2:].split("=", 1)
        overrides[k.replace("-", "_")] = v
    names = {f.name: type(f.default) for f in fields(cls)}  # (every field has a plain default)
    preset = overrides.pop("preset", None)
    if preset is not None and preset not in presets:
        raise SystemExit(f"unknown preset {preset!r}; known: {', '.join(presets) or 'none'}")
    values = dict(presets[preset]) if preset is not None else {}
    for k, v in overrides.items():
        if k not in names:
            close = difflib.get_close_matches(k, list(names), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
            raise SystemExit(f"unknown option --{k}{hint} (all options: {', '.join(names)})")
        values[k] = _convert(k, v, names[k])
    return cls(**values)


def subconfig(cls, cfg, **extra):
    """Another file's config dataclass (RolloutConfig, BrowseConfig) from the fields of `cfg` with the same names,
    then `extra` (None: that field's default). train.py's and eval.py's configs inherit both, so every field is
    there, with the same default: one place for each."""
    names = {f.name for f in fields(cls)}
    values = {**asdict(cfg), **extra}
    return cls(**{k: v for k, v in values.items() if k in names and v is not None})
