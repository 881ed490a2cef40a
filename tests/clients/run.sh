#!/usr/bin/env bash
# Runs the published Zscaler ZIA Python clients (zscaler-sdk-python, pyzscaler; pinned below)
# against the gateway example: login, GET /status, logout. See zia_roundtrip.py's docstring.
# Then once more over https (G3): the gateway with --tls-cert/--tls-key from a CA made here with
# openssl, the clients trusting it through REQUESTS_CA_BUNDLE (and SSL_CERT_FILE for urllib).
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

gateway_err=/dev/null
gateway_log() {
  echo "--- gateway stderr:"
  cat "$gateway_err"
}

# start_gateway NAME [FLAGS...]: start the gateway on a free port with a fresh state
# $work/NAME.db and FLAGS, its output in $work/NAME.out and .err; sets gateway_pid, base_url
# and admin.
start_gateway() {
  local name=$1 port deadline out
  shift
  out="$work/$name.out"
  gateway_err="$work/$name.err"
  port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  say "starting the gateway on 127.0.0.1:$port${*:+ ($*)}"
  "$gateway_bin" --listen "127.0.0.1:$port" --state "$work/$name.db" --org-id "$ORG_ID" --api-key "$API_KEY" --password "$PASSWORD" \
    "$@" >"$out" 2>"$gateway_err" &
  gateway_pid=$!
  deadline=$((SECONDS + 30))
  until grep -q '^base url: ' "$out" 2>/dev/null; do
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
  base_url=$(sed -n 's/^base url: //p' "$out")
  admin=$(sed -n 's/^admin: //p' "$out")
  say "gateway up: base url $base_url, admin $admin"
}

stop_gateway() {
  kill "$gateway_pid" 2>/dev/null || true
  wait "$gateway_pid" 2>/dev/null || true
  gateway_pid=
}

start_gateway state

# Extra environment for the clients (the https round sets the CA here).
client_env=()

# run_clients LOG PASSWORD: run both clients, output to the terminal and LOG; returns their status.
run_clients() {
  env "${client_env[@]}" ZIA_BASE_URL="$base_url" ZIA_USERNAME="$admin" ZIA_PASSWORD="$2" ZIA_API_KEY="$API_KEY" \
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
stop_gateway

say "over https (G3): a CA and a certificate for 127.0.0.1 made with openssl"
if ! command -v openssl >/dev/null 2>&1; then
  say "SKIPPED: the https round trip needs openssl (apt-get install openssl)"
  exit 0
fi
pki="$work/pki"
mkdir -p "$pki"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj "/CN=orgkey clients test CA" -keyout "$pki/ca.key" -out "$pki/ca.pem" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=localhost" \
  -keyout "$pki/key.pem" -out "$pki/server.csr" 2>/dev/null
printf '%s\n' 'subjectAltName=IP:127.0.0.1,DNS:localhost' 'basicConstraints=critical,CA:FALSE' \
  'keyUsage=critical,digitalSignature' 'extendedKeyUsage=serverAuth' \
  'authorityKeyIdentifier=keyid' 'subjectKeyIdentifier=hash' >"$pki/server.ext"
openssl x509 -req -in "$pki/server.csr" -CA "$pki/ca.pem" -CAkey "$pki/ca.key" -CAcreateserial \
  -days 2 -extfile "$pki/server.ext" -out "$pki/cert.pem" 2>/dev/null
start_gateway tls-state --tls-cert "$pki/cert.pem" --tls-key "$pki/key.pem"
case "$base_url" in
  https://*) ;;
  *) say "FAIL: with --tls-cert the base url is $base_url, not https"; gateway_log; exit 1 ;;
esac
client_env=(REQUESTS_CA_BUNDLE="$pki/ca.pem" SSL_CERT_FILE="$pki/ca.pem")
rc=0
run_clients "$work/tls.log" "$PASSWORD" || rc=$?
if [ "$rc" -ne 0 ] || [ "$(tail -n 1 "$work/tls.log")" != "2 passed, 0 failed" ]; then
  say "FAIL: the clients' round trip over https failed (exit $rc)"
  gateway_log
  exit 1
fi
say "ok: both clients pass over https, trusting the test CA"

say "negative check: without the test CA both clients must refuse the certificate"
client_env=()
rc=0
run_clients "$work/tls-untrusted.log" "$PASSWORD" || rc=$?
refused=$(awk '/^--- /{client=$2} /CERTIFICATE_VERIFY_FAILED/{seen[client]=1} END{n=0; for(c in seen) n++; print n}' \
  "$work/tls-untrusted.log")
if [ "$rc" -eq 0 ] || [ "$(tail -n 1 "$work/tls-untrusted.log")" != "0 passed, 2 failed" ] ||
  [ "$refused" -ne 2 ]; then
  say "FAIL: a client accepted the gateway's certificate without the test CA (exit $rc)"
  gateway_log
  exit 1
fi
say "ok: both clients refuse the certificate without the CA"
