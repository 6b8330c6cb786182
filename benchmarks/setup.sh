#!/usr/bin/env bash
# Install what benchmarks/run.py needs beyond the project's own setup (scripts/setup.sh):
# bubblewrap, for the "bwrap + python + pandas" comparison row. Idempotent; run as root.
set -euo pipefail

if command -v bwrap >/dev/null 2>&1; then
    echo "[bench-setup] bubblewrap present: $(bwrap --version)"
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "[bench-setup] error: bwrap is missing and installing it needs root (apt-get install bubblewrap)" >&2
    exit 1
fi
echo "[bench-setup] installing bubblewrap"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends bubblewrap
echo "[bench-setup] $(bwrap --version)"
