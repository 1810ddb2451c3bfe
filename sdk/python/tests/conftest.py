"""Runs the real agent-shim (``$AGENT_SHIM_BIN``, else ``<repo>/target/debug/agent-shim``;
build it with ``cargo build -p agent-shim``) with SDK drivers under it, and cleans up every
process it starts, by pid. Under ``CI=true`` a test that cannot run fails."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from typing import Iterator, List, Optional

import pytest

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[2]
DRIVERS = HERE / "drivers"
PATIENCE = 20.0  # the longest any single wait of a test lasts


def skip_or_fail(capability: str, why: str) -> None:
    """Skips loudly; fails under CI=true unless AGENT_SHIM_CI_CANNOT names `capability`."""
    cannot = os.environ.get("AGENT_SHIM_CI_CANNOT", "").split(",")
    if os.environ.get("CI") == "true" and capability not in cannot:
        pytest.fail(f"cannot run under CI: {why}")
    pytest.skip(f"SKIPPED: {why}")


def shim_bin() -> str:
    path = os.environ.get("AGENT_SHIM_BIN") or str(REPO / "target" / "debug" / "agent-shim")
    if not os.access(path, os.X_OK):
        skip_or_fail("shim", f"no agent-shim at {path}: cargo build -p agent-shim")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Shim:
    """An agent-shim process in supervisor mode with a control link."""

    def __init__(self, tmp: pathlib.Path, driver: List[str], *, listen: Optional[str] = None,
                 token: Optional[bytes] = b"s3cret-token", args: Optional[List[str]] = None,
                 env: Optional[dict[str, str]] = None) -> None:
        self.tmp = tmp
        self.socket_path = tmp / "control.sock"
        self.address = listen or f"unix:{self.socket_path}"
        self.token_file = tmp / "token"
        self.token = token
        argv = [shim_bin(), "--control-listen", self.address, "--grace", "3s"]
        if token is not None:
            # A trailing newline, as `echo $TOKEN > file` writes: it is not part of the token.
            self.token_file.write_bytes(token + b"\n")
            os.chmod(self.token_file, 0o600)
            argv += ["--control-token-file", str(self.token_file)]
        else:
            argv += ["--control-insecure"]
        argv += (args or []) + ["--"] + driver
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = str(REPO / "sdk" / "python" / "src")
        full_env.pop("AGENT_SHIM_TOKEN", None)
        full_env.update(env or {})
        self.log = open(tmp / "shim.log", "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
        self._wait_listening()

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the shim exited {self.proc.returncode}: {self.output()}")
            if self.address.startswith("unix:"):
                if self.socket_path.exists():
                    return
            else:
                host, _, port = self.address.split(":", 1)[1].rpartition(":")
                try:
                    if self.address.startswith("tcp:"):
                        socket.create_connection((host, int(port)), timeout=1).close()
                    return
                except OSError:
                    pass
            time.sleep(0.02)
        raise RuntimeError(f"the shim did not listen within {PATIENCE} s: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        return (self.tmp / "shim.log").read_text(errors="replace")[-4000:]

    def wait(self, timeout: float = PATIENCE) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGTERM (the shim stops its driver and execs), then SIGKILL after a grace."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(PATIENCE)
        self.log.close()


@pytest.fixture
def shim_factory(tmp_path: pathlib.Path) -> Iterator["type[Shim] | object"]:
    started: List[Shim] = []
    counter = [0]

    def start(driver: Optional[List[str]] = None, **kw: object) -> Shim:
        counter[0] += 1
        tmp = tmp_path / f"shim{counter[0]}"
        tmp.mkdir()
        shim = Shim(tmp, driver or driver_cmd("sdk_test_driver.py"), **kw)  # type: ignore[arg-type]
        started.append(shim)
        return shim

    yield start
    for shim in started:
        shim.kill()


def driver_cmd(name: str) -> List[str]:
    return [sys.executable, "-u", str(DRIVERS / name)]


def echo_driver_cmd() -> List[str]:
    return [sys.executable, "-u", str(REPO / "examples" / "python-driver" / "echo_driver.py")]
