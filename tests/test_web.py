"""The web chat page at /, driven in headless Chromium: type a message, watch the reply stream.

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON
messages ended by a NUL byte, Chromium reading fd 3 and writing fd 4), so the test needs no
webdriver, no websocket library and no debugging port. scripts/test.sh installs Debian's
`chromium` when it is missing; without a browser the test is skipped, saying why. Set
NANOSEEK_CHROMIUM to use another binary.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time

import pytest
from serving import checkpoint, r1_tokenizer, serve, thinking_model, tokenizer  # noqa: F401

CHROMIUM = os.environ.get("NANOSEEK_CHROMIUM") or next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
# Headless, and quiet on the network: nothing but the page under test is fetched.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--remote-debugging-pipe"]


class Browser:
    """A headless Chromium and one page in it, commanded over the DevTools pipe."""

    def __init__(self, binary: str):
        self.profile = tempfile.mkdtemp(prefix="nanoseek-chromium-")
        to_chrome, self._cmd = os.pipe()
        self._out, from_chrome = os.pipe()
        # Park Chromium's ends above fd 9, so moving them to 3 and 4 in the shell cannot
        # clobber one with the other.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome, from_chrome)]
        os.close(to_chrome)
        os.close(from_chrome)
        script = f'exec "$0" "$@" 3<&{high[0]} 4>&{high[1]} {high[0]}<&- {high[1]}>&-'
        self.proc = subprocess.Popen(
            ["bash", "-c", script, binary, *FLAGS, f"--user-data-dir={self.profile}"],
            pass_fds=high, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for fd in high:
            os.close(fd)
        self._buffer = b""
        self._id = 0
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget",
                                 {"targetId": target, "flatten": True})["sessionId"]

    def send(self, method: str, params: dict | None = None, page: bool = False,
             timeout: float = 30) -> dict:
        """One DevTools command; returns its result (events in between are ignored)."""
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if page:
            msg["sessionId"] = self.session
        os.write(self._cmd, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer to {method} in {timeout}s")
            if select.select([self._out], [], [], left)[0]:
                data = os.read(self._out, 1 << 16)
                if not data:
                    raise RuntimeError("chromium exited")
                self._buffer += data

    def eval(self, expression: str):
        """Evaluate JavaScript in the page; returns its JSON value."""
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                           "awaitPromise": True}, page=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while not (value := self.eval(expression)):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.05)
        return value

    def type_and_send(self, text: str) -> None:
        """Focus the message box, type like a keyboard would, press Enter."""
        self.eval("document.getElementById('input').focus()")
        self.send("Input.insertText", {"text": text}, page=True)
        for kind in ("keyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", {"type": kind, "key": "Enter", "code": "Enter",
                                                 "windowsVirtualKeyCode": 13}, page=True)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd)
        os.close(self._out)
        shutil.rmtree(self.profile, ignore_errors=True)


# The last assistant bubble, as the page shows it.
LAST_REPLY = """(() => {
  const all = document.querySelectorAll('.msg.assistant');
  const m = all[all.length - 1];
  if (!m) return null;
  const details = m.querySelector('details.reasoning');
  return {state: m.dataset.state, chunks: Number(m.dataset.chunks || 0),
          content: m.querySelector('.content').textContent,
          reasoning: details.hidden ? null : details.querySelector('.text').textContent,
          open: details.open, error: (m.querySelector('.error') || {}).textContent || null,
          count: all.length};
})()"""


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary found (scripts/test.sh installs "
                                              "Debian's chromium; or set NANOSEEK_CHROMIUM)")
def test_chat_page_streams_a_reply(checkpoint, tokenizer):  # noqa: F811
    tok = r1_tokenizer(tokenizer)
    with serve(thinking_model(checkpoint, tokenizer), tok, reasoning_parser="deepseek-r1") as s:
        browser = Browser(CHROMIUM)
        try:
            browser.send("Page.navigate", {"url": s.url + "/"}, page=True)
            browser.wait_for("document.getElementById('model')?.textContent === 'tiny'")
            browser.eval("document.getElementById('temperature').value = '0';"
                         "document.getElementById('max-tokens').value = '24'")
            api = s.client()
            history = []
            reasoned = 0
            for question in ("And 7 times 8?", "What is 6 times 7?"):
                browser.type_and_send(question)
                browser.wait_for(f"(() => {{ const r = {LAST_REPLY}; "
                                 f"return r && r.count === {len(history) // 2 + 1} && "
                                 f"r.state === 'done'; }})()")
                shown = browser.eval(LAST_REPLY)
                assert shown["error"] is None
                assert shown["chunks"] > 1, "the reply should arrive as a stream of chunks"
                # The page must show what the API answers for the same conversation: the
                # history is kept in the page and sent back with each turn.
                history.append({"role": "user", "content": question})
                want = api.chat.completions.create(model="tiny", messages=history,
                                                   max_tokens=24, temperature=0).choices[0].message
                assert shown["content"] == want.content
                assert shown["reasoning"] == want.reasoning_content
                if shown["reasoning"]:
                    reasoned += 1
                    assert shown["open"] is False  # reasoning starts collapsed
                history.append({"role": "assistant", "content": want.content})
            assert reasoned, "no turn showed reasoning: the test model should think first"
            browser.eval("document.querySelector('.msg.assistant .reasoning summary').click()")
            assert browser.eval("document.querySelector('.msg.assistant .reasoning').open")
            assert browser.eval("document.getElementById('input').value") == ""
        finally:
            browser.close()
