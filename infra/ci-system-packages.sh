#!/usr/bin/env bash
# System packages for the slow infra tests (tests/test_infra_slow.py), for CI and developers:
# Debian's PostgreSQL (started, loopback only) and Chromium (headless UI check).
# Installs only what is missing; safe to run repeatedly. Needs root or sudo for apt-get.
#
#   infra/ci-system-packages.sh
set -euo pipefail

SUDO=()
if [[ "$(id -u)" != 0 ]]; then
  command -v sudo >/dev/null || { echo "ci-system-packages.sh: run as root or install sudo" >&2; exit 2; }
  SUDO=(sudo)
fi

missing=()
compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || missing+=(postgresql)
command -v pg_ctlcluster >/dev/null || missing+=(postgresql-common)
[[ -x /usr/bin/chromium ]] || missing+=(chromium)

if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${SUDO[@]}" apt-get update -qq
  "${SUDO[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Start every PostgreSQL cluster that is down (Debian's listens on localhost only); create the
# default cluster if the package was installed without one (e.g. in a minimal container).
version="$(ls /usr/lib/postgresql | sort -V | tail -n 1)"
if [[ -z "$(pg_lsclusters -h 2>/dev/null)" ]]; then
  "${SUDO[@]}" pg_createcluster "$version" main >/dev/null
fi
while read -r ver name _port status _rest; do
  [[ "$status" == online* ]] || "${SUDO[@]}" pg_ctlcluster "$ver" "$name" start
done < <(pg_lsclusters -h)

port="$(pg_lsclusters -h | awk 'NR == 1 {print $3}')"
for _ in $(seq 60); do
  pg_isready -q -h 127.0.0.1 -p "$port" && break
  sleep 0.5
done
pg_isready -h 127.0.0.1 -p "$port"
/usr/bin/chromium --version
