#!/usr/bin/env bash
# softhsm-setup.sh [DIR]: a private SoftHSM token with the demo seals, and a daemon
# configuration that uses it. DIR defaults to ./.demo.
#
# Idempotent: every step checks whether its result is already there; a second run changes
# nothing. It makes, under DIR:
#   softhsm2.conf   a private SoftHSM configuration (export SOFTHSM2_CONF=DIR/softhsm2.conf)
#   tokens/         the token "sealgate-demo"
#   user.pin        the token's user PIN (mode 0600); so.pin, its security officer PIN
#   ca/             a demo certificate authority and the seals' certificates
#   approvers/      demo approvers' key pairs (PKCS#8 private keys, SPKI public keys)
#   state/          the daemon's durable state (replay ledger, TOTP state, audit log)
#   audit-key.pub.pem  the audit key's public half, for offline verification
#   images/         the seals' images (red round seals, PNG) that stamped PDFs show
#   contract.pdf    a one-page demo contract to stamp
#   sealgate.toml   the daemon's configuration, with the trust store and seal policies
# The token holds three seals, each a key pair whose private half is sensitive and
# non-extractable, with an X.509 certificate from the demo CA:
#   contract-seal   ECDSA P-256  (合同专用章, contract seal)
#   finance-seal    Ed25519      (财务专用章, finance seal)
#   official-seal   RSA-2048     (公章, official seal)
# an AES key, sealgate-mfa-wrap, that wraps applicants' TOTP secrets, and sealgate-audit
# (ECDSA P-256, sensitive, non-extractable), which signs the audit log's checkpoints; its public
# key is written to audit-key.pub.pem for `sealctl audit verify --key`.
# Demo approvers: zhang.wei (sales department head), liu.yang (finance department head),
# li.na (executive), wang.fang (finance officer).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dir=${1:-./.demo}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
label=sealgate-demo

say() { printf 'softhsm-setup: %s\n' "$*"; }

# --- packages ---------------------------------------------------------------------------------
need=()
command -v softhsm2-util >/dev/null || need+=(softhsm2)
command -v pkcs11-tool >/dev/null || need+=(opensc)
command -v openssl >/dev/null || need+=(openssl)
# Building sealgated links libpcsclite (PIV cards through pcscd), found with pkg-config.
pkg-config --exists libpcsclite 2>/dev/null || need+=(pkg-config libpcsclite-dev)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]} with apt-get"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

module=""
for m in /usr/lib/softhsm/libsofthsm2.so /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so \
         /usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so; do
  if [ -e "$m" ]; then module=$m; break; fi
done
[ -n "$module" ] || { say "no libsofthsm2.so found"; exit 1; }

# --- private SoftHSM configuration and PINs ---------------------------------------------------
umask 077
mkdir -p "$dir/tokens" "$dir/ca"
if [ ! -f "$dir/softhsm2.conf" ]; then
  cat >"$dir/softhsm2.conf" <<EOF
directories.tokendir = $dir/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
EOF
fi
export SOFTHSM2_CONF="$dir/softhsm2.conf"

new_pin() { od -An -N4 -tu4 /dev/urandom | tr -d ' \n' | cut -c1-8; }
[ -s "$dir/user.pin" ] || { new_pin >"$dir/user.pin"; echo >>"$dir/user.pin"; }
[ -s "$dir/so.pin" ] || { new_pin >"$dir/so.pin"; echo >>"$dir/so.pin"; }
pin=$(head -n1 "$dir/user.pin")
so_pin=$(head -n1 "$dir/so.pin")

# --- token ------------------------------------------------------------------------------------
if ! softhsm2-util --show-slots 2>/dev/null | grep -q "Label: *$label *\$"; then
  say "creating token $label"
  softhsm2-util --init-token --free --label "$label" --pin "$pin" --so-pin "$so_pin" >/dev/null
fi

p11() { pkcs11-tool --module "$module" --token-label "$label" --login --pin "$pin" "$@"; }

has_object() { # TYPE LABEL
  p11 --list-objects --type "$1" 2>/dev/null | grep -q "label: *$2\$"
}

# --- demo certificate authority ---------------------------------------------------------------
if [ ! -f "$dir/ca/ca.crt" ]; then
  say "creating the demo certificate authority"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/ca/ca.key" 2>/dev/null
  openssl req -new -x509 -key "$dir/ca/ca.key" -days 3650 -subj "/O=sealgate demo/CN=sealgate demo CA" \
    -out "$dir/ca/ca.crt"
fi

# --- seals ------------------------------------------------------------------------------------
seal() { # LABEL ID KEYTYPE COMMON-NAME
  local name=$1 id=$2 type=$3 cn=$4
  if ! has_object privkey "$name"; then
    say "generating $name ($type) inside the token"
    p11 --keypairgen --key-type "$type" --label "$name" --id "$id" --usage-sign >/dev/null
  fi
  if ! has_object cert "$name"; then
    say "certifying $name with the demo CA"
    local pub="$dir/ca/$name.pub"
    pkcs11-tool --module "$module" --token-label "$label" --read-object --type pubkey \
      --id "$id" -o "$pub.raw" >/dev/null
    # pkcs11-tool writes some key types as PEM and others as DER.
    openssl pkey -pubin -in "$pub.raw" -out "$pub.pem" 2>/dev/null ||
      openssl pkey -pubin -inform DER -in "$pub.raw" -out "$pub.pem"
    openssl req -new -key "$dir/ca/ca.key" -subj "/O=sealgate demo/CN=$cn" -out "$dir/ca/$name.csr"
    printf 'keyUsage=critical,digitalSignature,nonRepudiation\nbasicConstraints=critical,CA:FALSE\n' \
      >"$dir/ca/$name.ext"
    openssl x509 -req -in "$dir/ca/$name.csr" -CA "$dir/ca/ca.crt" -CAkey "$dir/ca/ca.key" \
      -CAcreateserial -force_pubkey "$pub.pem" -days 3650 -extfile "$dir/ca/$name.ext" \
      -out "$dir/ca/$name.crt" 2>/dev/null
    openssl x509 -in "$dir/ca/$name.crt" -outform DER -out "$dir/ca/$name.crt.der"
    p11 --write-object "$dir/ca/$name.crt.der" --type cert --id "$id" --label "$name" >/dev/null
    rm -f "$pub.raw" "$dir/ca/$name.csr" "$dir/ca/$name.ext"
  fi
}
seal contract-seal 01 EC:prime256v1 "contract seal"
seal finance-seal 02 EC:edwards25519 "finance seal"
seal official-seal 03 rsa:2048 "official seal"

if ! has_object secrkey sealgate-mfa-wrap; then
  say "generating the TOTP wrapping key inside the token"
  # (pkcs11-tool warns that it cannot print the sensitive key it made; that is the point)
  p11 --keygen --key-type AES:32 --label sealgate-mfa-wrap --id 10 --sensitive >/dev/null 2>&1
fi

if ! has_object privkey sealgate-audit; then
  say "generating the audit key inside the token"
  p11 --keypairgen --key-type EC:prime256v1 --label sealgate-audit --id 20 --usage-sign >/dev/null
fi
if [ ! -f "$dir/audit-key.pub.pem" ]; then
  pkcs11-tool --module "$module" --token-label "$label" --read-object --type pubkey \
    --id 20 -o "$dir/audit-key.raw" >/dev/null
  openssl pkey -pubin -in "$dir/audit-key.raw" -out "$dir/audit-key.pub.pem" 2>/dev/null ||
    openssl pkey -pubin -inform DER -in "$dir/audit-key.raw" -out "$dir/audit-key.pub.pem"
  rm -f "$dir/audit-key.raw"
fi

# --- seal images ------------------------------------------------------------------------------
# Drawn by `sealctl pdf draw-seal`: $SEALCTL when given, else sealctl built (release) now.
mkdir -p "$dir/images"
for s in contract finance official; do
  if [ ! -s "$dir/images/$s.png" ]; then
    say "drawing the $s seal's image"
    if [ -n "${SEALCTL:-}" ]; then
      "$SEALCTL" pdf draw-seal --out "$dir/images/$s.png"
    else
      (cd "$here" && cargo run -q --release --bin sealctl -- pdf draw-seal --out "$dir/images/$s.png")
    fi
  fi
done

# --- a demo contract (PDF 1.7, written by hand: six objects and their cross-reference table) --
if [ ! -s "$dir/contract.pdf" ]; then
  say "writing a demo contract, contract.pdf"
  LC_ALL=C
  text="BT /F1 20 Tf 72 760 Td (Supply contract 2026-118) Tj 0 -30 Td /F1 12 Tf (Between Shanghai Sealgate Trading Co. and Shenzhen Parts Ltd.) Tj ET"
  objs=(
    "<< /Type /Catalog /Pages 2 0 R >>"
    "<< /Type /Pages /Kids [3 0 R] /Count 1 /MediaBox [0 0 595 842] >>"
    "<< /Type /Page /Parent 2 0 R /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>"
    "<< /Length ${#text} >>
stream
$text
endstream"
    "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"
  )
  body="%PDF-1.7
"
  offsets=()
  for i in "${!objs[@]}"; do
    offsets+=("${#body}")
    body+="$((i + 1)) 0 obj
${objs[$i]}
endobj
"
  done
  xref=${#body}
  body+="xref
0 $((${#objs[@]} + 1))
0000000000 65535 f 
"
  for o in "${offsets[@]}"; do body+=$(printf '%010d 00000 n \n' "$o"); body+="
"; done
  body+="trailer
<< /Size $((${#objs[@]} + 1)) /Root 1 0 R >>
startxref
$xref
%%EOF
"
  printf '%s' "$body" >"$dir/contract.pdf"
  unset LC_ALL
fi

# --- demo approvers ---------------------------------------------------------------------------
mkdir -p "$dir/approvers"
approver() { # ID ALGORITHM
  local id=$1 alg=$2
  if [ ! -f "$dir/approvers/$id.key" ]; then
    say "making approver key $id ($alg)"
    if [ "$alg" = ed25519 ]; then
      openssl genpkey -algorithm ED25519 -out "$dir/approvers/$id.key"
    else
      openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/approvers/$id.key"
    fi
    openssl pkey -in "$dir/approvers/$id.key" -pubout -out "$dir/approvers/$id.pub.pem"
  fi
}
approver zhang.wei ed25519
approver liu.yang ed25519
approver li.na p256
approver wang.fang p256

# --- daemon configuration ---------------------------------------------------------------------
if [ ! -f "$dir/sealgate.toml" ]; then
  uid=$(id -u)
  root_line="allow_root = false"
  # The office application and the administrator are different callers: an office app that
  # could also enroll or reset applicants' TOTP would hold both factors of the official seal.
  # The administrator is root (run its commands with sudo), unless the demo itself runs as root.
  admin_caller="[[caller]]
name = \"demo-admin\"
uids = [0]
seals = []
admin = true
# The auditors' console (sealgate-console, run with sudo in the demo) records auditors' logins,
# searches and acknowledgements through this caller.
oversight = true"
  office_admin=false
  if [ "$uid" -eq 0 ]; then
    root_line="allow_root = true   # set up as root for the demo; run as a dedicated user in production"
    # One uid cannot be two callers: as root, the office app is also the administrator here.
    admin_caller="# Set up as root: root is the office app and the administrator alike. Run the demo as
# another user to have them apart, as any real installation must."
    office_admin=true
  fi
  cat >"$dir/sealgate.toml" <<EOF
# sealgate demo configuration, written by softhsm-setup.sh.
[daemon]
socket = "$dir/sealgated.sock"
profiles_dir = "$here/device-profiles"
state_dir = "$dir/state"
max_frame_bytes = 1048576
max_connections = 64
request_timeout_ms = 5000
$root_line

# The office application: the user who ran the set-up may use every demo seal.
[[caller]]
name = "demo-office-app"
uids = [$uid]
seals = ["contract", "finance", "official"]
admin = $office_admin
oversight = $office_admin

# The administrator: enrolls and resets applicants' TOTP, follows alerts; stamps nothing.
$admin_caller

[[device]]
id = "demo-hsm"
profile = "softhsm2"
token_label = "$label"
pin_file = "$dir/user.pin"
wrap_key_label = "sealgate-mfa-wrap"

# Applicants' TOTP secrets are wrapped by an AES key inside the demo token.
[mfa]
device = "demo-hsm"
max_failures = 5

# The audit log's checkpoints are signed by a key of its own inside the token.
[audit]
device = "demo-hsm"
key_label = "sealgate-audit"
algorithm = "ecdsa-p256-sha256"

# Anomaly rules: each raises an alert record, a WARN log line, and an event for
# \`sealctl alerts --follow\`.
[audit.alerts]
working_hours = "08:00-20:00"
working_days = ["mon", "tue", "wed", "thu", "fri"]
timezone = "Asia/Shanghai"
burst_count = 30
burst_window_seconds = 60
denial_spike_count = 10
denial_spike_window_seconds = 60

# The approval pages whose passkey approvals count (docs/approvals.md): the console's own, and
# the page the walk-through's software passkey names.
[webauthn]
origins = ["https://localhost:8443", "https://approvals.demo.test"]

# The trust store: who may approve, in which role and department.
[[approver]]
id = "zhang.wei"
name = "张伟"
role = "dept_head"
department = "sales"
public_key_file = "approvers/zhang.wei.pub.pem"

[[approver]]
id = "liu.yang"
name = "刘洋"
role = "dept_head"
department = "finance"
public_key_file = "approvers/liu.yang.pub.pem"

[[approver]]
id = "li.na"
name = "李娜"
role = "executive"
department = "management"
public_key_file = "approvers/li.na.pub.pem"

[[approver]]
id = "wang.fang"
name = "王芳"
role = "finance"
department = "finance"
public_key_file = "approvers/wang.fang.pub.pem"

[[seal]]
id = "contract"
name = "合同专用章 (contract seal)"
device = "demo-hsm"
key_label = "contract-seal"
image = "images/contract.png"
algorithm = "ecdsa-p256-sha256"

# Contracts of CNY 100,000.00 or more: the applicant's department head, then an executive.
[[seal.rule]]
name = "large contracts"
doc_types = ["contract"]
currency = "CNY"
amount_min = 10000000
# A contract approval without an amount is refused, not taken as a small contract.
amount_required = true
levels = ["dept_head", "executive"]
dept_scoped = ["dept_head"]
# A rule may also limit hours, e.g. hours = "08:00-20:00" with timezone = "Asia/Shanghai".

# Smaller contracts: the applicant's department head.
[[seal.rule]]
name = "contracts"
doc_types = ["contract"]
levels = ["dept_head"]
dept_scoped = ["dept_head"]

[[seal]]
id = "finance"
name = "财务专用章 (finance seal)"
device = "demo-hsm"
key_label = "finance-seal"
image = "images/finance.png"
algorithm = "ed25519"

# Invoices: a finance officer; at most 200 an hour per applicant.
[[seal.rule]]
name = "invoices"
doc_types = ["invoice"]
levels = ["finance"]
rate_limit_count = 200
rate_limit_window_seconds = 3600

[[seal]]
id = "official"
name = "公章 (official seal)"
device = "demo-hsm"
key_label = "official-seal"
image = "images/official.png"
algorithm = "rsa-pss-sha256"

# The official seal: department head then executive, and the applicant's TOTP code.
[[seal.rule]]
name = "official use"
levels = ["dept_head", "executive"]
dept_scoped = ["dept_head"]
mfa = true
EOF
fi

# --- alert delivery ---------------------------------------------------------------------------
# `sealctl notify --config DIR/notify.toml` sends the demo's alerts to a webhook on
# 127.0.0.1:8765, signed with the key in DIR/notify/webhook.secret (see README, "Alert delivery").
if [ ! -f "$dir/notify.toml" ]; then
  say "writing the alert delivery configuration, notify.toml"
  mkdir -p "$dir/notify"
  [ -f "$dir/notify/webhook.secret" ] || od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$dir/notify/webhook.secret"
  chmod 600 "$dir/notify/webhook.secret"
  cat >"$dir/notify.toml" <<EOF
site = "demo"
db = "state/sealgate.db"
outbox = "notify/outbox.db"

[[channel]]
id = "demo-webhook"
kind = "webhook"
url = "http://127.0.0.1:8765/hook"
secret_file = "notify/webhook.secret"

[[route]]
channels = ["demo-webhook"]
EOF
fi

# --- the auditors' console ---------------------------------------------------------------------
# `sealgate-console serve --config DIR/console.toml` serves the log on https://127.0.0.1:8443/
# with a certificate of the demo CA; the auditor qian.li (钱丽) logs in with the password in
# DIR/console/qian.li.password and the TOTP code of the enrolment printed to
# DIR/console/qian.li.enrolment.json (see README, "The auditors' console").
if [ ! -f "$dir/console.toml" ]; then
  say "writing the console configuration, console.toml, its certificate and its auditor"
  uid=$(id -u)
  mkdir -p "$dir/console"
  chmod 700 "$dir/console"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/console/tls.key" 2>/dev/null
  openssl req -new -key "$dir/console/tls.key" -subj "/O=sealgate demo/CN=localhost" \
    -out "$dir/console/tls.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >"$dir/console/tls.ext"
  openssl x509 -req -in "$dir/console/tls.csr" -CA "$dir/ca/ca.crt" -CAkey "$dir/ca/ca.key" \
    -CAcreateserial -days 825 -extfile "$dir/console/tls.ext" -out "$dir/console/tls.crt" 2>/dev/null
  rm -f "$dir/console/tls.csr" "$dir/console/tls.ext"
  [ -f "$dir/console/qian.li.password" ] ||
    od -An -tx1 -N12 /dev/urandom | tr -d ' \n' >"$dir/console/qian.li.password"
  chmod 600 "$dir/console/qian.li.password"
  add_user=(add-user --users "$dir/console/users.toml" --name qian.li --role auditor
    --password-file "$dir/console/qian.li.password" --json)
  if [ -n "${SEALGATE_CONSOLE:-}" ]; then
    "$SEALGATE_CONSOLE" "${add_user[@]}" >"$dir/console/qian.li.enrolment.json"
  else
    (cd "$here" && cargo run -q --release --bin sealgate-console -- "${add_user[@]}") \
      >"$dir/console/qian.li.enrolment.json"
  fi
  chmod 600 "$dir/console/qian.li.enrolment.json"
  cat >"$dir/console.toml" <<EOF
listen = "127.0.0.1:8443"
site = "demo"
db = "state/sealgate.db"
socket = "sealgated.sock"
# The console runs as root in the demo (the caller demo-admin); the daemon as $(id -un).
daemon_uid = $uid
tls_cert = "console/tls.crt"
tls_key = "console/tls.key"
users = "console/users.toml"
audit_key = "audit-key.pub.pem"
outbox = "notify/outbox.db"

# The approval page (docs/approvals.md): approvers register a passkey after
# \`sealgate-console invite\` and approve at https://localhost:8443/approvals.
[approvals]
rp_id = "localhost"
origin = "https://localhost:8443"
approvers = "console/approvers.toml"
EOF
fi

say "ready in $dir"
cat <<EOF
Start the daemon:
  SOFTHSM2_CONF=$dir/softhsm2.conf cargo run --release --bin sealgated -- --config $dir/sealgate.toml
Its socket: $dir/sealgated.sock   (for sealctl: export SEALGATE_SOCKET=$dir/sealgated.sock)
EOF
