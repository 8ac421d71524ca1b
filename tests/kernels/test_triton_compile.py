"""Each Triton kernel compiles for an H100 (sm_90) through triton's bundled ptxas, without a GPU.

The CPU interpreter runs a kernel's Python, not the compiler: type errors in loops, dot
operands or specialised arguments only show when compiling. This catches them on a CPU-only
machine. It does not launch anything.
"""

from __future__ import annotations

from pathlib import Path
from shutil import which

import pytest

from msa_cluster.kernels._common import HAS_TRITON
from tests.kernels.helpers import triton_mode

pytestmark = [
    pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed"),
    pytest.mark.skipif(triton_mode() == "interpreter", reason="kernels are interpreted in this process, not compiled"),
]

SM90 = 90


def _compile(fn, signature: dict[str, str], constexprs: dict[str, object], num_warps: int) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {**signature, **{name: "constexpr" for name in constexprs}}
    kernel = triton.compile(
        ASTSource(fn=fn, signature=sig, constexprs=constexprs),
        target=GPUTarget("cuda", SM90, 32),
        options={"num_warps": num_warps},
    )
    assert kernel.asm["cubin"], f"{fn.__name__}: no cubin"


def _has_ptxas() -> bool:
    """triton wheels bundle ptxas under backends/nvidia/bin; a system one on PATH also works."""
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists() or bool(which("ptxas"))


@pytest.mark.skipif(HAS_TRITON and not _has_ptxas(), reason="triton's NVIDIA backend (ptxas) is not available")
@pytest.mark.parametrize(
    "case", ["pooling", "attention-prefill-bf16", "attention-decode-fp32", "routing-folded", "doc-reduce"]
)
def test_kernel_compiles_for_sm90(case):
    """The kernel, at the launch configuration its launcher uses, compiles to an sm_90 cubin."""
    from msa_cluster.kernels import attention, pooling, routing

    ints = lambda *names: {n: "i32" for n in names}  # noqa: E731
    if case == "pooling":
        sig = {"x_ptr": "*bf16", "len_ptr": "*i64", "out_ptr": "*fp32", **ints("T", "F", "C", "P")}
        _compile(pooling._chunk_mean_kernel, sig, {"BLOCK_T": pooling._BLOCK_T, "BLOCK_F": 128}, 4)
    elif case.startswith("attention"):
        dtype, rows, lowp = ("bf16", 256, True) if "prefill" in case else ("fp32", 1, False)
        block_m, block_n, warps = attention._launch_config(rows, lowp)
        split = "decode" in case  # decode launches split-K: fp32 partials and (max, denominator) out
        ptrs = {name: f"*{dtype}" for name in ("q_ptr", "k_ptr", "v_ptr")}
        sig = {**ptrs, "slot_ptr": "*i64", "o_ptr": "*fp32" if split else f"*{dtype}", "ml_ptr": "*fp32",
               **ints("Tq", "S", "H", "Hkv", "D"), "scale": "fp32", "split_len": "i32"}
        consts = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": 128, "LOWP_DOT": lowp, "SPLIT": split}
        _compile(attention._gathered_attention_kernel, sig, consts, warps)
    elif case == "routing-folded":  # folded routing launches with HR = HKV = 1, specialised as constants
        sig = {"q_ptr": "*fp32", "mask_ptr": "*i8", "k_ptr": "*bf16", "out_ptr": "*fp32", **ints("T", "C", "W")}
        consts = {"HR": 1, "HKV": 1, "TOKEN_MEAN": False}
        consts.update(BLOCK_T=routing._BLOCK_T, BLOCK_C=routing._BLOCK_C, BLOCK_K=routing._BLOCK_K)
        _compile(routing._chunk_score_kernel, sig, consts, routing._SCORE_WARPS)
    else:
        sig = {"chunk_ptr": "*fp32", "off_ptr": "*i64", "out_ptr": "*fp32", **ints("C", "N")}
        _compile(routing._doc_reduce_kernel, sig, {"CHUNK_MEAN": True, "BLOCK": routing._BLOCK_DOC}, 4)


def test_msa_kernels_reference_turns_triton_dispatch_off(monkeypatch):
    """MSA_KERNELS=reference sends CUDA tensors to the torch references (the dispatch rule's one override)."""
    from types import SimpleNamespace

    from msa_cluster.kernels import _common

    monkeypatch.setattr(_common, "HAS_TRITON", True)
    on_gpu, on_cpu = SimpleNamespace(is_cuda=True), SimpleNamespace(is_cuda=False)
    monkeypatch.delenv("MSA_KERNELS", raising=False)
    assert _common.use_triton(on_gpu, on_gpu) and not _common.use_triton(on_gpu, on_cpu)
    monkeypatch.setenv("MSA_KERNELS", "reference")
    assert not _common.use_triton(on_gpu, on_gpu)
