"""The ``ship-plan`` flow: one verifiable bundle per site, uploaded to S3 under that site's own prefix.

(invite-sites: a presigned upload link per site for its certificate request) ->
validate spec -> prepare the federation (its CA, the aggregator's workspace, key and certificate,
the initial model; kept in the federation's folder) -> sign each site's certificate request ->
make each site's bundle (plan, CA certificate, the site's signed certificate, image reference and
digest, data.yaml template, preflight settings, SHA-256 manifest) -> upload each bundle under
``sites/<site>/`` and give each site a presigned link to its own bundle only -> publish every
bundle's fingerprint (MLflow, the returned summary, ``fingerprints.txt``).

The private-key round trip: a site runs ``sitekit keygen`` in its own folder and sends only the
certificate request (CSR, not secret); this flow checks the request names that site and signs it.
No private key of a site ever reaches the federation, and no bundle can carry one
(:func:`sitekit.bundle.pack` refuses).

Access control: a presigned link authorises exactly one object (the site's bundle) for a limited
time; a link altered to name another site's object fails its signature check (403). The links are
capabilities: they go to each site privately (``links/<site>.txt``), never into MLflow.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from pathlib import Path

import mlflow
import yaml
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows import compliance, tracking
from sitekit import bundle as B
from sitekit import pki
from sitekit.engine import openfl_adapter as engine
from sitekit.sitehome import atomic_write, data_template
from sitekit.spec import FederationSpec, load_spec

PROTOCOL = "gRPC over HTTP/2 inside TLS 1.2+ with mutual TLS (client certificates)"
LINK_SECONDS = 7 * 24 * 3600  # S3's longest presigned lifetime


def federation_folder(spec: FederationSpec, workdir: str | Path | None = None) -> Path:
    return Path(workdir) if workdir else tracking.fedward_home() / "federations" / spec.name


@task(name="prepare-federation", cache_policy=NO_CACHE)
def prepare_federation(spec: FederationSpec, folder: Path) -> dict:
    """The federation's CA (made once, kept), the aggregator's workspace (plan, its own key and
    certificate, the initial model). Returns the facts the bundles need."""
    ca_dir = folder / "ca"
    if not (ca_dir / "ca.crt").exists():
        pki.create_ca(ca_dir, spec.name)
        print(f"federation CA created in {ca_dir}")
    agg = folder / "aggregator"
    engine.write_plan(spec, agg)
    paths = engine.participant_layout(agg, "aggregator", spec.aggregator.host)
    if not paths["cert"].exists() or not paths["key"].exists():
        pki.make_key_and_request(paths["key"], paths["csr"], spec.aggregator.host, dns_name=spec.aggregator.host)
        pki.sign_request(ca_dir, paths["csr"].read_bytes(), spec.aggregator.host, "aggregator", paths["cert"])
    shutil.copyfile(ca_dir / "ca.crt", paths["chain"])
    engine.initialize_model(spec, agg)
    shared = {k: v for k, v in engine.model_tensors(spec).items()}
    n_params = int(sum(v.size for v in shared.values()))
    n_bytes = int(sum(v.nbytes for v in shared.values()))
    if spec.algorithm == "scaffold" and not any(k.startswith(engine.SCAFFOLD_PREFIX) for k in shared):
        n_bytes *= 2  # the control variate travels beside the model, both ways
    plan = (agg / engine.PLAN).read_bytes()
    return {"plan": plan, "cols": (agg / engine.COLS).read_bytes(), "plan_sha256": B.plan_sha256(plan),
            "ca_pem": (ca_dir / "ca.crt").read_bytes(), "aggregator_pem": paths["cert"].read_bytes(),
            "model_parameters": n_params, "model_bytes": n_bytes, "aggregator_folder": str(agg)}


def request_key(federation: str, site: str) -> str:
    return f"sites/{site}/{federation}/request.csr"


@flow(name="invite-sites", log_prints=True)
def invite_sites(spec_path: str, bucket: str = "fedward-bundles", s3_endpoint: str | None = None,
                 expires_seconds: int = LINK_SECONDS, workdir: str | None = None) -> dict[str, str]:
    """Give each site a presigned upload link for its certificate request (and nothing else).

    The site runs ``sitekit keygen`` and ``sitekit send-request --url LINK``: only the CSR travels,
    outbound from the site; ``ship-plan`` then collects the requests from S3. Returns {site: link};
    the links are also written to ``links/<site>-request.txt`` (send each privately)."""
    spec = load_spec(spec_path)
    folder = federation_folder(spec, workdir)
    s3 = s3_client(s3_endpoint)
    _ensure_bucket(s3, bucket)
    out = {}
    for site in spec.site_names:
        out[site] = s3.generate_presigned_url("put_object", Params={"Bucket": bucket, "Key": request_key(spec.name, site)},
                                              ExpiresIn=expires_seconds)
        atomic_write(folder / "links" / f"{site}-request.txt", f"site: {site}\nupload your certificate request: {out[site]}\n", 0o600)
    print(f"request links for {len(out)} sites in {folder / 'links'}")
    return out


def _ensure_bucket(s3, bucket: str) -> None:
    try:
        s3.head_bucket(Bucket=bucket)
    except s3.exceptions.ClientError:
        s3.create_bucket(Bucket=bucket)


@task(name="collect-site-requests", cache_policy=NO_CACHE)
def collect_requests(spec: FederationSpec, folder: Path, bucket: str, endpoint: str | None) -> dict[str, str]:
    """The certificate requests the sites uploaded with their invite links; {site: local path}."""
    s3 = s3_client(endpoint)
    out = {}
    for site in spec.site_names:
        try:
            body = s3.get_object(Bucket=bucket, Key=request_key(spec.name, site))["Body"].read(1 << 20)
        except s3.exceptions.ClientError:
            raise pki.PKIError(f"site '{site}' has not uploaded its certificate request yet "
                               f"(s3://{bucket}/{request_key(spec.name, site)}); ask it to run 'sitekit send-request'.") from None
        path = folder / "requests" / f"{site}.csr"
        atomic_write(path, body)
        out[site] = str(path)
    return out


@task(name="sign-site-requests", cache_policy=NO_CACHE)
def sign_site_requests(spec: FederationSpec, folder: Path, csrs: dict[str, str]) -> dict[str, bytes]:
    """Sign each site's CSR after checking it names that site; returns {site: certificate PEM}."""
    missing = [s for s in spec.site_names if s not in csrs]
    if missing:
        raise pki.PKIError(f"no certificate request from site(s) {', '.join(missing)}; each site runs 'sitekit keygen' "
                           "and sends its .csr file.")
    unknown = sorted(set(csrs) - set(spec.site_names))
    if unknown:
        raise pki.PKIError(f"certificate request for '{unknown[0]}', which is not a site of federation '{spec.name}' "
                           f"({spec.path}).")
    out = {}
    for site in spec.site_names:
        pem = Path(csrs[site]).read_bytes()
        if b"PRIVATE KEY" in pem:
            raise pki.PKIError(f"site '{site}': the file sent as its certificate request ({csrs[site]}) holds a private "
                               "key; refusing it. The site must keep its key and send only the .csr.")
        cert = pki.sign_request(folder / "ca", pem, site, "site", folder / "sites" / site / f"col_{site}.crt")
        out[site] = cert.read_bytes()
    print(f"signed {len(out)} site certificates with the federation CA")
    return out


def preflight_settings(spec: FederationSpec, site: str, fed: dict, site_pem: bytes) -> dict:
    per_round = fed["model_bytes"] + 64 * 1024  # the model (and SCAFFOLD's variate) plus metrics and framing
    return {
        "federation": spec.name, "site": site,
        "aggregator": {"host": spec.aggregator.host, "port": spec.aggregator.port, "protocol": PROTOCOL},
        "certificates": {"aggregator_sha256": pki.fingerprint(fed["aggregator_pem"]),
                         "ca_sha256": pki.fingerprint(fed["ca_pem"]), "site_sha256": pki.fingerprint(site_pem)},
        "traffic": {"model_parameters": fed["model_parameters"], "model_bytes": fed["model_bytes"],
                    "rounds": spec.rounds, "download_bytes_per_round": per_round, "upload_bytes_per_round": per_round},
        "task": {"kind": spec.task.kind, "dataset": spec.task.dataset},
        "network": {"timeout_seconds": 5, "handshakes": 3,
                    "throughput_probe_bytes": int(min(max(fed["model_bytes"], 1 << 20), 16 << 20))},
    }


@task(name="make-site-bundles", cache_policy=NO_CACHE)
def make_bundles(spec: FederationSpec, folder: Path, fed: dict, certs: dict[str, bytes], images: dict) -> dict[str, dict]:
    """One bundle per site (deterministic tar + manifest); returns {site: {path, fingerprint}}."""
    out = {}
    for site in spec.site_names:
        if images is None:  # the site runs sitekit from its own Python installation, not from an image
            image = {"reference": None, "digest": None, "id": None, "profile": None,
                     "note": "no image was built for this plan: run sitekit from a Python installation"}
        else:
            img = images.get("sites", {}).get(site)
            if img is None:
                raise ValueError(f"no image for site '{site}' in the build-site-images result; build the images first.")
            if img.get("labels", {}).get("org.fedward.plan-sha256") not in (None, fed["plan_sha256"]):
                raise ValueError(f"the image for site '{site}' was built for another plan "
                                 f"({img['labels']['org.fedward.plan-sha256'][:12]}); rebuild the images for this plan.")
            image = {"reference": img["reference"], "digest": img.get("digest"), "id": img["id"], "profile": images.get("profile")}
        files = {
            B.PLAN: fed["plan"], B.COLS: fed["cols"], B.CA_CERT: fed["ca_pem"], B.site_cert_path(site): certs[site],
            B.IMAGE: (json.dumps(image, indent=2, sort_keys=True) + "\n").encode(),
            B.DATA_TEMPLATE: data_template(site).encode(),
            B.PREFLIGHT: yaml.safe_dump(preflight_settings(spec, site, fed, certs[site]), sort_keys=False).encode(),
        }
        data, fp = B.pack(spec.name, site, files)
        path = folder / "bundles" / site / f"bundle-{fp[:16]}.tar"
        atomic_write(path, data)
        out[site] = {"path": str(path), "fingerprint": fp, "bytes": len(data)}
        print(f"site {site}: bundle {fp} ({len(data)} bytes, {len(files) + 1} files)")
    return out


def s3_client(endpoint: str | None = None):
    """boto3 S3 client for FEDWARD_S3_ENDPOINT (or AWS), with credentials from the environment."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint or os.environ.get("FEDWARD_S3_ENDPOINT"),
                        region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                        config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                                      retries={"max_attempts": 3, "mode": "standard"}))


def bundle_key(federation: str, site: str, fingerprint: str) -> str:
    return f"sites/{site}/{federation}/bundle-{fingerprint[:16]}.tar"


@task(name="upload-bundles", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def upload_bundles(spec: FederationSpec, bundles: dict[str, dict], bucket: str, endpoint: str | None,
                   expires_seconds: int) -> dict[str, dict]:
    """Upload each bundle under its site's own prefix; return a presigned download link per site."""
    s3 = s3_client(endpoint)
    _ensure_bucket(s3, bucket)
    out = {}
    for site, b in bundles.items():
        key = bundle_key(spec.name, site, b["fingerprint"])
        with open(b["path"], "rb") as f:
            s3.put_object(Bucket=bucket, Key=key, Body=f, ContentType="application/x-tar",
                          Metadata={"fedward-fingerprint": b["fingerprint"], "fedward-site": site})
        url = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires_seconds)
        out[site] = {"bucket": bucket, "key": key, "url": url}
        print(f"site {site}: uploaded to s3://{bucket}/{key}")
    return out


@flow(name="ship-plan", log_prints=True)
def ship_plan(spec_path: str, csrs: dict[str, str] | None, images: dict | None, bucket: str = "fedward-bundles",
              s3_endpoint: str | None = None, expires_seconds: int = LINK_SECONDS, workdir: str | None = None) -> dict:
    """Ship every site its bundle; return {federation, plan_sha256, sites: {site: {fingerprint, url, key}}}.

    ``csrs`` maps each site to the certificate request it sent (None: collect the requests the sites
    uploaded with their invite-sites links); ``images`` is the result of the
    build-site-images flow (None: the sites run sitekit from a Python installation)."""
    spec = load_spec(spec_path)
    compliance.check_governance(spec, when="before any plan is shipped")  # no bundle for a site without its record
    folder = federation_folder(spec, workdir)
    tracking.configure(f"fedward/{spec.name}")
    with mlflow.start_run(run_name=f"ship-plan {dt.datetime.now():%Y-%m-%d %H:%M}"):
        mlflow.set_tags({"fedward.federation": spec.name, "fedward.step": "ship-plan"})
        fed = prepare_federation(spec, folder)
        if csrs is None:
            csrs = collect_requests(spec, folder, bucket, s3_endpoint)
        certs = sign_site_requests(spec, folder, csrs)
        bundles = make_bundles(spec, folder, fed, certs, images)
        links = upload_bundles(spec, bundles, bucket, s3_endpoint, expires_seconds)
        mlflow.log_params({"plan_sha256": fed["plan_sha256"], "bucket": bucket, "sites": ",".join(spec.site_names),
                           "model_bytes": fed["model_bytes"]})
        published = {site: {"fingerprint": b["fingerprint"], "object": f"s3://{bucket}/{links[site]['key']}",
                            "image": images["sites"][site]["reference"] if images else None,
                            "image_digest": images["sites"][site].get("digest") if images else None}
                     for site, b in bundles.items()}
        for site, p in published.items():
            mlflow.set_tag(f"bundle.{site}", p["fingerprint"])
        audit = compliance.record_bundles_shipped(spec, Path(fed["aggregator_folder"]), published, fed["plan_sha256"])
        mlflow.log_artifact(str(audit.path), "audit")
        mlflow.set_tag(compliance.HEAD_TAG, audit.head())
        mlflow.log_dict({"federation": spec.name, "plan_sha256": fed["plan_sha256"], "sites": published},
                        "bundles/fingerprints.json")
        text = "".join(f"{site}  {p['fingerprint']}\n" for site, p in published.items())
        atomic_write(folder / "fingerprints.txt", text)
        for site in spec.site_names:  # to be sent privately to each site: the link is its key to the bundle
            atomic_write(folder / "links" / f"{site}.txt",
                         f"site: {site}\nfingerprint: {bundles[site]['fingerprint']}\nurl: {links[site]['url']}\n", 0o600)
    print(f"published fingerprints ({folder / 'fingerprints.txt'}):\n{text}", end="")
    return {"federation": spec.name, "plan_sha256": fed["plan_sha256"], "aggregator_folder": fed["aggregator_folder"],
            "sites": {s: {**published[s], "url": links[s]["url"], "key": links[s]["key"], "bucket": bucket} for s in spec.site_names}}
