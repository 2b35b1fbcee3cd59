"""Start, watch and always stop the processes of a federation.

OpenFL's collaborators retry forever and its aggregator waits forever for a missing site,
so nothing here waits without a deadline: every loop is bounded, every process started is
stopped (its whole process group) when the block ends, however it ends.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


class FederationFailed(RuntimeError):
    """A participant failed or stalled; ``who`` names the site(s) or 'aggregator'."""

    def __init__(self, who: str, reason: str):
        super().__init__(f"{who}: {reason}")
        self.who = who
        self.reason = reason


@dataclass
class Participant:
    name: str
    role: str  # "aggregator" | "site" | "site-job"
    folder: Path
    proc: subprocess.Popen
    log_path: Path
    started: float = field(default_factory=time.monotonic)

    def poll(self) -> int | None:
        return self.proc.poll()

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def failure_reason(self) -> str:
        """The participant's own one-line reason if it left one, else its exit and last log lines."""
        status = self.folder / "status.json"
        if status.exists():
            try:
                return json.loads(status.read_text())["reason"]
            except (ValueError, KeyError, OSError):
                pass
        rc = self.proc.returncode
        how = f"was killed by signal {-rc}" if rc is not None and rc < 0 else f"exited with code {rc}"
        return f"its process {how} (its log: {self.log_path})"


class Supervisor:
    """Owns participant processes; ``with Supervisor() as s:`` guarantees they are stopped."""

    def __init__(self, grace_seconds: float = 5.0):
        self.participants: list[Participant] = []
        self.grace_seconds = grace_seconds

    def start(self, name: str, role: str, argv: list[str], folder: Path, env: dict[str, str] | None = None) -> Participant:
        folder.mkdir(parents=True, exist_ok=True)
        log_path = folder / "logs" / f"{role}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        (folder / "status.json").unlink(missing_ok=True)
        full_env = {**os.environ, **(env or {})}
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen([sys.executable, *argv], cwd=folder, stdout=logf, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=full_env, start_new_session=True)
        p = Participant(name, role, folder, proc, log_path)
        self.participants.append(p)
        return p

    def stop(self, p: Participant) -> None:
        if p.poll() is not None:
            return
        try:
            os.killpg(p.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            p.proc.wait(timeout=self.grace_seconds)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.proc.wait(timeout=self.grace_seconds)

    def stop_all(self) -> None:
        for p in reversed(self.participants):
            self.stop(p)

    def __enter__(self) -> "Supervisor":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()

    def wait_all(self, participants: list[Participant], timeout: float, what: str,
                 progress=None, every: float = 15.0) -> None:
        """Wait for short-lived site jobs; raise FederationFailed naming the first that fails or overruns.

        ``progress(participants)`` is called every ``every`` seconds while they run.
        """
        deadline = time.monotonic() + timeout
        pending = list(participants)
        next_report = time.monotonic() + every
        while pending:
            if progress is not None and time.monotonic() >= next_report:
                progress(participants)
                next_report += every
            for p in list(pending):
                rc = p.poll()
                if rc is None:
                    continue
                pending.remove(p)
                if rc != 0:
                    raise FederationFailed(f"site '{p.name}'", f"{what} failed: {p.failure_reason()}")
            if pending and time.monotonic() > deadline:
                names = ", ".join(f"'{p.name}'" for p in pending)
                raise FederationFailed(f"site {names}", f"{what} did not finish within {timeout:.0f} s")
            time.sleep(0.2)


class EventTail:
    """Reads complete new JSON lines from a growing events file."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.buffer = ""

    def read(self) -> list[dict]:
        try:
            with open(self.path) as f:
                f.seek(self.offset)
                chunk = f.read()
                self.offset = f.tell()
        except FileNotFoundError:
            return []
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split("\n")
        return [json.loads(line) for line in lines if line.strip()]
