"""Every default of the tool, in one place.

Frozen dataclasses, one per stage. The CLI reads its option defaults from here, the library
functions take these objects, and every store records the resolved config in its provenance.
Paper defaults are marked (paper); defaults we chose by measurement say where it was measured.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

IGNORE_INDEX = 255  # the one label value meaning "unsure / ignore" in every mask

OTSolver = Literal["dhr", "pot"]
Marginals = Literal["seeded", "uniform"]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class SinkhornConfig:
    """The OT operator f_OT of METHOD.md."""

    eps: float = 0.1  # entropic regularisation (paper)
    max_iter: int = 100  # iteration cap (paper)
    tol: float = 1e-2  # stop when mean |r - r_prev| < tol; scale dependent (paper)
    solver: OTSolver = "dhr"  # "dhr": the authors' rule, batched; "pot": POT's converged log solver

    def __post_init__(self) -> None:
        _check(self.eps > 0, f"eps must be > 0, got {self.eps}")
        _check(self.max_iter >= 1, f"max_iter must be >= 1, got {self.max_iter}")
        _check(self.tol > 0, f"tol must be > 0, got {self.tol}")
        _check(self.solver in ("dhr", "pot"), f"solver must be 'dhr' or 'pot', got {self.solver!r}")


@dataclass(frozen=True)
class CRFConfig:
    """Mean-field dense CRF (deeplab-style parameters, as the authors use with pydensecrf)."""

    n_iter: int = 10
    gauss_sxy: float = 1.0
    gauss_compat: float = 3.0
    bilateral_sxy: float = 67.0
    bilateral_srgb: float = 3.0
    bilateral_compat: float = 4.0
    # Resolution the mean field runs at: the longer image side is scaled to at most this
    # many pixels (spatial parameters are scaled with it), the result is upsampled back.
    max_side: int = 128

    def __post_init__(self) -> None:
        _check(self.n_iter >= 0, f"CRF n_iter must be >= 0, got {self.n_iter}")
        _check(self.max_side >= 8, f"CRF max_side must be >= 8, got {self.max_side}")


@dataclass(frozen=True)
class SeedConfig:
    """Step 1: OT seed recovery from CAMs (`dhr seed`)."""

    sinkhorn: SinkhornConfig = field(default_factory=SinkhornConfig)
    crf: CRFConfig = field(default_factory=CRFConfig)
    use_crf: bool = True
    # Background competes with the classes (METHOD.md decision): score (1 - max_k A_k)^bg_power.
    bg_power: float = 3.0
    # Pixels whose winning probability is below this become 255 (unsure).
    confidence: float = 0.5
    batch_size: int = 8
    device: str = "auto"

    def __post_init__(self) -> None:
        _check(self.bg_power > 0, f"bg_power must be > 0, got {self.bg_power}")
        _check(0 <= self.confidence <= 1, f"confidence must be in [0, 1], got {self.confidence}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class PropagateConfig:
    """Steps 2 and 3: inter- and intra-class rebalancing (`dhr propagate`)."""

    sinkhorn: SinkhornConfig = field(default_factory=SinkhornConfig)
    crf: CRFConfig = field(default_factory=CRFConfig)
    use_crf: bool = True
    tau: float = 0.8  # prototype cosine above which classes share a USS group (paper)
    marginals: Marginals = "seeded"  # METHOD.md decision; "uniform" reproduces the authors
    min_marginal: float = 0.02  # floor of a class's share under seeded marginals
    recover_missing: bool = True  # prototype from the CAM peak for labelled classes that win no cell
    batch_size: int = 8
    device: str = "auto"

    def __post_init__(self) -> None:
        _check(-1 <= self.tau <= 1, f"tau must be in [-1, 1], got {self.tau}")
        _check(self.marginals in ("seeded", "uniform"), f"marginals must be 'seeded' or 'uniform', got {self.marginals!r}")
        _check(0 < self.min_marginal < 1, f"min_marginal must be in (0, 1), got {self.min_marginal}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class EvalConfig:
    """`dhr eval`: DHR's mIoU / mFPR / mFNR protocol."""

    skip_background_only: bool = False  # DHR's evaluator drops GT images with no foreground (non-COCO)
    on_size_mismatch: Literal["fail", "skip"] = "fail"
    report_images: int = 8  # worst and most-improved images shown in the HTML report


@dataclass(frozen=True)
class CamsConfig:
    """`dhr cams`: CAMs and features from a network, multi-scale with flips (authors' scales)."""

    scales: tuple[float, ...] = (1.0, 0.5, 1.5, 2.0)
    flip: bool = True
    batch_size: int = 4
    store_dtype: Literal["float16", "float32"] = "float16"
    device: str = "auto"


def as_dict(cfg) -> dict:
    """A config as plain JSON-able data (for provenance)."""
    return asdict(cfg)
