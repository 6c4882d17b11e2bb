#!/usr/bin/env bash
# Create (or update, or --drop) a PostgreSQL role and database for the MLflow server on the
# local, loopback-only PostgreSQL (Debian's default: listen_addresses = 'localhost').
#
#   export MLFLOW_PG_PASSWORD="$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')"
#   infra/mlflow/postgres-local.sh                   # role + database "mlflow", owner mlflow
#   PGPASSWORD="$MLFLOW_PG_PASSWORD" infra/mlflow/start-server.sh --backend postgresql
#   infra/mlflow/postgres-local.sh --drop            # remove both again
#
# Environment (no credentials are stored anywhere in the repository):
#   MLFLOW_PG_PASSWORD  required (not for --drop): the role's password
#   MLFLOW_PG_USER      role name      [mlflow]
#   MLFLOW_PG_DB        database name  [mlflow]
#   PGPORT              server port    [5432]
#   PG_ADMIN            how to run psql as a superuser; default: `runuser -u postgres --` when
#                       root, plain psql when already the postgres user, else `sudo -u postgres`
# Start PostgreSQL first (infra/ci-system-packages.sh does, or: pg_ctlcluster 15 main start).
set -euo pipefail

die() { echo "postgres-local.sh: $*" >&2; exit 2; }

drop=0
case "${1:-}" in
  --drop) drop=1 ;;
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) die "unknown option '$1' (see --help)" ;;
esac

user="${MLFLOW_PG_USER:-mlflow}"
db="${MLFLOW_PG_DB:-mlflow}"
port="${PGPORT:-5432}"
[[ "$user" =~ ^[a-z_][a-z0-9_]*$ ]] || die "MLFLOW_PG_USER must be a plain lower-case identifier, got '$user'"
[[ "$db" =~ ^[a-z_][a-z0-9_]*$ ]] || die "MLFLOW_PG_DB must be a plain lower-case identifier, got '$db'"
if ((!drop)); then
  [[ -n "${MLFLOW_PG_PASSWORD:-}" ]] || die "set MLFLOW_PG_PASSWORD (e.g. from your secret store); it is never stored here"
fi

command -v psql >/dev/null || die "psql not found: install postgresql (infra/ci-system-packages.sh)"
if command -v pg_isready >/dev/null && ! pg_isready -q -h 127.0.0.1 -p "$port"; then
  die "no PostgreSQL answers on 127.0.0.1:$port. Start it: infra/ci-system-packages.sh, or pg_ctlcluster <version> main start"
fi

if [[ -n "${PG_ADMIN:-}" ]]; then
  read -r -a admin <<<"$PG_ADMIN"
elif [[ "$(id -u)" == 0 ]]; then
  admin=(runuser -u postgres --)
elif [[ "$(id -un)" == postgres ]]; then
  admin=()
else
  admin=(sudo -u postgres)
fi

# SQL string literal: double the single quotes (standard_conforming_strings is on by default).
lit() { printf "'%s'" "${1//\'/\'\'}"; }

# The SQL, password included, goes through stdin: never on a command line.
if ((drop)); then
  sql="DROP DATABASE IF EXISTS \"$db\" WITH (FORCE);
DROP ROLE IF EXISTS \"$user\";"
else
  sql="SELECT format('CREATE ROLE %I LOGIN', $(lit "$user"))
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $(lit "$user"))\\gexec
SELECT format('ALTER ROLE %I LOGIN PASSWORD %L', $(lit "$user"), $(lit "$MLFLOW_PG_PASSWORD"))\\gexec
SELECT format('CREATE DATABASE %I OWNER %I', $(lit "$db"), $(lit "$user"))
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = $(lit "$db"))\\gexec"
fi

(cd / && "${admin[@]}" psql -X -q -v ON_ERROR_STOP=1 -p "$port" -d postgres) <<<"$sql" >/dev/null

if ((drop)); then
  echo "dropped database $db and role $user"
  exit 0
fi

# Check the new credentials over TCP on loopback, as the MLflow server will connect.
PGPASSWORD="$MLFLOW_PG_PASSWORD" psql -X -q -h 127.0.0.1 -p "$port" -U "$user" -d "$db" \
  -c 'SELECT 1' >/dev/null || die "created $user/$db but cannot log in over 127.0.0.1:$port (check pg_hba.conf)"

echo "database $db (owner $user) ready on 127.0.0.1:$port"
echo "start MLflow on it with:"
echo "  PGPASSWORD=\"\$MLFLOW_PG_PASSWORD\" MLFLOW_PG_USER=$user MLFLOW_PG_DB=$db infra/mlflow/start-server.sh --backend postgresql"
