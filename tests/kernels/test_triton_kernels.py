"""Each Triton kernel against its reference, and the routing kernel's position independence.

Runs on a CUDA GPU, or on CPU when this process started with TRITON_INTERPRET=1; otherwise
test_triton_interpreter.py runs this file in a fresh process with the interpreter on.
Sizes are small: the interpreter is 100-1000x slower than torch.

Legend: B rows, T tokens, F features, P chunk size, Tq queries, S slots, H heads, Hkv kv heads,
D head dim, C chunks, N documents.
"""

from __future__ import annotations

import pytest
import torch

from msa_cluster.kernels import attention, pooling, routing
from msa_cluster.kernels.routing import doc_scores_ref, prepare_queries, select_top_k
from msa_cluster.types import RoutingSpec
from tests.kernels.helpers import assert_close, triton_mode

MODE = triton_mode()
pytestmark = [
    pytest.mark.skipif(
        MODE is None,
        reason="needs CUDA or a process started with TRITON_INTERPRET=1 (test_triton_interpreter.py runs this file so)",
    ),
    # the interpreter evaluates masked-out lanes too (0 / 0 in padded attention rows); they are never stored
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]
DEVICE = "cuda" if MODE == "cuda" else "cpu"

FP32_RTOL = 1e-5
FP32_ATOL = 1e-5
LOWP_RTOL = 1e-2  # bf16 / fp16 attention outputs
LOWP_ATOL = 1e-2
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _tol(dtype: torch.dtype) -> dict[str, float]:
    lowp = dtype != torch.float32
    return {"rtol": LOWP_RTOL if lowp else FP32_RTOL, "atol": LOWP_ATOL if lowp else FP32_ATOL}


# -- pooling


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "T, P, F, lengths",
    [
        (1, 4, 4, [1]),  # one token, shorter than a chunk
        (37, 8, 20, [37, 1, 0]),  # T not a multiple of P; one-token and empty documents
        (20, 16, 130, [20, 3]),  # F spans two feature blocks
        (0, 4, 4, [0, 0]),  # C = 0
    ],
)
def test_chunk_mean_kernel_matches_ref(dtype, T, P, F, lengths):
    """The pooling kernel gives the reference's fp32 chunk means (fp32 accumulation for every input dtype)."""
    torch.manual_seed(T + F)
    x = torch.randn(len(lengths), T, F).to(dtype)
    lens = torch.tensor(lengths)
    got = pooling.chunk_mean_triton(x.to(DEVICE), lens.to(DEVICE), P)
    assert got.dtype == torch.float32
    assert_close(got, pooling.chunk_mean_ref(x, lens, P), rtol=FP32_RTOL, atol=FP32_ATOL)


# -- attention


def _msa_slots(template: int, chunks: int, prompt: int) -> list[int]:
    return list(range(template)) + [template + chunks + i for i in range(prompt)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize(
    "q_slots, S, D",
    [
        ([0], 1, 8),  # one query, one slot; head dim below the 16-wide tile
        ([69], 70, 16),  # decode: one query over several slot tiles
        (_msa_slots(3, 40, 20), 63, 24),  # prefill: > 64 rows for G = 4; head dim not a power of 2
    ],
)
def test_gathered_attention_kernel_matches_ref(dtype, heads, q_slots, S, D):
    """The online-softmax kernel equals the reference for every GQA ratio, dtype and awkward shape."""
    H, Hkv = heads
    torch.manual_seed(S + D)
    q, k, v = torch.randn(len(q_slots), H, D), torch.randn(S, Hkv, D), torch.randn(S, Hkv, D)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    slots = torch.tensor(q_slots)
    got = attention.gathered_attention_triton(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), slots.to(DEVICE), D**-0.5)
    assert got.dtype == dtype
    assert_close(got, attention.gathered_attention_ref(q, k, v, slots, D**-0.5), **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_splits", [None, 1, 3, 8])
def test_split_k_decode_matches_ref(dtype, num_splits):
    """Split-K over the slots (partials merged by max and denominator) equals the reference for a
    decode step, a short prefill, more splits than slot tiles, and a row that sees no slot."""
    torch.manual_seed(3)
    H, Hkv, D, S = 8, 2, 16, 150
    k, v = torch.randn(S, Hkv, D).to(dtype), torch.randn(S, Hkv, D).to(dtype)
    for q_slots in ([S - 1], [40, 149, -1], [3]):
        q = torch.randn(len(q_slots), H, D).to(dtype)
        slots = torch.tensor(q_slots)
        got = attention.gathered_attention_triton(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), slots.to(DEVICE), 0.25,
                                                  num_splits=num_splits)
        assert got.dtype == dtype
        assert_close(got, attention.gathered_attention_ref(q, k, v, slots, 0.25), **_tol(dtype))


def test_split_k_fills_the_device_for_decode():
    """A one-token decode over a long context gets several splits; a long prefill gets one."""
    assert attention._num_splits(programs=8, S=8192, block_n=32, device=torch.device(DEVICE)) > 1
    assert attention._num_splits(programs=4096, S=8192, block_n=32, device=torch.device(DEVICE)) == 1


def test_gathered_attention_kernel_edge_cases_match_ref():
    """Slots in any order or past the end, an empty context (zeros) and a query that sees no slot
    (nan) all behave as in the reference."""
    q, k = torch.randn(4, 2, 16), torch.randn(10, 1, 16)
    cases = [(k, [5, 2, 30, 0]), (k[:0], [0, 1, 2, 3]), (k, [-1, 1, 2, 3])]
    for kk, slots in ((kk, torch.tensor(s)) for kk, s in cases):
        got = attention.gathered_attention_triton(q.to(DEVICE), kk.to(DEVICE), kk.to(DEVICE), slots.to(DEVICE), 0.25)
        assert_close(got, attention.gathered_attention_ref(q, kk, kk, slots, 0.25), rtol=FP32_RTOL, atol=FP32_ATOL)


# -- routing

SPECS = {  # (similarity, head_reduce, query_reduce, chunk_reduce)
    "released": ("dot", "mean", "max", "max"),  # the MSA-4B configuration
    "cosine-mean": ("cosine", "mean", "mean", "mean"),
    "per-head-max": ("dot", "max", "max", "mean"),  # unfolded: the kernel loops over heads
    "cosine-max-last": ("cosine", "max", "last", "max"),
}
DOC_CHUNKS = [1, 70, 3]  # C = 74: two chunk tiles; documents inside and across a tile edge


def _routing_case(seed: int, spec: str, H: int, Hkv: int, key_dtype=torch.float32, D: int = 8):
    g = torch.Generator().manual_seed(seed)
    rs = RoutingSpec(*SPECS[spec], num_heads=H, num_kv_heads=Hkv)
    mask = torch.rand(2, 5, generator=g) < 0.6
    mask[0, 1], mask[1] = True, False  # row 1 has no routing token
    query = prepare_queries(torch.randn(2, 5, H, D, generator=g), mask, rs, D**-0.5)
    keys = torch.randn(sum(DOC_CHUNKS), Hkv, D, generator=g).to(key_dtype)
    return query, keys, torch.tensor([0, *DOC_CHUNKS]).cumsum(0)


def _on(query, device):
    return type(query)(query.vectors.to(device), query.mask.to(device), query.spec, query.folded)


def _selected_ids(scores: torch.Tensor, k: int) -> list[list[int]]:
    return [[d.doc_id for d in row] for row in select_top_k(scores, torch.tensor([11, 3, 7]), k)]


@pytest.mark.parametrize(
    "spec, heads",
    [
        ("released", (4, 1)),
        ("cosine-mean", (4, 2)),
        ("per-head-max", (4, 4)),
        ("per-head-max", (4, 2)),
        ("cosine-max-last", (4, 1)),
    ],
)
def test_doc_scores_kernel_matches_ref_and_selects_the_same(spec, heads):
    """Kernel document scores are within fp32 tolerance of the float64 reference; top-k picks the same ids."""
    query, keys, offsets = _routing_case(5, spec, *heads)
    got = routing.doc_scores_triton(_on(query, DEVICE), keys.to(DEVICE), offsets)
    want = doc_scores_ref(query, keys, offsets)
    assert_close(got, want, rtol=FP32_RTOL, atol=FP32_ATOL)
    assert torch.isneginf(got[1]).all()
    assert _selected_ids(got, 2) == _selected_ids(want, 2)


@pytest.mark.parametrize("key_dtype", [torch.bfloat16, torch.float16])
def test_doc_scores_kernel_reads_16_bit_keys(key_dtype):
    """Stored 16-bit router keys are widened after the load: scores match the reference in fp32 tolerance."""
    query, keys, offsets = _routing_case(6, "released", 4, 2, key_dtype)
    got = routing.doc_scores_triton(_on(query, DEVICE), keys.to(DEVICE), offsets)
    assert_close(got, doc_scores_ref(query, keys, offsets), rtol=FP32_RTOL, atol=FP32_ATOL)


def test_doc_scores_kernel_one_document_and_no_chunks():
    """One single-chunk document scores like the reference; C = 0 gives -inf like the reference."""
    query, keys, _ = _routing_case(7, "released", 4, 2)
    one = torch.tensor([0, 1])
    got = routing.doc_scores_triton(_on(query, DEVICE), keys[:1].to(DEVICE), one)
    assert_close(got, doc_scores_ref(query, keys[:1], one), rtol=FP32_RTOL, atol=FP32_ATOL)
    empty = routing.doc_scores_triton(_on(query, DEVICE), keys[:0].to(DEVICE), torch.tensor([0, 0]))
    assert torch.equal(empty.cpu(), doc_scores_ref(query, keys[:0], torch.tensor([0, 0])))


@pytest.mark.parametrize("spec, D", [("released", 20), ("per-head-max", 8)])  # released: K = 40, a partial K block
def test_chunk_scores_kernel_bit_identical_at_any_offset_and_shard_size(spec, D):
    """A chunk's kernel score is bit-identical wherever it sits and however many chunks surround it."""
    query, _, _ = _routing_case(8, spec, 4, 2, D=D)
    query = _on(query, DEVICE)
    torch.manual_seed(8)
    doc = torch.randn(5, 2, D, device=DEVICE)
    alone = routing.chunk_scores_triton(query, doc)
    for before, after in [(37, 3), (62, 70), (130, 0)]:  # 62: across a tile edge; 135 chunks: three tiles
        keys = torch.cat([torch.randn(before, 2, D, device=DEVICE), doc, torch.randn(after, 2, D, device=DEVICE)])
        placed = routing.chunk_scores_triton(query, keys)[:, before : before + 5]
        assert torch.equal(placed, alone), f"chunk scores moved with offset {before} in {keys.shape[0]} chunks"


def test_doc_scores_kernel_of_any_shard_equals_global():
    """Kernel document scores of a shard are bit-identical to the same documents scored all together."""
    query, keys, offsets = _routing_case(9, "cosine-mean", 4, 2)
    query = _on(query, DEVICE)
    full = routing.doc_scores_triton(query, keys.to(DEVICE), offsets)
    for shard in ([1], [2, 0]):
        shard_keys = torch.cat([keys[offsets[n] : offsets[n + 1]] for n in shard]).to(DEVICE)
        shard_offsets = torch.tensor([0, *[DOC_CHUNKS[n] for n in shard]]).cumsum(0)
        assert torch.equal(routing.doc_scores_triton(query, shard_keys, shard_offsets), full[:, shard])


@pytest.mark.parametrize("spec, heads", [("released", (4, 1)), ("cosine-mean", (4, 2)), ("per-head-max", (4, 2))])
def test_route_top_k_with_the_triton_first_pass_equals_the_canonical_reference(spec, heads, monkeypatch):
    """With the Triton kernel as its first pass, route_top_k selects and scores exactly like the
    float64 reference (and so like the CPU first pass): CPU and GPU shards agree bit for bit."""
    from msa_cluster.kernels import routing_exact

    monkeypatch.setattr(routing_exact, "use_triton", lambda *tensors: True)  # the CUDA branch, on this device
    query, keys, offsets = _routing_case(11, spec, *heads, key_dtype=torch.bfloat16)
    ids = torch.tensor([11, 3, 7])
    for k in (1, 2, 3):
        got = routing_exact.route_top_k(_on(query, DEVICE), keys.to(DEVICE), offsets, ids, k)
        assert got == select_top_k(doc_scores_ref(query, keys, offsets), ids, k)


# -- dispatch on a real GPU


@pytest.mark.skipif(MODE != "cuda", reason="needs a CUDA GPU: the dispatchers only pick Triton for CUDA tensors")
def test_dispatchers_run_triton_on_cuda():
    """On CUDA tensors each dispatcher returns exactly its Triton launcher's output."""
    x, lens = torch.randn(2, 9, 8, device="cuda"), torch.tensor([9, 4], device="cuda")
    assert torch.equal(pooling.chunk_mean(x, lens, 4), pooling.chunk_mean_triton(x, lens, 4))
    q, k, v = (torch.randn(*s, device="cuda") for s in ((3, 4, 16), (6, 2, 16), (6, 2, 16)))
    slots = torch.tensor([3, 4, 5], device="cuda")
    got = attention.gathered_attention(q, k, v, slots, 0.25)
    assert torch.equal(got, attention.gathered_attention_triton(q, k, v, slots, 0.25))
    query, keys, offsets = _routing_case(10, "released", 4, 2)
    query, keys = _on(query, "cuda"), keys.cuda()
    assert torch.equal(routing.doc_scores(query, keys, offsets), routing.doc_scores_triton(query, keys, offsets))
