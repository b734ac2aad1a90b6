"""Toxiproxy: a real fault-injecting TCP proxy, built from its Go module, driven over HTTP.

`build_toxiproxy.sh` builds ``toxiproxy-server`` once into the machine-wide
cache (~/.cache/kubetasks); `Toxiproxy.start()` builds it when missing, runs
it on a free loopback port, and `create()` adds a proxy listening on another
free port. Faults used by the matrix:

* ``blackhole()``: every byte in both directions is dropped and new
  connections hang; on ``heal()`` the proxy closes the stalled connections
  (a middlebox that lost its state);
* ``freeze()``: every byte is held, then delivered in order on ``heal()`` (a
  TCP stall: the late writes really arrive);
* ``latency(ms, jitter)``: a slow link;
* ``reset_next(stream)``: the next chunk through a connection in that
  direction is dropped and the connection reset (RST).
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

HERE = Path(__file__).resolve().parent
FREEZE_MS = 3_600_000  # "for ever": the toxic is removed long before


def binary() -> Path:
    """The toxiproxy-server binary, built from its Go module on first use."""
    res = subprocess.run(["bash", str(HERE / "build_toxiproxy.sh")], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"building toxiproxy-server failed:\n{res.stderr[-3000:]}")
    return Path(res.stdout.strip().splitlines()[-1])


class Toxiproxy:
    def __init__(self, port: int, proc: subprocess.Popen[bytes]) -> None:
        self.port = port
        self.proc = proc

    @classmethod
    def start(cls, log: Path) -> Toxiproxy:
        exe = binary()
        port = devenv.free_port()
        out = open(log, "ab")  # noqa: SIM115 -- the child keeps its own copy
        try:
            proc = subprocess.Popen(
                [str(exe), "-host", "127.0.0.1", "-port", str(port)], stdout=out, stderr=subprocess.STDOUT
            )
        finally:
            out.close()
        tp = cls(port, proc)
        deadline = time.monotonic() + 20
        while True:
            try:
                tp.request("GET", "/version")
                return tp
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise RuntimeError(f"toxiproxy-server did not start: see {log}") from None
                time.sleep(0.05)

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
        return json.loads(raw) if raw.strip() else None

    def create(self, name: str, upstream_port: int) -> Proxy:
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
        self.server = server
        self.name = name
        self.port = port
        self._toxics: list[str] = []
        self._serial = 0

    def add(self, kind: str, stream: str = "downstream", toxicity: float = 1.0, **attributes: Any) -> str:
        self._serial += 1
        name = f"{kind}-{stream}-{self._serial}"
        self.server.request(
            "POST",
            f"/proxies/{self.name}/toxics",
            {"name": name, "type": kind, "stream": stream, "toxicity": toxicity, "attributes": attributes},
        )
        self._toxics.append(name)
        return name

    def remove(self, toxic: str) -> None:
        try:
            self.server.request("DELETE", f"/proxies/{self.name}/toxics/{toxic}")
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise
        self._toxics.remove(toxic)

    def heal(self) -> None:
        """Remove every toxic of this proxy (held bytes of a freeze are delivered in order)."""
        for t in list(self._toxics):
            self.remove(t)

    def blackhole(self) -> None:
        for stream in ("upstream", "downstream"):
            self.add("timeout", stream, timeout=0)

    def freeze(self) -> None:
        for stream in ("upstream", "downstream"):
            self.add("latency", stream, latency=FREEZE_MS)

    def latency(self, ms: int, jitter: int = 0, stream: str = "downstream") -> str:
        return self.add("latency", stream, latency=ms, jitter=jitter)

    def reset_next(self, stream: str, toxicity: float = 1.0) -> str:
        return self.add("reset_peer", stream, toxicity, timeout=0)

    def set_enabled(self, enabled: bool) -> None:
        """Disabled: every connection is closed and new ones refused."""
        self.server.request("POST", f"/proxies/{self.name}", {"enabled": enabled})
