"""What every launcher shares: CuPy loaded on demand, compiled modules cached per template key,
and a view of CuPy arrays and PyTorch CUDA tensors as raw device pointers.

Nothing here touches the GPU at import time; CuPy is imported on the first launch, so the package
imports on a machine with no GPU and no CuPy.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import pathlib
import struct
import threading
from typing import NamedTuple

import numpy as np

from decode_attention.contract import dtype_name

CUDA_DIR = pathlib.Path(__file__).resolve().parent / "cuda"

# dtype name -> C++ element type of the kernel templates.
C_TYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float"}
KERNEL_DTYPES = tuple(C_TYPES)
HEAD_DIMS = (64, 128, 256)
COMPILE_OPTIONS = ("-std=c++17", "--use_fast_math")
# Sources with code for Hopper's arch-specific instructions (wgmma.cuh): compiled for sm_90a on a
# GPU of compute capability 9.0, where `HAS_WGMMA` turns those paths on; elsewhere for the GPU's own
# architecture, with the paths that work everywhere.
ARCH_SPECIFIC_SOURCES = frozenset({"shared_prefix"})


def arch_options(source: str, compute_capability: str) -> tuple:
    """Extra compile options of `source` for a GPU of `compute_capability` ("90" for Hopper)."""
    return ("-arch=sm_90a",) if source in ARCH_SPECIFIC_SOURCES and compute_capability == "90" else ()


def cupy():
    """The cupy module, or an ImportError that says how to get it."""
    try:
        import cupy as cp  # noqa: PLC0415 - imported on first use only
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise ImportError(
            "gpukernels needs CuPy and a CUDA GPU: pip install 'decode-attention[cuda13]' "
            "(or [cuda12]); the references (refattn) and the cost model work without them"
        ) from exc
    return cp


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        cp = cupy()
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - any failure means no usable GPU
        return False


@functools.lru_cache(maxsize=None)
def module(source: str, name_expression: str):
    """The compiled module of one kernel instantiation (`source` is a file in gpukernels/cuda)."""
    cp = cupy()
    code = (CUDA_DIR / f"{source}.cu").read_text()
    options = COMPILE_OPTIONS + (f"-I{CUDA_DIR}",) + arch_options(source, cp.cuda.Device().compute_capability)
    return cp.RawModule(code=code, options=options, name_expressions=[name_expression])


def kernel(source: str, name_expression: str):
    return module(source, name_expression).get_function(name_expression)


class Device(NamedTuple):
    """A CUDA array seen through its pointer, whatever library owns it (a tuple: cheap to make on
    every call)."""

    obj: object
    kind: str            # "cupy" or "torch"
    ptr: int
    shape: tuple
    dtype: str
    device_id: int
    contiguous: bool


_KINDS: dict = {}


def _kind(x) -> "str | None":
    """"torch", "cupy" or None for the type of `x`, decided once per type."""
    t = type(x)
    kind = _KINDS.get(t, False)
    if kind is False:
        if t.__module__.startswith("torch") and hasattr(t, "data_ptr"):
            kind = "torch"
        elif t.__module__.startswith("cupy") and hasattr(t, "data"):
            kind = "cupy"
        else:
            kind = None
        _KINDS[t] = kind
    return kind


def _is_torch(x) -> bool:
    return _kind(x) == "torch"


def _is_cupy(x) -> bool:
    return _kind(x) == "cupy"


_DTYPE_NAMES: dict = {}


def _dtype_name(dtype) -> str:
    """dtype_name, remembered per dtype object: NumPy's own name lookup costs microseconds a call."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = dtype_name(dtype)
    return name


def device_array(x, name: str) -> Device:
    """View `x` (a CuPy array or a PyTorch CUDA tensor) as a device pointer; TypeError otherwise."""
    kind = _kind(x)
    if kind == "cupy":
        data = x.data
        return Device(x, "cupy", data.ptr, x.shape, _dtype_name(x.dtype), data.device_id,
                      x.flags.c_contiguous)
    if kind == "torch":
        if not x.is_cuda:
            raise TypeError(f"{name} must be a CUDA tensor, got a tensor on {x.device}")
        return Device(x, "torch", int(x.data_ptr()), tuple(x.shape), _dtype_name(x.dtype),
                      int(x.device.index), bool(x.is_contiguous()))
    raise TypeError(
        f"{name} must be a CuPy array or a PyTorch CUDA tensor, got {type(x).__module__}."
        f"{type(x).__name__}"
    )


def require_contiguous(a: Device, name: str) -> None:
    if not a.contiguous:
        raise ValueError(f"{name} must be contiguous (row-major), got a strided view of shape {a.shape}")


def require_aligned(a: Device, name: str) -> None:
    """Kernels that read rows in 16-byte pieces (cp.async, the TMA) need them to start on a 16-byte
    boundary."""
    if a.ptr % 16:
        raise ValueError(f"{name} must start at a 16-byte aligned address (its data is at {a.ptr:#x}: "
                         "an array viewed from an offset into another); copy it to a new array")


def require_rows(a: Device, name: str) -> None:
    """An array the kernels read in 16-byte pieces (q, caches, segments, float32 states):
    contiguous and on a 16-byte boundary."""
    require_contiguous(a, name)
    require_aligned(a, name)


class RecentCache:
    """The values of the most recent `size` keys (least recently used out first), for one-shot
    calls that keep what their checks and plans made for the next call with the same key."""

    def __init__(self, size: int):
        self.size = size
        self._items: "collections.OrderedDict" = collections.OrderedDict()

    def get_or_make(self, key, make):
        """The value kept for `key`, or `make()` kept for it (not kept when key is None)."""
        if key is not None and key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = make()
        if key is not None:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._items)


def require_same_device(arrays: dict) -> int:
    ids = {name: a.device_id for name, a in arrays.items() if a is not None}
    if len(set(ids.values())) > 1:
        raise ValueError(f"all arrays must be on one GPU, got devices {ids}")
    return next(iter(ids.values()))


def host_ints(x, name: str) -> np.ndarray:
    """A host int64 copy of an index array from NumPy, a list, CuPy or PyTorch (a device copy syncs)."""
    if x is None:
        return None
    if _is_torch(x):
        if x.dtype.is_floating_point or x.dtype.is_complex or str(x.dtype) == "torch.bool":
            raise TypeError(f"{name} must hold integers, got {x.dtype}")
        return x.detach().cpu().numpy().astype(np.int64)
    if _is_cupy(x):
        x = x.get()
    arr = np.asarray(x)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes  # noqa: PLC0415

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def empty(kind: str, shape: tuple, dtype: str, device_id: int, *, zero: bool = False):
    """An array of the caller's kind on the caller's device: uninitialised, or zeros with `zero`."""
    if kind == "torch":
        import torch  # noqa: PLC0415

        make = torch.zeros if zero else torch.empty
        return make(shape, dtype=getattr(torch, dtype), device=f"cuda:{device_id}")
    cp = cupy()
    with cp.cuda.Device(device_id):
        return (cp.zeros if zero else cp.empty)(shape, dtype=_np_dtype(dtype))


def device_int32(x, kind: str, device_id: int, name: str):
    """An int32 device copy of an index array (host or device), in the caller's kind."""
    if kind == "torch":
        import torch  # noqa: PLC0415

        if _is_torch(x) and x.is_cuda and x.dtype == torch.int32 and x.is_contiguous():
            return x
        return torch.as_tensor(host_ints(x, name), dtype=torch.int32, device=f"cuda:{device_id}")
    cp = cupy()
    with cp.cuda.Device(device_id):
        if _is_cupy(x) and x.dtype == np.int32 and x.flags.c_contiguous:
            return x
        return cp.asarray(host_ints(x, name), dtype=np.int32)


def to_int32_on_device(x, kind: str, device_id: int):
    """An int32 contiguous copy of a device index array, made on the device (no host round trip)."""
    if kind == "torch":
        import torch  # noqa: PLC0415

        return x.to(torch.int32).contiguous()
    cp = cupy()
    with cp.cuda.Device(device_id):
        return cp.ascontiguousarray(x, dtype=np.int32)


def current_stream_ptr(kind: str, device_id: int) -> int:
    """The caller's current stream: PyTorch's for tensors, CuPy's for CuPy arrays."""
    if kind == "torch":
        import torch  # noqa: PLC0415

        return int(torch.cuda.current_stream(device_id).cuda_stream)
    return int(cupy().cuda.get_current_stream().ptr)


# Argument kinds of `Kernel` signatures: each argument fills one 8-byte slot, but a tensor map
# ("m": the 128 bytes of a CUtensorMap, passed by value), which fills 128.
_SLOTS = {"p": "Q", "q": "q", "i": "i4x", "f": "f4x", "m": "128s"}
_SLOT_BYTES = {"p": 8, "q": 8, "i": 8, "f": 8, "m": 128}


class _ArgBuffer:
    """One slot per kernel argument (`signature`'s kinds), and the array of the slots' addresses
    that cuLaunchKernel reads; it copies the values during the call, so one buffer per thread and
    signature serves every launch."""

    def __init__(self, signature: str):
        offsets = np.cumsum([0] + [_SLOT_BYTES[c] for c in signature])
        self.values = ctypes.create_string_buffer(int(offsets[-1]) + 64)
        base = (ctypes.addressof(self.values) + 63) & ~63   # a tensor map's slot 64-byte aligned
        self.offset = base - ctypes.addressof(self.values)
        self.addresses = (ctypes.c_uint64 * len(signature))(*(base + int(o) for o in offsets[:-1]))
        self.argv = ctypes.addressof(self.addresses)


_THREAD = threading.local()


# Programmatic dependent launch (sm_90): cuLaunchKernelEx with the programmatic stream serialization
# attribute lets a kernel start while the one before it in the stream still runs; the kernel waits
# for it in `wait_for_previous_grid` (cuda/common.cuh) before reading anything. CuPy launches
# through cuLaunchKernel only, so this calls the driver directly.
CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6   # CUlaunchAttributeID (cuda.h)


class _LaunchAttribute(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_char * 64)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttribute)), ("numAttrs", ctypes.c_uint)]


@functools.lru_cache(maxsize=None)
def _driver_function(name: str, *argtypes):
    """A function of the CUDA driver CuPy uses, returning its CUresult (an int), called directly
    for what CuPy does not wrap."""
    fn = getattr(ctypes.CDLL("libcuda.so.1"), name)
    fn.restype = ctypes.c_int
    fn.argtypes = list(argtypes)
    return fn


def _launch_kernel_ex():
    """cuLaunchKernelEx (CUDA 12 and later)."""
    return _driver_function("cuLaunchKernelEx", ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.c_void_p,
                            ctypes.c_void_p)


def _programmatic_attribute() -> _LaunchAttribute:
    attr = _LaunchAttribute()
    attr.id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    ctypes.memmove(ctypes.addressof(attr) + _LaunchAttribute.value.offset,
                   ctypes.byref(ctypes.c_int(1)), ctypes.sizeof(ctypes.c_int))   # allowed = 1
    return attr


@functools.lru_cache(maxsize=None)
def _programmatic_launches(device_id: int) -> bool:
    """Whether the GPU has programmatic dependent launch (compute capability 9.0 and up); on older
    ones a programmatic launch is a plain one."""
    return int(cupy().cuda.Device(device_id).compute_capability) >= 90


def launch_programmatic(function: int, grid, block, shared_mem: int, stream_ptr: int, argv: int) -> None:
    """Launch `function` (a CUfunction) as cuLaunchKernel would, allowed to start while the kernel
    before it in the stream still runs (programmatic stream serialization); a CUDA error raises."""
    attrs = getattr(_THREAD, "programmatic", None)
    if attrs is None:
        attrs = _THREAD.programmatic = (_LaunchAttribute * 1)(_programmatic_attribute())
    config = _LaunchConfig(*grid, *block, shared_mem, stream_ptr, attrs, 1)
    status = _launch_kernel_ex()(ctypes.byref(config), function, argv, None)
    if status != 0:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUresult {status}")


def _arg_buffer(signature: str) -> _ArgBuffer:
    buffers = getattr(_THREAD, "buffers", None)
    if buffers is None:
        buffers = _THREAD.buffers = {}
    buf = buffers.get(signature)
    if buf is None:
        buf = buffers[signature] = _ArgBuffer(signature)
    return buf


class Kernel:
    """One kernel instantiation launched through the driver (cuLaunchKernel) with a fixed argument
    layout: `signature` gives each argument's C type in order, "p" a pointer (an int address, 0 for
    null), "i" int32, "q" int64, "f" float32. The values are packed with `struct`, which rejects a
    value out of its type's range. CuPy's own launch converts each argument on every call (measured
    on an H100 machine's host: 12.5 us for the 21 arguments of split_kv, about 4.5 us this way).
    """

    def __init__(self, source: str, name_expression: str, signature: str, shared_mem: int = 0):
        self.raw = kernel(source, name_expression)
        self.name = name_expression
        self.nargs = len(signature)
        self.signature = signature
        self.format = "<" + "".join(_SLOTS[c] for c in signature)
        self.shared_mem = shared_mem
        self._functions: dict = {}   # device id -> CUfunction handle; ("resident", ...) -> blocks per SM

    def function(self, device_id: int) -> int:
        """The CUfunction handle on one device (loaded there, its shared-memory limit raised, once)."""
        f = self._functions.get(device_id)
        if f is None:
            cp = cupy()
            with cp.cuda.Device(device_id):
                raw = self.raw
                if self.shared_mem and raw.max_dynamic_shared_size_bytes < self.shared_mem:
                    raw.max_dynamic_shared_size_bytes = self.shared_mem
                f = self._functions[device_id] = raw.kernel.ptr
        return f

    def resident_blocks(self, device_id: int, block_threads: int) -> int:
        """Blocks of `block_threads` threads one SM holds at once (the driver's occupancy query,
        with this kernel's dynamic shared memory), once per device."""
        key = ("resident", device_id, block_threads)
        n = self._functions.get(key)
        if n is None:
            f = self.function(device_id)
            query = _driver_function("cuOccupancyMaxActiveBlocksPerMultiprocessor", ctypes.POINTER(ctypes.c_int),
                                     ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)
            blocks = ctypes.c_int(0)
            with cupy().cuda.Device(device_id):
                status = query(ctypes.byref(blocks), f, block_threads, self.shared_mem)
            if status != 0:
                raise RuntimeError(f"cuOccupancyMaxActiveBlocksPerMultiprocessor failed ({status}) for {self.name}")
            n = self._functions[key] = blocks.value
        return n

    def __call__(self, grid, block, args, *, stream_ptr: int, device_id: int, programmatic: bool = False) -> None:
        """Launch on `device_id`'s stream `stream_ptr`. `programmatic`: allowed to start while the
        kernel before it in the stream still runs (`launch_programmatic`; the kernel must wait for
        it before reading its outputs)."""
        if len(args) != self.nargs:
            raise TypeError(f"{self.name} takes {self.nargs} arguments, got {len(args)}")
        cp = cupy()
        f = self.function(device_id)
        buf = _arg_buffer(self.signature)
        struct.pack_into(self.format, buf.values, buf.offset, *args)
        gx, gy, gz = (tuple(grid) + (1, 1))[:3]
        bx, by, bz = (tuple(block) + (1, 1))[:3]
        if programmatic and _programmatic_launches(device_id):
            with cp.cuda.Device(device_id):
                launch_programmatic(f, (gx, gy, gz), (bx, by, bz), self.shared_mem, stream_ptr, buf.argv)
            return
        launch_kernel = cp.cuda.driver.launchKernel
        if cp.cuda.runtime.getDevice() != device_id:
            with cp.cuda.Device(device_id):
                launch_kernel(f, gx, gy, gz, bx, by, bz, self.shared_mem, stream_ptr, buf.argv, 0)
        else:
            launch_kernel(f, gx, gy, gz, bx, by, bz, self.shared_mem, stream_ptr, buf.argv, 0)


def address(x) -> int:
    """The device address of a CuPy array, a PyTorch tensor or a `Device` view; 0 for None."""
    if x is None:
        return 0
    if isinstance(x, Device):
        return x.ptr
    if _is_torch(x):
        return x.data_ptr()
    return x.data.ptr


# Tensor maps for the TMA (sm_90): cuTensorMapEncodeTiled's enums (cuda.h).
_TENSOR_MAP_DTYPES = {"float16": 6, "bfloat16": 9}
CU_TENSOR_MAP_SWIZZLE_128B = 3
CU_TENSOR_MAP_L2_PROMOTION_256B = 3


@functools.lru_cache(maxsize=256)
def tensor_map(ptr: int, dtype: str, dims: tuple, box: tuple) -> bytes:
    """The 128 bytes of a CUtensorMap over the contiguous 16-bit array at `ptr` of shape
    reversed(dims) (dims innermost first; 3 to 5 of them), read in boxes of `box` elements stored
    with the 128-byte swizzle; elements past the array's end in any dim read as zeros. Made on the
    host (no GPU work), so a map is cached by its arguments."""
    if ptr % 16:
        raise ValueError(f"a tensor map needs a 16-byte aligned address, got {ptr:#x}")
    rank = len(dims)
    if not 3 <= rank <= 5 or len(box) != rank:
        raise ValueError(f"a tensor map of 3 to 5 dims with a box of as many, got dims {dims}, box {box}")
    encode = _driver_function("cuTensorMapEncodeTiled", ctypes.c_void_p, ctypes.c_int, ctypes.c_uint,
                              ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                              ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int)
    out = ctypes.create_string_buffer(128 + 64)
    at = (ctypes.addressof(out) + 63) & ~63
    size = (ctypes.c_uint64 * rank)(*dims)
    pitches, pitch = [], 2
    for d in dims[:-1]:
        pitch *= d
        pitches.append(pitch)
    strides = (ctypes.c_uint64 * (rank - 1))(*pitches)
    boxes = (ctypes.c_uint32 * rank)(*box)
    steps = (ctypes.c_uint32 * rank)(*([1] * rank))
    status = encode(at, _TENSOR_MAP_DTYPES[dtype], rank, ptr, size, strides, boxes, steps, 0,
                    CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_256B, 0)
    if status != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed with CUresult {status} (dims {dims}, box {box})")
    return ctypes.string_at(at, 128)

