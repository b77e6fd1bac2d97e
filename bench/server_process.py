"""A gRPC server as a child process on a free loopback port: what the benchmarks and the tests start.

    with ServerProcess.vae_server("--model-dir", "models/vae-mnist") as server:    # python -m serving.server
        drawn = VaeClient(server.target).sample(4)                                 # .images, .seed, .model_version
    print(server.exit_code)

The server's address is read from its `server_started` JSON log line on stderr (`--port 0`: the kernel picks
a free port, so nothing races for it); the reference servers of bench/baseline_servers.py log the same line.
Every stderr line is kept in `lines`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

STARTED_EVENT = '"event": "server_started"'


def rss_bytes(pid: int) -> int:
    """Resident memory of process `pid` (Linux /proc), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS line")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process `pid` has used so far, all its threads (Linux /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": the comm may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14, 15


def nvidia_smi(*query: str) -> str | None:
    """What `nvidia-smi QUERY --format=csv,noheader,nounits` prints; None where it is missing or fails."""
    if shutil.which("nvidia-smi") is None:
        return None
    command = ["nvidia-smi", *query, "--format=csv,noheader,nounits"]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=20, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None


def gpu_memory_bytes(pid: int) -> int | None:
    """GPU memory process `pid` holds, per nvidia-smi; None where nvidia-smi is missing or does not list it
    (in a container nvidia-smi may show host process ids only)."""
    listing = nvidia_smi("--query-compute-apps=pid,used_memory")
    if listing is None:
        return None
    used = [int(mib) for line in listing.splitlines() for listed, mib in [line.split(",")] if int(listed) == pid]
    return sum(used) * 1024 * 1024 if used else None


def gpu_used_total_bytes() -> int | None:
    """Memory used on GPU 0 by everything (nvidia-smi), for when per-process figures are not available."""
    used = nvidia_smi("--query-gpu=memory.used", "--id=0")
    try:
        return None if used is None else int(used) * 1024 * 1024
    except ValueError:
        return None


class ServerProcess:
    """`command` started at once; `wait_started` waits for its `server_started` line."""

    def __init__(
        self, command: Sequence[str], *, cwd: str | Path | None = None, env: Mapping[str, str] | None = None
    ) -> None:
        """`cwd` and `env`: the child's working directory and whole environment (default: this process's)."""
        # stdin closed: a server reads none, and a test runner's stdin (pytest-xdist talks to its workers over it)
        # must not reach `docker run`, which forwards it to the container.
        self.process = subprocess.Popen(
            list(command), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=cwd,
            env=None if env is None else dict(env),
        )  # fmt: skip
        self.lines: list[str] = []
        self.target = self.metrics_url = self.http_url = ""
        self.exit_code: int | None = None
        self._started = threading.Event()
        self._reader = threading.Thread(target=self._read, name="server-stderr", daemon=True)
        self._reader.start()

    @classmethod
    def vae_server(
        cls, *args: str, cpus: str | None = None, cwd: str | Path | None = None, env: Mapping[str, str] | None = None
    ) -> ServerProcess:
        """`python -m serving.server *args` on 127.0.0.1, free ports; pinned to `cpus` (taskset) when given. From
        `cwd` (default: this process's), whose `serving` package `-m` then imports, with environment `env`."""
        command = [
            sys.executable, "-m", "serving.server", "--host=127.0.0.1", "--port=0", "--metrics-port=0", "--http-port=0",
            *args,
        ]  # fmt: skip
        return cls(["taskset", "-c", cpus, *command] if cpus else command, cwd=cwd, env=env)

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            if STARTED_EVENT in line and not self._started.is_set():
                started = json.loads(line)
                self.target = started["grpc_address"]
                if "metrics_address" in started:
                    self.metrics_url = f"http://{started['metrics_address']}/metrics"
                if started.get("http_address"):
                    self.http_url = f"http://{started['http_address']}"
                self._started.set()

    def wait_started(self, timeout_s: float = 60.0) -> ServerProcess:
        """Wait for the `server_started` line; kill the process and raise with its log when it does not come."""
        if not self._started.wait(timeout_s):
            self.process.kill()
            self.process.wait(timeout=10)
            raise RuntimeError(f"server did not start within {timeout_s} s:\n" + "".join(self.lines[-30:]))
        return self

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines read so far."""
        return [json.loads(line) for line in self.lines if line.startswith("{")]

    def rss_bytes(self) -> int:
        return rss_bytes(self.process.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.process.pid)

    def gpu_memory_bytes(self) -> int | None:
        return gpu_memory_bytes(self.process.pid)

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (a graceful drain), then the exit code; a process still running after `timeout_s` is killed."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout_s)

    def wait(self, timeout_s: float = 60.0) -> int:
        """The exit code, once the process has exited and its stderr is read; killed after `timeout_s`."""
        try:
            self.exit_code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            raise
        self._reader.join(timeout=5)
        return self.exit_code

    def __enter__(self) -> ServerProcess:
        return self.wait_started()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if self.process.poll() is None:
            self.stop()
