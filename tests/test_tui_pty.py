"""End to end: `rswitch tui` started for real in a pseudo-terminal, read through a terminal emulator.

Textual draws with escape sequences; `pyte` replays the child's output onto a virtual screen so the test
reads the same text a person would see. Traffic goes through the gateway the console shows, with the
official `openai` SDK, and the console must count it, quit on `q` and account for every record.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pexpect
import pyte
import pytest
import yaml

from tests.conftest import BASE_CONFIG, SUPPORT_VARS, merge

pytestmark = pytest.mark.slow

COLS, ROWS = 160, 45
RSWITCH = Path(sys.executable).parent / "rswitch"
URL_RE = re.compile(r"gateway (http://[\w.\-\[\]:]+:\d+)")
REQUESTS_RE = re.compile(r"requests (\d+)")
# Textual pushes/pops the kitty keyboard protocol (ESC[>25u, ESC[<u); pyte does not know them and would
# print their final "u" onto the screen
KITTY_KEYS_RE = re.compile(rb"\x1b\[[<>=]\d*u")
ATTEMPTS_RE = re.compile(r"requests (\d+) \(failed (\d+)\)\s+attempts (\d+) \(errors (\d+)\)")
# every call to 'flaky' fails upstream and falls back to support-b: one request, two attempts, one id
FLAKY_PROVIDER = {
    "broken": {"type": "mock", "retry_same": 0, "mock": {"failure_rate": 1.0, "failure_status": 503}}
}
FLAKY = {
    "id": "flaky",
    "template_id": "support",
    "model": "small",
    "provider": "broken",
    "fallbacks": ["support-b"],
}
STOPPED_RE = re.compile(r"rswitch stopped; (\d+) record\(s\) written, (\d+) dropped")


class Terminal:
    """A child process in a fixed-size pty, its output replayed onto a `pyte` screen."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.screen = pyte.Screen(COLS, ROWS)
        self.stream = pyte.ByteStream(self.screen)
        self.raw = bytearray()
        self.child = pexpect.spawn(
            argv[0], argv[1:], env=env, cwd=str(cwd), dimensions=(ROWS, COLS), echo=False, timeout=None
        )

    def pump(self, timeout: float = 0.1) -> bool:
        """Feed whatever the child wrote within `timeout` onto the screen; False once it has exited."""
        try:
            data = self.child.read_nonblocking(65536, timeout=timeout)
        except pexpect.TIMEOUT:
            return True
        except pexpect.EOF:
            return False
        self.raw += data
        self.stream.feed(KITTY_KEYS_RE.sub(b"", data))
        return True

    def text(self) -> str:
        return "\n".join(line.rstrip() for line in self.screen.display)

    def plain(self) -> str:
        """All raw output with escape sequences stripped (what a plain terminal keeps after the TUI)."""
        plain = re.sub(rb"\x1b\[[0-9;?<>=$]*[ -/]*[@-~]|\x1b[()][A-Z0-9]|\x1b[=>78]", b"", bytes(self.raw))
        return plain.decode("utf-8", "replace")

    def tail(self, n: int = 1500) -> str:
        return self.plain()[-n:]

    def wait_for(
        self, what: str, predicate: Callable[[str], re.Match[str] | None], timeout: float
    ) -> re.Match[str]:
        """Pump the pty until `predicate(screen text)` matches (bounded); fail showing the last screen."""
        deadline = time.monotonic() + timeout
        while True:
            match = predicate(self.text())
            if match:
                return match
            alive = self.pump(0.1)
            if not alive or time.monotonic() > deadline:
                match = predicate(self.text())
                if match:
                    return match
                state = "exited" if not alive else f"still running after {timeout:.0f}s"
                raise AssertionError(
                    f"the console never showed {what} (process {state}).\n"
                    f"--- last screen ---\n{self.text()}\n--- raw tail ---\n{self.tail()}"
                )

    def close(self) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)
        self.child.close(force=True)


@pytest.fixture
def console(tmp_path: Path) -> Iterator[tuple[Terminal, Path]]:
    config = merge(BASE_CONFIG, {"recorder": {"flush_interval_ms": 20}, "model_providers": FLAKY_PROVIDER})
    config["gateway"]["combinations"].append(FLAKY)
    config.setdefault("dataset", {})["base_path"] = str(tmp_path / "prompts")
    config.setdefault("analytics", {})["path"] = str(tmp_path / "analytics.duckdb")
    config_file = tmp_path / "rswitch.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ANTHROPIC_", "TEXTUAL"))}
    env.update(
        TERM="xterm-256color",
        COLUMNS=str(COLS),
        LINES=str(ROWS),
        RSWITCH_DATA_DIR=str(tmp_path / "data"),
        HOME=str(tmp_path),  # nothing from the developer's own config dirs
    )
    env.pop("NO_COLOR", None)
    term = Terminal([str(RSWITCH), "tui", "--config", str(config_file), "--port", "0"], env, tmp_path)
    try:
        yield term, tmp_path
    finally:
        term.close()


def test_tui_in_a_real_terminal_counts_sdk_traffic_and_quits_cleanly(console):
    term, tmp_path = console

    url = term.wait_for("the gateway URL", URL_RE.search, timeout=20).group(1)

    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=10)
    for i in range(5):
        resp = client.chat.completions.create(
            model="support-a",
            messages=[{"role": "user", "content": f"hello {i}"}],
            extra_body={"variables": SUPPORT_VARS},
        )
        assert resp.choices and resp.choices[0].message.content, f"request {i} got no answer: {resp!r}"

    def five_requests(screen: str) -> re.Match[str] | None:
        m = REQUESTS_RE.search(screen)
        return m if m and int(m.group(1)) >= 5 else None

    term.wait_for("`requests 5` or more", five_requests, timeout=20)

    # failed-over requests while the console runs: it shows each attempt and keeps running
    for i in range(3):
        raw = client.chat.completions.with_raw_response.create(
            model="flaky",
            messages=[{"role": "user", "content": f"fallback {i}"}],
            extra_body={"variables": SUPPORT_VARS},
        )
        assert raw.headers["x-rswitch-combination"] == "support-b", "the fallback did not serve"

    def requests_and_attempts(screen: str) -> re.Match[str] | None:
        m = ATTEMPTS_RE.search(" ".join(screen.split("\n")))
        return m if m and m.group(1) == "8" else None

    counts = term.wait_for("`requests 8 ... attempts 11`", requests_and_attempts, timeout=20)
    assert counts.groups() == ("8", "0", "11", "3"), counts.group(0)
    term.wait_for(
        "a failed attempt in the recent pane", lambda screen: re.search(r"503 ✗", screen), timeout=10
    )
    assert term.child.isalive(), f"the console exited.\n--- raw tail ---\n{term.tail()}"

    term.child.send("q")
    deadline = time.monotonic() + 10
    while term.pump(0.1):
        if time.monotonic() > deadline:
            raise AssertionError(
                f"`q` did not end rswitch tui within 10s.\n--- last screen ---\n{term.text()}\n"
                f"--- raw tail ---\n{term.tail()}"
            )
    term.child.close()
    assert term.child.exitstatus == 0, (
        f"rswitch tui exited with status {term.child.exitstatus} (signal {term.child.signalstatus}).\n"
        f"--- raw tail ---\n{term.tail()}"
    )

    closing = STOPPED_RE.search(term.plain())
    assert closing, f"no closing `rswitch stopped; ...` line.\n--- raw tail ---\n{term.tail()}"
    written, dropped = int(closing.group(1)), int(closing.group(2))
    assert written >= 11 and dropped == 0, f"records lost: {closing.group(0)}"

    assert (tmp_path / "analytics.duckdb").is_file(), "the analytics database was not written"
    assert (tmp_path / "prompts" / "support" / "dataset.sqlite").is_file(), (
        "the support dataset was not written"
    )
