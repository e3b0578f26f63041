#!/usr/bin/env bash
# Regenerate the Python code for our envd .proto files (spec/envd/**) into
# src/corral/spec/_generated/. The generated files are committed and never edited by hand.
#
#   scripts/generate.sh           regenerate in place (running it twice gives no diff)
#   scripts/generate.sh --check   regenerate into a temp dir and diff; exit 1 on drift
#
# Generators are pinned to the versions that produced the official e2b 2.45.1 SDK's envd code
# (protoc-gen-py 0.1.1 for protobuf-py 0.1.1, protoc-gen-connectrpc 0.11.1 for connectrpc
# 0.11.1). They live in their own venv under build/ so they never touch the project venv.
# protoc itself comes from Debian (apt-get install protobuf-compiler).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROTO_ROOT="$ROOT/spec/envd"
PROTOS=(process/process.proto filesystem/filesystem.proto)
OUT="$ROOT/src/corral/spec/_generated"
TOOLS_VENV="${CORRAL_TOOLS_VENV:-$ROOT/build/tools-venv}"
PLUGINS=("protoc-gen-py==0.1.1" "protoc-gen-connectrpc==0.11.1")
# The protoc the committed output was made with. Another version may serialise the embedded
# descriptors differently, which --check would report as drift.
EXPECTED_PROTOC="libprotoc 3.21.12"

check=0
case "${1:-}" in
  "") ;;
  --check) check=1 ;;
  -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

if ! command -v protoc >/dev/null 2>&1; then
  echo "generate.sh: protoc not found; install it with: apt-get install -y protobuf-compiler" >&2
  exit 2
fi
protoc_version="$(protoc --version)"
if [[ "$protoc_version" != "$EXPECTED_PROTOC" ]]; then
  echo "generate.sh: warning: $protoc_version, committed code was made with $EXPECTED_PROTOC" >&2
fi

# The tools venv: created on first use, re-pinned whenever a plugin version does not match.
tools_ok() {
  [[ -x "$TOOLS_VENV/bin/protoc-gen-py" && -x "$TOOLS_VENV/bin/protoc-gen-connectrpc" ]] || return 1
  "$TOOLS_VENV/bin/python" - "${PLUGINS[@]}" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
for pin in sys.argv[1:]:
    name, _, want = pin.partition("==")
    if version(name) != want:
        sys.exit(1)
PY
}
if ! tools_ok; then
  echo "generate.sh: installing ${PLUGINS[*]} into $TOOLS_VENV" >&2
  python3 -m venv "$TOOLS_VENV"
  "$TOOLS_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PLUGINS[@]}"
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# Paths are given relative to PROTO_ROOT so the descriptors record "process/process.proto",
# and each proto package becomes a Python package (process/, filesystem/) whose connect
# module imports its _pb module relatively.
(
  cd "$PROTO_ROOT"
  protoc \
    --proto_path=. \
    --plugin=protoc-gen-py="$TOOLS_VENV/bin/protoc-gen-py" \
    --plugin=protoc-gen-connectrpc="$TOOLS_VENV/bin/protoc-gen-connectrpc" \
    --py_out="$tmp" \
    --connectrpc_out="$tmp" \
    "${PROTOS[@]}"
)

if (( check )); then
  if diff -r -u --exclude=__pycache__ "$OUT" "$tmp"; then
    echo "generate.sh: generated code is up to date"
    exit 0
  fi
  echo "generate.sh: generated code drifted from spec/envd; run scripts/generate.sh" >&2
  exit 1
fi

rm -rf "$OUT"
mkdir -p "$(dirname "$OUT")"
cp -r "$tmp" "$OUT"
chmod -R u=rwX,go=rX "$OUT"
echo "generate.sh: wrote $OUT"
