#!/usr/bin/env bash
# Installs the headless browser that tests/test_web_ui.py drives: Debian's chromium package at
# /usr/bin/chromium. Playwright's own browser downloads are never used (they are not reachable
# from our machines); the tests launch this binary through Playwright's executable_path.
#
#   browser.sh            install chromium unless /usr/bin/chromium already exists
#
# Idempotent: an installed browser is left alone and no package index is fetched. Installing
# needs root (apt-get); without it the script says what to run and exits 1.
set -euo pipefail

CHROMIUM=/usr/bin/chromium

if [[ -x "$CHROMIUM" ]]; then
    exit 0
fi

if [[ "$(id -u)" -ne 0 ]]; then
    echo "browser.sh: $CHROMIUM is missing and installing it needs root;" \
        "run 'sudo apt-get install -y chromium' (Debian) or rerun this script as root" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
install_chromium() {
    apt-get install -y -qq --no-install-recommends chromium >/dev/null
}
# A fresh machine has no package index yet, and an old one may name versions the mirror no
# longer has: fetch the index only then, never on a run that can install without it.
if ! apt-cache show chromium >/dev/null 2>&1; then
    apt-get update -qq
fi
if ! install_chromium; then
    echo "browser.sh: installing from the current package index failed; updating it and retrying" >&2
    apt-get update -qq
    install_chromium
fi

if [[ ! -x "$CHROMIUM" ]]; then
    echo "browser.sh: apt-get installed chromium but $CHROMIUM is still missing" >&2
    exit 1
fi
echo "browser.sh: installed $("$CHROMIUM" --version)"
