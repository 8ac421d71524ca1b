"""Attention over a gathered context: [template head, pooled memory chunks, prompt, generated].

Legend: Tq query tokens, S context slots, H query heads, Hkv kv heads, G = H // Hkv, D head dim.

The context of one request at one layer is a single buffer of S key/value slots. A query at
buffer slot p sees every slot j <= p. Placing the template head at slots 0..2, the selected
chunks after it and the prompt after them makes this exactly MSA's rule: template tokens see
only earlier template tokens, prompt tokens see the template, all selected chunks, and the
prompt up to themselves (bottom-right causal alignment).

The Triton kernel is an online-softmax (FlashAttention-style) pass over the slots. One program
owns one kv head and BLOCK_M rows of (query token, head in the kv head's group), so the G heads
that share a kv head read each K/V tile once; rows are t * G + r for head h = kv_head * G + r.
"""

from __future__ import annotations

import torch

from msa_cluster.kernels._common import (
    FLOAT_DTYPES,
    HAS_TRITON,
    INDEX_DTYPES,
    check_tensor,
    next_power_of_2,
    require_triton,
    use_triton,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["gathered_attention", "gathered_attention_ref", "gathered_attention_triton"]


def _launch_config(rows: int, lowp: bool) -> tuple[int, int, int]:
    """(BLOCK_M rows of query token x group head, BLOCK_N slots, num_warps) for D <= 128.

    Small BLOCK_M for decode (one token); fp32 dots run on FMA units and need smaller tiles.
    Chosen from ptxas resource reports for sm_80 / sm_90 (no register spills, <= 64 KiB shared
    memory); not tuned on a GPU.
    """
    if lowp:
        return (16, 32, 4) if rows <= 16 else (64, 32, 8)
    return (16, 16, 4) if rows <= 16 else (32, 16, 4)


if HAS_TRITON:

    @triton.jit
    def _gathered_attention_kernel(  # type: ignore[no-untyped-def]  # Triton reads the signature
        q_ptr,  # [Tq, H, D]
        k_ptr,  # [S, Hkv, D]
        v_ptr,  # [S, Hkv, D]
        slot_ptr,  # [Tq]
        o_ptr,  # [Tq, H, D], q's dtype; split-K: [splits, Tq, H, D] fp32 unnormalised partial sums
        ml_ptr,  # split-K only: [splits, 2, Tq, H] fp32 running max and softmax denominator
        Tq,
        S,
        H,
        Hkv,
        D,
        scale,
        split_len,  # slots per split (a multiple of BLOCK_N); program_id(2) takes slots [pid * split_len, +split_len)
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        LOWP_DOT: tl.constexpr,  # True: dot operands in the input's 16-bit dtype; False: fp32, no TF32
        SPLIT: tl.constexpr,  # write partial (acc, max, denominator) per split for `_combine_splits`
    ):
        pid_m = tl.program_id(0)
        kvh = tl.program_id(1)
        pid_s = tl.program_id(2)
        G = H // Hkv
        # addresses are a 64-bit scalar base plus small int32 offsets, which keeps registers free
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # t * G + r
        row_ok = rows < Tq * G
        t_first = (pid_m * BLOCK_M) // G
        t_local = rows // G - t_first
        q_base = t_first.to(tl.int64) * H * D
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        row_off = (t_local * H + kvh * G + rows % G) * D  # [BLOCK_M] row starts, from q_base
        qo_ok = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + q_base + (row_off[:, None] + offs_d[None, :]), mask=qo_ok, other=0.0)
        if not LOWP_DOT:  # widen right after the load: also what keeps bf16 exact under the CPU interpreter
            q = q.to(tl.float32)
        slot = tl.load(slot_ptr + t_first + t_local, mask=row_ok, other=-1).to(tl.int32)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        kv_off = tl.arange(0, BLOCK_N)[:, None] * (Hkv * D) + offs_d[None, :]  # within one slot tile
        lo = pid_s * split_len
        hi = tl.minimum(tl.minimum(tl.max(slot) + 1, S), lo + split_len)  # no row of this block sees a slot past hi
        for n0 in range(lo, hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            kv_base = tl.cast(n0, tl.int64) * Hkv * D + kvh * D
            kv_ok = (cols < S)[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + kv_base + kv_off, mask=kv_ok, other=0.0)  # [BLOCK_N, BLOCK_D]
            v = tl.load(v_ptr + kv_base + kv_off, mask=kv_ok, other=0.0)
            if LOWP_DOT:  # 16-bit operands, fp32 accumulation (tensor cores)
                s = tl.dot(q, tl.trans(k))
            else:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            s = s * scale  # [BLOCK_M, BLOCK_N]
            visible = (cols[None, :] <= slot[:, None]) & (cols < S)[None, :]
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # a row that has seen no slot yet keeps m = -inf; subtract 0 there so exp() gives 0, not nan
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_sub)
            p = tl.exp(s - m_sub[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if LOWP_DOT:
                pv = tl.dot(p.to(v_ptr.dtype.element_ty), v)
            else:
                pv = tl.dot(p, v, input_precision="ieee")
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        # addresses rebuilt, not kept live through the loop: a [BLOCK_M, BLOCK_D] offset tensor costs registers
        if SPLIT:
            part = pid_s.to(tl.int64) * Tq * H
            o_rows = o_ptr + (part * D + q_base) + row_off
            tl.store(o_rows[:, None] + offs_d[None, :], acc, mask=qo_ok)
            ml_rows = ml_ptr + (2 * part + t_first.to(tl.int64) * H) + row_off // D
            tl.store(ml_rows, m_i, mask=row_ok)
            tl.store(ml_rows + Tq * H, l_i, mask=row_ok)
        else:
            out = acc / l_i[:, None]  # a row that sees no slot (slot < 0) gives 0 / 0 = nan, like the reference
            o_rows = o_ptr + q_base + row_off
            tl.store(o_rows[:, None] + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=qo_ok)


def _num_splits(programs: int, S: int, block_n: int, device: torch.device) -> int:
    """Split-K factor: enough programs to fill the device (2 per SM) when few query rows (decode)
    give few programs, but at least 4 slot tiles per split."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 64
    by_work = max(1, int(triton.cdiv(S, 4 * block_n)))
    return max(1, min(by_work, (2 * sms) // max(programs, 1)))


def _combine_splits(part: torch.Tensor, ml: torch.Tensor) -> torch.Tensor:
    """Merge split-K partials: part [splits, Tq, H, D] unnormalised sums, ml [splits, 2, Tq, H]
    (max, denominator) -> [Tq, H, D] fp32 (nan for a row that saw no slot)."""
    m, l_sum = ml[:, 0], ml[:, 1]
    top = m.amax(dim=0)  # [Tq, H]
    w = torch.exp(m - top.masked_fill(top == float("-inf"), 0.0))  # [splits, Tq, H]; 0 for empty splits
    return (w.unsqueeze(-1) * part).sum(dim=0) / (w * l_sum).sum(dim=0).unsqueeze(-1)


def gathered_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_slots: torch.Tensor, scale: float, *, num_splits: int | None = None
) -> torch.Tensor:
    """Triton launcher with `gathered_attention_ref` semantics.

    q, k, v: one dtype of float32 / bfloat16 / float16, contiguous, on one device (CUDA, or CPU
    under the Triton interpreter); q_slots int32/int64 [Tq]. fp32 inputs take fp32 dots without
    TF32; 16-bit inputs take 16-bit dots with fp32 accumulation (except bf16 on CPU: the
    interpreter computes bf16 dots wrongly, so fp32 there).
    num_splits: split-K over the slots (None: chosen so that a decode step fills the GPU; each
    split writes fp32 partials, merged by `_combine_splits`).
    """
    check_tensor("q", q, shape="[Tq, H, D]", ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, shape="[S, Hkv, D]", ndim=3, dtypes=FLOAT_DTYPES, device=q.device)
    check_tensor("v", v, shape="[S, Hkv, D]", ndim=3, dtypes=FLOAT_DTYPES, device=q.device)
    check_tensor("q_slots", q_slots, shape="[Tq]", ndim=1, dtypes=INDEX_DTYPES, contiguous=False)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    Tq, H, D = q.shape
    S, Hkv, Dk = k.shape
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v shape {tuple(v.shape)} must equal k shape {tuple(k.shape)}")
    if Dk != D:
        raise ValueError(f"q head dim {D} != k head dim {Dk}")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"query heads {H} must be a multiple of kv heads {Hkv}")
    if q_slots.shape[0] != Tq:
        raise ValueError(f"q_slots must have one slot per query token (Tq={Tq}), got {q_slots.shape[0]}")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1 or None, got {num_splits}")
    if Tq == 0 or H == 0 or D == 0 or S == 0:
        return torch.zeros_like(q)  # an empty context reads nothing: zeros, like the reference's empty sum
    require_triton()
    rows = Tq * (H // Hkv)
    lowp = q.dtype != torch.float32 and not (q.device.type == "cpu" and q.dtype == torch.bfloat16)
    block_m, block_n, num_warps = _launch_config(rows, lowp)
    programs = triton.cdiv(rows, block_m) * Hkv
    splits = num_splits or _num_splits(programs, S, block_n, q.device)
    split_len = triton.cdiv(triton.cdiv(S, splits), block_n) * block_n
    splits = triton.cdiv(S, split_len)
    if splits > 1:
        out = torch.empty(splits, Tq, H, D, dtype=torch.float32, device=q.device)
        ml = torch.empty(splits, 2, Tq, H, dtype=torch.float32, device=q.device)
    else:
        out, ml = torch.empty_like(q), q.new_empty(0, dtype=torch.float32)
    grid = (triton.cdiv(rows, block_m), Hkv, splits)
    _gathered_attention_kernel[grid](
        q, k, v, q_slots.to(q.device).contiguous(), out, ml, Tq, S, H, Hkv, D, float(scale), split_len,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, next_power_of_2(D)), LOWP_DOT=lowp, SPLIT=splits > 1,
        num_warps=num_warps,
    )  # fmt: skip
    return _combine_splits(out, ml).to(q.dtype) if splits > 1 else out


# Blocks of the reference: BLOCK_Q query tokens x BLOCK_S slots of logits at a time, so the
# extra memory is H * BLOCK_Q * BLOCK_S floats (4 MiB at H = 4), never H * Tq * S.
BLOCK_Q = 256
BLOCK_S = 1024


def _attend_block(q_blk: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, scale: float) -> torch.Tensor:
    """Online softmax of one query block over the slots it can see.

    q_blk: [Hkv, R, D] fp32, R = rows of (query token, group head); k, v: [Hkv, S, D] views of the
    context (no copy); slots: [R] the slot of each row -> [Hkv, R, D] fp32 (nan for a row that sees
    no slot, like a softmax over nothing)."""
    Hkv, R, D = q_blk.shape
    hi = min(int(slots.max()) + 1, k.shape[1])  # no row of this block sees a slot past hi
    low = int(slots.min())  # key blocks entirely at or below every row's slot need no mask
    m = q_blk.new_full((Hkv, R, 1), float("-inf"))
    l_sum = q_blk.new_zeros(Hkv, R, 1)
    acc = q_blk.new_zeros(Hkv, R, D)
    for s0 in range(0, max(hi, 0), BLOCK_S):
        s1 = min(s0 + BLOCK_S, hi)
        logits = torch.matmul(q_blk, k[:, s0:s1].float().transpose(1, 2)) * scale  # [Hkv, R, s1 - s0]
        if s1 - 1 > low:
            cols = torch.arange(s0, s1, device=q_blk.device)
            logits = logits.masked_fill(cols[None, None, :] > slots[None, :, None], float("-inf"))
        m_new = torch.maximum(m, logits.amax(dim=-1, keepdim=True))
        m_sub = m_new.masked_fill(m_new == float("-inf"), 0.0)  # a row that has seen nothing yet: exp(-inf) = 0, not nan
        p = torch.exp(logits - m_sub)
        alpha = torch.exp(m - m_sub)
        l_sum = l_sum * alpha + p.sum(dim=-1, keepdim=True)
        acc = acc * alpha + torch.matmul(p, v[:, s0:s1].float())
        m = m_new
    return acc / l_sum


def gathered_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_slots: torch.Tensor, scale: float
) -> torch.Tensor:
    """q: [Tq, H, D]; k, v: [S, Hkv, D]; q_slots: [Tq] int64 buffer slot of each query -> [Tq, H, D].

    Blocked online softmax in float32 (differentiable, for training too); the output has q's
    dtype. GQA reads each kv head once for its G query heads (rows t * G + r), with no per-group
    K/V copy; the extra memory is one BLOCK_Q x BLOCK_S block of logits per head.
    """
    Tq, H, D = q.shape
    S, Hkv, _ = k.shape
    if H % Hkv:
        raise ValueError(f"query heads {H} must be a multiple of kv heads {Hkv}")
    if S == 0 or Tq == 0:
        return q.new_zeros(q.shape)  # an empty context reads nothing
    G = H // Hkv
    k_h, v_h = k.permute(1, 0, 2), v.permute(1, 0, 2)  # [Hkv, S, D] views
    slots = q_slots.to(q.device)
    blocks = []
    for t0 in range(0, Tq, BLOCK_Q):
        n = min(BLOCK_Q, Tq - t0)
        q_blk = q[t0 : t0 + n].float().view(n, Hkv, G, D).permute(1, 0, 2, 3).reshape(Hkv, n * G, D)  # [Hkv, n*G, D]
        out = _attend_block(q_blk, k_h, v_h, slots[t0 : t0 + n].repeat_interleave(G), scale)
        blocks.append(out.view(Hkv, n, G, D).permute(1, 0, 2, 3).reshape(n, H, D))  # [n, H, D]
    return torch.cat(blocks).to(q.dtype)


def gathered_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_slots: torch.Tensor, scale: float
) -> torch.Tensor:
    """Slot-causal GQA attention: q [Tq, H, D], k/v [S, Hkv, D], q_slots [Tq] -> [Tq, H, D] in q's dtype.

    Query t sees slots j <= q_slots[t]. Triton on CUDA, the reference elsewhere. Example:
        >>> q, kv = torch.randn(2, 4, 8), torch.randn(5, 2, 8)
        >>> gathered_attention(q, kv, kv, torch.tensor([3, 4]), 8 ** -0.5).shape
        torch.Size([2, 4, 8])
    """
    if use_triton(q, k, v):
        return gathered_attention_triton(q.contiguous(), k.contiguous(), v.contiguous(), q_slots, scale)
    return gathered_attention_ref(q, k, v, q_slots, scale)
