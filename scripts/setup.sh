#!/usr/bin/env bash
# Install what deploy needs on a Debian machine (run as root): system packages when missing,
# then a virtual environment in .venv with deploy and its test tools installed into it.
set -euo pipefail
cd "$(dirname "$0")/.."

# --test: also what the test suite uses (systemd-analyze to verify the unit files, ss, and
# Debian's prometheus: a real server scraping the daemons, promtool checking their metrics).
with_tests=0
[ "${1:-}" = "--test" ] && with_tests=1

need=()
command -v rsync >/dev/null 2>&1 || need+=(rsync)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v setsid >/dev/null 2>&1 || need+=(util-linux)
command -v python3 >/dev/null 2>&1 || need+=(python3)
if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    need+=(python3-venv)
fi
if [ "$with_tests" = 1 ]; then
    command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
    command -v ss >/dev/null 2>&1 || need+=(iproute2)
    # curl: the TLS probe test; setpriv and mount: the local-user and full-disk tests
    command -v curl >/dev/null 2>&1 || need+=(curl)
    command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
    command -v mount >/dev/null 2>&1 || need+=(mount)
fi
if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ "$with_tests" = 1 ] && ! command -v promtool >/dev/null 2>&1; then
    echo "setup: installing prometheus" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Without its recommends (a node exporter, a web UI): the tests start the server themselves.
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

python3 - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"setup: deploy needs Python 3.11 or newer, this is {sys.version.split()[0]}")
PY

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
log=$(mktemp)
pip_install() {
    if ! .venv/bin/python -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1; then
        cat "$log" >&2
        echo "setup: pip install $* failed" >&2
        exit 1
    fi
}
# A regular (not editable) install, as an operator gets it: the twistd plugin file goes into
# site-packages/twisted/plugins and the `deploy-client` script into .venv/bin.
pip_install --force-reinstall --no-deps .
pip_install ".[test]"
rm -f "$log"
# Regenerate the plugin cache so `twistd --help` lists deploy-agent and deploy-proxy.
.venv/bin/python -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
echo "setup: ready in .venv" >&2
