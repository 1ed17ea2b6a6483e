#!/usr/bin/env bash
# Creates a virtual environment and installs dspo_basicsr with its test extra from this checkout.
#   bash scripts/install.sh [VENV_DIR]      (default: .venv)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$here/.venv}
python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade "pip<25" wheel
# torch first: basicsr 1.4.2's setup.py imports torch, so it is built without isolation against it.
"$py" -m pip install -q -r "$here/requirements-torch.txt" "setuptools>=77,<81" cython numpy
"$py" -m pip install -q --no-build-isolation basicsr==1.4.2
"$py" -m pip install -q -c "$here/requirements-torch.txt" -e "$here[test]"
echo "installed into $venv"
