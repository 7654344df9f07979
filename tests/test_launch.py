"""The driver-level launch: argument layouts that match the kernels' C signatures, packed into
8-byte slots. These run without a GPU; the GPU tests launch every kernel through the same path."""

import ctypes
import re
import struct

import pytest

from gpukernels import _runtime as rt
from gpukernels.split_kv import KERNEL_SIGNATURE

_C_KINDS = {"int": "i", "long long": "q", "float": "f"}


def _source_signature(source: str, kernel: str) -> str:
    """The `Kernel` signature read from a kernel's parameter list in gpukernels/cuda/<source>.cu."""
    code = re.sub(r"//[^\n]*", "", (rt.CUDA_DIR / f"{source}.cu").read_text())
    start = re.search(rf"\b{kernel}\s*\(", code)
    assert start, f"{kernel} not found in {source}.cu"
    params = code[start.end():code.index(")", start.end())]
    kinds = []
    for param in params.split(","):
        decl = " ".join(param.replace("__restrict__", "").split())
        if "*" in decl:
            kinds.append("p")
        else:
            ctype = decl.rsplit(" ", 1)[0].replace("const ", "")
            kinds.append(_C_KINDS[ctype])
    return "".join(kinds)


@pytest.mark.parametrize("kernel", ["split_kv_kernel", "split_kv_mma_kernel"])
def test_split_kv_signature_matches_the_kernels(kernel):
    assert _source_signature("split_kv", kernel) == KERNEL_SIGNATURE


def test_merge_states_signature_matches_the_kernel():
    from gpukernels.merge_states import MERGE_SIGNATURE

    assert _source_signature("merge_states", "merge_states_kernel") == MERGE_SIGNATURE


@pytest.mark.parametrize("kernel, module_name, attr", [
    ("shared_prefix_kernel", "shared_prefix", "PREFIX_SIGNATURE"),
    ("merge_prefix_chunks_kernel", "shared_prefix", "MERGE_SIGNATURE"),
    ("tree_segments_kernel", "tree", "SEGMENTS_SIGNATURE"),
    ("merge_parts_kernel", "tree", "MERGE_PARTS_SIGNATURE"),
])
def test_shared_prefix_and_tree_signatures_match_the_kernels(kernel, module_name, attr):
    import importlib

    module = importlib.import_module(f"gpukernels.{module_name}")
    assert _source_signature("shared_prefix", kernel) == getattr(module, attr)


def test_arguments_fill_one_8_byte_slot_each_at_the_listed_addresses():
    signature = "ppiqf"
    fmt = "<" + "".join(rt._SLOTS[c] for c in signature)
    assert struct.calcsize(fmt) == 8 * len(signature)
    buf = rt._arg_buffer(signature)
    assert rt._arg_buffer(signature) is buf        # one per thread and layout
    struct.pack_into(fmt, buf.values, buf.offset, 0xDEADBEEF0000, 0, -7, 1 << 40, 0.5)
    slot = list(buf.addresses)
    assert [b - a for a, b in zip(slot, slot[1:])] == [8] * 4
    assert ctypes.c_uint64.from_address(slot[0]).value == 0xDEADBEEF0000
    assert ctypes.c_uint64.from_address(slot[1]).value == 0
    assert ctypes.c_int32.from_address(slot[2]).value == -7
    assert ctypes.c_int64.from_address(slot[3]).value == 1 << 40
    assert ctypes.c_float.from_address(slot[4]).value == 0.5
    assert ctypes.c_uint64.from_address(buf.argv).value == slot[0]


def test_a_tensor_map_fills_128_bytes_at_a_64_byte_aligned_slot():
    signature = "mmpi"
    fmt = "<" + "".join(rt._SLOTS[c] for c in signature)
    buf = rt._arg_buffer(signature)
    maps = (bytes(range(128)), bytes(range(128, 256)))
    struct.pack_into(fmt, buf.values, buf.offset, *maps, 0x1234, 9)
    slot = list(buf.addresses)
    assert [b - a for a, b in zip(slot, slot[1:])] == [128, 128, 8]
    assert slot[0] % 64 == 0 and slot[1] % 64 == 0
    assert ctypes.string_at(slot[0], 128) == maps[0] and ctypes.string_at(slot[1], 128) == maps[1]
    assert ctypes.c_uint64.from_address(slot[2]).value == 0x1234
    assert ctypes.c_int32.from_address(slot[3]).value == 9


def test_a_value_out_of_its_c_type_is_refused():
    fmt = "<" + "".join(rt._SLOTS[c] for c in "pi")
    buf = rt._arg_buffer("pi")
    with pytest.raises(struct.error):
        struct.pack_into(fmt, buf.values, buf.offset, 0, 1 << 31)      # int32 overflow
    with pytest.raises(struct.error):
        struct.pack_into(fmt, buf.values, buf.offset, -1, 0)           # a negative address
