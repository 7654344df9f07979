"""Every kernel instantiation compiles for sm_90 with nvcc, without register spills."""

import shutil

import pytest

from gpukernels import compile_check


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed on this machine")
def test_every_instantiation_compiles_without_spills(capsys):
    rc = compile_check.main([])
    report = capsys.readouterr().out
    print(report)  # the register and shared-memory table goes to the log
    assert rc == 0, report[-2000:]
    assert "compile check passed" in report


def test_residency_check_flags_a_register_count_that_changes_blocks_per_sm():
    from costmodel.split_kv import TENSOR_CORE_REGISTERS, blocks_per_sm_by_registers, tensor_core_blocks_per_sm

    paged = "_ZN16decode_attention19split_kv_mma_kernelI6__halfLi128ELi8ELb1ELi2EEEvPKT_"
    assert compile_check._residency_problem(paged, TENSOR_CORE_REGISTERS[128, True]) is None
    assert compile_check._residency_problem(paged, 176) is None          # same allocation as 174
    assert "3 blocks per SM" in compile_check._residency_problem(paged, 168)
    # the contiguous pipeline's 3 stages of shared memory hold 2 blocks, whatever the registers
    contiguous = "_ZN16decode_attention19split_kv_mma_kernelI6__halfLi128ELi4ELb0ELi3EEEvPKT_"
    assert compile_check._residency_problem(contiguous, TENSOR_CORE_REGISTERS[128, False]) is None
    assert compile_check._residency_problem(contiguous, 96) is None
    # a 4-stage instantiation: 1 block (shared memory), as the model has it for 4 stages
    four = contiguous.replace("ELb0ELi3E", "ELb0ELi4E")
    assert compile_check._residency_problem(four, 166) is None
    assert compile_check._residency_problem("split_kv_kernelI6__halfLi128E", 250) is None  # CUDA cores
    # 65536 registers / (176 allocated x 128 threads): 2 blocks; the paged pipeline's shared
    # memory alone would allow 3, the contiguous one's (3 stages) 2, with 4 stages 1
    assert blocks_per_sm_by_registers(172) == 2 and blocks_per_sm_by_registers(118) == 4
    assert tensor_core_blocks_per_sm(128, 2, paged=True) == 2 and tensor_core_blocks_per_sm(128, 3) == 2
    assert tensor_core_blocks_per_sm(128, 4) == 1
    assert tensor_core_blocks_per_sm(64, 2, paged=True) == 4 and tensor_core_blocks_per_sm(64, 3) == 4
    assert tensor_core_blocks_per_sm(64, 4) == 3


def test_the_warm_up_compiles_what_the_compile_check_compiles():
    from gpukernels import compile_check, warm

    names = {e for _, e in warm.instantiations()}
    import importlib

    split_kv = importlib.import_module("gpukernels.split_kv")
    shared_prefix = importlib.import_module("gpukernels.shared_prefix")
    tree = importlib.import_module("gpukernels.tree")
    assert names == (set(split_kv.all_name_expressions()) | set(compile_check.merge_states_expressions())
                     | set(shared_prefix.all_name_expressions()) | set(tree.all_name_expressions()))
