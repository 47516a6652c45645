# Sourced by scripts/run and scripts/test: creates or updates the project's virtual
# environment (.venv) with the extras named in $BYZJAX_EXTRAS and activates it.
# uv installs the JAX stack in seconds where pip takes about a minute; without uv
# (and when it cannot be installed) this falls back to venv + pip.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
extras="${BYZJAX_EXTRAS:-}"
spec="."
[ -n "$extras" ] && spec=".[$extras]"
python="${PYTHON:-python3}"
stamp=".venv/.byzjax-installed"
want="$(cat pyproject.toml; echo "$extras")"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/python ]; then
  :  # up to date: nothing to install
else
  if ! command -v uv >/dev/null 2>&1; then
    "$python" -m pip install -q --disable-pip-version-check uv >/dev/null 2>&1 || true
  fi
  if command -v uv >/dev/null 2>&1; then
    [ -x .venv/bin/python ] || uv venv -q --python "$python" .venv
    uv pip install -q --python .venv/bin/python -e "$spec"
  else
    [ -x .venv/bin/python ] || "$python" -m venv .venv
    .venv/bin/python -m pip install -q --disable-pip-version-check -e "$spec"
  fi
  printf '%s' "$want" > "$stamp"
fi
# shellcheck disable=SC1091
source .venv/bin/activate
# Python may cache the bytecode it compiles (an environment that forbids it makes
# every process compile jax's modules again: `import jax` 4.6-5.7 s instead of
# 2.8 s on the 2-core AMD VM, for each test worker and subprocess).
unset PYTHONDONTWRITEBYTECODE
