#!/usr/bin/env bash
# Runs the published Zscaler ZIA Python clients (zscaler-sdk-python, pyzscaler; pinned below)
# against the gateway example: login, GET /status, logout. See zia_roundtrip.py's docstring.
#
#   bash tests/clients/run.sh
#
# Virtualenvs live in $ORGKEY_PYCLIENTS_DIR (default ~/.cache/orgkey-pyclients) and are reused;
# pip runs only when a pinned version is missing. The gateway is built into $CARGO_TARGET_DIR
# (default ~/.cache/orgkey-target, as in .ci/run). Needs python3 (with venv) and network
# access to PyPI on the first run.
set -euo pipefail
cd "$(dirname "$0")/../.."

# Exact pins: an unpinned zscaler-sdk-python silently resolves to 0.1.6.
ZSCALER_SDK_PYTHON_VERSION=1.11.3
PYZSCALER_VERSION=1.6.0

PYTHON="${PYTHON:-python3}"
CLIENTS_DIR="${ORGKEY_PYCLIENTS_DIR:-$HOME/.cache/orgkey-pyclients}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/orgkey-target}"
SCRIPT=tests/clients/zia_roundtrip.py

# Fixed test credentials for a throwaway gateway on loopback.
ORG_ID=acme
API_KEY=CiTestKey123
PASSWORD='ci-test-password-0123'
WRONG_PASSWORD='not-the-password-0123'

say() { printf '[clients] %s\n' "$*"; }

# ensure_venv DIR PACKAGE VERSION: make DIR a venv holding PACKAGE==VERSION.
ensure_venv() {
  local dir=$1 package=$2 version=$3 installed
  if ! "$dir/bin/python" -c '' 2>/dev/null; then
    say "creating venv $dir"
    rm -rf "$dir"
    "$PYTHON" -m venv "$dir"
  fi
  installed=$("$dir/bin/python" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' \
    "$package" 2>/dev/null || true)
  if [ "$installed" = "$version" ]; then
    say "$package==$version already in $dir"
  else
    say "installing $package==$version into $dir${installed:+ (had $installed)}"
    "$dir/bin/python" -m pip install --disable-pip-version-check -q "$package==$version"
  fi
}

mkdir -p "$CLIENTS_DIR"
ensure_venv "$CLIENTS_DIR/zscaler-sdk-python" zscaler-sdk-python "$ZSCALER_SDK_PYTHON_VERSION"
ensure_venv "$CLIENTS_DIR/pyzscaler" pyzscaler "$PYZSCALER_VERSION"

say "building the gateway example (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
cargo build --example gateway
gateway_bin="$CARGO_TARGET_DIR/debug/examples/gateway"

work=$(mktemp -d)
gateway_pid=
cleanup() {
  if [ -n "$gateway_pid" ] && kill -0 "$gateway_pid" 2>/dev/null; then
    say "stopping the gateway (pid $gateway_pid)"
    kill "$gateway_pid" 2>/dev/null || true
    wait "$gateway_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
say "starting the gateway on 127.0.0.1:$port"
"$gateway_bin" --listen "127.0.0.1:$port" --state "$work/state.db" --org-id "$ORG_ID" --api-key "$API_KEY" --password "$PASSWORD" \
  >"$work/gateway.out" 2>"$work/gateway.err" &
gateway_pid=$!

gateway_log() {
  echo "--- gateway stderr:"
  cat "$work/gateway.err"
}

deadline=$((SECONDS + 30))
until grep -q '^base url: ' "$work/gateway.out"; do
  if ! kill -0 "$gateway_pid" 2>/dev/null; then
    say "FAIL: the gateway exited before printing its base url"
    gateway_log
    exit 1
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    say "FAIL: the gateway printed no base url within 30 s"
    gateway_log
    exit 1
  fi
  sleep 0.1
done
base_url=$(sed -n 's/^base url: //p' "$work/gateway.out")
admin=$(sed -n 's/^admin: //p' "$work/gateway.out")
say "gateway up: base url $base_url, admin $admin"

# run_clients LOG PASSWORD: run both clients, output to the terminal and LOG; returns their status.
run_clients() {
  env ZIA_BASE_URL="$base_url" ZIA_USERNAME="$admin" ZIA_PASSWORD="$2" ZIA_API_KEY="$API_KEY" \
    ZIA_LIBS=zscaler,pyzscaler ZIA_LENIENT_LOGOUT=1 \
    ZIA_SDK_PYTHON="$CLIENTS_DIR/zscaler-sdk-python/bin/python" \
    PYZSCALER_PYTHON="$CLIENTS_DIR/pyzscaler/bin/python" \
    NO_PROXY="127.0.0.1,localhost${NO_PROXY:+,$NO_PROXY}" no_proxy="127.0.0.1,localhost${no_proxy:+,$no_proxy}" \
    "$PYTHON" "$SCRIPT" >"$1" 2>&1
  local rc=$?
  cat "$1"
  return "$rc"
}

say "round trip with both clients (ZIA_LENIENT_LOGOUT=1)"
rc=0
run_clients "$work/good.log" "$PASSWORD" || rc=$?
if [ "$rc" -ne 0 ] || [ "$(tail -n 1 "$work/good.log")" != "2 passed, 0 failed" ]; then
  say "FAIL: the clients' round trip failed (exit $rc)"
  gateway_log
  exit 1
fi

say "negative check: the same run with a wrong password must fail for both clients"
rc=0
run_clients "$work/bad.log" "$WRONG_PASSWORD" || rc=$?
# Both must fail, at login (no "login ok"), with the gateway's 401 (not, say, a refused connection).
rejected=$(awk '/^--- /{client=$2} /AUTHENTICATION_FAILED/{seen[client]=1} END{n=0; for(c in seen) n++; print n}' \
  "$work/bad.log")
if [ "$rc" -eq 0 ] || [ "$(tail -n 1 "$work/bad.log")" != "0 passed, 2 failed" ] ||
  grep -q 'login ok' "$work/bad.log" || [ "$rejected" -ne 2 ]; then
  say "FAIL: a wrong password did not make both clients fail with AUTHENTICATION_FAILED (exit $rc)"
  gateway_log
  exit 1
fi
if ! kill -0 "$gateway_pid" 2>/dev/null; then
  say "FAIL: the gateway died during the checks"
  gateway_log
  exit 1
fi

say "ok: both clients pass against the gateway, and fail with a wrong password"
