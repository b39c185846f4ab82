#!/usr/bin/env bash
# Every CUDA path's tests and the GPU benchmarks in one call, results into benchmarks/GPU.md (and, where
# $OUT is set, as the device machine's tool sets it, a copy there with the logs). From the repository root:
#
#   benchmarks/gpu.sh               on a GPU machine: its steps are capped at 140 + 180 + 60 + 100 s (8 minutes)
#   benchmarks/gpu.sh --cpu-check   every step at toy size on the CPU (the GPU-only ones say "skipped: no CUDA")
#   benchmarks/gpu.sh --download-wheels   on a machine with a registry: fill .whl/ for an offline GPU machine
#
# Python packages. The GPU machine's own torch (a CUDA build) is never replaced: only packages that are
# missing are installed, at the versions constraints.txt pins, and every package already installed is
# pinned to its own version for that install (a CUDA torch 2.11 stays, though constraints.txt pins the
# CPU machines' 2.13). With no registry reachable, they come from the wheels in .whl/ (made here by
# --download-wheels; carried to the machine beside the tree). ae_lab itself is not installed: it runs
# from this tree (PYTHONPATH). MNIST: $AE_LAB_DATA, else ../shared/data, else .gpu_data (a copy of the
# mnist/*.gz files carried beside the tree); without them the on-device test skips and the sweep uses digits.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MODE=gpu
case "${1:-}" in
  --cpu-check) MODE=cpu-check ;;
  --download-wheels) MODE=wheels ;;
  "") ;;
  *) echo "benchmarks/gpu.sh: $1 is not allowed: --cpu-check, --download-wheels or nothing" >&2; exit 2 ;;
esac
[ "${AE_LAB_GPU_CPU_CHECK:-0}" = 1 ] && MODE=cpu-check
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=offline

# what ae_lab's tests and benchmarks need that the H200 image lacks (its package list, .library KINDS.md):
# Hydra and OmegaConf, pure Python (antlr4's runtime is a source archive, built there with its setuptools)
OFFLINE_NEEDS="hydra-core omegaconf antlr4-python3-runtime==4.9.3"
if [ "$MODE" = wheels ]; then
  mkdir -p .whl
  pins=$(for name in $OFFLINE_NEEDS; do grep -i "^${name%%=*}==" constraints.txt || echo "$name"; done)
  exec "$PYTHON" -m pip download --no-deps -d .whl $pins
fi

WORK=$(mktemp -d)
STEPS=$WORK/steps.tsv
: >"$STEPS"
BEGAN=$SECONDS
step() {  # step NAME LIMIT_S COMMAND...: run it, record its status and time
  local name=$1 limit=$2 started=$SECONDS status note
  shift 2
  echo "== $name (at most ${limit} s)"
  timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
  status=$?
  case $status in
    0) note="ok" ;;
    124) note="timed out after ${limit} s" ;;
    *) note="exit code $status: $(tail -n 1 "$WORK/$name.log" | tr '|\t' '  ' | cut -c1-160)" ;;
  esac
  [ $status = 0 ] && status=done || status=failed
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - started))" "$note" >>"$STEPS"
  tail -n 3 "$WORK/$name.log"
}
skipped() {  # skipped NAME REASON
  printf '%s\tskipped\t0\t%s\n' "$1" "$2" >>"$STEPS"
  echo "== $1: skipped: $2"
}

# ----- which torch, and the packages it lacks
CUDA=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo none)
if [ "$CUDA" = none ]; then
  echo "benchmarks/gpu.sh: $PYTHON has no torch; install the GPU machine's CUDA build first" >&2
  exit 1
fi
echo "torch: $("$PYTHON" -c "import torch; print(torch.__version__, 'CUDA', torch.version.cuda, 'available:', torch.cuda.is_available(), torch.__file__)")"
"$PYTHON" - "$WORK/constraints.txt" "$WORK/missing.txt" <<'EOF'
"""Write the install's constraints (constraints.txt, with every installed package pinned to its own
version instead) and the requirements of pyproject.toml (and its test extra) that are not installed."""
import importlib.metadata as metadata, re, sys, tomllib
def name(requirement): return re.split(r"[=<>!~ ;\[]", requirement.strip(), maxsplit=1)[0]
def installed(requirement):
    try: return metadata.version(name(requirement))
    except metadata.PackageNotFoundError: return None
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
needed = project["dependencies"] + project["optional-dependencies"]["test"]
pins = [line.strip() for line in open("constraints.txt") if line.strip() and not line.startswith("#")]
with open(sys.argv[1], "w") as out:
    for pin in pins:
        version = installed(pin)
        out.write(f"{name(pin)}=={version}\n" if version else pin + "\n")
with open(sys.argv[2], "w") as out:
    out.write("\n".join(r for r in needed if installed(r) is None))
EOF
mkdir -p "$WORK/site"
export PYTHONPATH="$PYTHONPATH:$WORK/site"  # where packages go when site-packages is read-only
if [ -s "$WORK/missing.txt" ]; then
  echo "missing: $(tr '\n' ' ' <"$WORK/missing.txt")"
  if [ -d .whl ]; then  # no registry: exactly the carried wheels, their own needs being on the image
    wheels=(.whl/*)
    "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation "${wheels[@]}" >>"$WORK/pip.log" 2>&1 ||
      "$PYTHON" -m pip install -q --target "$WORK/site" --no-index --no-deps --no-build-isolation "${wheels[@]}" \
        >>"$WORK/pip.log" 2>&1 || echo "the wheels in .whl/ could not be installed (see $WORK/pip.log)"
  else  # from the registry, one at a time: one that fails (nothing here needs wandb, say) leaves the others
    while read -r requirement; do
      "$PYTHON" -m pip install -q -c "$WORK/constraints.txt" "$requirement" >>"$WORK/pip.log" 2>&1 ||
        echo "not installed: $requirement (see $WORK/pip.log)"
    done <"$WORK/missing.txt"
  fi
fi
if ! "$PYTHON" -c "import ae_lab.run, ae_lab.apply, ae_lab.export, hydra_plugins.ae_lab_plugins.vectorized_launcher, pytest" 2>"$WORK/import.log"; then
  echo "benchmarks/gpu.sh: ae_lab cannot be imported ($(tail -n 1 "$WORK/import.log")); see $WORK/pip.log" >&2
  exit 1
fi

# ----- data
for candidate in "${AE_LAB_DATA:-}" ../shared/data .gpu_data; do
  if [ -n "$candidate" ] && [ -e "$candidate/mnist/train-images-idx3-ubyte.gz" ]; then
    export AE_LAB_DATA=$(cd "$candidate" && pwd)
    break
  fi
done
[ -n "${AE_LAB_DATA:-}" ] && echo "MNIST: $AE_LAB_DATA/mnist" || echo "MNIST: not found (the on-device test skips; the sweep uses digits)"

# ----- the steps: tests, sweeps, the ensemble step against the hand-written one, eager against compiled
if [ "$MODE" = cpu-check ]; then
  export CUDA_VISIBLE_DEVICES=""  # the check runs on the CPU even on a GPU machine
  step tests 300 "$PYTHON" -m pytest tests/test_gpu.py -m gpu -n 0 -q -p no:cacheprovider -rs
  grep -q "needs CUDA" "$WORK/tests.log" &&
    sed -i 's/^tests\tdone\t\([0-9]*\)\tok$/tests\tskipped: no CUDA\t\1\tevery test of tests\/test_gpu.py, with its reason/' "$STEPS"
  step sweeps 600 "$PYTHON" benchmarks/gpu.py sweeps --toy --output "$WORK/sweeps.md"
  DEVICE=cpu QUICK=--quick
else
  if [ "$CUDA" != 1 ]; then
    echo "benchmarks/gpu.sh: torch sees no GPU here; run benchmarks/gpu.sh --cpu-check for the CPU check" >&2
    exit 1
  fi
  step tests 140 "$PYTHON" -m pytest tests/test_gpu.py -m gpu -n 0 -q -p no:cacheprovider -rs
  step sweeps 180 "$PYTHON" benchmarks/gpu.py sweeps --members 16 64 --basic-cap 16 --output "$WORK/sweeps.md"
  DEVICE=cuda QUICK=
fi
tail -n 25 "$WORK/tests.log" >"$WORK/tests.txt"
if [ -f benchmarks/ensemble_step.py ]; then
  step ensemble_step $([ $MODE = gpu ] && echo 60 || echo 300) "$PYTHON" benchmarks/ensemble_step.py --device $DEVICE $QUICK --output "$WORK/ensemble_step.md"
else
  skipped ensemble_step "benchmarks/ensemble_step.py is not in this tree (the leanstep branch writes it)"
fi
step gpu_step $([ $MODE = gpu ] && echo 100 || echo 300) "$PYTHON" benchmarks/gpu_step.py --device $DEVICE $QUICK --output "$WORK/gpu_step.md"
[ "$MODE" = cpu-check ] && sed -i 's/^\(gpu_step\tdone\t[0-9]*\t\)ok$/\1ok on the CPU; CUDA graphs (reduce-overhead): skipped: no CUDA/' "$STEPS"

"$PYTHON" benchmarks/gpu.py report --mode $MODE --steps "$STEPS" --sections "$WORK" --output benchmarks/GPU.md \
  --seconds $((SECONDS - BEGAN))
echo "== benchmarks/GPU.md written ($((SECONDS - BEGAN)) s in all; logs in $WORK)"
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then  # the device machine's tool brings $OUT back
  cp benchmarks/GPU.md "$OUT/"
  tar -czf "$OUT/gpu-logs.tar.gz" -C "$WORK" .
fi
cat "$STEPS"
