"""The model's few fitted constants, stored as data in `costmodel/data/calibration.json`.

Each GPU may have its own entry (fitted on that GPU's decode suite by `python -m costmodel.calibrate`
or `decode-attention accuracy --fit`); a GPU without one uses the "default" entry, whose values are
derived from datasheets and the kernel's shape, not from measurements (its `source` says so).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

__all__ = ["Calibration", "load_calibration", "calibration_path", "DEFAULT_CALIBRATION", "FITTED_FIELDS",
           "PAGED_FITTED_FIELDS"]


@dataclass(frozen=True)
class Calibration:
    launch_s: float = 3.0e-6             # one kernel launch, as CUDA events see it back to back
    block_round_trip_s: float = 1.0e-6   # a block's dependent memory round trips: load q, first tile, epilogue
    block_bytes_per_s: float = 3.0e10    # what one block can stream on its own (bytes in flight / latency)
    bw_fraction: float = 0.97            # of the GPU's stream ceiling a well-fed kernel reaches
    contention_exponent: float = 2.5     # how sharply blocks' streams saturate the memory system
    blocks_per_sm: int = 1               # resident decode blocks per SM as the schedule sees them (fitted)
    page_lookup_s: float = 2.0e-7        # a page-table lookup's latency on its block's path
    page_lookup_bytes: float = 512.0     # traffic-equivalent of a lookup's scattered page (row misses)
    paged_stream_fraction: float = 1 / 2  # a paged block's stream rate over a contiguous one's
                                          # (default: tiles in flight, 1 of the paged kernel's 2
                                          # stages against 2 of 3)
    matmul_fraction: float = 0.6         # of the tensor-core rate an attention-shaped product reaches
    vector_fraction: float = 0.5         # of the fp32 CUDA-core rate the softmax/dot loops reach
    source: str = "datasheet-derived defaults, not fitted: no committed decode results yet"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Calibration":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown calibration constants: {sorted(unknown)}")
        return cls(**data)


DEFAULT_CALIBRATION = Calibration()

# The constants `costmodel.calibrate` fits on a decode suite (others keep their defaults until a
# suite that exercises them is used).
FITTED_FIELDS = ("launch_s", "block_round_trip_s", "block_bytes_per_s", "bw_fraction",
                 "contention_exponent")
PAGED_FITTED_FIELDS = ("page_lookup_s", "page_lookup_bytes", "paged_stream_fraction")  # on paged rows, the rest held


def calibration_path() -> Path:
    return Path(str(resources.files("costmodel").joinpath("data/calibration.json")))


@functools.lru_cache(maxsize=None)
def _entries(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        return {}
    return json.loads(p.read_text()).get("gpus", {})


def load_calibration(gpu_key: str | None = None, *, path: "str | Path | None" = None) -> Calibration:
    """The constants for a GPU key (e.g. "h100_sxm"): its own entry if fitted, else the default."""
    entries = _entries(str(path or calibration_path()))
    if gpu_key is not None and gpu_key in entries:
        return Calibration.from_json(entries[gpu_key])
    if "default" in entries:
        return Calibration.from_json(entries["default"])
    return DEFAULT_CALIBRATION


def save_calibration(gpu_key: str, calibration: Calibration, *, path: "str | Path | None" = None) -> Path:
    """Write (or replace) one GPU's entry, keeping the others."""
    p = Path(path or calibration_path())
    data = json.loads(p.read_text()) if p.exists() else {}
    gpus = data.setdefault("gpus", {})
    gpus.setdefault("default", DEFAULT_CALIBRATION.to_json())
    gpus[gpu_key] = calibration.to_json()
    p.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    _entries.cache_clear()
    return p
