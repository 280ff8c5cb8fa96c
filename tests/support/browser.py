"""Headless Chromium driven over the DevTools protocol: open a page, wait until a script finds what it
looks for, read the page's data and text, save a screenshot. Debian's `chromium` package; None where it
is not installed (the tests that need it then skip, saying so)."""

import base64
import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.request

import websocket

from support.ray_ports import free_port


def chromium() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


class Page:
    def __init__(self, url: str):
        self.ws = websocket.create_connection(url, timeout=60, suppress_origin=True)
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}...: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str, ready: str, timeout: float = 90):
        """Navigate to `url` and wait until the expression `ready` is truthy; its last value."""
        self.call("Page.navigate", url=url)
        deadline, value = time.time() + timeout, None
        while time.time() < deadline:
            try:
                value = self.evaluate(ready)
            except RuntimeError:  # the page is not there yet (no body, the app not mounted)
                value = None
            if value:
                return value
            time.sleep(0.5)
        text = self.evaluate("document.body ? document.body.innerText.slice(0, 2000) : ''")
        raise AssertionError(f"{url}: {ready!r} still false after {timeout} s; the page reads: {text!r}")

    def screenshot(self, path: str) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))


@contextlib.contextmanager
def browser(folder: str, width: int = 1500, height: int = 1000):
    """A headless Chromium with its profile in `folder`; yields a Page."""
    port = free_port()
    log = open(os.path.join(folder, "chromium.log"), "w")
    proc = subprocess.Popen([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                             f"--remote-debugging-port={port}", f"--user-data-dir={folder}/chromium-profile",
                             f"--window-size={width},{height}", "--no-first-run", "about:blank"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as response:
                    targets = [t for t in json.loads(response.read()) if t.get("type") == "page"]
                if targets:
                    break
            except OSError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError(f"chromium did not start: {open(log.name).read()[-2000:]}")
            time.sleep(0.5)
        page = Page(targets[0]["webSocketDebuggerUrl"])
        page.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        yield page
        page.ws.close()
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(30)
        log.close()
