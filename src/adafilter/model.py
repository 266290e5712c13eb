"""Compatibility module: the model code lives in :mod:`adafilter.tuner`.

``from adafilter.model import wrap, AdaFilterModel, plan_gating, ...`` keeps working.
"""

from .tuner import *  # noqa: F403
from .tuner import __all__  # noqa: F401
