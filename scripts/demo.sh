#!/usr/bin/env bash
# Set everything up (scripts/setup.sh), then run the demonstration, examples/demo.py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
echo
exec .venv/bin/python examples/demo.py "$@"
