"""Contract shared by every item-index back-end: top hits on clear data, ids kept, adds, save/load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamrec.models import index as index_module
from streamrec.models.index import BLOCK, CompiledMaxima, ItemIndex, block_maxima, top_k
from streamrec.models.perf import exact_top_k, index_timings, recall_at_k
from streamrec.models.sequences import can_compile


@pytest.fixture()
def vectors() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.normal(size=(500, 16)).astype(np.float32)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_index_finds_the_best_inner_product(kind: str, vectors: np.ndarray, tmp_path: Path) -> None:
    ids = np.arange(1, 501)
    index = ItemIndex.build(vectors, ids, kind)  # type: ignore[arg-type]
    queries = vectors[:20] * 10  # each query points at one item far harder than at any other
    scores, found = index.search(queries, 5)
    exact = exact_top_k(vectors, queries, 5) + 1
    if kind == "flat":  # exact: the same five, in the same order
        np.testing.assert_array_equal(found, exact)
    else:  # approximate: the clear best is found for nearly every query
        assert (found[:, 0] == exact[:, 0]).mean() >= 0.9
    assert np.all(np.diff(scores, axis=1) <= 1e-5)  # best first

    index.add(np.full((1, 16), 50.0, dtype=np.float32), np.array([999]))
    _, found = index.search(np.ones((1, 16), dtype=np.float32), 1)
    assert found[0, 0] == 999 and index.size == 501

    index.save(tmp_path, "v1.0")
    loaded, version = ItemIndex.load(tmp_path)
    assert version == "v1.0" and loaded.size == 501 and loaded.kind == index.kind


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_replaced_vectors_are_what_the_index_finds_under_the_same_ids(kind: str, vectors: np.ndarray) -> None:
    """A rewritten item's new vector takes its old one's place: found where the new one points, no longer
    where the old one did, and the index holds as many items as before."""
    ids = np.arange(1, 501)
    index = ItemIndex.build(vectors, ids, kind)  # type: ignore[arg-type]
    moved = np.array([7, 300])
    fresh = np.random.default_rng(2).normal(size=(2, 16)).astype(np.float32)
    index.search(vectors[:1], 5)  # a search first: the flat index's dense table must not outlive the change
    index.replace(fresh, moved)
    assert index.size == 500
    _, found = index.search(fresh * 10, 1)
    np.testing.assert_array_equal(found[:, 0], moved)
    if kind == "flat":  # exact: the answers of the table with the new rows in place of the old
        now = vectors.copy()
        now[moved - 1] = fresh
        queries = np.random.default_rng(3).normal(size=(40, 16)).astype(np.float32)
        _, found = index.search(queries, 5)
        np.testing.assert_array_equal(found, exact_top_k(now, queries, 5) + 1)


def test_a_small_flat_index_answers_as_faiss_does_in_chunks_and_after_adds(
    vectors: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small flat indexes are searched with a matrix product and torch.topk: the same answer as FAISS's own
    # exact search, query chunk by chunk, and items added later are found.
    monkeypatch.setattr(index_module, "DENSE_CHUNK_SCORES", 7 * 500)  # chunks of 7 queries
    index = ItemIndex.build(vectors, np.arange(1, 501) * 3, "flat")
    queries = np.random.default_rng(1).normal(size=(50, 16)).astype(np.float32)

    def faiss_answer(k: int) -> tuple[np.ndarray, np.ndarray]:
        return index._index.search(queries, min(k, index.size))

    for k in (1, 10, 600):
        scores, found = index.search(queries, k)
        want_scores, want_found = faiss_answer(k)
        np.testing.assert_array_equal(found, want_found)
        np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)

    index.add(queries[:5] * 10, np.array([7001, 7002, 7003, 7004, 7005]))  # each the best for its query
    scores, found = index.search(queries, 10)
    assert found[:5, 0].tolist() == [7001, 7002, 7003, 7004, 7005]
    np.testing.assert_array_equal(found, faiss_answer(10)[1])


@pytest.mark.parametrize("kind", ["flat", "faiss flat", "hnsw"])
def test_excluded_items_are_never_found_and_k_others_take_their_place(
    kind: str, vectors: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each query's excluded items (a shopper's purchases) are left out and the query still gets k results:
    the answer is the unexcluded search's, asked wide enough, with them dropped, in its order. A query may
    exclude many items, none, or items the index lacks; ``allowed`` still applies."""
    monkeypatch.setattr(index_module, "DENSE_CHUNK_SCORES", 7 * 512)  # the dense table: chunks of 7 queries
    if kind == "faiss flat":
        monkeypatch.setattr(index_module, "DENSE_MAX_ITEMS", 100)  # FAISS's own flat search answers
    ids = np.arange(1, 501) * 2  # item indices the index does not hold lie between them
    index = ItemIndex.build(vectors, ids, "hnsw" if kind == "hnsw" else "flat")
    assert index.search_method.startswith("torch") == (kind == "flat")
    rng = np.random.default_rng(2)
    queries = rng.normal(size=(30, 16)).astype(np.float32)
    allowed = rng.random(1002) > 0.1
    _, unexcluded = index.search(queries, 500, allowed)
    excluded = [
        set(rng.choice(row[row > 0], size=int(rng.integers(0, 60)), replace=False).tolist()) | {3, 5000}
        for row in unexcluded
    ]
    excluded[4] = set()
    for k in (1, 10, 40):
        scores, found = index.search(queries, k, allowed, excluded=excluded)
        assert found.shape == scores.shape == (30, k)
        for row, (mine, skip) in enumerate(zip(found.tolist(), excluded, strict=True)):
            expected = [i for i in unexcluded[row].tolist() if i not in skip and i > 0][:k]
            if kind == "hnsw":  # approximate: searched wider, it may find a little more
                assert not set(mine) & skip and len(set(mine) & set(expected)) >= 0.8 * k
            else:
                assert mine == expected
        assert np.all(allowed[found[found > 0]])
        assert np.all(np.diff(scores, axis=1) <= 1e-5)


def test_measured_recall_is_against_an_exact_reference_that_shares_no_code_with_the_index(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rows = index_timings((2_000,), ("flat", "hnsw"), (1, 50), dim=16, recall_queries=50)
    flat, hnsw = rows
    assert flat["recall_at_10"] == 1.0 and flat["search"] == "torch matmul + block-maxima top-k (exact)"
    assert 0 < hnsw["recall_at_10"] <= 1.0 and hnsw["search"].startswith("FAISS IndexHNSWFlat")
    monkeypatch.setattr(index_module, "DENSE_MAX_ITEMS", 1_000)  # past it, FAISS's own flat search answers
    assert index_timings((2_000,), ("flat",), (1,), dim=16)[0]["search"] == "FAISS IndexFlatIP (exact)"

    # The check can fail: a flat index that answers wrongly is measured as such.
    real = ItemIndex.search

    def off_by_one(self: ItemIndex, queries: np.ndarray, k: int, allowed: object = None) -> object:
        scores, found = real(self, queries, k + 1)
        return scores[:, 1:], found[:, 1:]  # misses each query's best item

    monkeypatch.setattr(ItemIndex, "search", off_by_one)
    assert index_timings((2_000,), ("flat",), (1,), dim=16)[0]["recall_at_10"] == 0.9
    assert recall_at_k(np.array([[1, 2], [3, 4]]), np.array([[2, 1], [3, 5]])) == 0.75


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 5),
    blocks=st.integers(1, 40),
    k=st.integers(1, 20),
    hidden_share=st.sampled_from([0.0, 0.5, 0.95]),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_the_block_maxima_top_k_is_torch_topk(
    rows: int, blocks: int, k: int, hidden_share: float, ties: bool, seed: int
) -> None:
    """``top_k`` looks closely only at the k blocks with the best maxima: the same scores as a full top-k,
    best first, each at a column that holds it; -inf (items that may not be found) where fewer are left."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, blocks * BLOCK, generator=generator)
    if ties:
        scores = scores.round()  # many equal scores: either of two equal ones may be taken
    scores[torch.rand(scores.shape, generator=generator) < hidden_share] = -torch.inf
    k = min(k, scores.shape[1])
    values, columns = top_k(scores, k)
    expected = torch.topk(scores, k, dim=1).values
    assert torch.equal(values, expected)
    assert torch.equal(scores.gather(1, columns), values)
    assert all(len(set(row)) == k for row in columns.tolist())  # no column twice


def _near_ties(rng: np.random.Generator, items: int, dim: int, tied: int) -> np.ndarray:
    """Item vectors where ``tied`` items are one vector plus changes far below bfloat16's resolution (their
    bfloat16 scores tie, their float32 scores do not), among items that score clearly lower."""
    vectors = rng.normal(size=(items, dim)).astype(np.float32) * 0.5
    base = rng.normal(size=dim).astype(np.float32) * 3
    vectors[:tied] = base + rng.normal(size=(tied, dim)).astype(np.float32) * 1e-4
    return vectors


@pytest.mark.parametrize("maxima", ["eager", "compiled"])
@pytest.mark.parametrize("case", ["random", "near ties"])
def test_bfloat16_scoring_settled_in_float32_answers_as_the_float32_search(
    case: str, maxima: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the CPU runs bfloat16 natively the dense search scores in bfloat16 first and settles the best in
    float32 (``coarse``): the same items in the same order as the float32 search, with allowed items,
    excluded ones, chunks, and items whose bfloat16 scores tie; with the block maxima compiled (what a
    worker whose encoder is compiled searches with) as with the eager ones."""
    if maxima == "compiled" and not can_compile(torch.device("cpu")):
        pytest.skip("no C++ compiler on this machine: the search takes its block maxima eagerly")
    monkeypatch.setattr(index_module, "DENSE_CHUNK_SCORES", 37 * 4096)  # chunks of 37 queries
    rng = np.random.default_rng(3)
    items, dim = 4_000, 32
    if case == "random":
        vectors = rng.normal(size=(items, dim)).astype(np.float32)
        queries = rng.normal(size=(90, dim)).astype(np.float32)
    else:
        vectors = _near_ties(rng, items, dim, tied=300)
        queries = vectors[:1].repeat(90, axis=0) + rng.normal(size=(90, dim)).astype(np.float32) * 0.01
    ids = rng.permutation(items * 2)[:items] + 1
    exact, coarse = ItemIndex.build(vectors, ids), ItemIndex.build(vectors, ids)
    coarse.coarse = True
    if maxima == "compiled":
        coarse.maxima = compiled = CompiledMaxima()
    assert coarse.search_method.startswith("torch bfloat16")
    allowed = rng.random(items * 2 + 1) > 0.2
    excluded = [set(rng.choice(ids, size=int(rng.integers(0, 40))).tolist()) for _ in queries]
    for k in (1, 10, 18, 25):
        for kwargs in ({}, {"allowed": allowed}, {"allowed": allowed, "excluded": excluded}):
            want_scores, want = exact.search(queries, k, **kwargs)  # type: ignore[arg-type]
            scores, found = coarse.search(queries, k, **kwargs)  # type: ignore[arg-type]
            np.testing.assert_array_equal(found, want)
            np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
    if maxima == "compiled":
        assert compiled.failed is None  # answered compiled, not by falling back


def test_the_compiled_block_maxima_are_the_eager_ones_at_any_number_of_rows() -> None:
    """The block maxima of bfloat16 scores (hidden cells at -inf, negative scores, a row of one query, as a
    chunk's last can be) are the same floats compiled as eager: a maximum rounds nothing."""
    if not can_compile(torch.device("cpu")):
        pytest.skip("no C++ compiler on this machine: the search takes its block maxima eagerly")
    rng = np.random.default_rng(5)
    compiled = CompiledMaxima()
    for rows, blocks in ((1, 40), (2, 40), (37, 190), (258, 13)):
        scores = torch.from_numpy(rng.normal(size=(rows, blocks * BLOCK)).astype(np.float32) - 0.5)
        scores[:, -5:] = -torch.inf
        scores[0, :BLOCK] = -torch.inf  # a whole block hidden
        coarse = scores.to(torch.bfloat16)
        want = block_maxima(coarse, torch.empty(rows, blocks * BLOCK))
        got = compiled(coarse, torch.empty(0))
        assert got.dtype == torch.float32 and got.shape == (rows, blocks)
        assert torch.equal(got, want)
        assert torch.equal(want, coarse.float().view(rows, blocks, BLOCK).amax(dim=2))
    assert compiled.failed is None


def test_block_maxima_whose_compile_fails_are_taken_eagerly(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Compiling is a speed-up: when it fails the search logs why once and answers as the eager one does."""

    def broken(fn: object, **_: object) -> object:
        def compiled(*args: object) -> object:
            raise RuntimeError("inductor: C++ compile error")

        return compiled

    monkeypatch.setattr(index_module.torch, "compile", broken)
    rng = np.random.default_rng(6)
    vectors = rng.normal(size=(4_000, 32)).astype(np.float32)
    queries = rng.normal(size=(30, 32)).astype(np.float32)
    ids = np.arange(1, 4_001)
    exact, coarse = ItemIndex.build(vectors, ids), ItemIndex.build(vectors, ids)
    coarse.coarse, coarse.maxima = True, CompiledMaxima()
    with caplog.at_level("WARNING"):
        for _ in range(2):
            np.testing.assert_array_equal(coarse.search(queries, 10)[1], exact.search(queries, 10)[1])
    warned = [r.message for r in caplog.records if r.levelname == "WARNING"]
    why = "RuntimeError: inductor: C++ compile error"
    assert warned == [f"compiling the search's block maxima failed, eager from now: {why}"]


def test_a_query_the_error_bound_cannot_settle_is_searched_again_in_float32(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """300 items whose bfloat16 scores tie: the 32 scored again are not surely the best 10, the bound says so
    and those queries are searched again in full. Without the bound (no error allowed for) the answer is
    wrong, which is what the bound is for."""
    rng = np.random.default_rng(4)
    vectors = _near_ties(rng, 4_000, 32, tied=300)
    queries = vectors[:1].repeat(20, axis=0) + rng.normal(size=(20, 32)).astype(np.float32) * 0.01
    ids = np.arange(1, 4_001)
    exact, coarse = ItemIndex.build(vectors, ids), ItemIndex.build(vectors, ids)
    coarse.coarse = True
    settled: list[int] = []
    real = index_module.coarse_top_k

    def counting(*args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        values, columns, ok = real(*args, **kwargs)  # type: ignore[arg-type]
        settled.append(int(ok.sum()))
        return values, columns, ok

    monkeypatch.setattr(index_module, "coarse_top_k", counting)
    want = exact.search(queries, 10)[1]
    np.testing.assert_array_equal(coarse.search(queries, 10)[1], want)
    assert sum(settled) < len(queries)  # some were searched again
    monkeypatch.setattr(index_module, "COARSE_ERROR", 0.0)
    monkeypatch.setattr(index_module, "COARSE_ROUNDING", 0.0)
    assert not np.array_equal(coarse.search(queries, 10)[1], want)


@pytest.mark.parametrize("coarse", [False, True])
def test_asking_for_more_items_than_may_be_found_gives_those_there_are(
    coarse: bool, vectors: np.ndarray
) -> None:
    """A catalogue with three items in stock, asked for 100 (a shopper with many purchases asks wide): the
    three, best first, then missing results (-1), as FAISS answers; nothing fails."""
    index = ItemIndex.build(vectors, np.arange(1, 501))
    index.coarse = coarse
    allowed = np.zeros(501, dtype=bool)
    allowed[[7, 70, 300]] = True
    queries = vectors[:4]
    scores, found = index.search(queries, 100, allowed, excluded=[{70}, set(), set(), {7, 70, 300}])
    assert found.shape == scores.shape == (4, 100)
    for row, (mine, skip) in enumerate(zip(found.tolist(), [{70}, set(), set(), {7, 70, 300}], strict=True)):
        expected = sorted({7, 70, 300} - skip, key=lambda i: -float(vectors[i - 1] @ queries[row]))
        assert mine == expected + [-1] * (100 - len(expected))
    assert np.all(np.isneginf(scores[found == -1]))
