"""The ``gradient-inversion-audit`` flow: can a site's shared update be turned back into its images?

validate spec -> prepare the site's folder -> run the attack inside that site's own process
(``sitekit audit``) -> log the numbers to MLflow -> say plainly which settings leak.

The reconstructions and the figure are written into the site's folder and stay there; the
control plane receives only the numbers the site prints (PSNR, SSIM, baselines, leak flags).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import mlflow  # noqa: E402
from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from flows import tracking  # noqa: E402
from flows.supervisor import FederationFailed, Supervisor  # noqa: E402
from sitekit.engine import openfl_adapter as engine  # noqa: E402
from sitekit.spec import FederationSpec, SpecError, load_spec  # noqa: E402

SITEKIT = ["-m", "sitekit.cli"]


@task(name="prepare-site-folder", cache_policy=NO_CACHE)
def site_folder(spec: FederationSpec, site: str, workspace: str | None) -> tuple[Path, str | None]:
    """The site's participant folder: inside a finished run's workspace (attack its global model),
    or a new one holding only the plan and the site's data setting (attack the initial model)."""
    if workspace:
        folder = Path(workspace) / "sites" / site
        if not (folder / engine.PLAN).exists():
            raise SpecError(f"{workspace}: no site '{site}' in this workspace (expected {folder / engine.PLAN}); "
                            "pass the workspace of a finished run of this federation.")
        model = "models/global.pt" if (folder / "models" / "global.pt").exists() else None
        return folder, model
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    folder = tracking.fedward_home() / "audits" / f"{spec.name}-{stamp}" / "sites" / site
    engine.write_plan(spec, folder, site=site)
    return folder, None


@task(name="attack-at-the-site", cache_policy=NO_CACHE)
def attack_at_site(spec: FederationSpec, site: str, folder: Path, model: str | None, batch_sizes: list[int],
                   iterations: int) -> dict:
    """Run ``sitekit audit`` in the site's folder (its own process) and read back its numbers."""
    args = [*SITEKIT, "audit", "--workspace", ".", "--batch-sizes", ",".join(map(str, batch_sizes)),
            "--iterations", str(iterations)] + (["--model", model] if model else [])
    # bounded: each reconstruction is a fixed number of iterations; allow generously for a loaded machine
    timeout = max(spec.timeouts.round_seconds, 0.25 * iterations * sum(max(1, b // 2) for b in batch_sizes) * 2)
    shown = [0]

    def progress(jobs) -> None:  # the site's new progress lines (never its final report line)
        lines = jobs[0].log_path.read_text(errors="replace").splitlines()
        for line in lines[shown[0]:]:
            if line.startswith(f"[{site}]"):
                print(line, flush=True)
        shown[0] = len(lines)

    with Supervisor() as sup:
        job = sup.start(site, "site-job", args, folder, env={"FEDWARD_TORCH_THREADS": os.environ.get("FEDWARD_TORCH_THREADS", "1")})
        sup.wait_all([job], timeout=timeout, what="the gradient-inversion audit", progress=progress, every=5)
    progress([job])
    lines = [ln for ln in job.log_path.read_text().splitlines() if ln.startswith("{")]
    if not lines:
        raise FederationFailed(f"site '{site}'", f"the audit printed no report (its log: {job.log_path})")
    return json.loads(lines[-1])


def verdict(report: dict) -> list[str]:
    """One plain sentence per (batch size, setting)."""
    out = []
    for r in report["rows"]:
        head = f"batch {r['batch_size']:>2}, {r['setting']:<16}"
        numbers = (f"PSNR {r['psnr']:5.1f} dB (site's mean image {r['baseline_psnr']:4.1f}), "
                   f"SSIM {r['ssim']:.2f} (mean image {r['baseline_ssim']:.2f})")
        if r["leaks"]:
            out.append(f"{head} LEAKS: reconstructions beat the site's mean image; {numbers}")
        else:
            out.append(f"{head} no clear leak: reconstructions no better than the site's mean image; {numbers}")
    return out


def report_markdown(spec: FederationSpec, report: dict) -> str:
    lines = [f"# Gradient-inversion audit: site {report['site']} of {spec.name}", "",
             f"Attack: inverting gradients (Geiping et al. 2020), {report['iterations']} iterations, on the "
             f"{'global' if report['model'] == 'given' else 'initial'} model. A setting leaks when its reconstructions "
             f"beat the site's mean training image by >= {report['leak_rule']['psnr_gain_db']} dB PSNR or "
             f">= {report['leak_rule']['ssim_gain']} SSIM.", "",
             "| batch | setting | noise multiplier | clip | PSNR dB | SSIM | mean-image PSNR | mean-image SSIM | leaks |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['batch_size']} | {r['setting']} | {r['noise_multiplier']:g} | {r['clip']:g} | {r['psnr']:.2f} | "
                     f"{r['ssim']:.3f} | {r['baseline_psnr']:.2f} | {r['baseline_ssim']:.3f} | {'YES' if r['leaks'] else 'no'} |")
    lines += ["", "Images and the figure stay in the site's folder; only these numbers were sent."]
    return "\n".join(lines)


@flow(name="gradient-inversion-audit", log_prints=True)
def audit_flow(spec_path: str, site: str, workspace: str | None = None, batch_sizes: list[int] = (1, 4, 16),
               iterations: int = 1500, summary_path: str | None = None) -> dict:
    """Attack what ``site`` would share, inside that site; log only numbers; return the report."""
    spec = load_spec(spec_path)
    if site not in spec.site_names:
        raise SpecError(f"{spec.path}: there is no site '{site}' (sites: {', '.join(spec.site_names)}).")
    folder, model = site_folder(spec, site, workspace)
    print(f"auditing site '{site}' in its folder {folder} ({'global model of the run' if model else 'initial model'})")
    report = attack_at_site(spec, site, folder, model, list(batch_sizes), iterations)
    tracking.configure(f"fedward/{spec.name}")
    with mlflow.start_run(run_name=f"audit {site} {dt.datetime.now():%Y-%m-%d %H:%M}") as run:
        mlflow.set_tags({"fedward.federation": spec.name, "fedward.audit.site": site, "fedward.kind": "gradient-inversion-audit",
                         "fedward.audit.leaks": ", ".join(f"b{r['batch_size']}/{r['setting']}" for r in report["rows"] if r["leaks"]) or "none"})
        mlflow.log_params({"site": site, "iterations": iterations, "batch_sizes": ",".join(map(str, batch_sizes)),
                           "model": report["model"], "attack": "inverting-gradients (Geiping et al. 2020)",
                           **{f"setting.{r['setting']}": f"{r['kind']} z={r['noise_multiplier']:g} clip={r['clip']:g}"
                              for r in report["rows"]}})
        for r in report["rows"]:
            key = f"audit/b{r['batch_size']}/{r['setting']}"
            mlflow.log_metrics({f"{key}/psnr": r["psnr"], f"{key}/ssim": r["ssim"], f"{key}/baseline_psnr": r["baseline_psnr"],
                                f"{key}/baseline_ssim": r["baseline_ssim"], f"{key}/leaks": float(r["leaks"])})
        mlflow.log_dict(report, "audit/report.json")
        mlflow.log_text(report_markdown(spec, report), "audit/report.md")
        report["mlflow_run_id"] = run.info.run_id
    report["site_folder"] = str(folder)
    sys.stdout.write("\n" + "\n".join(verdict(report)) + "\n" + f"reconstructions and figure: {folder / 'audit'} "
                     "(kept at the site; not sent to MLflow)\n\n")
    sys.stdout.flush()
    if summary_path:
        out = Path(summary_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2))
        os.replace(tmp, out)
    return report
