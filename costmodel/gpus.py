"""GPU specifications as data (`costmodel/data/gpus.json`): datasheet figures, overridden by the
ceilings this project's benchmark measured.

The model uses three ceilings: `stream_bytes_per_s` (what a read-mostly kernel can pull from HBM:
the better of the measured read and copy rates, a fraction of the datasheet until measured),
`matmul_flops_per_s` (fp16 dense tensor-core rate) and `vector_flops_per_s` (fp32 CUDA-core rate).

>>> gpu = get_gpu("NVIDIA H100 80GB HBM3")
>>> gpu.num_sms, gpu.key
(132, 'h100_sxm')
>>> get_gpu("nvidia a100-sxm4-40gb").num_sms
108
>>> get_gpu("H100").with_measured(copy_bytes_per_s=3.1e12).stream_bytes_per_s
3100000000000.0
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass
from importlib import resources

import numpy as np

from decode_attention.contract import check_positive_int

__all__ = ["GPUSpec", "get_gpu", "gpu_names", "gpu_aliases", "gpu_for_num_sms", "plan_gpu",
           "normalize_gpu_name"]


@dataclass(frozen=True)
class GPUSpec:
    key: str                          # short id, e.g. "h100_sxm"
    name: str
    num_sms: int
    l2_bytes: int
    hbm_capacity_bytes: int
    hbm_bytes_per_s: float            # datasheet peak
    copy_bytes_per_s: float           # device-to-device copy, (bytes read + written) / time
    read_bytes_per_s: float | None    # read-only reduction, bytes read / time; None if not measured
    matmul_flops_per_s: float         # fp16 dense tensor-core rate in use (measured if known)
    vector_flops_per_s: float         # fp32 CUDA-core FMA rate (datasheet)
    l2_bytes_per_s: float             # L2 -> SM read rate (estimate)
    max_blocks_per_sm: int
    smem_bytes_per_sm: int
    datasheet_matmul_flops_per_s: float
    source: str                       # where the ceilings come from
    # the rate a framework's matrix-vector product (one token's row against a weight matrix larger
    # than L2, cuBLAS through PyTorch) reads the weights; None if not measured
    gemv_bytes_per_s: float | None = None
    # what one small kernel of a decode step (an element-wise op on one token's activations) costs
    # inside a CUDA graph, its start included; None if not measured
    graph_kernel_s: float | None = None

    @property
    def stream_bytes_per_s(self) -> float:
        """Ceiling of a kernel that mostly reads: the better of the measured read-only rate and the
        copy rate (docs/benchmarks.md, "Floor, frac and the ceiling of a row": a read-only kernel can
        pass the copy figure, never fall below it)."""
        return max(self.read_bytes_per_s or 0.0, self.copy_bytes_per_s)

    def roofline_flops_per_s(self, intensity_flops_per_byte, *, tensor_cores: bool = True):
        """The roofline: attainable FLOP/s at an arithmetic intensity (FLOP per HBM byte), the
        lesser of streaming at the memory ceiling and the tensor-core (or CUDA-core) rate."""
        peak = self.matmul_flops_per_s if tensor_cores else self.vector_flops_per_s
        return np.minimum(np.asarray(intensity_flops_per_byte, dtype=np.float64) * self.stream_bytes_per_s, peak)

    def with_measured(
        self,
        *,
        copy_bytes_per_s: float | None = None,
        read_bytes_per_s: float | None = None,
        matmul_flops_per_s: float | None = None,
        gemv_bytes_per_s: float | None = None,
        graph_kernel_s: float | None = None,
    ) -> "GPUSpec":
        """This GPU with ceilings measured in one benchmark run; None keeps the current value."""
        changes = {}
        for field, value in (
            ("copy_bytes_per_s", copy_bytes_per_s),
            ("read_bytes_per_s", read_bytes_per_s),
            ("matmul_flops_per_s", matmul_flops_per_s),
            ("gemv_bytes_per_s", gemv_bytes_per_s),
            ("graph_kernel_s", graph_kernel_s),
        ):
            if value is None:
                continue
            value = float(value)
            if not value > 0:
                raise ValueError(f"{field} must be > 0, got {value!r}")
            changes[field] = value
        if not changes:
            return self
        return dataclasses.replace(self, source=f"{self.source}; overridden by a run's measurements", **changes)


@functools.lru_cache(maxsize=1)
def _data() -> dict:
    text = resources.files("costmodel").joinpath("data/gpus.json").read_text()
    return json.loads(text)


def normalize_gpu_name(name: str) -> str:
    """The form names are matched in: case-folded, each run of spaces, '-' and '_' one space."""
    return re.sub(r"[\s_\-]+", " ", name.casefold()).strip()


@functools.lru_cache(maxsize=1)
def _index() -> dict[str, str]:
    """Normalised name -> key, over every GPU's key, name and aliases (the table of known names)."""
    index: dict[str, str] = {}
    for key, entry in _data()["gpus"].items():
        for name in (key, entry["name"], *entry["aliases"]):
            wanted = normalize_gpu_name(name)
            if index.setdefault(wanted, key) != key:
                raise ValueError(f"gpus.json gives the name {name!r} to both {index[wanted]} and {key}")
    return index


@functools.lru_cache(maxsize=None)
def _spec(key: str) -> GPUSpec:
    data = _data()
    entry = data["gpus"][key]
    sheet, measured = entry["datasheet"], entry.get("measured", {})
    copy = measured.get("copy_bytes_per_s")
    matmul = measured.get("matmul_flops_per_s")
    source = measured.get("source") or (
        f"datasheet; copy = {data['unmeasured_copy_fraction']} x HBM peak and "
        f"matmul = {data['unmeasured_matmul_fraction']} x tensor peak until measured"
    )
    return GPUSpec(
        key=key,
        name=entry["name"],
        num_sms=int(sheet["num_sms"]),
        l2_bytes=int(sheet["l2_bytes"]),
        hbm_capacity_bytes=int(sheet["hbm_capacity_bytes"]),
        hbm_bytes_per_s=float(sheet["hbm_bytes_per_s"]),
        copy_bytes_per_s=float(copy or sheet["hbm_bytes_per_s"] * data["unmeasured_copy_fraction"]),
        read_bytes_per_s=measured.get("read_bytes_per_s"),
        matmul_flops_per_s=float(matmul or sheet["matmul_flops_per_s"] * data["unmeasured_matmul_fraction"]),
        vector_flops_per_s=float(sheet["vector_flops_per_s"]),
        l2_bytes_per_s=float(sheet["l2_bytes_per_s"]),
        max_blocks_per_sm=int(sheet["max_blocks_per_sm"]),
        smem_bytes_per_sm=int(sheet["smem_bytes_per_sm"]),
        datasheet_matmul_flops_per_s=float(sheet["matmul_flops_per_s"]),
        source=source,
    )


def gpu_names() -> list[str]:
    """Keys of the GPUs in the data file."""
    return list(_data()["gpus"])


def gpu_aliases() -> dict[str, list[str]]:
    """Every name each GPU answers to, by key: its key, its full name and its aliases."""
    return {key: [key, entry["name"], *entry["aliases"]] for key, entry in _data()["gpus"].items()}


def get_gpu(name: "str | GPUSpec") -> GPUSpec:
    """The spec for a key ("h100_sxm"), a short name ("H100") or a device name as CUDA reports it
    ("NVIDIA H100 80GB HBM3"). A GPUSpec is returned as is.

    Names match exactly, after case-folding and reading each run of spaces, '-' and '_' as one
    space: "nvidia a100-sxm4-80gb" is the A100 SXM 80GB, but "H100 80GB HBM3 MIG 1g.10gb" (a slice
    with fewer SMs) or a part missing from gpus.json is a ValueError listing the known names,
    never the nearest GPU.
    """
    if isinstance(name, GPUSpec):
        return name
    if not isinstance(name, str):
        raise TypeError(f"gpu must be a GPU name (str) or a GPUSpec, got {type(name).__name__} {name!r}")
    wanted = normalize_gpu_name(name)
    if not wanted:
        raise ValueError(f"gpu must name a GPU, got the empty name {name!r}; known: {_known_names()}")
    key = _index().get(wanted)
    if key is None:
        raise ValueError(f"unknown GPU {name!r}; known: {_known_names()}")
    return _spec(key)


def _known_names() -> str:
    return "; ".join(f"{key} ({', '.join(names[1:])})" for key, names in gpu_aliases().items())


def gpu_for_num_sms(num_sms: int) -> GPUSpec:
    """A spec for a plan that only knows its SM count: the first listed GPU with that many SMs,
    else the first GPU with its SM count replaced."""
    num_sms = check_positive_int(num_sms, "num_sms")
    for key in gpu_names():
        spec = _spec(key)
        if spec.num_sms == num_sms:
            return spec
    return dataclasses.replace(_spec(gpu_names()[0]), num_sms=num_sms)


def plan_gpu(gpu: "GPUSpec | str | None", num_sms: "int | None", *,
             default_num_sms: int) -> tuple[GPUSpec, int]:
    """The GPU a plan is for and the SM count it is cut for.

    A named GPU (or a GPUSpec) brings its own SM count; `num_sms` given as well must agree with it.
    Without a GPU, `num_sms` (default `default_num_sms`) picks the spec (`gpu_for_num_sms`).
    """
    num_sms = check_positive_int(num_sms, "num_sms", allow_none=True)
    if gpu is None:
        num_sms = default_num_sms if num_sms is None else num_sms
        return gpu_for_num_sms(num_sms), num_sms
    spec = get_gpu(gpu)
    if num_sms is not None and num_sms != spec.num_sms:
        raise ValueError(f"num_sms = {num_sms} disagrees with gpu = {spec.name!r}, which has "
                         f"{spec.num_sms} SMs; give one of them (or a GPUSpec with that SM count)")
    return spec, spec.num_sms
