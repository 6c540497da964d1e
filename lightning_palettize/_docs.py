"""Renders the configuration reference of README.md from the config classes themselves.

``python -m lightning_palettize._docs`` prints it; ``tests/test_docs.py`` fails when README.md
and the classes disagree, so the reference cannot drift.
"""

from __future__ import annotations

import dataclasses

from lightning_palettize.config import (
    DKMPalettizerConfig,
    ModuleDKMPalettizerConfig,
    ModulePostTrainingPalettizerConfig,
    ModuleSKMPalettizerConfig,
    PostTrainingPalettizerConfig,
    SKMPalettizerConfig,
)

START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"

_CLASSES = [
    (ModulePostTrainingPalettizerConfig, PostTrainingPalettizerConfig),
    (ModuleSKMPalettizerConfig, SKMPalettizerConfig),
    (ModuleDKMPalettizerConfig, DKMPalettizerConfig),
]


def _fmt(value: object) -> str:
    return f"`{value!r}`".replace("|", "\\|")


def _type(field: dataclasses.Field) -> str:
    t = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", field.type)
    return f"`{t}`".replace("|", "\\|")


def config_reference() -> str:
    """The markdown block (between its markers) listing every field and default."""
    lines = [START, ""]
    for module_cls, top_cls in _CLASSES:
        lines.append(f"#### `{module_cls.__name__}` (per module; in `{top_cls.__name__}`)")
        lines.append("")
        lines.append("| field | type | default |")
        lines.append("|---|---|---|")
        for f in dataclasses.fields(module_cls):
            lines.append(f"| `{f.name}` | {_type(f)} | {_fmt(f.default)} |")
        extra = [
            f
            for f in dataclasses.fields(top_cls)
            if f.name not in ("global_config", "module_type_configs", "module_name_configs")
        ]
        lines.append("")
        top = ", ".join(f"`{f.name}` = {_fmt(f.default)}" for f in extra)
        lines.append(
            f"`{top_cls.__name__}`: `global_config`, `module_type_configs`, "
            f"`module_name_configs`" + (f", {top}" if top else "") + "."
        )
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


if __name__ == "__main__":
    print(config_reference())
