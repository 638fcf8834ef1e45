"""A headless Chromium driven over the DevTools protocol: load a page, wait (in real time) until a text
appears, then return the DOM text and a PNG screenshot. Streamlit renders over a websocket after the
page's load event, which the one-shot --screenshot mode does not wait for."""
from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import tempfile
import time

import httpx

FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1800"]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def capture(url: str, wait_for: str, port: int, timeout: float = 60) -> tuple[str, bytes]:
    profile = tempfile.mkdtemp(prefix="chromium-")
    proc = subprocess.Popen([chromium(), *FLAGS, f"--user-data-dir={profile}", f"--remote-debugging-port={port}",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                pages = httpx.get(f"http://127.0.0.1:{port}/json", timeout=2).json()
                target = next(p for p in pages if p.get("type") == "page")
                break
            except (httpx.HTTPError, StopIteration, ValueError):
                if time.monotonic() > deadline:
                    raise TimeoutError("chromium did not open its debugging port") from None
                time.sleep(0.3)
        return asyncio.run(_drive(target["webSocketDebuggerUrl"], url, wait_for, timeout))
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(profile, ignore_errors=True)


async def _drive(ws_url: str, url: str, wait_for: str, timeout: float) -> tuple[str, bytes]:
    import websockets

    async with websockets.connect(ws_url, max_size=64 << 20) as ws:
        ids = iter(range(1, 10_000))

        async def call(method: str, **params):
            msg_id = next(ids)
            await ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
            while True:
                reply = json.loads(await ws.recv())
                if reply.get("id") == msg_id:
                    return reply.get("result", {})

        await call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            res = await call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''")
            text = res.get("result", {}).get("value", "")
            if wait_for in text:
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(3)  # let the charts' images finish drawing
        res = await call("Runtime.evaluate", expression="document.body.innerText")
        text = res.get("result", {}).get("value", text)
        shot = await call("Page.captureScreenshot", format="png")
        return text, base64.b64decode(shot["data"])
