#!/usr/bin/env bash
# Set up everything zygote needs on a fresh Debian/Ubuntu machine (run as root), idempotently:
#   1. Debian packages: the libraries the layers load or build against, and the tools tests call;
#   2. a Python >= 3.11 virtualenv at ./.venv with this checkout installed editable.
# A second run with nothing to do takes well under a second: apt is skipped when every package is
# installed, pip when the venv's stamp matches the dependency files and the imports work.
#
# Environment: ZYGOTE_PYTHON=/path/to/python3.11 picks the interpreter; ZYGOTE_SETUP_FORCE=1
# reinstalls the venv's packages even when the stamp matches.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
STAMP="$VENV/.zygote-setup-stamp"

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

# ---- which Python -----------------------------------------------------------------------------

# Returns the real interpreter path (not a pyenv shim: shims are bash scripts, slow to start and
# meaningless inside the vmrun guest) of the first candidate that is CPython >= 3.11.
find_python() {
    local cand real
    local -a cands=()
    [[ -n "${ZYGOTE_PYTHON:-}" ]] && cands+=("$ZYGOTE_PYTHON")
    command -v python3.11 >/dev/null 2>&1 && cands+=("$(command -v python3.11)")
    for cand in /root/.pyenv/versions/3.11*/bin/python3.11; do
        [[ -x "$cand" ]] && cands+=("$cand")
    done
    command -v python3 >/dev/null 2>&1 && cands+=("$(command -v python3)")
    [[ -x /usr/bin/python3.11 ]] && cands+=(/usr/bin/python3.11)
    for cand in "${cands[@]}"; do
        real="$("$cand" -c 'import sys; assert sys.version_info >= (3, 11); print(sys.executable)' 2>/dev/null)" \
            || continue
        [[ -n "$real" && -x "$real" ]] && { printf '%s\n' "$real"; return 0; }
    done
    return 1
}

PY="$(find_python)" || die "no Python >= 3.11 found (tried python3.11, /root/.pyenv/versions/3.11*, python3); set ZYGOTE_PYTHON"

# ---- Debian packages --------------------------------------------------------------------------

# libcap-dev: python-prctl compiles against <sys/capability.h>.  libseccomp2: pyseccomp loads
# libseccomp.so.2 with ctypes.  nftables: the egress firewall (nft -j).  iproute2: `ip` for tests
# and debugging of veths/netns.  busybox-static: a static binary tests can exec inside a bare root.
# gcc + python3-dev: python-prctl is built from source (the chosen interpreter's own headers are
# used when it ships them, as pyenv's does).
APT_PKGS=(libcap-dev libseccomp2 nftables iproute2 busybox-static gcc python3-dev ca-certificates)
# Debian's own interpreter has no ensurepip without the python3.X-venv package.
if ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    APT_PKGS+=("python3-venv" "python$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv")
fi

missing=()
for pkg in "${APT_PKGS[@]}"; do
    status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
    [[ "$status" == "install ok installed" ]] || missing+=("$pkg")
done
if ((${#missing[@]})); then
    command -v apt-get >/dev/null || die "apt-get not found; install by hand: ${missing[*]}"
    [[ "$(id -u)" == 0 ]] || die "run as root to install: ${missing[*]}"
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    say "Debian packages: all present"
fi

# ---- the virtualenv ---------------------------------------------------------------------------

# What the venv must be able to import once set up: the two editable packages and what the layers,
# tests and demo use. Any failure here (or a changed dependency file) means pip runs again.
IMPORTS="zygote, zygote_client, trio, anyio, msgspec, cloudpickle, prctl, pyseccomp, pyroute2, structlog, \
numpy, pandas, pytest, pytest_trio, pytest_timeout, hypothesis, distributed"

stamp() {
    {
        printf 'python=%s\n' "$PY"
        sha256sum pyproject.toml client/pyproject.toml scripts/setup.sh
    } | sha256sum | cut -d' ' -f1
}

venv_ok() {
    [[ -x "$VENV/bin/python" ]] || return 1
    [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(stamp)" ]] || return 1
    # Locate (not import: that costs seconds) every module; the editable installs must point at
    # this checkout (a copied tree would otherwise import the original's code).
    "$VENV/bin/python" - "$ROOT" "$IMPORTS" <<'EOF' >/dev/null 2>&1
import importlib.util, os, sys
root = os.path.realpath(sys.argv[1])
for name in sys.argv[2].replace(",", " ").split():
    spec = importlib.util.find_spec(name)
    assert spec is not None, name
    if name.startswith("zygote"):
        assert os.path.realpath(spec.origin).startswith(root + os.sep), spec.origin
EOF
}

compile_sources() {
    # The project's own modules are installed editable, and PYTHONDONTWRITEBYTECODE (set on some
    # machines) keeps Python from caching their bytecode: every daemon, zygote and test process
    # would compile them again (~50 ms a daemon start). Stale files are only recompiled.
    "$VENV/bin/python" -m compileall -q zygote client/zygote_client >/dev/null
}

if [[ "${ZYGOTE_SETUP_FORCE:-0}" != 1 ]] && venv_ok; then
    compile_sources
    say "virtualenv .venv: up to date ($("$VENV/bin/python" -c 'import sys; print(sys.version.split()[0])'))"
    exit 0
fi

make_venv() {
    say "creating virtualenv .venv with $PY"
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
}

pip_install() {
    say "installing the project and its dependencies into .venv (pip)"
    rm -f "$STAMP"
    # The grep drops pip's notes about file:// index locations some machines configure but leave empty.
    "$VENV/bin/python" -m pip --disable-pip-version-check --no-input -q \
        install -e ./client -e '.[test,demo]' 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

imports_work() {  # really import everything once, after an install
    "$VENV/bin/python" - "$ROOT" <<EOF
import os, sys
import $IMPORTS
root = os.path.realpath(sys.argv[1])
for mod in (zygote, zygote_client):
    assert os.path.realpath(mod.__file__).startswith(root + os.sep), f"{mod.__name__} imports from {mod.__file__}"
EOF
}

# Recreate when missing or made from another interpreter (gone, or a machine with another pyenv).
if [[ ! -x "$VENV/bin/python" || "$(realpath "$VENV/bin/python")" != "$(realpath "$PY")" ]]; then
    make_venv
fi
pip_install
if ! imports_work; then
    # pip trusts its metadata: a package whose files were damaged counts as installed. Start over once.
    say "an import failed after pip install; recreating .venv from scratch"
    make_venv
    pip_install
    imports_work || die "the venv was installed but an import failed (see above)"
fi
compile_sources
stamp >"$STAMP"
say "virtualenv .venv: ready ($("$VENV/bin/python" -c 'import sys; print(sys.version.split()[0])'))"
