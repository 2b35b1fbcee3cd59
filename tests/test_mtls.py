"""Mutual TLS over real gRPC: the aggregator refuses a site with a foreign certificate, and the flow says who."""
import shutil

import pytest

from conftest import free_port, write_spec
from flows import federated_training as ft
from flows.supervisor import FederationFailed
from sitekit import pki
from sitekit.engine import openfl_adapter as engine
from sitekit.spec import load_spec


@pytest.fixture
def workspace(ixi_pool, tmp_path, mlflow_server):
    spec = load_spec(write_spec(tmp_path / "fed.yaml", ixi_pool, free_port(),
                                timeouts={"startup_seconds": 60, "round_seconds": 60}))
    return spec, ft.build_workspace.fn(spec, tmp_path / "runs")


def replace_site_identity(workspace, site, cn, ca_dir):
    """Give ``site`` a new key and a certificate for ``cn`` signed by the CA in ``ca_dir``."""
    paths = engine.participant_layout(workspace / "sites" / site, "site", site)
    pki.make_key_and_request(paths["key"], paths["csr"], cn)
    pki.sign_request(ca_dir, paths["csr"].read_bytes(), cn, "site", paths["cert"])


def run_expecting_refusal(spec, ws):
    import mlflow

    with mlflow.start_run():
        with pytest.raises(FederationFailed) as err:
            ft.run_rounds.fn(spec, ws, 0.0)
    return err.value


def test_certificate_from_another_ca_is_refused(workspace, tmp_path):
    spec, ws = workspace
    pki.create_ca(tmp_path / "rogue-ca", "rogue")
    replace_site_identity(ws, "hospital-b", "hospital-b", tmp_path / "rogue-ca")
    failure = run_expecting_refusal(spec, ws)
    assert failure.who == "site 'hospital-b'"
    assert "rejected this site's certificate during the TLS handshake" in failure.reason
    # the well-configured site was not blamed, and nothing kept running
    assert "hospital-a" not in failure.who
    assert not list(ws.glob("aggregator/save/final.pbuf"))


def test_certificate_for_another_sites_name_is_refused(workspace):
    spec, ws = workspace
    # hospital-b presents a valid federation certificate - but one that says it is hospital-a
    replace_site_identity(ws, "hospital-b", "hospital-a", ws / "ca")
    failure = run_expecting_refusal(spec, ws)
    assert failure.who == "site 'hospital-b'"
    assert "refused site 'hospital-b'" in failure.reason
    assert "CN: |hospital-a|" in failure.reason
