#!/usr/bin/env bash
# Set everything up (scripts/setup.sh), then run the tests in two places:
#   1. on this host (cgroup v1 hybrid here): the whole suite, cgroupv2-marked tests included;
#   2. in a pure cgroup-v2 guest (../shared/vm/vmrun, when it exists beside the checkout): the
#      tests marked cgroupv2 only, since the emulated guest is 20-50x slower than the host.
# Exits non-zero if setup fails or either run fails. pytest's "no tests collected" (exit 5) is a
# failure in both runs: a green result must mean tests actually ran.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VMRUN="../shared/vm/vmrun"
PYTEST=(.venv/bin/python -m pytest -q -p no:cacheprovider)

phase() { printf '\n==== %s ====\n' "$*"; }

phase "setup"
bash scripts/setup.sh

verdict() {  # name rc -> prints a line, returns 0 only for a run that passed
    case "$2" in
        0) echo "[test] $1: passed"; return 0 ;;
        5) echo "[test] $1: FAILED: no tests were collected (pytest exit 5)" ;;
        124) echo "[test] $1: FAILED: the guest timed out (vmrun exit 124)" ;;
        125) echo "[test] $1: FAILED: vmrun or the guest failed (vmrun exit 125)" ;;
        *) echo "[test] $1: FAILED (exit $2)" ;;
    esac
    return 1
}

phase "host: pytest tests ($(uname -r), $( [[ -f /sys/fs/cgroup/cgroup.controllers ]] && echo 'cgroup v2' || echo 'cgroup v1/hybrid'))"
host_rc=0
"${PYTEST[@]}" tests || host_rc=$?

guest_rc=skipped
if [[ -x "$VMRUN" ]]; then
    phase "guest: pytest -m cgroupv2 tests in a pure cgroup-v2 VM ($VMRUN)"
    # Count them on the host first: booting a guest only to learn there is nothing to run wastes
    # minutes, and an empty subset is a failure either way.
    collect_rc=0
    n=$("${PYTEST[@]}" --collect-only -m cgroupv2 tests 2>/dev/null | grep -cE '::' ) || collect_rc=$?
    if [[ "${n:-0}" == 0 ]]; then
        echo "[test] guest: no test is marked cgroupv2 (collect exit $collect_rc); nothing would run in the guest"
        guest_rc=5
    else
        echo "[test] guest: $n cgroupv2 test(s); booting the VM (slow: emulated CPU)"
        guest_rc=0
        if "$VMRUN" --setup; then
            "$VMRUN" --timeout 1500 -- "${PYTEST[@]}" -m cgroupv2 tests || guest_rc=$?
        else
            echo "[test] guest: vmrun --setup failed"
            guest_rc=125
        fi
    fi
else
    phase "guest: skipped ($VMRUN not found beside the checkout)"
fi

phase "summary"
ok=0
verdict "host run" "$host_rc" || ok=1
if [[ "$guest_rc" == skipped ]]; then
    echo "[test] guest run: skipped (no $VMRUN)"
else
    verdict "guest run (cgroupv2)" "$guest_rc" || ok=1
fi
exit "$ok"
