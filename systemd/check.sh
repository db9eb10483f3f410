#!/usr/bin/env bash
# systemd/check.sh SEALGATED_BINARY: checks the shipped units with systemd's own tools.
# `systemd-analyze verify` must be clean and the offline security exposure must be 2.0 or
# better, and the service must not leave core dumps (they would hold PINs). The units name
# /usr/bin/sealgated; the check points them at the given binary.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=$(realpath "${1:?usage: systemd/check.sh PATH-TO-sealgated}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sed "s|/usr/bin/sealgated|$bin|" "$here/sealgated.service" >"$work/sealgated.service"
cp "$here/sealgated.socket" "$work/"
cd "$work"
grep -qx 'LimitCORE=0' sealgated.service || { echo "sealgated.service must set LimitCORE=0"; exit 1; }
out=$(systemd-analyze verify ./sealgated.socket ./sealgated.service 2>&1) || { echo "$out"; exit 1; }
[ -z "$out" ] || { echo "systemd-analyze verify is not clean:"; echo "$out"; exit 1; }
score=$(systemd-analyze security --offline=true ./sealgated.service 2>&1 |
  sed -n 's/.*Overall exposure level for sealgated.service: \([0-9.]*\).*/\1/p')
[ -n "$score" ] || { echo "no exposure score from systemd-analyze security"; exit 1; }
echo "systemd units: verify clean, exposure $score"
awk -v s="$score" 'BEGIN { exit !(s <= 2.0) }' || { echo "exposure $score is worse than 2.0"; exit 1; }
