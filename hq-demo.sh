#!/usr/bin/env bash
# hq-demo.sh [DIR]: headquarters for the demo site. Run it beside the demo daemon (started by
# the README's command (a), which made DIR, default ./.demo). It makes, under DIR/hq:
#   a private PostgreSQL cluster (initdb + pg_ctl, on 127.0.0.1:${HQ_PG_PORT:-55432}; run as
#     the postgres user when this runs as root), with the database "sealgate", its owner
#     "sealgate" and the role "sealgate_hq" that sealgate-hq serves as;
#   certificates: HQ's for "localhost" from the demo CA, and the site's client certificate;
#   a SoftHSM token "sealgate-hq-witness" with HQ's witness key;
#   hq.toml, enrolling the demo site ("demo") by its certificate and audit key;
# then migrates the schema, starts sealgate-hq on 127.0.0.1:${HQ_PORT:-7443}, headquarters'
# auditors' console on https://127.0.0.1:${HQ_CONSOLE_PORT:-8444}/ (as the role
# "sealgate_console", with the demo console's certificate and auditor), and ships the demo
# daemon's audit log there with `sealctl audit ship --follow` until Ctrl-C, which stops all.
# Idempotent: a second run reuses what the first made.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
demo=${1:-./.demo}
[ -f "$demo/sealgate.toml" ] || { echo "hq-demo: run the README's command (a) first" >&2; exit 1; }
demo=$(cd "$demo" && pwd)
hq="$demo/hq"
mkdir -p "$hq"
say() { printf 'hq-demo: %s\n' "$*"; }
export SOFTHSM2_CONF="$demo/softhsm2.conf"
db="$demo/state/sealgate.db"
[ -f "$db" ] || { echo "hq-demo: start the demo daemon once first ($db is not there)" >&2; exit 1; }

sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  say "installing postgresql with apt-get"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql >/dev/null
fi
pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
cargo build --release --quiet --bin sealgate-hq --bin sealctl --bin sealgate-console
bin=$PWD/target/release

# --- PostgreSQL -------------------------------------------------------------------------------
# PostgreSQL refuses to run as root: as root the cluster belongs to the postgres user, in a
# directory that user can reach.
pg_port=${HQ_PG_PORT:-55432}
if [ "$(id -u)" -eq 0 ]; then
  pgdir=/var/tmp/sealgate-hq-demo
  as_pg() { runuser -u postgres -- "$@"; }
  mkdir -p "$pgdir" && chown postgres: "$pgdir"
else
  pgdir="$hq/postgres"
  as_pg() { "$@"; }
  mkdir -p "$pgdir"
fi
if [ ! -f "$pgdir/data/PG_VERSION" ]; then
  say "making a PostgreSQL cluster in $pgdir/data"
  as_pg "$pgbin/initdb" -D "$pgdir/data" -U sealgate --auth=trust -E UTF8 --locale=C >/dev/null
fi
if ! as_pg "$pgbin/pg_ctl" -D "$pgdir/data" status >/dev/null 2>&1; then
  as_pg "$pgbin/pg_ctl" -D "$pgdir/data" -l "$pgdir/postgres.log" -w \
    -o "-p $pg_port -k $pgdir -c listen_addresses=127.0.0.1" start >/dev/null
fi
psql() { "$pgbin/psql" -h 127.0.0.1 -p "$pg_port" -U sealgate -v ON_ERROR_STOP=1 -Atq "$@"; }
[ "$(psql -d postgres -c "SELECT 1 FROM pg_roles WHERE rolname = 'sealgate_hq'")" = 1 ] ||
  psql -d postgres -c "CREATE ROLE sealgate_hq LOGIN"
[ "$(psql -d postgres -c "SELECT 1 FROM pg_roles WHERE rolname = 'sealgate_console'")" = 1 ] ||
  psql -d postgres -c "CREATE ROLE sealgate_console LOGIN"
[ "$(psql -d postgres -c "SELECT 1 FROM pg_database WHERE datname = 'sealgate'")" = 1 ] ||
  psql -d postgres -c "CREATE DATABASE sealgate OWNER sealgate"

# --- certificates -----------------------------------------------------------------------------
umask 077
if [ ! -f "$hq/hq.crt" ]; then
  say "making HQ's certificate (from the demo CA) and the site's"
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$hq/hq.key" \
    -subj "/O=sealgate demo/CN=localhost" -out "$hq/hq.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n' >"$hq/hq.ext"
  openssl x509 -req -in "$hq/hq.csr" -CA "$demo/ca/ca.crt" -CAkey "$demo/ca/ca.key" \
    -CAcreateserial -days 825 -extfile "$hq/hq.ext" -out "$hq/hq.crt" 2>/dev/null
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$hq/site.key" \
    -subj "/O=sealgate demo/CN=demo site" -days 825 -addext extendedKeyUsage=clientAuth \
    -out "$hq/site.crt" 2>/dev/null
fi
site_fp=$(openssl x509 -in "$hq/site.crt" -outform DER | sha256sum | cut -d' ' -f1)

# --- the witness key ----------------------------------------------------------------------------
module=$(ls /usr/lib/softhsm/libsofthsm2.so /usr/lib/*/softhsm/libsofthsm2.so 2>/dev/null | head -n1)
if ! softhsm2-util --show-slots | grep -q 'Label:.*sealgate-hq-witness'; then
  say "making the token sealgate-hq-witness with HQ's witness key"
  head -c 12 /dev/urandom | od -An -tu1 | tr -dc 0-9 | head -c 8 >"$hq/witness.pin"
  echo >>"$hq/witness.pin"
  wpin=$(head -n1 "$hq/witness.pin")
  softhsm2-util --init-token --free --label sealgate-hq-witness --pin "$wpin" \
    --so-pin "$(head -n1 "$demo/so.pin")" >/dev/null
  pkcs11-tool --module "$module" --token-label sealgate-hq-witness --login --pin "$wpin" \
    --keypairgen --key-type EC:prime256v1 --label hq-witness --usage-sign >/dev/null
fi

# --- configuration, schema, node --------------------------------------------------------------
hq_port=${HQ_PORT:-7443}
cat >"$hq/hq.toml" <<EOF
[hq]
listen = "127.0.0.1:$hq_port"
cert = "$hq/hq.crt"
key = "$hq/hq.key"

[database]
url = "host=127.0.0.1 port=$pg_port user=sealgate_hq dbname=sealgate"

[[site]]
id = "demo"
certificate_sha256 = "$site_fp"
audit_key = "$demo/audit-key.pub.pem"

[witness]
profiles_dir = "$PWD/device-profiles"
key_label = "hq-witness"

[witness.device]
id = "hq-witness"
profile = "softhsm2"
token_label = "sealgate-hq-witness"
pin_file = "$hq/witness.pin"
EOF
"$bin/sealgate-hq" --config "$hq/hq.toml" migrate --grant sealgate_hq \
  --grant-console sealgate_console --url "host=127.0.0.1 port=$pg_port user=sealgate dbname=sealgate"
"$bin/sealgate-hq" --config "$hq/hq.toml" witness-key >"$hq/hq-witness.pub.pem"
"$bin/sealgate-hq" --config "$hq/hq.toml" --log-format text serve 2>>"$hq/sealgate-hq.log" &
node=$!
# Headquarters' console: every enrolled site's verified records, as a role that may only read
# and add its own events; the demo console's certificate and auditor (qian.li).
console_port=${HQ_CONSOLE_PORT:-8444}
cat >"$hq/console.toml" <<EOF
listen = "127.0.0.1:$console_port"
site = "HQ"
tls_cert = "$demo/console/tls.crt"
tls_key = "$demo/console/tls.key"
users = "$demo/console/users.toml"

[hq_database]
url = "host=127.0.0.1 port=$pg_port user=sealgate_console dbname=sealgate"
EOF
"$bin/sealgate-console" --log-format text serve --config "$hq/console.toml" \
  >/dev/null 2>>"$hq/sealgate-console.log" &
console=$!
stop_all() {
  kill "$node" "$console" 2>/dev/null || true
  wait "$node" "$console" 2>/dev/null || true
  as_pg "$pgbin/pg_ctl" -D "$pgdir/data" -m fast stop >/dev/null || true
}
trap stop_all EXIT
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$hq_port") 2>/dev/null && break
  kill -0 $node 2>/dev/null || { cat "$hq/sealgate-hq.log" >&2; exit 1; }
  sleep 0.1
done
say "sealgate-hq serves on 127.0.0.1:$hq_port (log: $hq/sealgate-hq.log)"
say "headquarters' console: https://127.0.0.1:$console_port/ (qian.li; log: $hq/sealgate-console.log)"
say "look at what HQ holds, in another terminal:"
say "  export SEALGATE_HQ_DB=\"host=127.0.0.1 port=$pg_port user=sealgate dbname=sealgate\""
say "  sealctl hq stats; sealctl hq query --kind stamp.completed --limit 5; sealctl hq alerts --follow"
say "  or: $pgbin/psql -h 127.0.0.1 -p $pg_port -U sealgate sealgate"
ship() {
  "$bin/sealctl" audit ship --db "$db" --hq "127.0.0.1:$hq_port" --server-name localhost \
    --ca "$demo/ca/ca.crt" --cert "$hq/site.crt" --key "$hq/site.key" \
    --hq-key "$hq/hq-witness.pub.pem" "$@"
}
say "shipping what the demo log holds"
ship
say "following $db until Ctrl-C"
ship --follow
