"""`msa eval`'s sweep: sizes parse, RULER's string match, and every example is asked over a memory of the stated size."""

import pytest

from msa_cluster.model import MSAForCausalLM
from msa_cluster.model.tokenizer import load_codec
from msa_cluster.training.memory_eval import (
    InProcessEvalMemory,
    SweepConfig,
    format_size,
    goal_lines,
    markdown_table,
    parse_size,
    run_sweep,
    string_match,
)


def test_sizes_parse_in_binary_units_and_bad_ones_name_themselves():
    assert [parse_size(s) for s in ("16K", "128k", "1M", "10M", "100M", "500", "1.5K")] == [
        16384, 131072, 1 << 20, 10 << 20, 100 << 20, 500, 1536]  # fmt: skip
    assert [format_size(n) for n in (16384, 1 << 20, 10 << 20, 500)] == ["16K", "1M", "10M", "500"]
    for bad in ("", "16Q", "-1K", "0", "K"):
        with pytest.raises(ValueError, match="memory size"):
            parse_size(bad)
    with pytest.raises(ValueError, match="tasks"):
        SweepConfig(tasks=("niah_x",))


def test_string_match_is_rulers_share_of_reference_values():
    assert string_match("The answer is 123 and 456.", "123, 456") == 1.0
    assert string_match("only 456", "123, 456") == 0.5
    assert string_match("AbC-def", "abc-DEF") == 1.0
    assert string_match("", "123") == 0.0


@pytest.fixture(scope="module")
def tiny():
    return MSAForCausalLM.from_pretrained("msa-tiny-random"), load_codec("msa-tiny-random")


def test_sweep_asks_every_example_over_a_memory_of_the_stated_size(tiny):
    """Background grows to each size; each example's documents are added with fresh ids and deleted after."""
    model, codec = tiny
    memory = InProcessEvalMemory(model)
    cfg = SweepConfig(sizes=(3000, 1500), tasks=("niah_single", "two_hop"), examples=2, max_answer_tokens=4)
    result = run_sweep(model, codec, cfg, memory)
    assert [s.size for s in result.sizes] == [1500, 3000]
    for s in result.sizes:
        assert s.size <= s.tokens <= s.size * 1.3
        assert {r["task"] for r in s.records} == {"niah_single", "two_hop", "two_hop_one_round"}
        assert s.scores["niah_single"].examples == 2 and s.scores["all"].examples == 4
        for r in s.records:
            assert all(g >= s.documents - 16 for g in r["gold"])  # the example's ids come after the background
            sel = set().union(*r["selected"].values())
            first = set(r["first_hop"])
            assert first <= set(r["gold"]) and r["router_recall_any"] == len(first & sel) / len(first)
            assert r["router_recall_any"] >= max(r["router_recall_layers"].values())
            assert 0.0 <= r["string_match"] <= 1.0 and r["finish"]
        assert all(len(v) == model.config.memory.top_k_docs for r in s.records for v in r["selected"].values())
    background = result.sizes[-1].documents - 16
    assert len(memory.memory) == background  # every example's documents were deleted again
    table = markdown_table(result)
    assert "| 3000 (" in table and "two_hop_one_round" in table


def test_the_background_is_the_shortest_prefix_of_fillers_that_reaches_the_budget(tiny):
    """The background's cheap per-text bound (no tokenizing) selects the same documents as counting
    every document's real tokens would: fillers in order, until the tokens reach the budget."""
    from msa_cluster.model import protocol as P
    from msa_cluster.training.bm25 import InvertedBM25
    from msa_cluster.training.memory_eval import _Background
    from msa_cluster.training.tasks import filler_texts

    model, codec = tiny
    for budget, batch in ((2000, 4096), (2000, 7), (5000, 16)):
        cfg = SweepConfig(sizes=(budget,), encode_batch_docs=batch)
        background = _Background(model, codec, InProcessEvalMemory(model), InvertedBM25(), cfg)
        background.grow(budget)
        tokens, count = 0, 0
        for i, text in enumerate(filler_texts(cfg.seed, "eval")):  # ids 0, 1, ... in a fresh memory
            if tokens >= budget:
                break
            tokens, count = tokens + len(P.encode_document(codec, i, text)), count + 1
        assert (background.documents, background.tokens) == (count, tokens)


def test_gold_outputs_score_one_and_an_immediate_wrong_answer_scores_zero():
    """Scripted with its gold outputs (under the memory's ids) every example scores 1 and cites exactly its gold;
    a model that says `nope<|im_end|>` at once scores 0 with no citations. BM25 finds single-hop needles."""
    from msa_cluster.model import protocol as P
    from msa_cluster.model.tokenizer import ByteTokenizer
    from msa_cluster.training.render import render
    from tests.model.helpers import make_model
    from tests.training.test_train_serve_parity import Script

    tok, model = ByteTokenizer(), make_model(seed=6, chunk=16, top_k=2)
    cfg = SweepConfig(sizes=(2500,), tasks=("niah_single", "niah_multivalue", "two_hop"), examples=2, num_docs=6,
                      named_ids="free")  # the script names gold ids, routed or not

    def gold(ex, mode):
        return Script([i for turn in render(ex, tok, mode).turns for i, t in zip(turn.ids, turn.target) if t])

    result = run_sweep(model, tok, cfg, processor=gold)
    (size,) = result.sizes
    lines = goal_lines(result)
    assert "niah_single string match at 2500: 1.000 (goal >= 0.95)" in lines
    assert "two_hop at 2500: interleave 1.000 vs one round 1.000: +0.0 points (goal >= +15)" in lines
    for task in ("niah_single", "niah_multivalue", "two_hop", "two_hop_one_round"):
        v = size.scores[task]
        assert v.string_match == v.exact == 1.0 and v.finish == {"answered": 2}, task
        if task != "two_hop_one_round":  # one round cites every routed document
            assert v.citation_recall == v.citation_precision == 1.0, task
    assert size.scores["niah_single"].bm25_recall == 1.0
    nope = [*tok.encode("nope"), tok.token_id(P.IM_END)]
    (size,) = run_sweep(model, tok, cfg, processor=lambda ex, mode: Script(nope)).sizes
    assert size.scores["all"].string_match == 0.0 and size.scores["all"].citation_recall == 0.0
    assert size.scores["all"].finish == {"answered": 6}
