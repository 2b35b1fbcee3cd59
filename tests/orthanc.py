"""A real Orthanc PACS with DICOMweb (Debian's ``orthanc`` and ``orthanc-dicomweb``) for tests.

Orthanc 1.10 listens on all interfaces whatever it is told, so it runs inside a network namespace
of its own that has only ``lo``: nothing outside this machine's loopback can reach it. Two socats
bridge one loopback port of the test's namespace to Orthanc's port through a Unix socket, the
same way a hospital host is bridged to its proxy elsewhere in the tests. Remote access is also
refused by configuration, the DICOM (C-STORE/C-FIND) port is off, and HTTP needs a user.
"""
from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from conftest import _stop, free_port

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


@dataclass(frozen=True)
class Orthanc:
    url: str            # REST root, e.g. http://127.0.0.1:PORT
    user: str
    password: str
    pid: int            # Orthanc's process (``ip netns exec`` execs it)
    netns: str          # the network namespace it runs in

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def request(self, path: str, data: bytes | None = None, method: str | None = None, timeout: float = 30):
        req = urllib.request.Request(self.url + path, data=data, method=method)
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        if data is not None:
            req.add_header("Content-Type", "application/dicom")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body else None

    def upload(self, files) -> int:
        """POST each DICOM file to ``/instances`` (Orthanc's REST upload); returns how many were new."""
        new = 0
        for f in files:
            answer = self.request("/instances", Path(f).read_bytes(), "POST")
            new += answer.get("Status") == "Success"
        return new


def missing_tools() -> str | None:
    for tool in (ORTHANC, DICOMWEB_PLUGIN, shutil.which("socat"), shutil.which("ip")):
        if not tool or not Path(tool).exists():
            return ("Orthanc, its DICOMweb plugin, socat and iproute2 are needed: "
                    "apt-get install -y orthanc orthanc-dicomweb socat iproute2 (.ci/run does)")
    return None


@contextmanager
def orthanc_server(root: Path, user: str = "sitekit", password: str | None = None):
    """Start Orthanc in its own network namespace; yields an :class:`Orthanc`; stops it and removes the namespace."""
    problem = missing_tools()
    if problem:
        raise RuntimeError(problem)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    password = password or secrets.token_hex(12)
    ns = f"fedward-pacs-{os.getpid()}-{secrets.token_hex(3)}"
    config = {
        "Name": "fedward-test-pacs", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
        "HttpPort": 8042,                 # inside the namespace: no other process can hold it
        "DicomServerEnabled": False,      # no DICOM port: tests speak DICOMweb and REST only
        "RemoteAccessAllowed": False, "AuthenticationEnabled": True, "RegisteredUsers": {user: password},
        "Plugins": [DICOMWEB_PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Host": "localhost"},
        "StorageCompression": False, "HttpTimeout": 60, "ConcurrentJobs": 1,
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    sock = root / "orthanc.sock"
    procs: list[subprocess.Popen] = []
    log = open(root / "orthanc.log", "wb")
    subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True, capture_output=True)
        procs.append(subprocess.Popen(["ip", "netns", "exec", ns, ORTHANC, str(root / "orthanc.json")],
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        procs.append(subprocess.Popen(["ip", "netns", "exec", ns, "socat", f"UNIX-LISTEN:{sock},fork,mode=600",
                                       "TCP:127.0.0.1:8042"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        port = free_port()
        procs.append(subprocess.Popen(["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork",
                                       f"UNIX-CONNECT:{sock}"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        server = Orthanc(f"http://127.0.0.1:{port}", user, password, procs[0].pid, ns)
        deadline = time.monotonic() + 60
        while True:
            for p in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[3] if len(p.args) > 3 else p.args[0]} exited with {p.returncode}; "
                                       f"see {root / 'orthanc.log'}")
            try:
                if server.request("/system", timeout=2).get("Name") == "fedward-test-pacs":
                    break
            except (OSError, urllib.error.URLError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not answer within 60 s; see {root / 'orthanc.log'}")
            time.sleep(0.3)
        yield server
    finally:
        for p in reversed(procs):
            _stop(p)
        log.close()
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def listening_ports_in(pid: int) -> set[int]:
    """TCP ports in LISTEN state in the network namespace of process ``pid`` (from /proc)."""
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports
