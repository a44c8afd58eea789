"""Static checks of the GPU kernels that need no GPU: the SASS reader (pyengine/kernels/sass.py)
on a listing written here, and the CUDA kernels of csrc/cuda compiled for sm_90a
(benchmarks/static_gpu.py): every source compiles, no decode kernel spills, and every decode
kernel's steady-state loop is found. The Triton decode kernels' spill check runs with their
ahead-of-time compilation (tests/kernels/test_triton_aot.py)."""

from __future__ import annotations

import shutil
import sys
import textwrap
from pathlib import Path

import pytest

from pyengine.kernels import sass

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _listing(src: Path) -> str:
    """An nvdisasm -c -gi style listing of one kernel: a prologue, then a loop whose header
    loads the weight (a line of ``src`` carrying the marker) and either stages activations (a
    nested loop behind a barrier) or skips that, then computes unless a guard skips it, and
    branches back."""
    loc = f'\t//## File "{src}", line'
    return textwrap.dedent(f"""\
        //--------------------- .text.kern --------------------------
        \t.section\t.text.kern,"ax",@progbits
        kern:
        .text.kern:
        {loc} 1
                /*0000*/                   MOV R1, c[0x0][0x28] ;
                /*0010*/                   S2R R0, SR_TID.X ;
        .L_x_0:
        {loc} 2 inlined at "{src}", line 3
                /*0020*/                   LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;
        {loc} 4
                /*0030*/                   LDG.E.U16.CONSTANT R8, desc[UR4][R10.64] ;
                /*0040*/               @P0 BRA `(.L_x_2) ;
                /*0050*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        .L_x_1:
                /*0060*/                   LDG.E.128 R12, desc[UR4][R14.64] ;
                /*0070*/                   FFMA R16, R12, R13, R16 ;
                /*0080*/                   STS.128 [R18], R12 ;
                /*0090*/               @P1 BRA `(.L_x_1) ;
                /*00a0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        .L_x_2:
                /*00b0*/               @P2 BRA `(.L_x_3) ;
                /*00c0*/                   LDS.128 R20, [R19] ;
                /*00d0*/                   LOP3.LUT R24, R4, 0xf, RZ, 0xc0, !PT ;
                /*00e0*/                   FFMA R30, R20, R24, R30 ;
                /*00f0*/                   FFMA R31, R21, R24, R31 ;
        .L_x_3:
                /*0100*/                   IADD3 R2, P3, R2, 0x10, RZ ;
                /*0110*/               @P4 BRA `(.L_x_0) ;
                /*0120*/                   STG.E [R26.64], R30 ;
                /*0130*/                   EXIT ;
        .L_x_4:
                /*0140*/                   BRA `(.L_x_4);
        """)


def test_steady_state_takes_the_computing_path_without_optional_work(tmp_path):
    src = tmp_path / "kernel.src"
    src.write_text("prologue\nx\nload(w)  // static-gpu: weight load\nload(scale)\n")
    funcs = sass.parse(_listing(src))
    func = funcs["kern"]
    assert len(func.instrs) == 21 and func.labels[".L_x_0"] == 2
    # the weight load is known by the marker on the line it was inlined at
    assert [sass.is_weight_load(i) for i in func.instrs[2:4]] == [True, False]
    st = sass.steady_state(func)
    # header (LDG, LDG, BRA) -> skip the staging -> compute (LDS, LOP3, FFMA x2) -> latch
    assert st.instructions == 3 + 1 + 4 + 2
    assert (st.weight_loads, st.weight_load_bytes, st.other_global_loads) == (1, 16, 1)
    assert st.barriers == 0 and st.local_memory == 0 and st.opcodes["FFMA"] == 2
    assert sass.local_memory_instructions(func) == 0


def test_local_memory_instructions_are_counted(tmp_path):
    text = _listing(tmp_path / "none.src").replace(
        "STS.128 [R18], R12", "STL [R1+0x8], R12").replace("LDS.128 R20, [R19]", "LDL R20, [R1]")
    func = sass.parse(text)["kern"]
    assert sass.local_memory_instructions(func) == 2
    assert sass.steady_state(func) is None     # no marked weight load: no loop to report


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_cuda_sources_compile_for_sm90a_and_decode_kernels_do_not_spill():
    sys.path.insert(0, str(BENCHMARKS))
    import static_gpu

    rows = static_gpu.cuda_rows(jobs=2)
    assert {r["source"] for r in rows} == set(static_gpu.CUDA_SOURCES)
    decode = [r for r in rows if "decode_gemv_kernel" in r["kernel"]]
    # 4 packed widths x 6 tile heights + 5 plane precisions x 4 tile heights
    assert len(decode) == 4 * 6 + 5 * 4, sorted(r["kernel"] for r in decode)
    for r in decode:
        assert r["spill_store_bytes"] == r["spill_load_bytes"] == 0, r
        assert r["local_memory_instructions"] == 0, r
        assert r["loop_error"] is None, r
        assert r["loop_instructions"] > 0 and r["registers"] <= 255
    with_m = [r for r in decode if "M" in r]
    assert {(r["weight"], r["M"]) for r in with_m} >= {
        (w, m) for w in ("int2", "int3", "int4", "int8") for m in (1, 16)}
    # The tensor-core decode kernel: 2 dtypes x 2 token tiles x units per width (int8 1, int4 2,
    # int2 4, int3 4).
    mma = [r for r in rows if "decode_mma_kernel" in r["kernel"]]
    assert len(mma) == 2 * 2 * (1 + 2 + 4 + 4), sorted(r["kernel"] for r in mma)
    for r in mma:
        assert r["spill_store_bytes"] == r["spill_load_bytes"] == 0, r
        assert r["local_memory_instructions"] == 0, r
        assert r["loop_error"] is None, r
        assert r["iterations_per_trip"] >= 1 and r["ceiling_vs_copy"] > 0, r
    # The design target at group 128 (the rows that carry M = 1 or 16): every width and dtype
    # issue-bound at >= 1.3x the H200's copy bandwidth, so instruction issue leaves memory the
    # limit. A change that adds instructions to the steady-state loop fails here.
    at_group_128 = [r for r in mma if "M" in r]
    assert {(r["weight"], r["dtype"], r["M"]) for r in at_group_128} == {
        (w, d, m) for w in ("int2", "int3", "int4", "int8") for d in ("float16", "bfloat16")
        for m in (1, 16)}
    for r in at_group_128:
        assert r["ceiling_vs_copy"] >= static_gpu.TARGET_RATIO, r
