"""The ``build-site-images`` flow: one collaborator image per site and one aggregator image, through the
Docker Engine API (the ``docker`` package; here podman's Docker-compatible socket), built offline.

validate spec -> base image (from a debootstrap root filesystem when no base is given) -> wheels
(pip download once into a wheelhouse; the fedward wheel built fresh) -> one build context per
image (Dockerfile + wheels + the federation's plan) -> build, tag
``localhost/fedward/<federation>/collaborator:<plan12>-<site>`` -> record every digest in MLflow.

Profiles: ``full`` (torch, OpenFL, MONAI: what ``sitekit join`` and the aggregator run) and ``core``
(no training: ``sitekit --version``, keygen, fetch, approve, preflight). See images/README.md.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows import tracking
from sitekit import bundle as B
from sitekit.engine import openfl_adapter as engine
from sitekit.spec import FederationSpec, load_spec

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "images"
PROFILES = ("core", "full")
BASE_REF = "localhost/fedward/base:bookworm"
DEFAULT_ROOTFS = REPO / ".tools" / "images" / "debian-bookworm-python.tar"


class ImageBuildFailed(RuntimeError):
    """A build through the Docker API failed; the message names the image and the failing step."""


def docker_client(docker_host: str | None = None):
    """A Docker API client: ``docker_host`` or DOCKER_HOST (e.g. unix:///run/podman/podman.sock)."""
    import docker

    url = docker_host or os.environ.get("DOCKER_HOST")
    if not url:
        raise ImageBuildFailed("no Docker API to build with: set DOCKER_HOST (e.g. unix:///PATH/podman.sock from "
                               "'podman system service --time=0 unix:///PATH/podman.sock') or pass docker_host.")
    return docker.DockerClient(base_url=url, timeout=1800)


def collaborator_ref(federation: str, plan_sha: str, site: str) -> str:
    return f"localhost/fedward/{federation}/collaborator:{plan_sha[:12]}-{site}"


def aggregator_ref(federation: str, plan_sha: str) -> str:
    return f"localhost/fedward/{federation}/aggregator:{plan_sha[:12]}"


def _build(client, context: Path, tag: str, base: str, labels: dict[str, str], what: str) -> dict:
    """Build ``context`` through the API; print the steps; return reference, id, digest, size."""
    import docker

    t0 = time.monotonic()
    try:
        image, logs = client.images.build(path=str(context), tag=tag, buildargs={"BASE": base}, labels=labels,
                                          rm=True, forcerm=True, pull=False)
    except docker.errors.BuildError as exc:
        tail = "".join(ln.get("stream", "") for ln in exc.build_log if isinstance(ln, dict))[-1500:]
        raise ImageBuildFailed(f"building {what} ({tag}) failed: {exc.msg}\n{tail}") from None
    except docker.errors.APIError as exc:
        raise ImageBuildFailed(f"building {what} ({tag}): the Docker API refused: {exc.explanation or exc}") from None
    steps = [ln["stream"].strip() for ln in logs if isinstance(ln, dict) and "STEP" in ln.get("stream", "")]
    image.reload()
    digests = image.attrs.get("RepoDigests") or []
    out = {"reference": tag, "id": image.id, "digest": digests[0].split("@", 1)[1] if digests else None,
           "size_bytes": int(image.attrs.get("Size", 0)), "build_seconds": round(time.monotonic() - t0, 1),
           "labels": labels}
    print(f"built {what}: {tag} ({out['size_bytes'] / 1e6:.0f} MB, {len(steps)} steps, {out['build_seconds']:.0f} s)", flush=True)
    return out


@task(name="base-image", cache_policy=NO_CACHE)
def ensure_base_image(client, base_image: str | None, rootfs: str | None) -> str:
    """The image every fedward image starts FROM: ``base_image`` if given, else one made from a
    debootstrap root filesystem (images/make-base-rootfs.sh; no registry needed)."""
    import docker

    if base_image:
        try:
            client.images.get(base_image)
        except docker.errors.ImageNotFound:
            raise ImageBuildFailed(f"base image {base_image} is not in the image store; load it (docker load) or leave "
                                   "base_image unset to build one from a debootstrap root filesystem.") from None
        return base_image
    tar = Path(rootfs) if rootfs else DEFAULT_ROOTFS
    if not tar.exists():
        subprocess.run([str(IMAGES / "make-base-rootfs.sh"), str(tar)], check=True)
    digest = _sha256(tar)[:12]
    ref = f"{BASE_REF}-{digest}"
    try:
        client.images.get(ref)
        return ref
    except docker.errors.ImageNotFound:
        pass
    ctx = tar.parent / f".base-context-{digest}"
    shutil.rmtree(ctx, ignore_errors=True)
    ctx.mkdir(parents=True)
    try:
        _link(tar, ctx / "rootfs.tar")
        shutil.copyfile(IMAGES / "base" / "Dockerfile", ctx / "Dockerfile")
        _build(client, ctx, ref, "scratch", {"org.fedward.role": "base", "org.fedward.rootfs-sha256": _sha256(tar)}, "base image")
    finally:
        shutil.rmtree(ctx, ignore_errors=True)
    return ref


def _sha256(path: Path) -> str:
    return B.sha256_file(path)


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _requirements(profile: str) -> str:
    lines = [ln.split("#", 1)[0].strip() for ln in (IMAGES / f"requirements-{profile}.txt").read_text().splitlines()]
    return "\n".join(ln for ln in lines if ln) + "\n"


@task(name="collect-wheels", cache_policy=NO_CACHE)
def collect_wheels(profile: str, wheelhouse: Path) -> Path:
    """Every wheel the image installs, in one folder: dependencies downloaded once (pinned by
    requirements.lock), the fedward wheel built from this checkout each time."""
    req = _requirements(profile)
    key = hashlib.sha256((req + (REPO / "requirements.lock").read_text()).encode()).hexdigest()[:12]
    deps = wheelhouse / f"{profile}-{key}"
    if not (deps / ".complete").exists():
        print(f"downloading the {profile} profile's wheels into {deps} ...", flush=True)
        shutil.rmtree(deps, ignore_errors=True)
        deps.mkdir(parents=True)
        (deps / "requirements.txt").write_text(req)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", str(deps),
                        "-c", str(REPO / "requirements.lock"), "-r", str(deps / "requirements.txt")], check=True)
        (deps / ".complete").touch()
    own = wheelhouse / "fedward"
    shutil.rmtree(own, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(own), str(REPO)],
                   check=True, stdout=subprocess.DEVNULL)
    return deps


def _context(root: Path, dockerfile: Path, deps: Path, wheelhouse: Path, files: dict[str, bytes]) -> Path:
    shutil.rmtree(root, ignore_errors=True)
    (root / "wheels").mkdir(parents=True)
    shutil.copyfile(dockerfile, root / "Dockerfile")
    for whl in list(deps.glob("*.whl")) + list((wheelhouse / "fedward").glob("*.whl")):
        _link(whl, root / "wheels" / whl.name)
    shutil.copyfile(deps / "requirements.txt", root / "wheels" / "requirements.txt")
    for name, data in files.items():
        (root / "fedward" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "fedward" / name).write_bytes(data)
    return root


@task(name="build-collaborator-image", cache_policy=NO_CACHE)
def build_collaborator(client, spec: FederationSpec, site: str, base: str, profile: str, plan: bytes, cols: bytes,
                       deps: Path, wheelhouse: Path, workdir: Path) -> dict:
    plan_sha = B.plan_sha256(plan)
    info = {"federation": spec.name, "site": site, "plan_sha256": plan_sha, "profile": profile, "role": "collaborator"}
    ctx = _context(workdir / f"collaborator-{site}", IMAGES / "collaborator" / "Dockerfile", deps, wheelhouse,
                   {"plan.yaml": plan, "cols.yaml": cols, "site.json": (json.dumps(info, indent=2) + "\n").encode()})
    labels = {f"org.fedward.{k.replace('_', '-')}": v for k, v in info.items()}
    try:
        return _build(client, ctx, collaborator_ref(spec.name, plan_sha, site), base, labels, f"collaborator image for site '{site}'")
    finally:
        shutil.rmtree(ctx, ignore_errors=True)


@task(name="build-aggregator-image", cache_policy=NO_CACHE)
def build_aggregator(client, spec: FederationSpec, base: str, profile: str, plan: bytes, cols: bytes,
                     deps: Path, wheelhouse: Path, workdir: Path) -> dict:
    plan_sha = B.plan_sha256(plan)
    info = {"federation": spec.name, "plan_sha256": plan_sha, "profile": profile, "role": "aggregator",
            "port": spec.aggregator.port}
    ctx = _context(workdir / "aggregator", IMAGES / "aggregator" / "Dockerfile", deps, wheelhouse,
                   {"plan.yaml": plan, "cols.yaml": cols, "aggregator.json": (json.dumps(info, indent=2) + "\n").encode()})
    labels = {f"org.fedward.{k.replace('_', '-')}": str(v) for k, v in info.items()}
    try:
        return _build(client, ctx, aggregator_ref(spec.name, plan_sha), base, labels, "aggregator image")
    finally:
        shutil.rmtree(ctx, ignore_errors=True)


@flow(name="build-site-images", log_prints=True)
def build_site_images(spec_path: str, profile: str = "full", base_image: str | None = None, rootfs: str | None = None,
                      docker_host: str | None = None, workdir: str | None = None) -> dict:
    """Build the aggregator image and one collaborator image per site for a federation; return (and
    log to MLflow) each image's reference, id and digest."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    spec = load_spec(spec_path)
    plan = engine.plan_text(spec).encode()
    import yaml

    cols = yaml.safe_dump({"collaborators": spec.site_names}).encode()
    plan_sha = B.plan_sha256(plan)
    client = docker_client(docker_host)
    work = Path(workdir) if workdir else tracking.fedward_home() / "images" / spec.name
    wheelhouse = REPO / ".tools" / "wheelhouse"
    print(f"building images for federation '{spec.name}' (plan {plan_sha[:12]}, profile {profile}, "
          f"{len(spec.sites)} sites) through {client.api.base_url}", flush=True)
    tracking.configure(f"fedward/{spec.name}")
    with mlflow.start_run(run_name=f"build-site-images {plan_sha[:12]}"):
        mlflow.set_tags({"fedward.federation": spec.name, "fedward.step": "build-site-images"})
        base = ensure_base_image(client, base_image, rootfs)
        deps = collect_wheels(profile, wheelhouse)
        mlflow.log_params({"plan_sha256": plan_sha, "profile": profile, "base_image": base, "sites": ",".join(spec.site_names),
                           "wheels": len(list(deps.glob("*.whl"))) + 1})
        result = {"federation": spec.name, "plan_sha256": plan_sha, "profile": profile, "base_image": base,
                  "aggregator": build_aggregator(client, spec, base, profile, plan, cols, deps, wheelhouse, work),
                  "sites": {}}
        for s in spec.sites:
            result["sites"][s.name] = build_collaborator(client, spec, s.name, base, profile, plan, cols, deps, wheelhouse, work)
        for name, img in [("aggregator", result["aggregator"]), *result["sites"].items()]:
            mlflow.set_tag(f"image.{name}", f"{img['reference']}@{img['digest']}")
            mlflow.log_metric(f"image_mb.{name}", img["size_bytes"] / 1e6)
        mlflow.log_dict(result, "images/images.json")
    return result
