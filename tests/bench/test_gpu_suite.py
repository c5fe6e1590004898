"""bench/gpu_suite.sh: its CPU dry run passes every stage and writes every JSON, and a stage that
runs out of time is reported while the suite goes on."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "bench", "gpu_suite.sh")
STAGES = ["env", "wheels", "install", "extension", "gpu_tests", "kernels", "branching", "iteration"]
RESULT_FILES = {"env.json", "gpu_tests.json", "kernels.json", "branching.json", "iteration.json", "summary.json",
                "suite.log"}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                       reason="needs bash and timeout (GNU coreutils)"),
]


def _suite(out, *args, **env):
    environ = dict(os.environ, PYTHON=sys.executable, **env)
    environ.pop("OUT", None)
    return subprocess.run(["bash", SCRIPT, "--dry-run", "--out", str(out), *args], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=1800)


def test_dry_run_passes_every_stage_and_writes_every_json(tmp_path):
    out = tmp_path / "out"
    # the stage limits guard against hangs; generous ones keep this test independent of machine load
    proc = _suite(out, "--budget", "3000", **{f"LIMIT_{stage}": "600" for stage in STAGES})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "ALL STAGES OK" in proc.stdout
    # what the device tool brings back: at most 8 plain files with plain names
    names = set(os.listdir(out))
    assert names == RESULT_FILES
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names)
    data = {n: json.loads((out / n).read_text()) for n in names if n.endswith(".json")}

    summary = data["summary.json"]
    assert [s["name"] for s in summary["stages"]] == STAGES
    assert all(s["status"] == "ok" for s in summary["stages"]), summary["stages"]
    assert summary["mode"] == "dry" and summary["all_ok"]
    assert set(summary["json_files"]) == {n for n in names if n.endswith(".json") and n != "summary.json"}

    env = data["env.json"]
    assert env["import_failures"] == {}
    assert env["optional_importable"]["datasets"] is False and env["optional_importable"]["math_verify"] is False

    tests = data["gpu_tests.json"]
    assert tests["tests"] > 0 and tests["failures"] == 0 and tests["errors"] == 0

    kernels = data["kernels.json"]
    assert kernels["dry_run"] and kernels["impl"] == "triton" and kernels["wrong"] == 0
    assert {r["method"] for r in kernels["rows"]} >= {"tree", "plain", "torch_sdpa"}
    assert all(0 <= r["rel_err"] <= kernels["error_limit"] and r["floor_us"] > 0 for r in kernels["rows"])
    assert all(" than plain" in c["words"] or "as fast as plain" in c["words"] for c in kernels["comparisons"])

    branching = data["branching.json"]
    assert branching["results"]

    iteration = data["iteration.json"]
    assert set(iteration["results"]) == {"vineppo", "ppo"}
    for algo, r in iteration["results"].items():
        assert r["tokens_as_expected"], algo
        assert r["seconds"]["iteration"] > 0
    assert iteration["results"]["vineppo"]["mc"]["tokens"] == iteration["workload"]["expected_mc_tokens"]

    log = (out / "suite.log").read_text()
    for stage in STAGES:
        assert f"=== stage {stage} (limit" in log


def test_a_stage_out_of_time_is_reported_and_the_suite_goes_on(tmp_path):
    out = tmp_path / "out"
    # the env stage cannot finish in 0.3 s; wheels gets a generous limit so that it passes on a loaded machine
    proc = _suite(out, "--only", "wheels", LIMIT_env="0.3", LIMIT_wheels="600")
    assert proc.returncode == 1
    stages = {s["name"]: s["status"] for s in json.loads((out / "summary.json").read_text())["stages"]}
    assert stages == {"env": "timeout", "wheels": "ok"}
    assert "SOME STAGES FAILED" in proc.stdout
