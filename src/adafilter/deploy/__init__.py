"""Use a trained run: load it back, classify images, export it for deployment.

* :func:`load` (:mod:`.loaded`) takes a run directory, its ``checkpoint.pt`` or a file written
  by :func:`export_run` and returns a :class:`LoadedRun`: the model in eval mode plus its class
  names, evaluation transform, method and configuration.
* :func:`rebuild_model` (:mod:`.rebuild`) is the one place that turns saved weights back into a
  model (also used by ``adafilter eval``): the run's backbone and method are rebuilt without
  pretrained weights and the saved state is loaded strictly, so a file of another model is
  refused; :mod:`.files` reads checkpoints and exports.
* :func:`export_run` (:mod:`.export`) writes the weights alone (safetensors when installed,
  else a ``weights_only`` torch file) with the metadata embedded and next to it as JSON;
  :func:`export_program` writes a ``torch.export`` program that runs without adafilter.
* :mod:`.images`: :func:`find_images` and :func:`save_policy_chart` for ``adafilter predict``.

Nothing here unpickles code: torch files are read with ``torch.load(weights_only=True)``.
"""

from .export import ExportFormat, export_program, export_run
from .files import EXPORT_FORMAT, EXPORT_VERSION
from .images import find_images, save_policy_chart
from .loaded import FileResult, LoadedRun, Prediction, load
from .rebuild import RebuiltModel, rebuild_model

__all__ = [
    "EXPORT_FORMAT",
    "EXPORT_VERSION",
    "ExportFormat",
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
