"""Message shapes the request check must catch before any provider converts them."""

from __future__ import annotations


async def test_an_assistant_turn_with_bad_tool_calls_and_no_content_is_a_400(make_gateway):
    """{role, tool_calls} has two keys, as {role, content} has: it is checked all the same (it was
    passed on, and the Anthropic conversion failed with a 500 on `tool_calls: [null]`)."""
    gw = await make_gateway()
    for calls in ([None], [{"function": 3}], "x"):
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": calls}]
        r = await gw.post({"messages": messages})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"].startswith("messages[1].tool_calls"), r.text
