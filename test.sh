#!/usr/bin/env bash
# test.sh: runs the whole test suite on a Debian machine, installing what it needs first.
# The tests use real parts: a SoftHSM token (softhsm2, made by softhsm-setup.sh), opensc's
# pkcs11-tool, openssl as the independent verifier, p11-kit's server and client module for
# token removal, sqlite3 for tampering with the audit log, make for the install layout, and
# Python with the protobuf package for a client in another language. The full-disk test
# mounts a small tmpfs, so run as root to include it.
set -euo pipefail
cd "$(dirname "$0")"

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
if [ ${#need[@]} -gt 0 ]; then
  echo "test.sh: installing ${need[*]} with apt-get"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

# A private Python environment for the Python client test (Debian's own python3-protobuf is
# older than the generated code needs).
venv=target/test-venv
if ! "$venv/bin/python3" -c 'import google.protobuf, cryptography' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r tests/python/requirements.txt
fi
export SEALGATE_TEST_PYTHON="$PWD/$venv/bin/python3"

cargo test --locked "$@"
