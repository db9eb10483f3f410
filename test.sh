#!/usr/bin/env bash
# test.sh: runs the whole test suite on a Debian machine, installing what it needs first.
# The tests use real parts: a SoftHSM token (softhsm2, made by softhsm-setup.sh), opensc's
# pkcs11-tool, openssl as the independent verifier, p11-kit's server and client module for
# token removal, sqlite3 for tampering with the audit log, make for the install layout, and
# Python with the protobuf package for a client in another language (and asn1crypto with
# cryptography, an outside verifier of Ed25519 CMS signatures), and the system's PC/SC
# service (pcscd) with vsmartcard's virtual reader driver, into which the PIV tests insert our
# card emulator; and PostgreSQL's server binaries, for the headquarters tests' own cluster,
# and promtool (prometheus) for HQ's alert rules; Debian's Chromium and chromedriver for the
# console's pages, with a Chinese font.
# The full-disk test mounts a small tmpfs, the storage fault tests mount a FUSE layer of their
# own (/dev/fuse), and pcscd is started if it is not running, so run as root (or with sudo) for
# those.
set -euo pipefail
cd "$(dirname "$0")"

sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo
need=()
command -v softhsm2-util >/dev/null || need+=(softhsm2)
command -v pkcs11-tool >/dev/null || need+=(opensc)
command -v openssl >/dev/null || need+=(openssl)
command -v p11-kit >/dev/null || need+=(p11-kit)
ls /usr/lib/*/pkcs11/p11-kit-client.so >/dev/null 2>&1 || need+=(p11-kit-modules)
command -v sqlite3 >/dev/null || need+=(sqlite3)
command -v make >/dev/null || need+=(make)
command -v python3 >/dev/null || need+=(python3)
python3 -m venv --help >/dev/null 2>&1 || need+=(python3-venv)
pkg-config --exists libpcsclite 2>/dev/null || need+=(pkg-config libpcsclite-dev)
command -v pcscd >/dev/null || [ -x /usr/sbin/pcscd ] || need+=(pcscd)
[ -e /usr/lib/pcsc/drivers/serial/libifdvpcd.so ] || need+=(vsmartcard-vpcd)
# Outside verifiers and the renderer of stamped PDFs.
command -v pdfsig >/dev/null && command -v pdftoppm >/dev/null || need+=(poppler-utils)
command -v qpdf >/dev/null || need+=(qpdf)
# PostgreSQL for the headquarters tests, which start a private cluster with its initdb and
# pg_ctl (run as the package's postgres user when the suite runs as root).
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
# promtool, which tests the alert rules shipped for HQ's metrics.
command -v promtool >/dev/null || need+=(prometheus)
# Headless Chromium and its WebDriver, which the console's end-to-end test drives, and a font
# with Chinese glyphs for its pages (zh-CN is the console's default language).
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
fc-list : family 2>/dev/null | grep -i 'wenquanyi\|noto sans cjk' >/dev/null || need+=(fonts-wqy-microhei)
if [ ${#need[@]} -gt 0 ]; then
  echo "test.sh: installing ${need[*]} with apt-get"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

# pcscd, with the virtual readers of vsmartcard-vpcd (vpcd listens for cards on 127.0.0.1:35963,
# hex 8C7B, and the ports after it). A socket file alone proves nothing: a pcscd that died (or a
# machine image taken while one ran) leaves its socket behind, and every client is then refused.
# So the process named in the pid file must be alive and vpcd's first port open; else the
# leftovers go and pcscd starts afresh. Under systemd, pcscd.socket starts it on demand (the
# PIV tests hold a context while they run, so it stays).
pcscd_pid() {
  local pid
  # pcscd ends its pid file with a NUL byte.
  pid=$(tr -d '\0' 2>/dev/null </run/pcscd/pcscd.pid) || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = pcscd ] && echo "$pid"
}
pcscd_ready() {
  pcscd_pid >/dev/null && [ -S /run/pcscd/pcscd.comm ] &&
    grep -q ':8C7B 00000000:0000 0A' /proc/net/tcp
}
if [ -d /run/systemd/system ] && $sudo systemctl start pcscd.socket 2>/dev/null; then
  :
elif ! pcscd_ready; then
  if pid=$(pcscd_pid); then
    echo "test.sh: restarting pcscd (pid $pid), which has no vpcd reader"
    $sudo kill "$pid"
    for _ in $(seq 50); do pcscd_pid >/dev/null || break; sleep 0.1; done
  fi
  $sudo rm -f /run/pcscd/pcscd.comm /run/pcscd/pcscd.pid
  $sudo /usr/sbin/pcscd
  for _ in $(seq 50); do pcscd_ready && break; sleep 0.1; done
  pcscd_ready || { echo "test.sh: pcscd did not start with vpcd's readers" >&2; exit 1; }
fi

# A private Python environment for the Python client test (Debian's own python3-protobuf is
# older than the generated code needs), the Ed25519 CMS check, pyHanko for stamped PDFs, and
# fido2 for the software passkey of the passkey tests.
venv=target/test-venv
if ! "$venv/bin/python3" -c 'import google.protobuf, cryptography, asn1crypto, pyhanko, fido2, aiosmtpd' 2>/dev/null ||
  [ ! -x "$venv/bin/pyhanko" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r tests/python/requirements.txt
fi
export SEALGATE_TEST_PYTHON="$PWD/$venv/bin/python3"

# Every daemon run of the suite leaves its log (and every failed start its error) in
# target/tmp/daemon-logs, beside the PINs and TOTP seeds the tests used; none may appear there.
logs=target/tmp/daemon-logs
rm -rf "$logs"
cargo test --locked --features failpoints "$@"
if [ -s "$logs/secrets.txt" ]; then
  # Short PINs could match an unrelated number by chance; those are checked by their own tests.
  awk 'length($0) >= 8' "$logs/secrets.txt" | sort -u >"$logs/secrets.8"
  found=$(find "$logs" -name '*.log' -print0 | xargs -0 -r grep -lwF -f "$logs/secrets.8" || true)
  if [ -n "$found" ]; then
    echo "test.sh: a PIN or TOTP seed appears in these daemon logs:" >&2
    echo "$found" >&2
    exit 1
  fi
  echo "test.sh: $(find "$logs" -name '*.log' | wc -l) daemon logs hold none of $(wc -l <"$logs/secrets.8") secrets"
fi
