"""SparseGrad as a peft method: ``get_peft_model(model, SparseGradConfig(...))``.

Importing this package adds SparseGrad to peft's look-up tables (config, tuner and prefix by
type name), the tables ``peft.register_peft_method`` fills for peft's own methods. That function
itself only accepts names of peft's closed ``PeftType`` enum, and the tables are the only place
the type is looked up, so they are filled directly. Import it (or ``sparsegrad.SparseGradConfig``)
before ``PeftModel.from_pretrained`` reads a SparseGrad adapter.

Tested with peft 0.21; the adapter state goes through ``BaseTuner._get_adapter_state_dict`` /
``_remap_adapter_state_dict_for_load``, which older peft releases lack.
"""
from __future__ import annotations

import peft
from peft import mapping
from peft.tuners.tuners_utils import BaseTuner

from .config import PEFT_TYPE, SparseGradConfig
from .layer import SparseGradLayer
from .model import SparseGradModel, compute_adapter_bases, fill_bases
from .trainer import SparseGradCallback

PEFT_RANGE = ">=0.21,<0.22"
_NEEDED = ("_get_adapter_state_dict", "_remap_adapter_state_dict_for_load")
_TABLES = ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING")


def _register() -> None:
    missing = [name for name in _NEEDED if not hasattr(BaseTuner, name)]
    missing += [name for name in _TABLES if not isinstance(getattr(mapping, name, None), dict)]
    if missing:
        raise ImportError(f"sparsegrad's peft method needs peft{PEFT_RANGE}; this is peft {peft.__version__}, "
                          f"which lacks {', '.join(missing)}: pip install 'peft{PEFT_RANGE}'")
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = SparseGradConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = SparseGradModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = SparseGradModel.prefix


_register()

__all__ = ["PEFT_RANGE", "SparseGradCallback", "SparseGradConfig", "SparseGradLayer", "SparseGradModel",
           "compute_adapter_bases", "fill_bases"]
