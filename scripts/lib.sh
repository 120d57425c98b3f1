# Shared by scripts/check, scripts/demo and .ci/run: create and update the project's
# virtualenv (.venv) idempotently. Source it; do not run it.

# A CPython >= 3.10 on PATH; 3.11 first, the version constraints/dev.txt was resolved on.
pick_python() {
  for candidate in python3.11 python3.12 python3.13 python3.10 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
      command -v "$candidate"
      return 0
    fi
  done
  echo "error: packager needs Python >= 3.10 (none found on PATH)" >&2
  return 1
}

# Install the package (editable) with the pinned dev dependencies; skip when nothing changed.
ensure_venv() {
  local root stamp want python
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  stamp="$root/.venv/.packager-setup"
  want=$(cat "$root/pyproject.toml" "$root/constraints/dev.txt" | sha256sum | cut -d' ' -f1)
  if [ -x "$root/.venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  if [ ! -x "$root/.venv/bin/python" ]; then
    python=$(pick_python)
    echo "setup: creating .venv with $python" >&2
    "$python" -m venv "$root/.venv"
  fi
  # uv installs the ~150 pinned packages in seconds where pip takes minutes.
  "$root/.venv/bin/python" -m pip install --quiet --disable-pip-version-check "uv==0.13.9"
  echo "setup: installing packager and its dev dependencies" >&2
  # --compile-bytecode: packager starts every command with mlflow imports; without pycs
  # (and with PYTHONDONTWRITEBYTECODE, as on CI machines) each run would compile them.
  "$root/.venv/bin/uv" pip install --quiet --compile-bytecode --python "$root/.venv/bin/python" \
    -c "$root/constraints/dev.txt" -e "$root[dev]"
  echo "$want" >"$stamp"
}

# The frameworks users register (TensorFlow/Keras, PyTorch, transformers, XGBoost, LightGBM,
# ONNX, statsmodels) for the flavor tests (tests/server/test_flavors.py): 8.4 GiB installed,
# half of it the CUDA libraries and triton that PyPI's torch and xgboost wheels pull in. So
# they live in their own venv (.venv-flavors) rather than in .venv, which every other test,
# the demo and the lock benchmarks use. Both servers under test run from it; pytest itself
# stays in .venv. Pinned by constraints/flavors.txt; skipped when nothing changed. Needs
# ensure_venv first (its uv).
ensure_flavor_venv() {
  local root venv stamp want python
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  venv="$root/.venv-flavors"
  stamp="$venv/.packager-setup"
  want=$(flavor_venv_digest "$root")
  if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  if [ ! -x "$venv/bin/python" ]; then
    python=$(pick_python)
    echo "setup: creating .venv-flavors with $python" >&2
    "$python" -m venv "$venv"
  fi
  echo "setup: installing the flavor test frameworks into .venv-flavors" \
    "(3.9 GB of wheels the first time)" >&2
  # Bytecode up front: every test starts fresh interpreters that import TensorFlow or torch.
  "$root/.venv/bin/uv" pip install --quiet --compile-bytecode --python "$venv/bin/python" \
    -c "$root/constraints/flavors.txt" -r "$root/constraints/flavors.in" -e "$root[server]"
  echo "$want" >"$stamp"
}

# What .venv-flavors is built from; tests/server/conftest.py computes the same digest to
# refuse a stale environment.
flavor_venv_digest() {
  cat "$1/pyproject.toml" "$1/constraints/flavors.in" "$1/constraints/flavors.txt" |
    sha256sum | cut -d' ' -f1
}
