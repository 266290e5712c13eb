"""Compatibility module: loading, prediction and export live in :mod:`adafilter.deploy`.

``from adafilter.inference import load, export_run, ...`` keeps working.
"""

from .deploy import (
    EXPORT_FORMAT,
    FileResult,
    LoadedRun,
    Prediction,
    RebuiltModel,
    export_program,
    export_run,
    find_images,
    load,
    rebuild_model,
    save_policy_chart,
)

__all__ = [
    "EXPORT_FORMAT",
    "FileResult",
    "LoadedRun",
    "Prediction",
    "RebuiltModel",
    "export_program",
    "export_run",
    "find_images",
    "load",
    "rebuild_model",
    "save_policy_chart",
]
