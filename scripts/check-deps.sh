#!/usr/bin/env bash
# Proves that what install-deps.sh installs covers what the test suite needs, so a missing
# dependency fails here, early and by name, not in the middle of the suite or only on a fresh
# machine:
#   1. every Debian package of APT_PACKAGES (scripts/lib.sh: build tools included) is installed;
#   2. a clean virtual environment (target/check-deps-venv) with ONLY tests/requirements.txt in
#      it (pip's flags as install-deps.sh's) imports every third-party module that tests/e2e,
#      tests/support, bench and docs/tools import (found by parsing them; standard library and
#      the repository's own modules left out) and has the commands the tests run;
#   3. pytest collects tests/e2e in that environment.
# Boots nothing. Used by scripts/test.sh right after the dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

echo "apt packages (scripts/lib.sh):"
missing=()
for p in "${APT_PACKAGES[@]}"; do
  if dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    printf '  %-16s ok\n' "$p"
  else
    printf '  %-16s MISSING\n' "$p"
    missing+=("$p")
  fi
done
if ((${#missing[@]})); then
  echo "not installed: ${missing[*]} (scripts/install-deps.sh installs them)" >&2
  exit 1
fi

venv=target/check-deps-venv
echo "clean virtual environment $venv with only $TEST_REQUIREMENTS:"
mkdir -p target
python3 -m venv --clear "$venv" ||
  { echo "python3 -m venv failed (Debian: apt-get install python3-venv)" >&2; exit 1; }
# The same pip flags as install-deps.sh (a venv needs no --break-system-packages).
"$venv/bin/${PIP_INSTALL[0]}" "${PIP_INSTALL[@]:1}" -r "$TEST_REQUIREMENTS"
"$venv/bin/python" - "$TEST_REQUIREMENTS" <<'EOF'
import sys
from importlib.metadata import distributions, version
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if line:
        name = line.split(";")[0].split("[")[0].rstrip("<>=!~ 0123456789.,*")
        print(f"  {name:24} {version(name)}")
print(f"  ({sum(1 for _ in distributions())} distributions in all, dependencies included)")
EOF

echo "third-party imports of tests/e2e, tests/support, bench, docs/tools:"
"$venv/bin/python" - tests/e2e tests/support bench docs/tools <<'EOF'
import ast
import importlib
import sys
from pathlib import Path

dirs = [Path(d) for d in sys.argv[1:]]
files = sorted(f for d in dirs for f in d.rglob("*.py"))
# The repository's own modules: its packages and every module of the scanned directories (the
# e2e tests import `conftest` and each other by file name).
own = {"tests", "bench", "docs"} | {f.stem for f in files}
found = {}  # dotted module -> files importing it


def note(name, f):
    if name and name.split(".")[0] not in own and name.split(".")[0] not in sys.stdlib_module_names:
        found.setdefault(name, set()).add(str(f))


for f in files:
    for node in ast.walk(ast.parse(f.read_text(), str(f))):
        if isinstance(node, ast.Import):
            for a in node.names:
                note(a.name, f)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            note(node.module, f)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, "id", None) == "__import__"
                   or getattr(node.func, "attr", None) in ("import_module", "importorskip"))):
            note(node.args[0].value, f)

failed = []
for name in sorted(found):
    try:
        importlib.import_module(name)
        print(f"  {name:46} ok")
    except Exception as e:  # noqa: BLE001
        print(f"  {name:46} MISSING ({type(e).__name__}: {e}; imported by {', '.join(sorted(found[name]))})")
        failed.append(name)
if failed:
    sys.exit(f"not importable with only the requirements file installed: {', '.join(failed)} "
             "(add the package that provides it to tests/requirements.txt)")
print(f"  {len(found)} modules from {len(files)} files")
EOF

echo "commands the tests run from the environment:"
for c in pytest schemathesis; do
  [[ -x "$venv/bin/$c" ]] || { echo "  $c MISSING (not installed by $TEST_REQUIREMENTS)" >&2; exit 1; }
  echo "  $c ok"
done

echo "pytest --collect-only tests/e2e in that environment:"
if ! out=$("$venv/bin/python" -m pytest --collect-only -q -p no:cacheprovider tests/e2e 2>&1); then
  echo "$out" >&2
  exit 1
fi
echo "  $(tail -1 <<<"$out")"
echo "dependencies complete"
