#!/usr/bin/env bash
# Memory safety of the C++ CPU ops: builds csrc/ops.cpp + csrc/pymodule.cpp + csrc/cpu/*.cpp once with
# AddressSanitizer and UndefinedBehaviorSanitizer into a temporary copy of the xma2_ops package (as its
# _C module), then runs, under the sanitizers, the raw-op tests of the CPU kernel (test_cpu_kernel.py
# without the layer-API tests, and without its two random-config tests, which the fuzz cases cover),
# the argument and size checks (test_cpp_checks.py) and a few hundred random fuzz cases
# (test_cpp_fuzz.py: raw ops vs xma2_ops.reference.tile_sums on every ISA, plus bad inputs).  Exits non-zero on any
# test failure and on any sanitizer report.
#
# Needs: the Python on PATH (or $PYTHON) with torch, pytest and the package's Python files importable
# (CI: the fresh venv with the editable install), g++ (or $CXX) with libasan/libubsan.
# Knobs: XMA2_FUZZ_CASES (default 200), XMA2_SANITIZE_JOBS (parallel compiles, default nproc).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python}
CXX=${CXX:-g++}
FUZZ_CASES=${XMA2_FUZZ_CASES:-200}
JOBS=${XMA2_SANITIZE_JOBS:-$(nproc 2>/dev/null || echo 2)}
start=$(date +%s)

WORK=$(mktemp -d /tmp/xma2-sanitize.XXXXXX)
if [[ "${XMA2_SANITIZE_KEEP:-0}" == 1 ]]; then
  echo "check_sanitizers: keeping $WORK"
else
  trap 'rm -rf "$WORK"' EXIT
fi

eval "$("$PYTHON" - <<'EOF'
import shlex
import sysconfig

import torch
from torch.utils import cpp_extension

def out(name, value):
    print(f"{name}={shlex.quote(value)}")

out("TORCH_INC", " ".join("-I" + p for p in cpp_extension.include_paths()))
out("TORCH_LIB", cpp_extension.library_paths()[0])
out("ABI", str(int(torch._C._GLIBCXX_USE_CXX11_ABI)))
out("EXT_SUFFIX", sysconfig.get_config_var("EXT_SUFFIX"))
out("PY_INC", sysconfig.get_paths()["include"])
out("OPENMP", "-fopenmp" if torch.backends.openmp.is_available() else "")
EOF
)"

LIBASAN=$("$CXX" -print-file-name=libasan.so)
LIBSTDCXX=$("$CXX" -print-file-name=libstdc++.so.6)
if [[ ! -e "$LIBASAN" || ! -e "$LIBSTDCXX" ]]; then
  echo "check_sanitizers: $CXX has no libasan.so ($LIBASAN) or libstdc++.so.6 ($LIBSTDCXX)" >&2
  exit 1
fi
# The ASan runtime first, then libstdc++ so that its C++ interceptors (__cxa_throw) find the real
# functions: Python itself does not link libstdc++, and torch and Triton throw exceptions.
PRELOAD="$LIBASAN $LIBSTDCXX"

echo "== build with -fsanitize=address,undefined ($CXX, $JOBS jobs)"
SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
CXXFLAGS="-std=c++20 -O1 -g1 -fPIC $SAN $OPENMP -D_GLIBCXX_USE_CXX11_ABI=$ABI $TORCH_INC -I$PY_INC -I$ROOT/csrc"
sources=(csrc/ops.cpp csrc/pymodule.cpp csrc/cpu/*.cpp)
mkdir -p "$WORK/obj"
build_start=$(date +%s)
export CXX CXXFLAGS ROOT WORK
# xargs exits non-zero (and set -e stops here) when any compile fails.
# shellcheck disable=SC2016
printf '%s\n' "${sources[@]}" | xargs -P "$JOBS" -n 1 bash -c '$CXX $CXXFLAGS -c "$ROOT/$1" -o "$WORK/obj/${1//\//_}.o"' _
PKG=$WORK/pkg
mkdir -p "$PKG"
cp -r "$ROOT/xma2_ops" "$PKG/"
find "$PKG/xma2_ops" \( -name '_C*.so' -o -name '__pycache__' \) -prune -exec rm -rf {} +
# shellcheck disable=SC2086
"$CXX" -shared $SAN $OPENMP "$WORK"/obj/*.o -L"$TORCH_LIB" -Wl,-rpath,"$TORCH_LIB" -ltorch -ltorch_cpu -lc10 \
  -o "$PKG/xma2_ops/_C$EXT_SUFFIX"
echo "build: $(( $(date +%s) - build_start )) s"

echo "== raw-op tests and $FUZZ_CASES fuzz cases under the sanitizers"
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:detect_odr_violation=0
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
LOG=$WORK/pytest.log
cd "$PKG"  # not the checkout: `import xma2_ops` must find the sanitized copy (PYTHONPATH first)
set +e
LD_PRELOAD=$PRELOAD PYTHONPATH=$PKG XMA2_FUZZ_CASES=$FUZZ_CASES "$PYTHON" - <<EOF
import xma2_ops._C as c, xma2_ops
assert c.__file__.startswith("$PKG"), c.__file__
print("sanitized build loaded:", c.__file__)
EOF
rc=$?
if [[ $rc -eq 0 ]]; then
  LD_PRELOAD=$PRELOAD PYTHONPATH=$PKG XMA2_FUZZ_CASES=$FUZZ_CASES "$PYTHON" -m pytest -q -p no:cacheprovider \
    --rootdir "$ROOT" -k "not layer and not fused_ops and not random_configs and not bits_do_not_depend" \
    "$ROOT/python_tests/test_cpu_kernel.py" "$ROOT/python_tests/test_cpp_checks.py" \
    "$ROOT/python_tests/test_cpp_fuzz.py" 2>&1 | tee "$LOG"
  rc=${PIPESTATUS[0]}
fi
set -e
if grep -qE "AddressSanitizer|UndefinedBehaviorSanitizer|LeakSanitizer|runtime error:" "$LOG" 2>/dev/null; then
  echo "check_sanitizers: sanitizer report above" >&2
  rc=1
fi
echo "check_sanitizers: rc=$rc, wall time $(( $(date +%s) - start )) s"
exit "$rc"
