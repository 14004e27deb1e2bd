"""A `lorafleet serve` subprocess for bench_fleet.py: start, wait for ready, find worker pids, stop,
and a sampler of its status RPC (workers by state, busy workers, queue, counters).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from proc_tree import cmdline, stat_fields, subtree

from lorafleet.client.grpc_client import ApiError, AsyncClient

READY = re.compile(r"lorafleet: serving .* on (\S+?:\d+)")


@dataclass(frozen=True)
class StatusSample:
    t: float  # time.monotonic()
    alive: int  # workers holding a device: starting, active or draining
    active: int
    busy: int  # workers running at least one sequence
    running: tuple[int, ...]  # sequences per live worker
    pids: tuple[int, ...]  # each live worker's process (0 while starting), in the order of `running`
    states: tuple[str, ...]  # each live worker's state, same order
    queue_len: int
    migrations: int
    workers_released: int
    worker_deaths: int
    resumed_after_fault: int
    requests_completed: int
    requests_failed: int
    tokens_generated: int


@dataclass
class ServeProcess:
    proc: subprocess.Popen
    address: str
    log_path: Path
    started_s: float  # spawn to ready
    _closed: bool = field(default=False, repr=False)

    @classmethod
    def start(cls, serve_args: list[str], log_path: Path, timeout_s: float) -> ServeProcess:
        """Spawn `lorafleet serve` (its own session, so a hung one can be killed with its children)."""
        cmd = [sys.executable, "-m", "lorafleet.cli", "serve", *serve_args]
        env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1", "PYTHONUNBUFFERED": "1"}
        log = log_path.open("w")
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        begin = time.monotonic()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env, start_new_session=True
        )
        address: list[str] = []
        ready = threading.Event()

        def pump() -> None:  # the ready line gives the address; everything goes to the log
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                match = READY.search(line)
                if match and not address:
                    address.append(match.group(1))
                    ready.set()
            ready.set()
            log.close()

        threading.Thread(target=pump, daemon=True).start()
        server = cls(proc, "", log_path, 0.0)
        if not ready.wait(timeout_s) or not address:
            server.stop(grace_s=5.0)
            tail = log_path.read_text()[-2000:]
            why = f"exited with {proc.returncode}" if proc.returncode is not None else "timed out"
            raise RuntimeError(f"lorafleet serve {why} before it was ready; log tail:\n{tail}")
        server.address = address[0]
        server.started_s = time.monotonic() - begin
        return server

    def worker_pids(self) -> list[int]:
        """Pids of the WorkerActor processes under this server, oldest first (Linux /proc)."""
        return [pid for pid, _ in sorted(_descendants(self.proc.pid, "WorkerActor"), key=lambda x: x[1])]

    def stop(self, grace_s: float = 60.0) -> int | None:
        """SIGINT (serve drains and stops its Ray), then SIGKILL of its process group after grace_s;
        returns once its worker processes are gone too, so the next server finds the GPUs free."""
        if self._closed:
            return self.proc.returncode
        self._closed = True
        workers = self.worker_pids() if self.proc.poll() is None else []
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        deadline = time.monotonic() + 30.0
        while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        return self.proc.returncode


def _descendants(root: int, needle: str) -> list[tuple[int, int]]:
    """(pid, start time in clock ticks) of processes below `root` whose command line holds `needle`."""
    stats = stat_fields()
    found = []
    for pid in subtree(root, stats) - {root}:
        cmd = cmdline(pid)
        if cmd is not None and needle in cmd:
            found.append((pid, int(stats[pid][19])))
    return found


async def sample_status(client: AsyncClient, out: list[StatusSample], every_s: float) -> None:
    """Append one StatusSample every `every_s` until cancelled (a missed sample is skipped)."""
    while True:
        try:
            st = await client.status(timeout=5.0)
        except ApiError:
            st = None
        if st is not None:
            live = [w for w in st.workers if w.state != "stopped"]
            c = st.counters
            out.append(
                StatusSample(
                    t=time.monotonic(),
                    alive=len(live),
                    active=sum(1 for w in live if w.state == "active"),
                    busy=sum(1 for w in live if w.num_running > 0),
                    running=tuple(w.num_running for w in live),
                    pids=tuple(w.pid for w in live),
                    states=tuple(w.state for w in live),
                    queue_len=st.queue_len,
                    migrations=c.migrations,
                    workers_released=c.workers_released,
                    worker_deaths=c.worker_deaths,
                    resumed_after_fault=c.resumed_after_fault,
                    requests_completed=c.requests_completed,
                    requests_failed=c.requests_failed,
                    tokens_generated=c.tokens_generated,
                )
            )
        await asyncio.sleep(every_s)
