"""``make stack`` / ``make stack-down``: fedward's server stack on this machine, without Docker.

The same services as ``infra/compose.yaml``, as plain processes, every one on 127.0.0.1:

- S3 object store: ``rclone serve s3`` (rclone from ``make setup``), bucket ``fedward``;
- MLflow tracking server and model registry (sqlite here; PostgreSQL in compose) whose artifacts
  live in ``s3://fedward/artifacts`` and are served through the MLflow server
  (``--serve-artifacts``: clients need no S3 credentials);
- Prefect server (sqlite here; PostgreSQL in compose) and one Prefect process worker on the
  work pool ``fedward`` (it runs the deployments of ``flows/deployments.py``).

State lives in ``$FEDWARD_STACK_DIR`` (default ``.fedward/stack``, git-ignored): ``pids/``,
``logs/``, the databases, the S3 data, the generated S3 credentials (mode 600), and ``stack.env``
to source (``PREFECT_API_URL``, ``MLFLOW_TRACKING_URI``). Ports: ``FEDWARD_STACK_PREFECT_PORT``
(4200), ``FEDWARD_STACK_MLFLOW_PORT`` (5000), ``FEDWARD_STACK_S3_PORT`` (9000); the ports of a
running stack are kept in its state.

``up`` is idempotent (a service already running is left alone), ``down`` stops each service's whole
process group (SIGTERM, then SIGINT, then SIGKILL, each bounded) and is idempotent too,
``status`` prints what runs. Standard library only.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RCLONE = REPO / ".tools" / "bin" / "rclone"
BUCKET = "fedward"
POOL = "fedward"
SERVICES = ("s3", "mlflow", "prefect", "worker")  # start order; stopped in reverse
DEFAULT_PORTS = {"prefect": 4200, "mlflow": 5000, "s3": 9000}
QUIET = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
         "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
         "MLFLOW_DISABLE_TELEMETRY": "true"}


class StackError(RuntimeError):
    pass


class Stack:
    def __init__(self, root: Path | None = None):
        self.root = Path(root or os.environ.get("FEDWARD_STACK_DIR") or REPO / ".fedward" / "stack").resolve()
        self.pids, self.logs = self.root / "pids", self.root / "logs"
        self._log_start: dict[str, int] = {}

    # -- state ------------------------------------------------------------------------------------

    def ports(self) -> dict[str, int]:
        saved = self.root / "ports.json"
        if saved.exists() and any(self.pid(s) for s in SERVICES):
            return json.loads(saved.read_text())
        ports = {s: int(os.environ.get(f"FEDWARD_STACK_{s.upper()}_PORT", p)) for s, p in DEFAULT_PORTS.items()}
        _atomic(saved, json.dumps(ports))
        return ports

    def credentials(self) -> tuple[str, str]:
        path = self.root / "s3-credentials.json"
        if not path.exists():
            _atomic(path, json.dumps({"key": "fedward-" + secrets.token_hex(6), "secret": secrets.token_urlsafe(30)}), mode=0o600)
        c = json.loads(path.read_text())
        return c["key"], c["secret"]

    def pid(self, service: str) -> int | None:
        """The PID (= process group) of a running service, or None (a stale PID file is removed)."""
        f = self.pids / f"{service}.pid"
        try:
            pid = int(f.read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):
            f.unlink(missing_ok=True)
            return None
        try:  # a zombie is not a running service
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                f.unlink(missing_ok=True)
                return None
        except (OSError, IndexError):
            pass
        return pid

    def urls(self) -> dict[str, str]:
        p = self.ports()
        return {"prefect": f"http://127.0.0.1:{p['prefect']}/api", "mlflow": f"http://127.0.0.1:{p['mlflow']}",
                "s3": f"http://127.0.0.1:{p['s3']}"}

    # -- services ---------------------------------------------------------------------------------

    def _command(self, service: str) -> tuple[list[str], dict[str, str]]:
        p, u = self.ports(), self.urls()
        key, secret = self.credentials()
        env = {**os.environ, **QUIET}
        if service == "s3":
            if not RCLONE.exists():
                raise StackError(f"{RCLONE} is missing; run 'make setup' (it fetches rclone with infra/get-rclone.sh)")
            (self.root / "s3" / BUCKET).mkdir(parents=True, exist_ok=True)  # a bucket is a top-level folder
            return [str(RCLONE), "serve", "s3", "--addr", f"127.0.0.1:{p['s3']}", "--auth-key", f"{key},{secret}",
                    "--cache-dir", str(self.root / "rclone-cache"), str(self.root / "s3")], env
        if service == "mlflow":
            env.update({"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
                        "MLFLOW_S3_ENDPOINT_URL": u["s3"]})
            return [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(p["mlflow"]), "--workers", "1",
                    "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                    "--artifacts-destination", f"s3://{BUCKET}/artifacts", "--serve-artifacts"], env
        if service == "prefect":
            env.update({"PREFECT_HOME": str(self.root / "prefect")})
            env.pop("PREFECT_API_URL", None)
            return [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(p["prefect"])], env
        if service == "worker":
            env.update({"PREFECT_HOME": str(self.root / "prefect-worker"), "PREFECT_API_URL": u["prefect"],
                        "MLFLOW_TRACKING_URI": u["mlflow"], "PREFECT_WORKER_QUERY_SECONDS": "5"})
            return [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process",
                    "--name", f"fedward-stack-{socket.gethostname()}"], env
        raise ValueError(service)

    def _healthy(self, service: str) -> bool:
        p, u = self.ports(), self.urls()
        if service == "s3":
            return _port_open(p["s3"])
        if service == "worker":  # it has no port: ready once it says so in this start's part of its log
            try:
                with open(self.logs / "worker.log", "rb") as f:
                    f.seek(self._log_start.get("worker", 0))
                    return b"started" in f.read()
            except OSError:
                return False
        url = {"mlflow": f"{u['mlflow']}/health", "prefect": f"{u['prefect']}/health"}[service]
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def start(self, service: str, timeout: float = 120) -> str:
        if self.pid(service):
            return f"{service}: already running (pid {self.pid(service)})"
        port = self.ports().get(service)
        if port is not None and _port_open(port):
            raise StackError(f"{service}: port {port} on 127.0.0.1 is already in use by another program; stop it, or "
                             f"choose another port with FEDWARD_STACK_{service.upper()}_PORT")
        argv, env = self._command(service)
        self.pids.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{service}.log", "ab") as log:
            self._log_start[service] = log.tell()
            proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        _atomic(self.pids / f"{service}.pid", str(proc.pid))
        deadline = time.monotonic() + timeout
        while not self._healthy(service):
            if proc.poll() is not None:
                (self.pids / f"{service}.pid").unlink(missing_ok=True)
                raise StackError(f"{service} exited with code {proc.returncode}; see {self.logs / (service + '.log')}:\n"
                                 + _tail(self.logs / f"{service}.log", 8))
            if time.monotonic() > deadline:
                self.stop(service)
                raise StackError(f"{service} did not become ready within {timeout:.0f} s; see {self.logs / (service + '.log')}")
            time.sleep(0.5)
        return f"{service}: started (pid {proc.pid})"

    def stop(self, service: str) -> str:
        pid = self.pid(service)
        if pid is None:
            return f"{service}: not running"
        # A Prefect worker answers SIGTERM by waiting for its runs; SIGINT twice stops it; SIGKILL always does.
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGINT, 5), (signal.SIGINT, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            end = time.monotonic() + wait
            while time.monotonic() < end and _group_alive(pid):
                time.sleep(0.2)
            if not _group_alive(pid):
                break
        (self.pids / f"{service}.pid").unlink(missing_ok=True)
        return f"{service}: stopped (pid {pid})"

    def write_env(self) -> Path:
        u = self.urls()
        text = (f"# source this file: . {self.root / 'stack.env'}\n"
                f"export PREFECT_API_URL={u['prefect']}\nexport MLFLOW_TRACKING_URI={u['mlflow']}\n")
        _atomic(self.root / "stack.env", text)
        return self.root / "stack.env"

    def up(self) -> list[str]:
        self.root.mkdir(parents=True, exist_ok=True)
        self.ports()
        out = [self.start(s) for s in SERVICES]
        env = self.write_env()
        u = self.urls()
        out += [f"Prefect API  {u['prefect']}  (UI {u['prefect'][:-4]})",
                f"MLflow       {u['mlflow']}  (artifacts in s3://{BUCKET}/artifacts on {u['s3']})",
                f"worker       pool '{POOL}' (process)",
                f"environment  . {env}"]
        return out

    def down(self) -> list[str]:
        return [self.stop(s) for s in reversed(SERVICES)]

    def status(self) -> list[str]:
        u = self.urls()
        return [f"{s}: " + (f"running (pid {self.pid(s)}){'' if s == 'worker' else ' at ' + u[s]}" if self.pid(s) else "not running")
                for s in SERVICES]


def _atomic(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # members that are zombies do not count
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1 or args[0] not in ("up", "down", "status"):
        print("usage: python infra/stack.py up|down|status", file=sys.stderr)
        return 2
    stack = Stack()
    try:
        for line in getattr(stack, args[0])():
            print(line, flush=True)
    except StackError as exc:
        print(f"stack: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
