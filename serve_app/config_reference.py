"""The README's configuration reference, generated from the config models.

    python -m serve_app.config_reference            # print it
    python -m serve_app.config_reference --write    # replace the README's copy

A unit test keeps the README's copy equal to this output, so the reference cannot drift from
the fields the code accepts.
"""

from __future__ import annotations

import argparse
import re
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from serve_app.config import (
    LICENSE_SETTING_NAMES,
    MODEL_SETTING_NAMES,
    AppConfig,
    LicenseConfig,
    ModelConfig,
    _SettingsBase,
)

BEGIN = "<!-- config-reference:begin (python -m serve_app.config_reference --write) -->"
END = "<!-- config-reference:end -->"
README = Path(__file__).resolve().parents[1] / "README.md"


def type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(type_name(a) for a in args)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin in (tuple, list, dict):
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    if annotation is type(None):
        return "none"
    if annotation is SecretStr:
        return "secret"
    return getattr(annotation, "__name__", str(annotation))


def default_text(info: FieldInfo) -> str:
    if info.default_factory is dict:
        return "`{}`"
    if info.default_factory is not None:
        return "(computed)"
    if info.default is PydanticUndefined:
        return "required"
    value = info.default
    if isinstance(value, str) and value.startswith(str(Path.home())):
        value = "~" + value[len(str(Path.home())):]
    return f"`{value!r}`" if value not in (None, ()) else "unset"


def _cell(text: str | None) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")


def table(model: type[BaseModel], names: dict[str, str] | None, skip: set[str] = frozenset()
          ) -> list[str]:
    """Rows for ``model``'s fields; ``names`` maps a field to its ``SERVE_APP_*`` setting (None:
    the model is only reachable through a Serve config's ``args``). A setting read by
    ``Settings`` itself may default otherwise than the field: the row says so."""
    head = "| field | environment / `key=value` | type | default | description |"
    rows = [head, "|---|---|---|---|---|"]
    for field, info in model.model_fields.items():
        if field in skip:
            continue
        setting = None if names is None else names.get(field, field)
        env = "—" if setting is None else f"`SERVE_APP_{setting.upper()}`"
        default = default_text(info)
        own = _SettingsBase.model_fields.get(setting) if model is not _SettingsBase else None
        if own is not None and default_text(own) != default:
            default += f" (environment: {default_text(own)})"
        rows.append(f"| `{field}` | {env} | {type_name(info.annotation)} | "
                    f"{default} | {_cell(info.description)} |")
    return rows


def render() -> str:
    from serve_app.config import _NOT_DERIVED

    def names(model: type[BaseModel], renames: dict[str, str]) -> dict[str, str]:
        return {f: renames.get(f, f) for f in model.model_fields
                if f not in _NOT_DERIVED[model.__name__]}

    # Beside the derived settings: the fields ``Settings`` reads under names of its own.
    sections = [
        ("`ModelConfig`: one served model (a Serve config's `args.models[]`)",
         ModelConfig, {**names(ModelConfig, MODEL_SETTING_NAMES),
                       "served_model_name": "served_model_name"}),
        ("`AppConfig`: the application (a Serve config's `args`)",
         AppConfig, {**names(AppConfig, {}), "api_keys": "api_keys", "http_host": "host",
                     "http_port": "port", "key_store_path": "key_store_path"}),
        ("`LicenseConfig`: the customer's license (`args.license`)",
         LicenseConfig, {**names(LicenseConfig, LICENSE_SETTING_NAMES),
                         "ledger_path": "ledger_path"}),
    ]
    lines = [BEGIN, ""]
    shown: set[str] = set()
    for title, model, env in sections:
        lines += [f"#### {title}", ""]
        rows = table(model, env)
        # Fields without a setting of their own (`models`, `license`) are only in Serve configs.
        lines += [r.replace("`SERVE_APP_MODELS`", "—").replace("`SERVE_APP_LICENSE`", "—")
                  for r in rows]
        lines.append("")
        shown |= set(env.values())
    # Each setting once: the rest of ``Settings``' own fields have no config field.
    lines += ["#### Settings of the environment and `key=value` only (no field in a Serve "
              "config)", ""]
    lines += table(_SettingsBase, {}, skip=shown)
    lines += ["", END]
    return "\n".join(lines)


def readme_block(text: str) -> str:
    match = re.search(re.escape(BEGIN) + r".*?" + re.escape(END), text, re.S)
    if match is None:
        raise SystemExit(f"README.md has no block between {BEGIN!r} and {END!r}")
    return match.group(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="update README.md in place")
    args = parser.parse_args(argv)
    out = render()
    if not args.write:
        print(out)
        return
    text = README.read_text()
    README.write_text(text.replace(readme_block(text), out))
    print(f"updated {README}")


if __name__ == "__main__":
    main()
