#!/usr/bin/env bash
# systemd/check.sh SEALGATED_BINARY: checks the shipped units with systemd's own tools.
# `systemd-analyze verify` must be clean and the offline security exposure of each service must
# be 2.0 or better, and no service may leave core dumps (they would hold PINs and keys). The
# units name /usr/bin/sealgated, sealgate-hq, sealgate-console and sealctl; the check points them at the binaries
# beside the given one.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=$(realpath "${1:?usage: systemd/check.sh PATH-TO-sealgated}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
bindir=$(dirname "$bin")
for unit in sealgated.service sealgated.socket sealgate-hq.service sealgate-ship.service \
  sealgate-notify.service sealgate-console.service; do
  sed -e "s|/usr/bin/sealgated|$bin|" -e "s|/usr/bin/sealgate-hq|$bindir/sealgate-hq|" \
    -e "s|/usr/bin/sealctl|$bindir/sealctl|" \
    -e "s|/usr/bin/sealgate-console|$bindir/sealgate-console|" "$here/$unit" >"$work/$unit"
done
cd "$work"
touch ship.env
sed -i "s|/etc/sealgate/ship.env|$work/ship.env|" sealgate-ship.service
for service in sealgated sealgate-hq sealgate-ship sealgate-notify sealgate-console; do
  grep -qx 'LimitCORE=0' $service.service || { echo "$service.service must set LimitCORE=0"; exit 1; }
done
out=$(systemd-analyze verify ./sealgated.socket ./sealgated.service ./sealgate-hq.service \
  ./sealgate-ship.service ./sealgate-notify.service ./sealgate-console.service 2>&1) || { echo "$out"; exit 1; }
[ -z "$out" ] || { echo "systemd-analyze verify is not clean:"; echo "$out"; exit 1; }
for service in sealgated sealgate-hq sealgate-ship sealgate-notify sealgate-console; do
  score=$(systemd-analyze security --offline=true ./$service.service 2>&1 |
    sed -n "s/.*Overall exposure level for $service.service: \([0-9.]*\).*/\1/p")
  [ -n "$score" ] || { echo "no exposure score for $service.service"; exit 1; }
  echo "systemd: $service.service verify clean, exposure $score"
  awk -v s="$score" 'BEGIN { exit !(s <= 2.0) }' || { echo "$service: exposure $score is worse than 2.0"; exit 1; }
done
