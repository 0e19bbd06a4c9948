"""The fault benchmark (benchmarks/bench_faults.py) and its faulty upstream, so neither rots:
the upstream answers what the benchmark expects (and continues a prefill as vLLM does), the
verdicts never call a broken answer a full one, and the quick mode runs end to end through a
real `rswitch serve`."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from benchmarks import bench_faults as bf
from benchmarks import faulty_upstream as fu

pytestmark = pytest.mark.slow

USER = "Name forty words, please."
EXPECTED = fu.expected_answer(USER)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    procs = bf.Procs()
    try:
        port = bf.start_upstream(procs, tmp_path_factory.mktemp("upstream"), "upstream")
        client = openai.OpenAI(base_url=f"http://{bf.HOST}:{port}/v1", api_key="unused", max_retries=0)
        yield client
        client.close()
    finally:
        procs.stop_all()


def streamed(client: openai.OpenAI, model: str, messages: list[dict], **extra: object) -> tuple[str, int]:
    text, usage = [], 0
    for chunk in client.chat.completions.create(
        model=model, messages=messages, stream=True, stream_options={"include_usage": True}, **extra
    ):
        text += [c.delta.content for c in chunk.choices if c.delta.content]
        usage = chunk.usage.completion_tokens if chunk.usage else usage
    return "".join(text), usage


def test_the_healthy_upstream_answers_the_expected_text_whole(upstream):
    msgs = [{"role": "user", "content": USER}]
    answer = upstream.chat.completions.create(model="healthy", messages=msgs)
    assert answer.choices[0].message.content == EXPECTED
    assert len(EXPECTED.split()) == fu.ANSWER_WORDS
    assert streamed(upstream, "healthy", msgs) == (EXPECTED, fu.ANSWER_WORDS)


def test_a_prefill_is_continued_with_only_the_rest(upstream):
    prefix = EXPECTED[: len(EXPECTED) // 2 + 3]  # ends inside a word
    msgs = [{"role": "user", "content": USER}, {"role": "assistant", "content": prefix}]
    body = {"continue_final_message": True, "add_generation_prompt": False}
    answer = upstream.chat.completions.create(model="healthy", messages=msgs, extra_body=body)
    assert answer.choices[0].message.content == EXPECTED[len(prefix) :]
    text, _ = streamed(upstream, "healthy", msgs, extra_body=body)
    assert prefix + text == EXPECTED
    # without the flag a trailing assistant message is a finished turn: the whole answer again
    assert (
        upstream.chat.completions.create(model="healthy", messages=msgs).choices[0].message.content
        == EXPECTED
    )


def test_a_cut_stream_gives_the_sdk_a_prefix_then_an_error(upstream):
    got: list[str] = []
    with pytest.raises(Exception):  # noqa: B017 - httpx's own error for a connection reset mid-body
        for chunk in upstream.chat.completions.create(
            model="faulty/cut-mid", messages=[{"role": "user", "content": USER}], stream=True
        ):
            got += [c.delta.content for c in chunk.choices if c.delta.content]
    assert got and EXPECTED.startswith("".join(got)) and "".join(got) != EXPECTED


def test_the_500_once_fault_fires_once_per_message(upstream):
    msgs = [{"role": "user", "content": USER + " once"}]
    with pytest.raises(openai.InternalServerError):
        upstream.chat.completions.create(model="faulty/500-once", messages=msgs)
    answer = upstream.chat.completions.create(model="faulty/500-once", messages=msgs)
    assert answer.choices[0].message.content == fu.expected_answer(USER + " once")


@pytest.mark.parametrize(
    ("scenario", "mode", "text", "finishes", "failed", "status", "fallback_calls", "outcome"),
    [
        ("cut-mid", "stream", EXPECTED, 1, False, 200, 1, "full answer"),
        ("cut-mid", "stream", EXPECTED, 2, False, 200, 1, "wrong"),  # two finish_reasons
        ("cut-mid", "stream", EXPECTED[:20] + EXPECTED, 1, False, 200, 1, "wrong"),  # a repeat
        ("cut-mid", "json", " ".join(EXPECTED.split()[:5] + EXPECTED.split()[6:]), 1, False, 200, 1, "wrong"),
        ("cut-mid", "stream", EXPECTED[:40], 0, False, 200, 0, "wrong"),  # silently short
        ("cut-mid", "stream", EXPECTED[:40], 0, True, 200, 0, "truncated"),
        ("cut-mid", "stream", "", 0, True, 502, 0, "error"),
        ("content-policy", "json", "", 0, True, 400, 0, "error (correct)"),
        ("content-policy", "json", "", 0, True, 400, 1, "error"),  # the fallback was asked
        ("content-policy", "json", EXPECTED, 1, False, 200, 1, "wrong"),  # a refusal "rescued"
    ],
)
def test_verdicts(scenario, mode, text, finishes, failed, status, fallback_calls, outcome):
    row = bf.Row(scenario, mode, status=status, fallback_calls=fallback_calls)
    assert bf.classify(row, bf.Seen(USER, EXPECTED, text, finishes, failed)) == outcome


def test_every_scenario_runs_in_at_least_one_mode_and_the_table_has_16_faults():
    assert set(bf.MODES) == set(fu.SCENARIOS)
    faults = [r for r in bf.plan_rows(list(bf.MODES)) if r.scenario not in bf.CONTROL]
    assert len({r.scenario for r in faults}) == 16
    assert len(faults) >= 16


def test_quick_mode_end_to_end_through_rswitch_serve(tmp_path: Path):
    result = bf.run(list(bf.QUICK), [sys.executable, "-m", "rswitch"], tmp_path, log=lambda *_: None)
    rows = result["rows"]
    assert [(r["scenario"], r["mode"]) for r in rows] == [(s, m) for s in bf.QUICK for m in bf.MODES[s]]
    for r in rows:
        assert r["outcome"] in bf.OUTCOMES, r
        assert r["primary_calls"] >= 1, r  # every row went through rswitch to its faulty upstream
        assert r["attempts"] is None or r["attempts"] >= 1, r
    control = [r for r in rows if r["scenario"] == "healthy"]
    assert [r["outcome"] for r in control] == ["full answer", "full answer"]
    assert all((r["primary_calls"], r["fallback_calls"]) == (1, 0) for r in control)
    assert all(r["tokens"] and r["tokens"] > fu.ANSWER_WORDS for r in control)  # prompt + 40 words
    assert result["summary"]["control_ok"] is True
    assert result["summary"]["rescuable"] == 4  # 500-once and cut-mid, both modes
    table = bf.fmt_table(result)
    assert f"rescued {result['summary']['rescued']} of 4" in table
    assert table.splitlines()[0].split()[:3] == ["scenario", "mode", "outcome"]
    json.dumps(result)  # --json writes this as is
