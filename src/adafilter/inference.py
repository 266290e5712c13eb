"""Compatibility module: loading, prediction and export live in :mod:`adafilter.deploy`.

``from adafilter.inference import load, export_run, ...`` keeps working.
"""

from .deploy import *  # noqa: F403
from .deploy import __all__  # noqa: F401
