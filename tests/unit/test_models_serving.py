"""The serving API on a tiny model trained on a clear synthetic pattern: ranking, filters, reasons."""

from __future__ import annotations

import copy
import json
import platform
import random
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamrec.models import artifacts, registry, synthetic
from streamrec.models.data import PAD
from streamrec.models.evaluate import evaluate
from streamrec.models.item_map import ItemMap, merge_ranked
from streamrec.models.sequences import (
    SERVING_CHUNK_USERS,
    SERVING_MIN_GROUP,
    SERVING_ROW_BUCKETS,
    can_compile,
    length_groups,
    serving_vectors,
    window_buckets,
)
from streamrec.models.serving import Recommender, SearchSteering, keep_freed_memory, resolve_precision
from streamrec.models.train import TrainConfig, train
from streamrec.records import CatalogItem, Event, EventKind, HistoryEntry, RecommendedItem, UserState
from streamrec.state import StateLimits, apply_event
from tests.unit.reference_serving import reference_recommend

H = HistoryEntry


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serving")
    data = synthetic.write(root / "data")
    reg = root / "registry"
    path = train(data, registry_dir=reg, config=TrainConfig.preset("tiny", max_minutes=10.0), progress=False)
    assert registry.promote(path, reg)
    return path


@pytest.fixture()
def rec(model_dir: Path) -> Recommender:
    return Recommender.load(model_dir, device="cpu", precision="float32")  # the reference's precision


def clicks(*items: str) -> list[HistoryEntry]:
    return [H(EventKind.CLICK, t, item_id=i) for t, i in enumerate(items)]


CATEGORY_ITEMS = [f"{c}-{j}" for c in ("coffee", "shoes", "laptop", "garden", "camera") for j in range(20)]


def catalogue_record(item_id: str, in_stock: bool = True) -> CatalogItem:
    """A trained item's catalogue record, with the text the model was trained on (models/synthetic.py)."""
    category, j = item_id.split("-")
    return CatalogItem(
        item_id, f"{category.title()} {j}", category, 10.0 + int(j), in_stock, synthetic.CATEGORIES[category]
    )


def publish_catalogue(rec: Recommender, out_of_stock: tuple[str, ...] = ()) -> None:
    """The shop publishes every item the model was trained on (a catalogue makes it the only source)."""
    rec.upsert_items([catalogue_record(i, i not in out_of_stock) for i in CATEGORY_ITEMS])


def test_trained_model_ranks_the_true_next_item_highly(rec: Recommender) -> None:
    [recs] = rec.recommend([UserState("u", clicks("laptop-3", "laptop-4", "laptop-5"))], 10)
    ids = [r.item_id for r in recs]
    assert ids[0] == "laptop-6"
    # The synthetic data also ties positions across categories ("-6" follows "-5" everywhere), so a tiny
    # model may rank one same-position item of another category in the top 5.
    assert sum(i.startswith("laptop-") for i in ids[:5]) >= 4


def test_versions_and_catalogue_lookup(rec: Recommender, model_dir: Path) -> None:
    assert rec.model_version == model_dir.name
    assert rec.index_version.startswith(model_dir.name)
    assert rec.knows_item("coffee-3") and not rec.knows_item("coffee-999")


def test_purchased_and_out_of_stock_items_are_never_returned(rec: Recommender) -> None:
    history = [*clicks("camera-2", "camera-3"), H(EventKind.PURCHASE, 9, item_id="camera-4")]
    user = UserState("u", history, purchased=["camera-4", "camera-5"])
    publish_catalogue(rec, out_of_stock=("camera-6",))
    for k in (5, 50, 100):
        [recs] = rec.recommend([user], k)
        ids = {r.item_id for r in recs}
        assert not ids & {"camera-4", "camera-5", "camera-6"}
        assert len(recs) == min(k, rec.num_items - 3)
        assert len(ids) == len(recs)


def test_reasons_name_the_most_similar_history_element(rec: Recommender) -> None:
    bought = UserState("b", [H(EventKind.PURCHASE, 1, item_id="camera-4")], purchased=["camera-4"])
    viewed = UserState("v", clicks("shoes-7", "shoes-8"))
    cold = UserState("c")
    out = rec.recommend([bought, viewed, cold], 5)
    assert out[0][0].reason == "goes_with_purchase" and out[0][0].anchor == "camera-4"
    assert out[0][0].explanation == "Goes with Camera 4 you bought"
    assert out[1][0].reason == "similar_to_recent" and out[1][0].anchor in {"shoes-7", "shoes-8"}
    assert out[1][0].explanation.startswith("Because you viewed Shoes ")
    assert {r.reason for r in out[2]} == {"popular"}
    assert out[2][0].explanation == "Popular right now"


def test_an_item_viewed_then_bought_explains_as_bought_in_any_batch(rec: Recommender) -> None:
    """A shopper who viewed an item and then bought it has that item twice in the window: every
    recommendation anchored there names the purchase, the newer of two equal anchors, whatever the batch
    around the shopper (the matmul's rounding differs with the batch's shape)."""
    bought = [H(EventKind.CLICK, 1, item_id="garden-7"), H(EventKind.PURCHASE, 2, item_id="garden-7")]
    for k in (5, 10, 40):
        for n in range(rec.serve_len + 1):  # a neighbour with n events: batches of every window width
            neighbour = [UserState("n", clicks(*["coffee-0"] * n))] if n else []
            [first, *_] = rec.recommend([UserState("b", bought), *neighbour], k)
            assert {(r.reason, r.anchor) for r in first} == {("goes_with_purchase", "garden-7")}, (k, n)


def test_search_only_user_gets_query_driven_recommendations(rec: Recommender) -> None:
    coffee = UserState("s1", [H(EventKind.SEARCH, 1, query="espresso coffee")])
    garden = UserState("s2", [H(EventKind.SEARCH, 1, query="garden hose")])
    out = rec.recommend([coffee, garden], 5)
    assert all(r.item_id.startswith("coffee-") for r in out[0])
    assert all(r.item_id.startswith("garden-") for r in out[1])
    assert out[0][0].reason == "matches_search"
    assert out[0][0].explanation == "Matches your search 'espresso coffee'"


def test_a_search_changes_a_users_recommendations(rec: Recommender) -> None:
    before = UserState("u", clicks("shoes-1", "shoes-2"))
    after = UserState("u", [*before.history, H(EventKind.SEARCH, 5, query="camera lens")])
    [a], [b] = rec.recommend([before], 5), rec.recommend([after], 5)
    assert [r.item_id for r in a] != [r.item_id for r in b]


def test_new_item_with_content_is_embedded_near_similar_items(rec: Recommender) -> None:
    grinder = CatalogItem("grinder", "Coffee Grinder", "coffee", 30.0, True, "espresso coffee beans")
    publish_catalogue(rec)
    rec.upsert_items([grinder])
    assert rec.knows_item("grinder")
    v = rec.item_vector("grinder")

    def cos(other: str) -> float:
        w = rec.item_vector(other)
        return float(v @ w / (np.linalg.norm(v) * np.linalg.norm(w)))

    same = np.mean([cos(f"coffee-{j}") for j in range(20)])
    other = np.mean([cos(f"{c}-{j}") for c in ("shoes", "laptop", "garden", "camera") for j in range(20)])
    assert same > other + 0.3
    [recs] = rec.recommend([UserState("s", [H(EventKind.SEARCH, 1, query="coffee espresso beans")])], 20)
    assert "grinder" in {r.item_id for r in recs}


def test_the_model_records_the_text_each_item_was_embedded_from(model_dir: Path) -> None:
    """So that a worker tells a description rewritten since training from the one the model holds."""
    table = json.loads((model_dir / "items.json").read_text())
    expected = [artifacts.text_digest(catalogue_record(i).text) for i in table["ids"]]
    assert table["text_digests"] == expected


def test_a_catalogue_with_the_trained_texts_leaves_every_vector_as_trained(rec: Recommender) -> None:
    before = [rec.item_vector(i) for i in CATEGORY_ITEMS]
    publish_catalogue(rec)
    publish_catalogue(rec)  # sent again (a stock update): nothing is embedded again either
    np.testing.assert_array_equal(np.stack(before), np.stack([rec.item_vector(i) for i in CATEGORY_ITEMS]))


def test_a_rewritten_description_is_what_searches_and_the_items_vector_follow(
    rec: Recommender, model_dir: Path
) -> None:
    """A shop fills in a new item's description, or rewrites a trained one's: a search for the new words
    finds it, the old words no longer do, and its vector is the model's for the new text (a new item's
    content vector; a trained item's ID and attributes with the new text's part)."""
    publish_catalogue(rec)
    first = CatalogItem("tent-9", "Item 9", None, 90.0, True, None)  # published before it was described
    described = replace(
        first, title="Pop-up Camping Tent", category="outdoor", description="a tent for camping"
    )
    rec.upsert_items([first])
    searcher = UserState("s", [*clicks("coffee-3", "coffee-4"), H(EventKind.SEARCH, 9, query="camping tent")])

    def steered() -> set[str]:
        [recs] = rec.recommend([searcher], 10)
        return {r.item_id for r in recs if r.reason == "matches_search"}

    assert "tent-9" not in steered()
    rec.upsert_items([described])
    assert "tent-9" in steered()
    told_first = Recommender.load(model_dir, device="cpu", precision="float32")
    told_first.upsert_items([described])
    np.testing.assert_allclose(
        rec.item_vector("tent-9"), told_first.item_vector("tent-9"), rtol=1e-5, atol=1e-6
    )

    # A trained coffee item rewritten as a shoe: searched for as a shoe, and its vector is the model's item
    # tower on the new text (what training would have made of it with the same weights)
    shoe = replace(catalogue_record("coffee-3"), description="running shoe sneaker")
    rec.upsert_items([shoe])
    art = artifacts.load(model_dir)
    row = art.items.ids.index("coffee-3") + 1
    assert art.embedder is not None
    with torch.inference_mode():
        art.model.item_text[row] = torch.from_numpy(art.embedder.embed_items([shoe.text])[0])
        expected = art.model.item_vectors()[row].numpy()
    np.testing.assert_allclose(rec.item_vector("coffee-3"), expected, rtol=1e-5, atol=1e-5)
    others = [i for i in CATEGORY_ITEMS if i != "coffee-3"]
    np.testing.assert_array_equal(
        np.stack([rec.item_vector(i) for i in others]), np.stack([told_first.item_vector(i) for i in others])
    )


def test_once_a_catalogue_exists_only_its_items_in_stock_are_recommended(rec: Recommender) -> None:
    """Before any catalogue record the model's own items are served, as trained; after, only what the shop
    publishes and has in stock, items the model never saw included (through their content vectors)."""
    user = UserState("u", clicks("coffee-3", "coffee-4"))
    assert rec.recommendable == rec.num_items  # every trained item
    assert len(rec.recommend([user], 10)[0]) == 10
    shop = [
        *(CatalogItem(f"coffee-{j}", f"Coffee {j}", "coffee", 5.0, j != 2) for j in range(6)),
        CatalogItem("kettle-1", "Gooseneck Kettle", "coffee", 40.0, True, "pour-over coffee kettle"),
        CatalogItem("hose-1", "Garden Hose", "garden", 20.0, True, "a 20 m garden hose"),
    ]
    rec.upsert_items(shop)
    available = {i.item_id for i in shop if i.in_stock}
    assert rec.recommendable == len(available)
    [recs] = rec.recommend([user], 10)
    assert {r.item_id for r in recs} == available, "all the shop has, nothing it does not"
    [cold] = rec.recommend([UserState("new")], 3)
    assert {r.item_id for r in cold} <= available


def test_batch_results_match_single_user_calls(rec: Recommender) -> None:
    users = [
        UserState("a", clicks("laptop-1", "laptop-2")),
        UserState("c"),
        UserState("b", clicks("garden-5")),
    ]
    batch = rec.recommend(users, 5)
    for user, recs in zip(users, batch, strict=True):
        [single] = rec.recommend([user], 5)
        assert [r.item_id for r in recs] == [r.item_id for r in single]


def test_a_prepared_ranking_reads_the_states_once(rec: Recommender) -> None:
    # The worker ranks a batch in its serving thread while the next batch changes the same states in place.
    users = [UserState("a", clicks("laptop-1", "laptop-2")), UserState("b", clicks("garden-5"))]
    expected = rec.recommend(copy.deepcopy(users), 5)
    finish = rec.prepare(users, 5)
    limits = StateLimits()
    for user, recs in zip(users, expected, strict=True):  # each buys their top item and searches
        apply_event(
            user, Event(f"{user.user_id}-1", user.user_id, EventKind.PURCHASE, 10, recs[0].item_id), limits
        )
        apply_event(
            user, Event(f"{user.user_id}-2", user.user_id, EventKind.SEARCH, 11, query="camera"), limits
        )
    assert finish().all_items() == expected
    assert rec.recommend(users, 5) != expected


def test_upserts_from_another_thread_while_recommending(rec: Recommender) -> None:
    users = [UserState(f"u{i}", clicks(f"coffee-{i % 20}", f"coffee-{(i + 1) % 20}")) for i in range(50)]
    publish_catalogue(rec)
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for j in range(30):
                rec.upsert_items([CatalogItem(f"new-{j}", f"New {j}", "coffee", 1.0, j % 2 == 0, "coffee")])
        except BaseException as e:  # surfaced to the test thread below
            errors.append(e)

    thread = threading.Thread(target=writer)
    thread.start()
    for _ in range(10):
        for recs in rec.recommend(users, 10):
            assert len(recs) == 10
    thread.join()
    assert not errors
    assert rec.knows_item("new-29")
    assert rec.index_version.endswith("+31")  # the catalogue, then 30 upserts


# Items of a kind the model never saw (the synthetic shoppers know shoes, laptops, coffee, gardens, cameras):
# each is only its text, through the model's text projection.
TENTS = [
    CatalogItem(
        f"tent-{j}", f"{kind} Camping Tent", "outdoor", 90.0, True, f"a {kind.lower()} tent for camping"
    )
    for j, kind in enumerate(["Dome", "Tunnel", "Pop-up", "Family"])
]
LEASHES = [CatalogItem("leash-1", "Dog Leash", "pets", 12.0, True, "a nylon leash for walking the dog")]


def test_a_search_brings_items_the_model_never_saw_into_the_top_k(rec: Recommender) -> None:
    publish_catalogue(rec)
    rec.upsert_items([*TENTS, *LEASHES])
    history = clicks("coffee-3", "coffee-4", "coffee-5")
    searcher = UserState("s", [*history, H(EventKind.SEARCH, 9, query="camping tent")])
    newcomer = UserState("n", [H(EventKind.SEARCH, 1, query="camping tent")])
    [before] = rec.recommend([UserState("c", history)], 10)
    assert not {r.item_id for r in before} & {t.item_id for t in TENTS}
    for recs in rec.recommend([searcher, newcomer], 10):
        tents = [r for r in recs if r.item_id.startswith("tent-")]
        assert len(tents) == rec.search_steering.slots(10) == 3
        assert {(r.reason, r.anchor) for r in tents} == {("matches_search", "camping tent")}
        assert tents[0].explanation == "Matches your search 'camping tent'"
        assert len({r.item_id for r in recs}) == 10
    # The encoder's first picks keep their places; the query's matches are spread among the rest.
    [with_search] = rec.recommend([searcher], 10)
    rec.search_steering = SearchSteering(share=0.0)
    [without] = rec.recommend([searcher], 10)
    assert [r.item_id for r in with_search[:3]] == [r.item_id for r in without[:3]]
    assert [r.item_id.startswith("tent-") for r in with_search] == [i in (3, 6, 9) for i in range(10)]


def test_a_search_steers_only_while_it_is_recent_and_matches_something(rec: Recommender) -> None:
    publish_catalogue(rec)
    rec.upsert_items([*TENTS, *LEASHES])
    searched = [*clicks("shoes-1", "shoes-2"), H(EventKind.SEARCH, 5, query="camping tent")]
    users = [
        UserState("recent", searched),
        UserState(
            "later", [*searched, *(H(EventKind.CLICK, 6 + j, item_id=f"shoes-{3 + j}") for j in range(3))]
        ),
        UserState("unsold", [*clicks("shoes-1", "shoes-2"), H(EventKind.SEARCH, 5, query="wedding dress")]),
        UserState("bought", searched, purchased=["tent-0", "tent-1"]),
    ]
    steered = rec.recommend(users, 10)
    rec.search_steering = SearchSteering(share=0.0)
    unsteered = rec.recommend(users, 10)
    assert steered[0] != unsteered[0]
    assert steered[1:3] == unsteered[1:3], "three events after the search, or nothing it matches: no steering"
    assert {r.item_id for r in steered[3] if r.item_id.startswith("tent-")} == {"tent-2", "tent-3"}, (
        "never what they bought"
    )
    rec.search_steering = SearchSteering()
    rec.upsert_items([CatalogItem("tent-2", "Pop-up Camping Tent", "outdoor", 90.0, False)])
    [bought] = rec.recommend(users[3:], 10)
    assert {r.item_id for r in bought if r.item_id.startswith("tent-")} == {"tent-3"}, "nor out of stock"


def test_users_without_a_recent_search_get_what_they_got_before(rec: Recommender) -> None:
    publish_catalogue(rec)
    rec.upsert_items(TENTS)
    quiet = [
        UserState("a", clicks("laptop-1", "laptop-2"), purchased=["laptop-3"]),
        UserState(
            "b", [H(EventKind.SEARCH, 0, query="camping tent"), *clicks("garden-5", "garden-6", "garden-7")]
        ),
        UserState("c"),
        UserState("d", clicks("tent-1")),
    ]
    searchers = [
        UserState(f"s{j}", [H(EventKind.SEARCH, 1, query=q)])
        for j, q in enumerate(["camping tent", "espresso coffee"])
    ]
    steered = rec.recommend([searchers[0], *quiet, searchers[1]], 10)[1:-1]
    rec.search_steering = SearchSteering(share=0.0)
    assert steered == rec.recommend(quiet, 10)


def test_a_steered_users_list_does_not_depend_on_who_shares_the_batch(rec: Recommender) -> None:
    """The query's candidates are its nearest pool x k texts the user may be recommended, whoever else the
    micro-batch holds: a batch-mate with purchases (which widen the batch's text search) changes nothing, so
    a replay's shadow comparison of the served model with itself agrees."""
    publish_catalogue(rec)
    # The query's nearest texts are four tents, each a word further than the one before (no ties in the text
    # search); further still, tents described as laptops are, to this laptop shopper, the better scored.
    words = ["sturdy", "waterproof", "family", "dome", "tunnel", "pop-up", "green", "blue", "orange"]
    near = [" ".join(["camping tent", *words[:j]]) for j in range(4)]
    far = [" ".join(["camping tent notebook computer laptop", *words[: j + 1]]) for j in range(8)]
    rec.upsert_items(
        [CatalogItem(f"tent-{j}", "Tent", "outdoor", 1.0, True, text) for j, text in enumerate(near + far)]
    )
    rec.search_steering = SearchSteering(share=0.5, pool=1)  # k 4: 2 slots, from the 4 nearest texts
    searcher = UserState("s", [*clicks("laptop-3", "laptop-4"), H(EventKind.SEARCH, 5, query="camping tent")])
    hoarder = UserState("h", [H(EventKind.SEARCH, 1, query="camping tent")], purchased=CATEGORY_ITEMS[:8])

    def picks(items: list[RecommendedItem]) -> list[tuple[str, str]]:
        return [(r.item_id, r.reason) for r in items]  # scores: up to the batch's rounding

    [alone] = rec.recommend([searcher], 4)
    assert {r.item_id for r in alone} & {"tent-0", "tent-1", "tent-2", "tent-3"}
    assert picks(rec.recommend([hoarder, searcher], 4)[1]) == picks(alone)
    assert picks(rec.recommend([searcher, hoarder], 4)[0]) == picks(alone)


def test_search_steering_is_the_models_own_and_spreads_its_slots(model_dir: Path, tmp_path: Path) -> None:
    assert SearchSteering.of({}) == SearchSteering()
    assert SearchSteering.of({"search_steering": {"share": 0.5}}) == SearchSteering(share=0.5)
    assert [SearchSteering(share=0.3).slots(k) for k in (1, 3, 5, 10, 40)] == [0, 1, 2, 3, 12]
    assert SearchSteering(share=0.5).query_slots(4).tolist() == [False, True, False, True]
    assert SearchSteering(share=1.0).query_slots(3).tolist() == [True, True, True]
    with pytest.raises(ValueError):
        SearchSteering(share=1.5)
    copy_dir = tmp_path / "model"
    shutil.copytree(model_dir, copy_dir)
    meta = json.loads((copy_dir / "metadata.json").read_text())
    (copy_dir / "metadata.json").write_text(json.dumps({**meta, "search_steering": {"share": 0.0}}))
    assert Recommender.load(copy_dir, device="cpu").search_steering.share == 0.0


upsert_batches = st.lists(
    st.lists(
        st.builds(
            CatalogItem,
            st.sampled_from(["coffee-1", "shoes-7", "new-1", "new-2", "new-3", "new-4"]),
            st.sampled_from(["A", "B"]),
            st.none(),
            st.just(1.0),
            st.booleans(),
            st.sampled_from(["", "espresso coffee"]),
        ),
        max_size=5,
    ),
    max_size=4,
)


@settings(max_examples=15, deadline=None)
@given(upserts=upsert_batches)
def test_an_item_map_alone_gives_every_item_the_index_the_model_gives_it(
    model_dir: Path, upserts: list[list[CatalogItem]]
) -> None:
    # A worker with a ranking process keeps only the item map; the child holds the model. Both see the
    # same upserts (known items, repeats within a batch, items new in an earlier batch) and must agree on
    # every index, or the worker would name the wrong items.
    rec, items = Recommender.load(model_dir, device="cpu"), ItemMap.load(model_dir)
    for batch in upserts:
        rec.upsert_items(batch)
        items.upsert(batch)
    assert (items.ids, items.index_version, items.model_version) == (
        rec.item_ids,
        rec.index_version,
        rec.model_version,
    )
    users = [UserState("u", clicks("new-2", "coffee-1", "new-4"), purchased=["new-1", "shoes-7"])]
    mine, theirs = items.inputs(users), rec.inputs(users)
    assert (mine.warm, mine.queries, mine.excluded) == (theirs.warm, theirs.queries, theirs.excluded)
    assert all(np.array_equal(a, b) for a, b in zip(mine[1:4], theirs[1:4], strict=True))


TENT_IDS = [t.item_id for t in TENTS]
entries = st.one_of(
    st.builds(
        H,
        st.just(EventKind.CLICK),
        st.integers(0, 99),
        st.sampled_from([*CATEGORY_ITEMS, *TENT_IDS, "unknown-1"]),
    ),
    st.builds(H, st.just(EventKind.PURCHASE), st.integers(0, 99), st.sampled_from(CATEGORY_ITEMS)),
    st.builds(
        H,
        st.just(EventKind.SEARCH),
        st.integers(0, 99),
        st.none(),
        st.sampled_from(
            ["", "espresso coffee", "garden hose", "camera lens", "running shoes", "camping tent", "?!"]
        ),
    ),
)
shoppers = st.builds(
    UserState,
    user_id=st.text(min_size=1, max_size=4),
    history=st.lists(entries, max_size=24),
    purchased=st.lists(st.sampled_from([*CATEGORY_ITEMS, *TENT_IDS, "gone-1"]), max_size=30, unique=True),
)


steerings = st.sampled_from(
    [
        SearchSteering(),
        SearchSteering(share=0.0),
        SearchSteering(share=0.5, recent=1),
        SearchSteering(share=1.0, min_similarity=0.0, pool=1),
    ]
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    users=st.lists(shoppers, min_size=1, max_size=8),
    k=st.sampled_from([1, 5, 10, 40]),
    stock=st.data(),
    steering=steerings,
)
def test_the_batched_fast_path_equals_the_per_user_reference(
    rec: Recommender, users: list[UserState], k: int, stock: st.DataObject, steering: SearchSteering
) -> None:
    gone = stock.draw(st.lists(st.sampled_from([*CATEGORY_ITEMS, *TENT_IDS]), max_size=10, unique=True))
    rec.upsert_items([CatalogItem(i, i.title(), None, 1.0, in_stock=i not in gone) for i in CATEGORY_ITEMS])
    rec.upsert_items([replace(t, in_stock=t.item_id not in gone) for t in TENTS])
    rec.search_steering = steering
    assert rec.recommend(users, k) == reference_recommend(rec, users, k)


def browsing_shoppers(n: int, seed: int = 3) -> list[UserState]:
    rng = random.Random(seed)
    return [
        UserState(
            f"u{u}", clicks(*rng.sample(CATEGORY_ITEMS, rng.randint(1, 16))), [rng.choice(CATEGORY_ITEMS)]
        )
        for u in range(n)
    ]


def test_a_batch_larger_than_the_encoder_chunk_ranks_each_user_as_alone(rec: Recommender) -> None:
    """The encoder runs a big batch in chunks (SERVING_CHUNK_USERS): no user's ranking depends on which chunk
    or batch it shares."""
    users = browsing_shoppers(SERVING_CHUNK_USERS * 2 + 37)
    whole = rec.recommend(users, 10)
    alone = [
        items for start in range(0, len(users), 50) for items in rec.recommend(users[start : start + 50], 10)
    ]
    assert [[i.item_id for i in row] for row in whole] == [[i.item_id for i in row] for row in alone]
    assert np.allclose(
        [[i.score for i in row] for row in whole], [[i.score for i in row] for row in alone], atol=1e-4
    )


def test_each_user_is_encoded_at_their_own_window_length_as_over_the_full_window(rec: Recommender) -> None:
    """The encoder runs each user at the shortest serving length that holds their events (``window_buckets``):
    what it saves is the work over padding, which is masked, so every vector is the one the full serving
    window gives, up to float rounding, for windows of every length in one batch."""
    lengths = [1, 2, 3, 4, 5, 8, 9, 15, 16, 7, 1, 16, 2]
    rng = random.Random(11)
    users = [UserState(f"u{n}", clicks(*rng.choices(CATEGORY_ITEMS, k=n)), []) for n in lengths]
    inputs = rec.inputs(users)
    items, kinds, qids = (torch.from_numpy(a) for a in inputs[1:4])
    window = rec.serve_len
    assert set(window_buckets(window)) > {window} and items.shape[1] == window  # several lengths meet
    with torch.inference_mode():
        served = serving_vectors(
            rec._model, rec._encoder, items, kinds, qids, None, rec._table_t, window=window
        )
        full = rec._encoder.encode_last(rec._table_t[items], kinds.clone(), None)
    assert torch.allclose(served, full, atol=1e-5)
    with pytest.raises(ValueError, match="serving window"):
        serving_vectors(rec._model, rec._encoder, items, kinds, qids, None, rec._table_t, window=window - 1)


def test_through_the_compiled_encoder_a_length_few_users_hold_is_encoded_with_a_longer_one(
    rec: Recommender, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An encoder call costs ~1 ms however few users it holds: through a compiled encoder a small batch is
    not cut into a call per window length. A length held by fewer than SERVING_MIN_GROUP users goes up to
    the next longer one (those carried with it counting), and the vectors are what every user's own length
    gives, up to float rounding. The eager encoder keeps every user at their own length (the same bits in
    any batch)."""
    shapes: list[tuple[int, ...]] = []

    def recording(item_vecs: torch.Tensor, kinds: torch.Tensor, query_vecs: torch.Tensor | None = None):
        shapes.append(tuple(kinds.shape))
        return rec._encoder.encode_last(item_vecs, kinds, query_vecs)

    from streamrec.models import sequences

    monkeypatch.setattr(sequences.torch, "compile", lambda fn, **_: recording)  # "compiled": recorded
    compiled = sequences.CompiledEncoder(rec._encoder)
    rng = random.Random(4)
    lengths = [1] * 70 + [3] * 10 + [7] * 60 + [12] * 3
    rng.shuffle(lengths)
    users = [UserState(f"u{n}", clicks(*rng.choices(CATEGORY_ITEMS, k=n)), []) for n in lengths]
    items, kinds, qids = (torch.from_numpy(a) for a in rec.inputs(users)[1:4])
    window = rec.serve_len
    assert window == 16 and SERVING_MIN_GROUP == 64
    with torch.inference_mode():
        merged = serving_vectors(
            rec._model, rec._encoder, items, kinds, qids, None, rec._table_t, window, compiled
        )
        own = serving_vectors(rec._model, rec._encoder, items, kinds, qids, None, rec._table_t, window)
    # 70 users at 2 events; the 10 at 4 wait for 8 and go with its 60; the 3 at 16 alone (none longer)
    assert sorted(shapes) == [(3, 16), (96, 2), (96, 8)]  # rows padded to the row buckets
    assert torch.allclose(merged, own, atol=1e-5)
    assert [(len(rows), n) for rows, n in length_groups(torch.tensor([1, 3, 9]), window, 1)] == [
        (1, 2),
        (1, 4),
        (1, 16),
    ]
    assert [(rows.tolist(), n) for rows, n in length_groups(torch.tensor([1, 3, 9]), window, 64)] == [
        ([0, 1, 2], 16)
    ]


def test_bfloat16_serving_recommends_what_float32_does(model_dir: Path, rec: Recommender) -> None:
    """The bfloat16 encoder (``serving_precision``) is a speed-up, not another model: its top 10 is
    float32's, bar near-ties, and its scores are within bfloat16's rounding of float32's."""
    fast = Recommender.load(model_dir, device="cpu", precision="bfloat16")
    assert fast.precision == torch.bfloat16 and rec.precision == torch.float32
    users = browsing_shoppers(300)
    exact, approx = rec.recommend(users, 10), fast.recommend(users, 10)
    overlap = [
        len({i.item_id for i in a} & {i.item_id for i in b}) / 10 for a, b in zip(exact, approx, strict=True)
    ]
    assert np.mean(overlap) >= 0.95
    assert np.allclose([r[0].score for r in exact], [r[0].score for r in approx], rtol=0.05, atol=0.05)
    alone = [items for u in users[:20] for items in fast.recommend([u], 10)]  # batches of one user
    assert [[i.item_id for i in r] for r in alone] == [[i.item_id for i in r] for r in approx[:20]]


def test_auto_precision_is_bfloat16_only_where_the_cpu_runs_it_natively(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from streamrec.models import serving

    for native in (True, False):
        monkeypatch.setattr(serving, "native_bf16", lambda native=native: native)
        assert resolve_precision("auto", torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)
    assert resolve_precision("float32", torch.device("cpu")) == torch.float32
    assert resolve_precision("bfloat16", torch.device("cpu")) == torch.bfloat16


def test_eval_scores_the_model_as_the_worker_serves_it(model_dir: Path, tmp_path: Path) -> None:
    """`streamrec eval` also scores the served path (newest ``serve_len`` events, last position, serving
    precision): over the model's whole window in float32 it is the model itself; a shorter window or
    bfloat16 is reported with its loss against the full model."""
    data = synthetic.write(tmp_path / "data")
    max_len = json.loads((model_dir / "config.json").read_text())["encoder"]["max_len"]
    whole = evaluate(data, model_dir, baselines=(), serve_len=max_len, precision="float32")
    assert whole["served"] == {"serve_len": max_len, "precision": "float32", "compiled": False}
    full, served = whole["model"], whole["model_as_served"]
    assert served["ndcg@10"] == pytest.approx(full["ndcg@10"], abs=1e-3)  # type: ignore[index]
    short = evaluate(data, model_dir, baselines=(), serve_len=2, precision="bfloat16")
    assert short["served"] == {"serve_len": 2, "precision": "bfloat16", "compiled": False}
    expected = 1 - short["model_as_served"]["ndcg@10"] / short["model"]["ndcg@10"]  # type: ignore[index]
    assert short["served_ndcg_loss"] == pytest.approx(expected, abs=1e-4)
    assert "model_as_served" not in evaluate(data, model_dir, baselines=(), as_served=False)


def test_a_model_is_served_and_evaluated_with_the_window_its_training_chose(
    model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A model's metadata names its serving window (``TrainConfig.serve_len``, at most its ``max_len``):
    the worker's recommender, the ranking process's item map and `streamrec eval`'s served path all use it;
    a model written before the key was kept is served with 16 events; a worker whose states keep fewer
    events than the window says so at load."""
    from streamrec.models.item_map import DEFAULT_SERVE_LEN, model_serve_len
    from streamrec.settings import Settings
    from streamrec.streams.app import load_recommender

    meta = json.loads((model_dir / "metadata.json").read_text())
    max_len = json.loads((model_dir / "config.json").read_text())["encoder"]["max_len"]
    assert meta["serve_len"] == min(DEFAULT_SERVE_LEN, max_len)  # written by train()
    assert model_serve_len({}, 200) == DEFAULT_SERVE_LEN  # older models
    assert model_serve_len({"serve_len": 50}, 200) == 50
    assert model_serve_len({"serve_len": 50}, 20) == 20
    assert model_serve_len({"serve_len": 50}, 200, asked=8) == 8

    chosen = tmp_path / "chosen"
    shutil.copytree(model_dir, chosen)
    (chosen / "metadata.json").write_text(json.dumps({**meta, "serve_len": 5}))
    assert Recommender.load(chosen, device="cpu").serve_len == 5
    assert ItemMap.load(chosen).serve_len == 5
    assert Recommender.load(chosen, device="cpu", serve_len=3).serve_len == 3
    data = synthetic.write(tmp_path / "data")
    assert evaluate(data, chosen, baselines=())["served"]["serve_len"] == 5  # type: ignore[index]

    settings = Settings(history_length=4, serving_compile=False)
    with caplog.at_level("WARNING", logger="streamrec.streams.app"):
        served = load_recommender(settings, chosen)
    assert served.serve_len == 5
    assert "STREAMREC_HISTORY_LENGTH" in caplog.text and "at least 5" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="streamrec.streams.app"):
        load_recommender(Settings(history_length=5, serving_compile=False), chosen)
    assert "STREAMREC_HISTORY_LENGTH" not in caplog.text


def test_the_bench_browses_the_served_models_own_catalogue(model_dir: Path) -> None:
    """`streamrec bench` with a model that is not the sample model: its shoppers browse the model's own
    items (issue 30: every window a real one), most popular first in each group of alike items, and
    search for items' titles."""
    from streamrec.models import artifacts
    from streamrec.sample import ShopperSimulator
    from streamrec.streams.bench import bench_catalog

    art = artifacts.load(model_dir)
    catalog = bench_catalog(model_dir, categories=5)
    assert sorted(i.item_id for i in catalog) == sorted(art.items.ids)
    assert len({i.category for i in catalog}) == 5
    popularity = [float(art.popularity[art.items.ids.index(i.item_id) + 1]) for i in catalog]
    assert popularity == sorted(popularity, reverse=True)
    # Items the model holds alike share a group: most of a group is one of the synthetic categories.
    groups: dict[str | None, list[str]] = {}
    for item in catalog:
        groups.setdefault(item.category, []).append(item.item_id.split("-")[0])
    purity = sum(max(map(members.count, members)) for members in groups.values()) / len(catalog)
    assert purity >= 0.7
    simulator = ShopperSimulator(catalog, users=50, seed=1)
    events = [simulator.next_event(1_000 + n) for n in range(500)]
    known = set(art.items.ids)
    assert all(e.item_id in known for e in events if e.item_id is not None)
    titles = {i.title.lower() for i in catalog}
    assert {e.query for e in events if e.query is not None} <= titles
    assert any(e.query for e in events)


def test_rankings_of_any_size_meet_only_the_shapes_the_warm_up_built(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In bfloat16 the CPU builds the encoder's kernels per input shape on first use (15-45 ms each for the
    Beauty model): a worker warms every serving shape up once (every row bucket at every window length), and
    no batch, whatever its users and windows, meets another one."""
    rec = Recommender.load(model_dir, device="cpu")
    seen: list[tuple[int, ...]] = []
    encode_last = rec._encoder.encode_last

    def recording(item_vecs: torch.Tensor, kinds: torch.Tensor, query_vecs: torch.Tensor | None = None):
        seen.append(tuple(kinds.shape))
        return encode_last(item_vecs, kinds, query_vecs)

    monkeypatch.setattr(rec._encoder, "encode_last", recording)
    rec.warm_up()
    built = set(seen)
    assert built == {(r, w) for r in SERVING_ROW_BUCKETS for w in window_buckets(rec.serve_len)}
    seen.clear()
    rng = random.Random(5)
    for n in [1, 2, 5, 7, 13, 31, 100, 257, 600]:
        users = [
            UserState(f"u{u}", clicks(*rng.choices(CATEGORY_ITEMS, k=rng.randint(1, 20))), [])
            for u in range(n)
        ]
        rec.recommend(users, 5)
    assert seen and set(seen) <= built
    assert {w for _, w in seen} == set(window_buckets(rec.serve_len))  # each length met


def test_a_batch_ranked_in_slices_and_merged_is_the_batch_ranked_whole(rec: Recommender) -> None:
    """Several ranking processes each rank a slice of a batch (``merge_ranked`` joins their arrays): every
    user gets the list, reasons and explanations the whole batch gives them, though each slice numbers its
    reason codes on its own (a search's code names a query of its slice's table)."""
    searches = ["espresso coffee", "garden hose", "camera lens", "tent"]
    users = [
        *browsing_shoppers(40),
        *(UserState(f"s{n}", [H(EventKind.SEARCH, 1, query=searches[n % 4])]) for n in range(12)),
        UserState("newcomer"),
        *browsing_shoppers(30, seed=9),
    ]
    random.Random(2).shuffle(users)
    whole = rec.rank_arrays(rec.inputs(users), 10).batch(rec.item_ids)
    cuts = [0, 7, 8, 31, 50, len(users)]
    parts = [rec.rank_arrays(rec.inputs(users[a:b]), 10) for a, b in zip(cuts, cuts[1:], strict=False)]
    merged = merge_ranked(parts).batch(rec.item_ids).all_items()
    expected = whole.all_items()
    # scores up to float rounding: a product's last bits follow the number of rows it is computed for
    assert [[(i.item_id, i.reason, i.explanation, i.anchor) for i in row] for row in merged] == [
        [(i.item_id, i.reason, i.explanation, i.anchor) for i in row] for row in expected
    ]
    assert [i.score for row in merged for i in row] == pytest.approx(
        [i.score for row in expected for i in row], rel=1e-5
    )
    overlapping = [set(a.reasons) & set(b.reasons) for a, b in zip(parts, parts[1:], strict=False)]
    assert any(overlapping)  # the slices' codes did meet: merging had to number them anew


def test_the_compiled_encoder_ranks_as_the_eager_one_whatever_the_batch(model_dir: Path) -> None:
    """``serving_compile`` (the default): the encoder compiled by torch.compile recommends what the eager
    encoder does, bar near-ties. Its kernels round differently for different batch shapes, so a user's
    list depends on the batch only at near-ties: scores agree within bfloat16's rounding. Asked for every
    batch size, no later batch compiles again (``warm_up`` built what serving meets)."""
    if not can_compile(torch.device("cpu")):
        pytest.skip("no C++ compiler on this machine: the worker serves the eager encoder (tested below)")
    eager = Recommender.load(model_dir, device="cpu", precision="bfloat16")
    fast = Recommender.load(model_dir, device="cpu", precision="bfloat16")
    assert fast.compile_encoder()
    fast.warm_up()
    assert fast.encoder_compiled
    compiles = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    users = [*browsing_shoppers(300), UserState("s", [H(EventKind.SEARCH, 1, query="espresso coffee")])]
    want, got = eager.recommend(users, 10), fast.recommend(users, 10)

    def agree(a: list[list[RecommendedItem]], b: list[list[RecommendedItem]], share: float) -> None:
        pairs = list(zip(a, b, strict=True))
        overlap = [len({i.item_id for i in x} & {i.item_id for i in y}) / 10 for x, y in pairs]
        assert np.mean(overlap) >= share
        assert np.mean([x[0].item_id == y[0].item_id for x, y in pairs]) >= share
        assert np.allclose([x[0].score for x, _ in pairs], [y[0].score for _, y in pairs], atol=0.05)

    agree(want, got, 0.97)
    for size in (1, 37, 128):
        n = 60 if size == 1 else len(users)
        agree([r for s in range(0, n, size) for r in fast.recommend(users[s : s + size], 10)], got[:n], 0.97)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiles
    assert fast.encoder_compiled  # no shape on the way made it give up


def test_a_compile_that_fails_leaves_the_eager_encoder_serving(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """Compiling is a speed-up: when it fails (no compiler, an inductor error at warm-up or at a later
    shape), the worker logs why once and ranks with the eager encoder, the same lists."""
    from streamrec.models import sequences

    def broken(fn: object, **_: object) -> object:
        def compiled(*args: object) -> object:
            raise RuntimeError("inductor: C++ compile error")

        return compiled

    monkeypatch.setattr(sequences.torch, "compile", broken)
    eager = Recommender.load(model_dir, device="cpu", precision="float32")
    fast = Recommender.load(model_dir, device="cpu", precision="float32")
    assert fast.compile_encoder()
    with caplog.at_level("WARNING"):
        fast.warm_up()
        fast.warm_up()
    assert not fast.encoder_compiled
    why = "RuntimeError: inductor: C++ compile error"
    warned = [r.message for r in caplog.records if r.levelname == "WARNING"]
    assert warned == [f"compiling the serving encoder failed, serving it uncompiled: {why}"]
    users = browsing_shoppers(40)
    assert fast.recommend(users, 10) == eager.recommend(users, 10)

    # `streamrec eval` (STREAMREC_SERVING_COMPILE) reports what served: the eager encoder, not the compile
    data = synthetic.write(tmp_path / "data")
    report = evaluate(data, model_dir, baselines=(), precision="float32", compile_encoder=True)
    assert report["served"]["compiled"] is False  # type: ignore[index]

    monkeypatch.setattr(sequences.shutil, "which", lambda name: None)  # no compiler at all: not even tried
    assert not can_compile(torch.device("cpu"))
    assert not eager.compile_encoder() and not eager.encoder_compiled


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_a_serving_process_keeps_freed_memory_where_the_c_library_is_glibc() -> None:
    # The call reaches glibc's mallopt with its two settings accepted (it answers 0 to a value it refuses,
    # as it would to a wrong signature); elsewhere it is skipped and changes nothing but speed.
    assert keep_freed_memory()


def test_each_recommendation_is_explained_by_the_most_similar_step_of_the_history_newest_first(
    rec: Recommender,
) -> None:
    """The anchor of a recommended item (what its reason names) is the history position, an item or a
    search's query, whose vector is most like the item's; among equals (an item clicked, then bought) the
    newest. The batched ``_anchors`` against a loop over every user, item and position."""
    rng = np.random.default_rng(5)
    n, length, k = 60, 16, 7
    items = rng.integers(1, len(rec._unit), size=(n, length))
    qids = np.zeros((n, length), dtype=np.int64)
    searched = rng.random((n, length)) < 0.25
    items[searched] = PAD
    qids[searched] = rng.integers(1, 9, size=int(searched.sum()))
    items[:, :3] = PAD  # short windows: padding first
    qids[:, :3] = 0
    same = rng.integers(1, len(rec._unit), size=len(items[::2]))
    items[::2, 10:13] = same[:, None]  # the same item at three positions (viewed, viewed, bought)
    qids[::2, 10:13] = 0
    qspace = rng.normal(size=(9, rec._unit.shape[1])).astype(np.float32)
    picked = rng.integers(1, len(rec._unit), size=(n, k))
    picked[::2, 0] = same  # recommended what they had: equally similar at 10, 11 and 12
    qunit = qspace / np.linalg.norm(qspace, axis=1, keepdims=True)

    expected = np.zeros((n, k), dtype=np.int64)
    for u in range(n):
        for j in range(k):
            target = rec._unit[picked[u, j]]
            sims = {
                pos: float(
                    target @ (rec._unit[items[u, pos]] if items[u, pos] != PAD else qunit[qids[u, pos]])
                )
                for pos in range(length)
                if items[u, pos] != PAD or qids[u, pos] > 0
            }
            best = max(sims.values())
            expected[u, j] = max(pos for pos, sim in sims.items() if sim >= best - 1e-5)
    anchors = rec._anchors(picked, items, qids, qspace)
    np.testing.assert_array_equal(anchors, expected)
    # the newest of the three (or a later view of it, drawn by chance)
    assert (anchors[::2, 0] >= 12).all() and (items[::2][np.arange(len(same)), anchors[::2, 0]] == same).all()
    assert (np.take_along_axis(items, anchors, axis=1) == PAD).any()  # some explained by a search
