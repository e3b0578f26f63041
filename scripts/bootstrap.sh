#!/usr/bin/env bash
# Prepare this machine for Corral: apt packages, the .venv, host settings and the `base` template.
#
# Idempotent, and fast when there is nothing to do (a few dpkg-query calls, one sha256 and
# `corral setup`, which only checks). Run as root on Debian 12 or Ubuntu; `make setup` calls it.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ "$(id -u)" -ne 0 ]]; then
    echo "bootstrap: must run as root (Corral runs sandboxes with crun as root); try: sudo make setup" >&2
    exit 1
fi

say() { echo "bootstrap: $*"; }

# --- which Python makes the .venv ---------------------------------------------------------------
# Only needed when the .venv does not exist yet. Prefer a python3 >= 3.11 already on PATH;
# fall back to Debian's (bookworm ships 3.11), which needs python3-venv for `-m venv`.
python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }
python=""
need_debian_python=0
if [[ ! -x .venv/bin/python ]]; then
    for candidate in python3 python3.13 python3.12 python3.11; do
        if command -v "$candidate" >/dev/null && python_ok "$candidate"; then
            python="$(command -v "$candidate")"
            break
        fi
    done
    if [[ -z "$python" ]] || [[ "$("$python" -c 'import sys; print(sys.base_prefix)')" == /usr ]]; then
        need_debian_python=1
    fi
fi

# --- apt packages: install only the missing ones -------------------------------------------------
packages=(
    crun             # the default OCI runtime
    catatonit        # pid 1 inside sandboxes on runsc: reaps zombies
    gcc libc6-dev    # builds the sandboxes' own pid 1, the exec agent (native/corral-init.c)
    mmdebstrap       # builds the base template's Debian tree
    debian-archive-keyring  # so mmdebstrap can verify Debian's archive (also on Ubuntu hosts)
    nftables         # NAT and egress policy for the sandbox bridge
    iproute2         # netns, veth, bridge
    uidmap           # subordinate uid/gid ranges for sandbox users
    tmux
    protobuf-compiler  # `make generate`
    ca-certificates
    docker-registry  # tests: a local OCI registry for template pulls
    umoci skopeo     # tests: build and push images into it
    runsc            # gVisor: the optional stronger runtime (`--runtime runsc`)
)
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    packages+=(nodejs npm)  # tests: the official JS SDK smoke test
fi
if [[ "$need_debian_python" -eq 1 ]]; then
    packages+=(python3 python3-venv)
fi
missing=()
for package in "${packages[@]}"; do
    if [[ "$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)" != "install ok installed" ]]; then
        missing+=("$package")
    fi
done
if [[ ${#missing[@]} -gt 0 ]]; then
    say "installing apt packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
    say "installed apt packages: ${missing[*]}"
fi

# --- the .venv ----------------------------------------------------------------------------------
if [[ ! -x .venv/bin/python ]]; then
    if [[ -z "$python" ]]; then
        python=/usr/bin/python3
        python_ok "$python" || { echo "bootstrap: Corral needs Python >= 3.11; $python is older" >&2; exit 1; }
    fi
    say "creating .venv with $python ($("$python" --version 2>&1))"
    "$python" -m venv .venv
fi

# Reinstall only when pyproject.toml changed since the last install.
stamp=.venv/.corral-pyproject.sha256
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [[ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]]; then
    say "installing Corral and its dependencies into .venv (pip install -e '.[dev]')"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
    echo "$want" >"$stamp"
fi

# --- the sandboxes' pid 1 (exec agent) ------------------------------------------------------------
# Static, so it runs inside any template; rebuilt only when its source or flags changed. A new
# binary replaces the old by rename: running sandboxes keep the one they bind-mounted.
init_binary="${CORRAL_INIT_BINARY:-/usr/local/libexec/corral/corral-init}"
init_build=(gcc -static -O2 -Wall -Wextra -s -o "$init_binary.new" native/corral-init.c)
want="$( (cat native/corral-init.c; echo "${init_build[*]}") | sha256sum | cut -d' ' -f1)"
if [[ ! -x "$init_binary" || "$(cat "$init_binary.sha256" 2>/dev/null || true)" != "$want" ]]; then
    say "building the sandbox init (exec agent) $init_binary"
    mkdir -p "$(dirname "$init_binary")"
    "${init_build[@]}"
    mv -f "$init_binary.new" "$init_binary"
    echo "$want" >"$init_binary.sha256"
fi

# The statx shim preloaded in gVisor sandboxes (native/corral-statx.c), next to the init: the
# node binds it read-only into runsc sandboxes (corral.node.runtime.statx_shim).
shim="$(dirname "$init_binary")/corral-statx.so"
shim_build=(gcc -shared -fPIC -O2 -Wall -Wextra -s -o "$shim.new" native/corral-statx.c)
want="$( (cat native/corral-statx.c; echo "${shim_build[*]}") | sha256sum | cut -d' ' -f1)"
if [[ ! -f "$shim" || "$(cat "$shim.sha256" 2>/dev/null || true)" != "$want" ]]; then
    say "building the gVisor statx shim $shim"
    "${shim_build[@]}"
    chmod 0644 "$shim.new"
    mv -f "$shim.new" "$shim"
    echo "$want" >"$shim.sha256"
fi

# --- host settings and the base template -----------------------------------------------------------
exec .venv/bin/corral setup
