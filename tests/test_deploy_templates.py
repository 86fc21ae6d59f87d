"""deploy/k8s-gpu-job-template.json, the Kubernetes work pool's job template of docs/real-run.md.

The Prefect server itself validates a base job template when a pool is created (a `job_configuration` and a
`variables` schema, every `{{ placeholder }}` of the job configuration declared as a variable), and
`prefect work-pool create --type kubernetes` works without prefect-kubernetes installed: so the test creates a
pool from the file on the shared test server, as the guide tells a reader to, and checks that a template with
an undeclared placeholder is refused the same way (the check can fail). What a cluster does with the Job is
not tested here (no cluster).
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest

from flows.local_server import LocalStack

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "deploy" / "k8s-gpu-job-template.json"
PLACEHOLDER = re.compile(r"\{\{\s*([\w.-]+)\s*\}\}")


def test_template_asks_for_gpus_and_declares_every_placeholder():
    t = json.loads(TEMPLATE.read_text(encoding="utf-8"))
    used = set(PLACEHOLDER.findall(json.dumps(t["job_configuration"])))
    declared = set(t["variables"]["properties"])
    assert used <= declared, used - declared
    container = t["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert t["variables"]["properties"]["gpu_count"]["default"] == 1
    assert container["args"] == "{{ command }}" and container["image"] == "{{ image }}"


@pytest.mark.heavy
def test_prefect_work_pool_create_accepts_the_template(prefect_server: LocalStack, tmp_path):
    name = f"k8s-gpu-{uuid.uuid4().hex[:8]}"
    made = prefect_server.prefect("work-pool", "create", name, "--type", "kubernetes", "--base-job-template",
                                  str(TEMPLATE), check=False, timeout=180)
    try:
        assert made.returncode == 0, made.stdout + made.stderr
        shown = prefect_server.prefect("work-pool", "inspect", name, check=False, timeout=120)
        assert shown.returncode == 0 and "nvidia.com/gpu" in shown.stdout, shown.stdout + shown.stderr
    finally:
        prefect_server.prefect("work-pool", "delete", name, check=False, timeout=120)

    bad = json.loads(TEMPLATE.read_text(encoding="utf-8"))
    bad["variables"]["properties"].pop("gpu_count")
    bad_file = tmp_path / "bad.json"
    bad_file.write_text(json.dumps(bad), encoding="utf-8")
    refused = prefect_server.prefect("work-pool", "create", name + "-bad", "--type", "kubernetes",
                                     "--base-job-template", str(bad_file), check=False, timeout=180)
    prefect_server.prefect("work-pool", "delete", name + "-bad", check=False, timeout=120)
    assert refused.returncode != 0 and "gpu_count" in refused.stdout + refused.stderr, refused.stdout + refused.stderr
