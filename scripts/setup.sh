#!/bin/sh
# Set-up after `python3.11 -m venv .venv` (the Makefile runs both): the package with every extra
# ([export,demo,test], all pinned), and Debian's
# chromium (used by the test that renders the HTML report in a real headless browser).
set -e
cd "$(dirname "$0")/.."
.venv/bin/pip install -q -e ".[all]"
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get install -y -q chromium >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q chromium >/dev/null; }
fi
echo "set-up done: .venv ready, $(command -v chromium || echo 'chromium NOT installed')"
