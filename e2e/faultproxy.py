"""Toxiproxy between an operator process and a server (the API server, PostgreSQL).

``toxiproxy-server`` is built from its Go module by e2e/cluster/build.sh
(target ``toxiproxy``) into the machine-wide cache. A test starts one server
on a free loopback port and adds a proxy per link it wants to break; the
operator under test is given the proxy's address instead of the server's,
while the test itself keeps talking to the real server.

* ``cut()``: the link is down -- open connections are closed and new ones
  refused (a server that went away);
* ``blackhole()``: the link hangs -- bytes are dropped both ways and new
  connections stall (a partition; nothing tells the client);
* ``heal()``: back to normal.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from kubetasks import devenv


class Toxiproxy:
    def __init__(self, binary: str, log: Path) -> None:
        self.port = devenv.free_port()
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [binary, "-host", "127.0.0.1", "-port", str(self.port)], stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 20
        while True:
            try:
                self.request("GET", "/version")
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.proc.kill()
                    raise RuntimeError(f"toxiproxy-server did not start: see {log}") from None
                time.sleep(0.05)

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
        return json.loads(raw) if raw.strip() else None

    def proxy(self, name: str, upstream_port: int) -> Proxy:
        port = devenv.free_port()
        self.request(
            "POST",
            "/proxies",
            {"name": name, "listen": f"127.0.0.1:{port}", "upstream": f"127.0.0.1:{upstream_port}"},
        )
        return Proxy(self, name, port)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Proxy:
    def __init__(self, server: Toxiproxy, name: str, port: int) -> None:
        self.server, self.name, self.port = server, name, port
        self._toxics: list[str] = []

    def cut(self) -> None:
        self.server.request("POST", f"/proxies/{self.name}", {"enabled": False})

    def blackhole(self) -> None:
        for stream in ("upstream", "downstream"):
            name = f"blackhole-{stream}"
            self.server.request(
                "POST",
                f"/proxies/{self.name}/toxics",
                {
                    "name": name,
                    "type": "timeout",
                    "stream": stream,
                    "toxicity": 1.0,
                    "attributes": {"timeout": 0},
                },
            )
            self._toxics.append(name)

    def heal(self) -> None:
        for name in self._toxics:
            try:
                self.server.request("DELETE", f"/proxies/{self.name}/toxics/{name}")
            except urllib.error.HTTPError as exc:
                if exc.code != 404:
                    raise
        self._toxics.clear()
        self.server.request("POST", f"/proxies/{self.name}", {"enabled": True})
