"""Micro-batching of the semantic step: concurrent prompts share one encoder call and one scoring,
and every caller still gets its own answer, its own error, and its own timeout."""

from __future__ import annotations

import asyncio
import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest

from rswitch.providers.batching import MicroBatcher
from rswitch.providers.blas import one_blas_thread
from rswitch.providers.encoder import StaticEncoder
from rswitch.routing.base import Query
from tests.conftest import chat
from tests.test_encoder import ENCODER
from tests.test_router_rules import COMBOS


class Recorder:
    """A batch function that doubles numbers and remembers each batch it was given."""

    def __init__(self, fail_on: int | None = None, gate: asyncio.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.fail_on, self.gate = fail_on, gate

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"cannot double {self.fail_on}")
        return [2 * x for x in items]


async def test_callers_of_one_turn_share_one_call_and_each_gets_its_own_rows_in_order():
    run = Recorder()
    batcher = MicroBatcher(run)
    asks = [[1], [2, 3], [4], [5, 6, 7], [8]]
    answers = await asyncio.gather(*(batcher.submit(a) for a in asks))
    assert [list(a) for a in answers] == [[2], [4, 6], [8], [10, 12, 14], [16]]
    assert run.batches == [[1, 2, 3, 4, 5, 6, 7, 8]]
    # a lone caller is served alone, on the next turn; nothing is asked for nothing
    assert list(await batcher.submit([9])) == [18] and run.batches[-1] == [9]
    assert list(await batcher.submit([])) == [] and len(run.batches) == 2


async def test_the_batch_stays_open_while_callers_keep_joining_and_a_lone_caller_waits_one_turn():
    run = Recorder()
    batcher = MicroBatcher(run)

    async def after(turns: int, item: int) -> list[int]:
        for _ in range(turns):
            await asyncio.sleep(0)
        return list(await batcher.submit([item]))

    answers = await asyncio.gather(after(0, 1), after(0, 2), after(1, 3), after(2, 4))
    assert answers == [[2], [4], [6], [8]] and run.batches == [[1, 2, 3, 4]]
    turns = 0

    async def ticker() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    ticking = asyncio.ensure_future(ticker())
    await asyncio.sleep(0)
    start = turns
    assert list(await batcher.submit([5])) == [10]
    assert turns - start == 1  # alone: sent after one loop turn
    ticking.cancel()


async def test_a_batch_is_bounded_and_the_rest_start_the_next():
    run = Recorder()
    batcher = MicroBatcher(run, max_items=4)
    answers = await asyncio.gather(*(batcher.submit([i]) for i in range(10)))
    assert [a[0] for a in answers] == [2 * i for i in range(10)]
    assert [len(b) for b in run.batches] == [4, 4, 2]
    # a caller with more items than the bound is served on its own
    assert list(await batcher.submit(list(range(6)))) == [0, 2, 4, 6, 8, 10]
    for bad in ({"max_items": 0}, {"max_turns": 0}):
        with pytest.raises(ValueError, match="must be at least 1"):
            MicroBatcher(run, **bad)


async def test_an_error_reaches_every_caller_of_that_batch_and_no_other():
    run = Recorder(fail_on=3)
    batcher = MicroBatcher(run, max_items=3)
    results = await asyncio.gather(*(batcher.submit([i]) for i in range(6)), return_exceptions=True)
    assert [str(r) if isinstance(r, Exception) else list(r) for r in results] == [
        [0],
        [2],
        [4],
        "cannot double 3",
        "cannot double 3",
        "cannot double 3",
    ]
    assert list(await batcher.submit([7])) == [14]  # the batcher still works


async def test_a_batch_function_answering_the_wrong_count_is_an_error_for_its_callers():
    def short(items: list[int]) -> list[int]:
        return items[:-1]

    batcher = MicroBatcher(short)
    results = await asyncio.gather(batcher.submit([1]), batcher.submit([2]), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and "1 results for 2 items" in str(r) for r in results)


async def test_a_caller_that_times_out_does_not_strand_the_others():
    gate = asyncio.Event()
    run = Recorder(gate=gate)
    batcher = MicroBatcher(run)

    async def impatient(items: list[int]) -> object:
        async with asyncio.timeout(0.01):
            return await batcher.submit(items)

    # the first caller (which runs the batch) and one joiner give up while the batch is held
    first = asyncio.ensure_future(impatient([1]))
    patient = [asyncio.ensure_future(batcher.submit([i])) for i in (2, 3)]
    joiner = asyncio.ensure_future(impatient([4]))
    last = asyncio.ensure_future(batcher.submit([5]))
    for t in (first, joiner):
        with pytest.raises(TimeoutError):
            await t
    gate.set()
    async with asyncio.timeout(10):  # stranded callers would wait forever: fail instead
        assert [list(await t) for t in (*patient, last)] == [[4], [6], [10]]
    # the others' items were run again without the first caller's
    assert run.batches == [[1, 2, 3, 4, 5], [2, 3, 5]]


async def test_a_batch_over_its_timeout_fails_its_callers_and_the_next_batch_is_served():
    gate = asyncio.Event()
    run = Recorder(gate=gate)
    batcher = MicroBatcher(run, timeout=0.01)
    results = await asyncio.gather(*(batcher.submit([i]) for i in (1, 2, 3)), return_exceptions=True)
    assert all(isinstance(r, TimeoutError) for r in results)
    gate.set()
    assert list(await batcher.submit([4])) == [8] and run.batches == [[1, 2, 3], [4]]


async def test_a_first_caller_cancelled_before_sending_hands_the_batch_on():
    run = Recorder()
    batcher = MicroBatcher(run)
    first = asyncio.ensure_future(batcher.submit([1]))
    others = [asyncio.ensure_future(batcher.submit([i])) for i in (2, 3)]
    await asyncio.sleep(0)  # the first caller opened the batch, the others joined; it is not sent yet
    assert run.batches == []
    first.cancel()
    async with asyncio.timeout(10):  # stranded callers would wait forever: fail instead
        assert [list(await t) for t in others] == [[4], [6]]
    assert first.cancelled() and run.batches == [[2, 3]]


def test_one_blas_thread_inside_the_block_and_the_setting_restored_after():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        blas = [i for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
        if not blas or blas[0]["num_threads"] != 2:
            pytest.skip("numpy's BLAS does not take a thread count here")
        with one_blas_thread():
            inside = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
        after = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
        with one_blas_thread(work=200 * 256):  # one query against 200 utterances: left alone
            small = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
        with one_blas_thread(work=16 * 200 * 256):
            big = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    assert set(inside) == {1} and set(after) == {2}
    assert set(small) == {2} and set(big) == {1}


# -- the static encoder's own tokenization and pooling -----------------------------------------


@pytest.fixture(scope="module")
def static() -> StaticEncoder:
    return StaticEncoder()


@pytest.fixture(scope="module")
def wordllama() -> object:
    import wordllama

    return wordllama.WordLlama.load(dim=256, cache_dir=Path(wordllama.__file__).parent, disable_download=True)


def test_static_encoder_gives_wordllamas_vectors_and_token_ids(static, wordllama):
    data = Path(__file__).parent.parent / "benchmarks" / "routing" / "data" / "clinc_full.json.gz"
    texts = [t for t, _ in json.loads(gzip.decompress(data.read_bytes()))["val"]][:2000]
    texts += [
        "",
        " ",
        "  two  spaces ",
        "tab\tand\nnewline",
        "<s> a special token",
        "é ü 漢字 🙂",
        "x" * 3000,
    ]
    tok = wordllama.tokenizer
    assert [static._token_ids(t) for t in texts] == [
        tok.encode(t, add_special_tokens=False).ids for t in texts
    ]
    similar = ["", "hi there you", "hello there", "what is the weather"]  # one padded gather
    for batch in (texts, texts[:1], texts[:8], similar, ["hi", "a much longer prompt than the other " * 30]):
        got = static.encode(batch)
        with np.errstate(invalid="ignore"):  # WordLlama divides a text without tokens by 0
            want = np.asarray(wordllama.embed(batch, norm=True), dtype=np.float32)
        real = ~np.isnan(want).any(axis=1)
        assert got.dtype == np.float32 and got.shape == (len(batch), 256)
        assert np.abs(got[real] - want[real]).max() < 1e-5
        assert not got[~real].any()  # no tokens: a zero vector, not NaN


# -- through a real gateway ----------------------------------------------------------------------

TOPICS = {
    "strong": ["review this legal contract clause", "is this contract enforceable in court"],
    "cheap": ["what is the weather today", "will it rain tomorrow"],
}
ROUTING = {
    "default": [
        {
            "type": "semantic",
            "name": "topics",
            "encoder": {"provider": "enc", "model": "wordllama-256"},
            "routes": [{"route": r, "threshold": 0.4, "utterances": u} for r, u in TOPICS.items()],
        }
    ]
}
PROMPTS = {
    "strong": ["check the termination clause of my contract", "is my lease contract legal"],
    "cheap": ["is it going to rain on saturday", "weather forecast for paris"],
}


async def test_concurrent_requests_share_encoder_calls_and_each_is_routed_right(make_gateway):
    gw = await make_gateway(ENCODER | {"gateway": {"combinations": COMBOS}, "routing": ROUTING})
    provider = gw.core.providers["enc"]
    calls: list[list[str]] = []
    original = provider.encode

    async def counting(texts: list[str]) -> np.ndarray:
        calls.append(list(texts))
        return await original(texts)

    gw.core.gateway.default_chain.steps[0].embed = counting
    asks = [(route, p) for _ in range(4) for route, ps in PROMPTS.items() for p in ps]  # 16 requests
    responses = await asyncio.gather(*(gw.post(chat(p, variables={"words": 5})) for _, p in asks))
    for (route, prompt), r in zip(asks, responses, strict=True):
        assert r.status_code == 200, r.text
        assert r.headers["x-rswitch-combination"] == route, (prompt, r.headers["x-rswitch-route"])
        assert f"topics: nearest combination:{route}" in r.headers["x-rswitch-route"]
    assert sorted(t for c in calls for t in c) == sorted(p for _, p in asks)  # each prompt embedded once
    assert len(calls) < len(asks)  # ... in fewer encoder calls than requests


async def test_an_embedding_bandit_shares_encoder_calls_between_concurrent_requests(make_gateway):
    from tests.test_router_bandit_embedding import CONFIG

    gw = await make_gateway(CONFIG)
    batcher = gw.core.gateway.default_chain.steps[0].embed.__self__  # the step's MicroBatcher
    calls: list[list[str]] = []
    original = batcher.run

    async def counting(texts: list[str]) -> np.ndarray:
        calls.append(list(texts))
        return await original(texts)

    batcher.run = counting
    prompts = [p for ps in PROMPTS.values() for p in ps] * 3  # 12 requests
    responses = await asyncio.gather(*(gw.post(chat(p, variables={"words": 5})) for p in prompts))
    assert all("learner: linucb pick" in r.headers["x-rswitch-route"] for r in responses)
    assert sorted(t for c in calls for t in c) == sorted(prompts) and len(calls) < len(prompts)


def test_a_batch_left_open_on_a_closed_loop_does_not_catch_the_next_loops_callers():
    run = Recorder()
    batcher = MicroBatcher(run)
    old = asyncio.new_event_loop()
    abandoned = old.create_task(batcher.submit([1]))  # still referenced, so never collected
    old.call_soon(old.stop)
    old.run_forever()  # one turn: the first caller opened a batch; then its loop is gone
    old.close()

    async def ask() -> list[int]:
        async with asyncio.timeout(10):  # joining the dead batch would wait forever: fail instead
            return list(await batcher.submit([2]))

    assert asyncio.run(ask()) == [4] and run.batches == [[2]]
    assert not abandoned.done()


async def test_a_learned_step_shares_encoder_calls_and_routes_each_prompt_as_alone(make_gateway):
    from tests.test_routing_learned import CHAT, MATHS, learned, record_with_feedback, step_of

    gw = await make_gateway(learned())
    step = step_of(gw)
    await record_with_feedback(gw, MATHS[:16] + CHAT[:16])
    await step.fit()
    prompts = MATHS[16:] + CHAT[16:]
    alone = [await step.decide(Query([{"role": "user", "content": p}])) for p in prompts]
    calls: list[list[str]] = []
    original = step.embed

    async def counting(texts: list[str]) -> np.ndarray:
        calls.append(list(texts))
        return await original(texts)

    step.embed = counting
    together = await asyncio.gather(*(step.decide(Query([{"role": "user", "content": p}])) for p in prompts))
    assert [d.combinations for d in together] == [d.combinations for d in alone]
    assert [d.score for d in together] == pytest.approx([d.score for d in alone], abs=1e-5)

    # equally near labelled prompts: the batch's one product may order a tie, even at the k-th
    # place, otherwise than one product a prompt does; the neighbours' similarities are the same
    def near(d):
        return sorted(float(x) for x in re.findall(r"#\d+ (\d\.\d\d)", d.reason))

    for a, b in zip(together, alone, strict=True):
        assert near(a) == pytest.approx(near(b), abs=0.011) and len(near(a)) == 3
    assert sorted(t for c in calls for t in c) == sorted(prompts) and len(calls) < len(prompts)
