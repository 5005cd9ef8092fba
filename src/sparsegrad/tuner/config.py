"""SparseGradConfig: SparseGrad as a peft method (``get_peft_model(model, SparseGradConfig(...))``)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from peft.config import PeftConfig

from ..basis import Bases
from ..layer import MODES
from ..support import STRUCTURES
from ..util import file_sha256

PEFT_TYPE = "SPARSEGRAD"  # the key of this method in peft's look-up tables (see tuner/__init__.py)


class _HeldBases:
    """A Bases object carried by a config: passed by reference (peft copies configs), never written to JSON."""

    def __init__(self, bases: Bases) -> None:
        self.bases = bases

    def __deepcopy__(self, memo) -> _HeldBases:
        return self

    def __repr__(self) -> str:
        return repr(self.bases)


@dataclass
class SparseGradConfig(PeftConfig):
    """Configuration of a SparseGrad adapter.

    Args:
        target_modules: the MLP linears (peft's convention: a list of name suffixes, or one regular
            expression over the whole name). Default: the architecture's MLP linears
            (``sparsegrad.DEFAULT_TARGETS``).
        blocks: narrow the targets to some blocks: a list of indices, or "every:3".
        density: share of each layer's entries that train (default 0.01, the paper's 1%).
        n_params: trained entries per layer, instead of a density.
        mode: "fixed" (a support chosen once from the preliminary phase's energy; exact gradient
            there) or "dynamic" (the paper: top-k of the transformed gradient at every step).
        structure: the fixed mode's support: "scattered" (the top-k entries of the energy, the paper's)
            or "block" (k entries in r rows x c columns of S: cheaper gradient and fold).
        bases: the preliminary phase's output: a ``Bases`` object (``sparsegrad.compute_bases``), or
            the path of a file written by ``Bases.save``. None when the adapter is loaded from a
            folder that embeds them, or when ``SparseGradCallback`` computes them from a
            Trainer's own dataloader.
        embed_bases: save the basis rows the trained entries use inside the adapter (self-contained),
            or only a reference to the ``bases`` file (path and SHA-256; smaller).
        modules_to_save: other modules trained whole and saved (a task head, ...).
    """

    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "MLP linears to adapt (default: the architecture's)"})
    blocks: list[int] | str | None = field(default=None, metadata={"help": "blocks to adapt"})
    density: float | None = field(default=None, metadata={"help": "share of each layer's entries trained"})
    n_params: int | None = field(default=None, metadata={"help": "entries trained per layer"})
    mode: str = field(default="fixed", metadata={"help": "'fixed' or 'dynamic'"})
    structure: str = field(default="scattered", metadata={"help": "the fixed support: 'scattered' or 'block'"})
    bases: str | Bases | None = field(default=None, metadata={"help": "Bases object or bases file"})
    bases_sha256: str | None = field(default=None, metadata={"help": "of the bases file (set on save)"})
    embed_bases: bool = field(default=True, metadata={"help": "save the basis rows in the adapter"})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "modules trained whole"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if self.mode not in MODES or self.mode == "meprop":
            raise ValueError(f"mode={self.mode!r}: SparseGradConfig takes 'fixed' or 'dynamic'")
        if self.structure not in STRUCTURES:
            raise ValueError(f"structure={self.structure!r}: SparseGradConfig takes one of {STRUCTURES}")
        if self.structure != "scattered" and self.mode != "fixed":
            raise ValueError(f"structure={self.structure!r} shapes the fixed mode's support: use it with mode='fixed'")
        if self.density is not None and self.n_params is not None:
            raise ValueError("pass density or n_params, not both")
        if isinstance(self.bases, Bases):
            self.bases = _HeldBases(self.bases)
        elif self.bases is not None and not isinstance(self.bases, (str, os.PathLike, _HeldBases)):
            raise TypeError(f"bases must be a Bases object or the path of a bases file, got {type(self.bases).__name__}")
        if isinstance(self.bases, os.PathLike):
            self.bases = os.fspath(self.bases)
        if not self.embed_bases and not isinstance(self.bases, str):
            raise ValueError("embed_bases=False saves a reference to the bases file: pass bases='<path of a "
                             "file written by Bases.save>'")

    def resolve_bases(self) -> Bases | None:
        """The Bases this config names (loaded from its file), or None."""
        if isinstance(self.bases, _HeldBases):
            return self.bases.bases
        if isinstance(self.bases, str):
            if self.bases_sha256 is not None and file_sha256(self.bases) != self.bases_sha256:
                raise ValueError(f"{self.bases} is not the bases file this adapter was trained with (its SHA-256 "
                                 "differs): pass the original file")
            return Bases.load(self.bases)
        return None

    def to_dict(self) -> dict:
        out = super().to_dict()
        if isinstance(self.bases, str):
            out["bases"] = os.path.abspath(self.bases)
            if not self.embed_bases and self.bases_sha256 is None and os.path.isfile(self.bases):
                out["bases_sha256"] = file_sha256(self.bases)
        else:
            out["bases"] = None  # a Bases object: the adapter embeds the rows it needs
        return out
