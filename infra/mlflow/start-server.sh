#!/usr/bin/env bash
# Start the shared MLflow tracking server: SQLite or PostgreSQL backend, one artifact root that
# every Ray node uploads to *through the server* (--serve-artifacts), small footprint.
#
#   infra/mlflow/start-server.sh                                # sqlite, 127.0.0.1:5000
#   infra/mlflow/start-server.sh --backend postgresql           # see postgres-local.sh
#   infra/mlflow/start-server.sh --artifacts-destination s3://bucket/mlartifacts --port 5001
#   infra/mlflow/start-server.sh --print-command                # show what would run
#   infra/mlflow/start-server.sh ... -- --expose-prometheus /tmp/metrics   # extra mlflow flags
#
# Every flag also reads an environment variable (in brackets); flags win.
#   --backend sqlite|postgresql   [MLFLOW_BACKEND, default sqlite]
#   --data-dir DIR                [MLFLOW_DATA_DIR, default ./mlflow-server]: sqlite db + artifacts
#   --sqlite-path FILE            [MLFLOW_SQLITE_PATH, default DATA_DIR/mlflow.db]
#   --postgres-uri URI            [MLFLOW_POSTGRES_URI, default
#                                  postgresql://$MLFLOW_PG_USER@$PGHOST:$PGPORT/$MLFLOW_PG_DB
#                                  with mlflow / 127.0.0.1 / 5432 / mlflow]. No password in it:
#                                  libpq reads PGPASSWORD or ~/.pgpass.
#   --artifacts-destination URI   [MLFLOW_ARTIFACTS_DESTINATION, default DATA_DIR/artifacts]:
#                                  a local folder, a shared filesystem path or s3://...
#   --host ADDR                   [MLFLOW_HOST, default 127.0.0.1]
#   --port N                      [MLFLOW_PORT, default 5000]
#   --allowed-hosts LIST          [MLFLOW_ALLOWED_HOSTS]: Host headers to accept besides
#                                  localhost and private IPs, e.g. mlflow.internal:5000
#
# Security: the server has no authentication. It binds 127.0.0.1 unless --host says otherwise.
# Bind another address (0.0.0.0, a private IP) only on a trusted private network or behind an
# authenticating reverse proxy (nginx/Caddy with basic auth or oauth2-proxy, TLS) that is the
# only thing reaching the port. Workers on other nodes then use
# MLFLOW_TRACKING_URI=http://<head-or-proxy>:<port>.
set -euo pipefail

die() { echo "start-server.sh: $*" >&2; exit 2; }

backend="${MLFLOW_BACKEND:-sqlite}"
data_dir="${MLFLOW_DATA_DIR:-./mlflow-server}"
sqlite_path="${MLFLOW_SQLITE_PATH:-}"
pg_uri="${MLFLOW_POSTGRES_URI:-}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-}"
host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
allowed_hosts="${MLFLOW_ALLOWED_HOSTS:-}"
print_only=0
extra=()

while (($#)); do
  case "$1" in
    --backend) backend="${2:?--backend needs sqlite or postgresql}"; shift 2 ;;
    --data-dir) data_dir="${2:?}"; shift 2 ;;
    --sqlite-path) sqlite_path="${2:?}"; shift 2 ;;
    --postgres-uri) pg_uri="${2:?}"; shift 2 ;;
    --artifacts-destination) artifacts="${2:?}"; shift 2 ;;
    --host) host="${2:?}"; shift 2 ;;
    --port) port="${2:?}"; shift 2 ;;
    --allowed-hosts) allowed_hosts="${2:?}"; shift 2 ;;
    --print-command) print_only=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

[[ "$port" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$port'"
mkdir -p "$data_dir"
data_dir="$(cd "$data_dir" && pwd)"

case "$backend" in
  sqlite)
    sqlite_path="${sqlite_path:-$data_dir/mlflow.db}"
    mkdir -p "$(dirname "$sqlite_path")"
    sqlite_path="$(cd "$(dirname "$sqlite_path")" && pwd)/$(basename "$sqlite_path")"
    store_uri="sqlite:///$sqlite_path"
    ;;
  postgresql|postgres)
    if [[ -z "$pg_uri" ]]; then
      pg_uri="postgresql://${MLFLOW_PG_USER:-mlflow}@${PGHOST:-127.0.0.1}:${PGPORT:-5432}/${MLFLOW_PG_DB:-mlflow}"
    fi
    # user:password@ in a URI ends up in shell history and process listings.
    if [[ "$pg_uri" =~ ^[a-z0-9+]+://[^/@]*:[^/@]*@ ]]; then
      die "put the PostgreSQL password in PGPASSWORD or ~/.pgpass, not in the URI"
    fi
    [[ "$pg_uri" == postgresql* ]] || die "--postgres-uri must start with postgresql://, got '$pg_uri'"
    store_uri="$pg_uri"
    ;;
  *) die "--backend must be sqlite or postgresql, got '$backend'" ;;
esac

if [[ -z "$artifacts" ]]; then
  artifacts="$data_dir/artifacts"
fi
if [[ "$artifacts" != *://* ]]; then
  mkdir -p "$artifacts"
  artifacts="$(cd "$artifacts" && pwd)"
fi

mlflow_bin="${MLFLOW_BIN:-}"
if [[ -z "$mlflow_bin" ]]; then
  repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
  if [[ -x "$repo_root/.venv/bin/mlflow" ]]; then
    mlflow_bin="$repo_root/.venv/bin/mlflow"
  else
    mlflow_bin="$(command -v mlflow || true)"
  fi
fi
[[ -n "$mlflow_bin" ]] || die "mlflow not found: install the project (README set-up) or set MLFLOW_BIN"

# The backend URI goes through the environment, not argv (process listings show argv).
export MLFLOW_BACKEND_STORE_URI="$store_uri"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false   # no job runner: ~0.5 GB instead of ~2.4 GB
cmd=("$mlflow_bin" server
     --host "$host" --port "$port" --workers 1
     --serve-artifacts --artifacts-destination "$artifacts")
if [[ -n "$allowed_hosts" ]]; then
  cmd+=(--allowed-hosts "$allowed_hosts")
fi
cmd+=("${extra[@]}")

case "$host" in
  127.*|localhost|::1) ;;
  *) echo "start-server.sh: WARNING: binding $host. The MLflow server has no authentication:" \
          "keep this port reachable only from the cluster's private network or an auth proxy." >&2 ;;
esac

if ((print_only)); then
  printf 'MLFLOW_BACKEND_STORE_URI=%q\n' "$store_uri"
  echo "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false"
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi

echo "MLflow server: backend ${store_uri%%://*}, artifacts $artifacts, http://$host:$port" >&2
exec "${cmd[@]}"
