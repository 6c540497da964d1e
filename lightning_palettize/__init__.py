"""lightning_palettize: palettization (LUT weight clustering) for PyTorch and Lightning.

The pure-PyTorch API mirrors ``coremltools.optimize.torch.palettization`` (same config classes,
arguments and defaults); the Lightning callbacks live in :mod:`lightning_palettize.callbacks`.
"""

from lightning_palettize.config import (
    DKMPalettizerConfig,
    ModuleDKMPalettizerConfig,
    ModulePostTrainingPalettizerConfig,
    ModuleSKMPalettizerConfig,
    PostTrainingPalettizerConfig,
    SKMPalettizerConfig,
    load_config,
)
from lightning_palettize.export import (
    compact_size,
    export_coreml,
    load_palettized,
    read_palettized_metadata,
    save_palettized,
)
from lightning_palettize.palette import Layout, Palette
from lightning_palettize.palettizers import DKMPalettizer, PostTrainingPalettizer
from lightning_palettize.palettizers._common import strip_coreml_metadata
from lightning_palettize.palettizers.skm import SKMPalettizer
from lightning_palettize.report import PalettizationReport, ReportRow

__version__ = "0.1.0"

__all__ = [
    "DKMPalettizer",
    "DKMPalettizerConfig",
    "Layout",
    "ModuleDKMPalettizerConfig",
    "ModulePostTrainingPalettizerConfig",
    "ModuleSKMPalettizerConfig",
    "Palette",
    "PalettizationReport",
    "PostTrainingPalettizer",
    "PostTrainingPalettizerConfig",
    "ReportRow",
    "SKMPalettizer",
    "SKMPalettizerConfig",
    "compact_size",
    "export_coreml",
    "load_config",
    "load_palettized",
    "read_palettized_metadata",
    "save_palettized",
    "strip_coreml_metadata",
]

# The Lightning face, imported on first use so plain-PyTorch users do not pay for Lightning.
_CALLBACK_EXPORTS = (
    "PalettizationCallback",
    "PostTrainingPalettizationCallback",
    "SKMPalettizationCallback",
    "load_palettized_checkpoint",
    "restore_palettization",
)
__all__ += list(_CALLBACK_EXPORTS)


def __getattr__(name: str):
    if name in _CALLBACK_EXPORTS:
        from lightning_palettize import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
