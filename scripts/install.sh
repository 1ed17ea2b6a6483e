#!/usr/bin/env bash
# Creates a virtual environment and installs dspo_basicsr with its test extra from this checkout.
#   bash scripts/install.sh [VENV_DIR]      (default: .venv)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$here/.venv}
python3 -m venv "$venv"
py="$venv/bin/python"
# The annotation studio's browser tests drive Debian's headless Chromium through its chromedriver.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null
  else
    echo "note: the browser tests need Debian's chromium and chromium-driver (apt-get install chromium chromium-driver as root)"
  fi
fi
pip_install() {
  # Hide pip's notes about index folders of this machine's pip configuration that do not exist.
  "$py" -m pip install -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
pip_install --upgrade "pip<25" wheel
# torch first: basicsr 1.4.2's setup.py imports torch, so it is built without isolation against it.
pip_install -r "$here/requirements-torch.txt" "setuptools>=77,<81" cython numpy
pip_install --no-build-isolation basicsr==1.4.2
pip_install -c "$here/requirements-torch.txt" -e "$here[test]"
echo "installed into $venv"
