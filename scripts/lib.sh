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
