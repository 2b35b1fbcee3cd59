"""A hospital whose only way out is its HTTPS proxy: a network namespace with nothing but loopback,
bridged (socat over a Unix socket) to a real tinyproxy that allows CONNECT only to the aggregator's
host and port. Its collaborator trains through it; without the proxy setting, or with the proxy down,
`sitekit preflight` and `sitekit join` fail within seconds saying what to ask IT for.

Real components: OpenFL over gRPC + mutual TLS, tinyproxy, Linux network namespaces, rclone's S3,
Prefect and MLflow servers; data: two hospitals of UCI heart-disease (Cleveland, Hungary)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import BIN, DATA, free_port, site_governance
from sitekit import sitehome as H
from sitekit.cli import main as sitekit_main
from sitekit.layout import participant_layout

HEART = DATA / "heart-disease"
NETNS_PROXY_PORT = 3128  # the proxy's address as the hospital sees it (inside its namespace)
SITEKIT = str(BIN / "sitekit")


def _popen(argv, log: Path, **kw):
    return subprocess.Popen(argv, stdout=open(log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, **kw)


def _stop(proc):
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _wait_port(port: int, proc, what: str, timeout: float = 20) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout} s")


class Hospital:
    """A network namespace with only loopback; 127.0.0.1:3128 inside it leads to the proxy, nothing else leads out."""

    def __init__(self, root: Path, proxy_port: int):
        for tool in ("ip", "socat", "tinyproxy"):
            if not shutil.which(tool):
                pytest.fail(f"{tool} is missing; apt-get install iproute2 socat tinyproxy (see .ci/run)")
        self.name = f"fedward-hospital-{uuid.uuid4().hex[:8]}"
        self.root, self.proxy_port = root, proxy_port
        self.sock = root / "proxy.sock"
        self.procs: dict[str, subprocess.Popen] = {}
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"], check=True)
        # host side: the Unix socket leads to the proxy; namespace side: 127.0.0.1:3128 leads to the socket
        self.procs["bridge-host"] = _popen(["socat", f"UNIX-LISTEN:{self.sock},fork,unlink-early",
                                            f"TCP:127.0.0.1:{proxy_port}"], root / "bridge-host.log")
        deadline = time.monotonic() + 10
        while not self.sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.procs["bridge-netns"] = _popen(["ip", "netns", "exec", self.name, "socat",
                                             f"TCP-LISTEN:{NETNS_PROXY_PORT},bind=127.0.0.1,fork,reuseaddr",
                                             f"UNIX-CONNECT:{self.sock}"], root / "bridge-netns.log")
        time.sleep(0.3)

    def run(self, argv, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
        full = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        full.update(env or {})
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], capture_output=True, text=True,
                              timeout=timeout, env=full, stdin=subprocess.DEVNULL)

    def start(self, argv, log: Path, env: dict | None = None) -> subprocess.Popen:
        full = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        full.update(env or {})
        p = _popen(["ip", "netns", "exec", self.name, *argv], log, env=full)
        self.procs[f"job-{len(self.procs)}"] = p
        return p

    def close(self):
        for p in reversed(list(self.procs.values())):
            _stop(p)
        subprocess.run(["ip", "netns", "del", self.name], check=False)


class Proxy:
    """tinyproxy on 127.0.0.1, CONNECT allowed only to host:port."""

    def __init__(self, root: Path, host: str, port: int):
        self.port = free_port()
        self.log = root / "tinyproxy.log"
        (root / "filter").write_text(f"^{host.replace('.', '[.]')}$\n")
        self.conf = root / "tinyproxy.conf"
        self.conf.write_text(f'Port {self.port}\nListen 127.0.0.1\nTimeout 60\nLogFile "{self.log}"\nLogLevel Connect\n'
                             f'MaxClients 20\nAllow 127.0.0.1\nConnectPort {port}\nFilter "{root / "filter"}"\n'
                             "FilterType ere\nFilterDefaultDeny Yes\n")
        self.root, self.proc = root, None

    def start(self):
        self.proc = _popen(["tinyproxy", "-d", "-c", str(self.conf)], self.root / "tinyproxy.out")
        _wait_port(self.port, self.proc, "tinyproxy")

    def stop(self):
        _stop(self.proc)


@pytest.fixture(scope="module")
def federation(tmp_path_factory, s3_server, mlflow_server, prefect_server):
    """A two-hospital heart-disease federation shipped through S3; each hospital made its own key."""
    from flows.ship_plan import invite_sites, ship_plan

    if not HEART.is_dir():
        pytest.fail(f"heart-disease data not found at {HEART}; set FEDWARD_DATA to the shared data folder")
    root = tmp_path_factory.mktemp("egress")
    port = free_port()
    spec = {"name": "heart-egress", "task": {"kind": "tabular", "dataset": "heart-disease", "model": {"name": "logreg"}},
            "sites": [{"name": "cleveland", "data": str(HEART / "processed.cleveland.data"), "governance": site_governance("cleveland")},
                      {"name": "hungary", "data": str(HEART / "processed.hungarian.data"), "governance": site_governance("hungary")}],
            "rounds": 2, "local_steps": 20, "batch_size": 4, "learning_rate": 0.001,
            "aggregator": {"host": "localhost", "port": port}, "timeouts": {"startup_seconds": 60, "round_seconds": 60}}
    (root / "fed.yaml").write_text(yaml.safe_dump(spec))
    homes = {s["name"]: root / "sites" / s["name"] for s in spec["sites"]}
    os.environ.update({"AWS_ACCESS_KEY_ID": s3_server["key"], "AWS_SECRET_ACCESS_KEY": s3_server["secret"]})
    try:
        # the round trip of a certificate: each site gets an upload link, makes its key, sends only the CSR
        invites = invite_sites(str(root / "fed.yaml"), bucket="egress", s3_endpoint=s3_server["endpoint"],
                               workdir=str(root / "federation"))
        for site, home in homes.items():
            assert sitekit_main(["keygen", "--workspace", str(home), "--role", "site", "--name", site]) == 0
            assert sitekit_main(["send-request", "--home", str(home), "--site", site, "--url", invites[site]]) == 0
        shipped = ship_plan(str(root / "fed.yaml"), None, None, bucket="egress", s3_endpoint=s3_server["endpoint"],
                            workdir=str(root / "federation"))
    finally:
        os.environ.pop("AWS_ACCESS_KEY_ID", None)
        os.environ.pop("AWS_SECRET_ACCESS_KEY", None)
    for site, home in homes.items():  # hospital IT fetches and verifies its bundle, then fills in data.yaml
        s = shipped["sites"][site]
        assert sitekit_main(["fetch", "--home", str(home), "--url", s["url"], "--fingerprint", s["fingerprint"]]) == 0
        data = {"cleveland": HEART / "processed.cleveland.data", "hungary": HEART / "processed.hungarian.data"}[site]
        (home / "data.yaml").write_text(f"site: {site}\ndata: {data}\n")
    return {"root": root, "port": port, "homes": homes, "shipped": shipped, "aggregator": Path(shipped["aggregator_folder"]),
            "invites": invites, "s3": s3_server}


def test_a_sites_upload_link_writes_only_its_own_request(federation, capsys):
    invites, s3 = federation["invites"], federation["s3"]
    stored = s3["data"] / "egress" / "sites" / "hungary" / "heart-egress" / "request.csr"
    before = stored.read_bytes()
    assert b"CERTIFICATE REQUEST" in before and b"PRIVATE KEY" not in before
    # Cleveland alters its own upload link to overwrite Hungary's request: the signature does not match
    forged = invites["cleveland"].replace("sites/cleveland/", "sites/hungary/")
    assert forged != invites["cleveland"]
    home = federation["homes"]["cleveland"]
    assert sitekit_main(["send-request", "--home", str(home), "--site", "cleveland", "--url", forged]) == 2
    assert "the upload link was refused (403" in capsys.readouterr().err
    assert stored.read_bytes() == before
    # what the federation signed is exactly what each site sent, for the key each site holds
    for site, h in federation["homes"].items():
        sent = participant_layout(h, "site", site)["csr"].read_bytes()
        assert (federation["root"] / "federation" / "requests" / f"{site}.csr").read_bytes() == sent


def test_the_operator_cli_invites_sites_and_ships_the_requests_they_uploaded(federation, capsys, monkeypatch):
    """`fedward invite-sites` then `fedward ship` without --csr: what the README tells the operator to type.
    The requests are the ones the sites uploaded in the fixture; a second federation folder gets its own CA."""
    from flows.cli import main

    s3 = federation["s3"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3["secret"])
    spec, folder = str(federation["root"] / "fed.yaml"), federation["root"] / "federation-cli"
    assert main(["invite-sites", spec, "--bucket", "egress", "--s3-endpoint", s3["endpoint"], "--workdir", str(folder)]) == 0
    for site in federation["homes"]:
        link = (folder / "links" / f"{site}-request.txt").read_text()
        assert f"sites/{site}/heart-egress/request.csr" in link and oct((folder / "links" / f"{site}-request.txt").stat().st_mode)[-3:] == "600"
    assert main(["ship", spec, "--bucket", "egress", "--s3-endpoint", s3["endpoint"], "--workdir", str(folder)]) == 0
    out = capsys.readouterr().out
    for site, home in federation["homes"].items():
        assert f"{site}: fingerprint " in out
        # signed from the request the site uploaded (the key it holds), not from anything the federation made
        assert (folder / "requests" / f"{site}.csr").read_bytes() == participant_layout(home, "site", site)["csr"].read_bytes()
    # a federation whose sites have not uploaded yet: one sentence, no traceback
    other = federation["root"] / "fed-other.yaml"
    other.write_text(yaml.safe_dump({**yaml.safe_load((federation["root"] / "fed.yaml").read_text()), "name": "heart-other"}))
    assert main(["ship", str(other), "--bucket", "egress", "--s3-endpoint", s3["endpoint"],
                 "--workdir", str(federation["root"] / "federation-other")]) == 2
    assert "site 'cleveland' has not uploaded its certificate request yet" in capsys.readouterr().err


@pytest.fixture(scope="module")
def hospital(federation):
    proxy = Proxy(federation["root"], "localhost", federation["port"])
    proxy.start()
    h = Hospital(federation["root"], proxy.port)
    h.proxy = proxy
    try:
        yield h
    finally:
        h.close()
        proxy.stop()


@pytest.fixture(scope="module")
def aggregator(federation):
    folder = federation["aggregator"]
    proc = _popen([sys.executable, "-m", "sitekit.engine.openfl_adapter", "aggregator"], federation["root"] / "aggregator.log",
                  cwd=folder)
    try:
        _wait_port(federation["port"], proc, "aggregator", timeout=60)
        yield proc
    finally:
        _stop(proc)


def _set_proxy(home: Path, proxy: str | None) -> None:
    settings = yaml.safe_load((home / "data.yaml").read_text())
    settings["proxy"] = proxy
    (home / "data.yaml").write_text(yaml.safe_dump(settings))


def test_without_the_proxy_setting_preflight_and_join_fail_in_seconds(federation, hospital, aggregator):
    home = federation["homes"]["cleveland"]
    _set_proxy(home, None)
    r = hospital.run([SITEKIT, "preflight", "--home", str(home)], timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "[FAIL] network" in r.stdout and "no HTTPS proxy is configured" in r.stdout
    assert "-> ask IT to: either give you the HTTPS proxy's address" in r.stdout
    assert "[PASS] data" in r.stdout and "[PASS] identity" in r.stdout  # everything else was fine
    H.approve(home, "C. Admin, Cleveland IT")
    r = hospital.run([SITEKIT, "join", "--home", str(home)], timeout=60)
    assert r.returncode == 5, r.stdout + r.stderr
    assert "Ask your IT team to" in r.stderr and f"localhost:{federation['port']}" in r.stderr


def test_the_proxy_allows_only_the_aggregator(federation, hospital, aggregator):
    probe = ("import sys; from sitekit.netcheck import open_tunnel, NetworkProblem\n"
             "try:\n    open_tunnel(sys.argv[1], int(sys.argv[2]), 'http://127.0.0.1:3128')\n    print('OPEN')\n"
             "except NetworkProblem as e:\n    print(e)\n")
    other = free_port()
    for host, port, expect in (("localhost", federation["port"], "OPEN"),
                               ("localhost", other, f"refused CONNECT to localhost:{other} (HTTP/1.1 403"),
                               ("127.0.0.1", federation["port"], "refused CONNECT to 127.0.0.1"),):
        r = hospital.run([sys.executable, "-c", probe, host, str(port)], timeout=30)
        assert expect in r.stdout, (host, port, r.stdout, r.stderr)
    # and the hospital has no other way out: the aggregator's port is not reachable directly
    r = hospital.run([sys.executable, "-c", probe.replace("'http://127.0.0.1:3128'", "None"), "localhost",
                      str(federation["port"])], timeout=30)
    assert "cannot connect to the aggregator" in r.stdout


def test_with_the_proxy_down_preflight_and_join_fail_in_seconds(federation, hospital, aggregator):
    home = federation["homes"]["cleveland"]
    _set_proxy(home, f"http://127.0.0.1:{NETNS_PROXY_PORT}")
    H.approve(home, "C. Admin, Cleveland IT")
    hospital.proxy.stop()
    try:
        r = hospital.run([SITEKIT, "preflight", "--home", str(home)], timeout=60)
        assert r.returncode == 1 and "[FAIL] network" in r.stdout
        assert "closed the connection without answering" in r.stdout and "-> ask IT to: check the proxy is running" in r.stdout
        r = hospital.run([SITEKIT, "join", "--home", str(home)], timeout=60)
        assert r.returncode == 5 and "Ask your IT team to check the proxy is running" in r.stderr, r.stderr
    finally:
        hospital.proxy.start()


def test_preflight_through_the_proxy_then_train_through_it(federation, hospital, aggregator):
    home_c, home_h = federation["homes"]["cleveland"], federation["homes"]["hungary"]
    _set_proxy(home_c, f"http://127.0.0.1:{NETNS_PROXY_PORT}")
    r = hospital.run([SITEKIT, "preflight", "--home", str(home_c)], timeout=120)
    report = (home_c / "preflight" / "report.txt").read_text()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "RESULT: READY to join" in report and "[PASS] network" in report
    assert f"through the HTTPS proxy http://127.0.0.1:{NETNS_PROXY_PORT}" in report
    figures = {c["name"]: c["figures"] for c in json.loads((home_c / "preflight" / "report.json").read_text())["checks"]}
    assert figures["network"]["rtt_ms"] > 0 and figures["network"]["upload_mbit_s"] > 0
    assert figures["data"]["train_cases"] + figures["data"]["test_cases"] == 303 - figures["data"]["dropped_rows"]
    allow = (home_c / "preflight" / "allow-list-request.txt").read_text()
    assert f"Port                   : {federation['port']}/TCP" in allow and "OUTBOUND ONLY" in allow
    assert f"through http://127.0.0.1:{NETNS_PROXY_PORT} using HTTP CONNECT to localhost:{federation['port']} only" in allow

    for home in (home_c, home_h):
        H.approve(home, "Site admin")
    # Cleveland inside its namespace (only way out: the proxy), Hungary directly on the host
    log_c, log_h = federation["root"] / "join-cleveland.log", federation["root"] / "join-hungary.log"
    cleveland = hospital.start([SITEKIT, "join", "--home", str(home_c)], log_c)
    hungary = _popen([SITEKIT, "join", "--home", str(home_h)], log_h,
                     env={k: v for k, v in os.environ.items() if "proxy" not in k.lower()})
    try:
        for p, log in ((cleveland, log_c), (hungary, log_h)):
            p.wait(timeout=240)
            assert p.returncode == 0, log.read_text()[-3000:]
        aggregator.wait(timeout=60)
    finally:
        _stop(cleveland)
        _stop(hungary)
    events = [json.loads(ln) for ln in (federation["aggregator"] / "events.jsonl").read_text().splitlines()]
    rounds = [e for e in events if e["event"] == "round_end"]
    assert [e["round"] for e in rounds] == [0, 1] and any(e["event"] == "finished" for e in events)
    assert set(rounds[-1]["sites"]) == {"cleveland", "hungary"}
    assert "joining federation 'heart-egress' as site 'cleveland'" in log_c.read_text()
    # the proxy carried Cleveland's training traffic: its log shows the CONNECTs to the aggregator
    proxy_log = hospital.proxy.log.read_text()
    assert proxy_log.count(f"CONNECT localhost:{federation['port']}") >= 4  # preflight handshakes + gRPC + training
    assert (federation["aggregator"] / "save" / "final.pbuf").exists()
    # the federation's audit log (aggregator folder): what ship-plan shipped, then every update the
    # aggregator received, recorded by the aggregator itself (no flow was watching this one)
    from sitekit.audit import AuditLog, verify

    audit = AuditLog(federation["aggregator"] / "audit.jsonl")
    assert verify(audit.path).ok
    recs = audit.records()
    shipped = {r["data"]["site"]: r["data"]["bundle_fingerprint"] for r in recs if r["kind"] == "plan_shipped"}
    assert shipped == {s: v["fingerprint"] for s, v in federation["shipped"]["sites"].items()}
    trained = sorted((r["data"]["site"], r["data"]["round"]) for r in recs
                     if r["kind"] == "update_received" and r["data"]["task"] == "train")
    assert trained == [("cleveland", 0), ("cleveland", 1), ("hungary", 0), ("hungary", 1)]
    # and each site's approval is in its own hash-chained approvals log
    for home in (home_c, home_h):
        log = AuditLog(home / H.APPROVALS_LOG)
        assert verify(log.path).ok and [r["kind"] for r in log.records()][-1] == "approval"
