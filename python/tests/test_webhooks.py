"""`jobrelay.webhooks.verify` on a real delivery: a `jobrelay server` with a webhook secret
and a callback allowlist of 127.0.0.1, its `jobrelay client`, and a receiver of the test's
own (an HTTP server on a loopback port) that records what it is sent."""

from __future__ import annotations

import json
import queue
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

import pytest

import jobrelay
from jobrelay.webhooks import InvalidSignature, sign, verify

from .conftest import JobFactory, Server, find_binary

SECRET = "whsec-python-test"
Delivery = Tuple[Dict[str, str], bytes]


@pytest.fixture
def receiver() -> Iterator[Tuple[str, "queue.Queue[Delivery]"]]:
    got: "queue.Queue[Delivery]" = queue.Queue()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            got.put(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(204)
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", got
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def webhook_server(tmp_path: Path) -> Iterator[str]:
    binary = find_binary()
    if binary is None:
        pytest.skip("no jobrelay binary: set JOBRELAY_BIN or run `cargo build -p jobrelay`")
    client_dir = tmp_path / "client"
    client = Server(
        binary, client_dir, ["client", "--port", "0", "--data-dir", str(client_dir)]
    )
    config = tmp_path / "server.toml"
    config.write_text(
        '[webhooks]\nallowed_hosts = ["127.0.0.1"]\n\n'
        f'[services.example]\nclients = ["{client.url}"]\nwebhook_secret = "{SECRET}"\n'
    )
    data = tmp_path / "server"
    server = Server(
        binary,
        data,
        ["server", "--port", "0", "--data-dir", str(data), "--config", str(config)],
    )
    try:
        yield server.url
    finally:
        server.stop()
        client.stop()


def test_verify_accepts_a_real_delivery_and_refuses_tampering(
    webhook_server: str,
    receiver: Tuple[str, "queue.Queue[Delivery]"],
    make_job: JobFactory,
) -> None:
    hook, got = receiver
    with jobrelay.Client(webhook_server, user=1) as client:
        job = client.submit(make_job("echo done > out.txt"), service="example", callback_url=hook)
        job.wait(timeout=60)
    headers, body = got.get(timeout=60)

    received = verify(SECRET, headers, body)
    assert received["id"] == job.id
    assert received["status"] == "Completed"
    assert headers["x-jobrelay-event"] == "Completed"
    assert headers["x-jobrelay-delivery"]
    # Any capitalisation of the header names, and the body as text.
    titled = {k.title(): v for k, v in headers.items()}
    assert verify(SECRET, titled, body.decode())["id"] == job.id

    changed = body.replace(b'"Completed"', b'"Failed"')
    with pytest.raises(InvalidSignature):
        verify(SECRET, headers, changed)
    with pytest.raises(InvalidSignature):
        verify("another-secret", headers, body)
    t = int(headers["x-jobrelay-signature"].split(",")[0].removeprefix("t="))
    with pytest.raises(InvalidSignature, match="more than 300"):
        verify(SECRET, headers, body, now=t + 301)
    assert verify(SECRET, headers, body, tolerance=600, now=t + 301)["id"] == job.id
    with pytest.raises(InvalidSignature):
        verify(SECRET, {}, body)


def test_sign_makes_what_verify_accepts() -> None:
    body = json.dumps({"id": 3, "status": "Killed"})
    header = sign(SECRET, body, t=1_700_000_000)
    assert verify(SECRET, {"x-jobrelay-signature": header}, body, now=1_700_000_100)["id"] == 3
    # The same value the server computes (its unit test checks this pair too).
    assert sign("whsec_test", '{"id":1}', t=1_700_000_000) == (
        "t=1700000000,v1=2f441ba4b3b2d50d28a9ab9d9fd8880376ecd1eb5d0435401553f5d8d0a5dcf8"
    )
