"""The grammar for the rest of a cut JSON answer, checked by llama.cpp's own grammar engine
(the sampler the embedded model generates with), over the real model's vocabulary: whatever the
JSON and wherever it was cut, the grammar lets the rest through and nothing that breaks it."""

from __future__ import annotations

import ctypes
import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from rswitch.providers.json_continuation import continuation_grammar
from rswitch.providers.local import default_model_path

llama_cpp = pytest.importorskip("llama_cpp")  # the local extra, which `make test` installs


@pytest.fixture(scope="module")
def vocab() -> Iterator[Any]:
    llm = llama_cpp.Llama(str(default_model_path()), vocab_only=True, verbose=False)
    yield llm
    llm.close()


def accepts(llm: Any, grammar: str, text: str) -> bool:
    """Whether llama.cpp's grammar sampler lets the model write `text` (as the model's tokens)
    and then end its answer. Each token is offered alone: the sampler masks a token it refuses."""
    sampler = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, grammar.encode(), b"root")
    assert sampler, f"llama.cpp could not parse the grammar:\n{grammar}"
    try:
        tokens = llm.tokenize(text.encode(), add_bos=False, special=False) if text else []
        for token in [*tokens, llm.token_eos()]:
            one = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 0.0, 0.0))
            candidates = llama_cpp.llama_token_data_array(data=one, size=1, selected=-1, sorted=False)
            llama_cpp.llama_sampler_apply(sampler, ctypes.byref(candidates))
            if math.isinf(one[0].logit):
                return False
            if token != llm.token_eos():
                llama_cpp.llama_sampler_accept(sampler, token)
        return True
    finally:
        llama_cpp.llama_sampler_free(sampler)


SAMPLE = '{"name": "Ada", "n": -12.5e+3, "ok": true, "tags": ["x\\u00e9y", null, [0, {}]], "e": {}}'


def test_at_every_cut_the_rest_is_let_through_and_one_more_brace_is_not(vocab) -> None:
    for cut in range(len(SAMPLE) + 1):
        grammar = continuation_grammar(SAMPLE[:cut])
        assert grammar is not None, SAMPLE[:cut]
        assert accepts(vocab, grammar, SAMPLE[cut:]), SAMPLE[:cut]
        assert not accepts(vocab, grammar, SAMPLE[cut:] + "}"), SAMPLE[:cut]
        if cut < len(SAMPLE):
            assert not accepts(vocab, grammar, SAMPLE[cut:-1]), SAMPLE[:cut]  # unclosed


def test_a_whole_object_may_only_be_followed_by_whitespace(vocab) -> None:
    grammar = continuation_grammar('{"a": 1}')
    assert accepts(vocab, grammar, "") and accepts(vocab, grammar, "\n")
    assert not accepts(vocab, grammar, '{"b": 2}')  # what a model continuing as text writes


def test_json_mode_wants_an_object_and_value_mode_any_value(vocab) -> None:
    assert continuation_grammar("[1, 2") is None and continuation_grammar('"ab') is None
    assert accepts(vocab, continuation_grammar("[1, 2", root="value"), "]")
    assert accepts(vocab, continuation_grammar("  ", root="value"), "3.5")
    assert accepts(vocab, continuation_grammar("", root="value"), '""\n')  # a value, then a newline
    assert accepts(vocab, continuation_grammar(" "), "{}")
    assert not accepts(vocab, continuation_grammar(" "), "3.5")
    with pytest.raises(ValueError, match="root"):
        continuation_grammar("{", root="array")


@pytest.mark.parametrize(
    "partial",
    [
        'Sure! {"a": 1',  # prose first
        '{"a" 1',  # no colon
        '{"a": }',  # no value
        "{'a': 1",  # single quotes
        '{"a": tru3',  # a broken literal
        '{"a": 01',  # a leading zero
        '{"a": 1.}',  # a dot without digits
        '{"a": "x\\q',  # an unknown escape
        '{"a": "\\u12G',  # a bad hex digit
        '{"a": "line\nbreak',  # a raw control character in a string
        '{"a": 1}}',  # closed twice
        '{"a": [1}',  # the wrong bracket
        '{"a": 1,}',  # a trailing comma
        "```json\n{",  # a code fence
    ],
)
def test_text_that_no_json_begins_with_gets_no_grammar(partial: str) -> None:
    assert continuation_grammar(partial) is None


# JSON as a model writes it: any nesting, strings with escapes and non-ASCII, numbers of every
# shape (integers of up to 20 digits, the grammar's bound)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**19), 10**19)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(st.characters(exclude_categories=("Cs",)), max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
objects = st.dictionaries(st.text(max_size=8), values, max_size=5)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    doc=objects,
    indent=st.sampled_from([None, 2]),
    ascii_only=st.booleans(),
    where=st.floats(0, 1),
)
def test_any_json_object_cut_anywhere_is_completed_by_its_rest_and_not_by_a_broken_one(
    vocab, doc: dict[str, Any], indent: int | None, ascii_only: bool, where: float
) -> None:
    text = json.dumps(doc, indent=indent, ensure_ascii=ascii_only)
    # text the model can write: its vocabulary has no bytes for some unassigned planes' characters
    assume(vocab.detokenize(vocab.tokenize(text.encode(), add_bos=False, special=False)) == text.encode())
    cut = round(where * len(text))
    grammar = continuation_grammar(text[:cut])
    assert grammar is not None, text[:cut]
    assert accepts(vocab, grammar, text[cut:]), (text[:cut], text[cut:])
    assert not accepts(vocab, grammar, text[cut:] + ","), (text[:cut], text[cut:])
    if cut < len(text):
        assert not accepts(vocab, grammar, text[cut:-1]), (text[:cut], text[cut:])
