#!/bin/sh
# As the official image's entrypoint: a first start initialises the cluster with
# POSTGRES_USER (the superuser), POSTGRES_PASSWORD and POSTGRES_DB, password logins from
# any address; every start then runs postgres in the foreground on all interfaces.
set -e
user=${POSTGRES_USER:-postgres}
db=${POSTGRES_DB:-$user}
mkdir -p "$PGDATA" && chown postgres:postgres "$PGDATA" && chmod 700 "$PGDATA"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  printf '%s' "$POSTGRES_PASSWORD" > /tmp/pw && chown postgres /tmp/pw
  su postgres -c "initdb -D '$PGDATA' -U '$user' --encoding=UTF8 --locale=C.UTF-8 --pwfile=/tmp/pw --auth-host=scram-sha-256 --auth-local=trust"
  rm /tmp/pw
  echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  su postgres -c "pg_ctl -D '$PGDATA' -w -o '-c listen_addresses=' start"
  [ "$db" = postgres ] || su postgres -c "psql -U '$user' -d postgres -c 'CREATE DATABASE \"$db\"'"
  su postgres -c "pg_ctl -D '$PGDATA' -w stop"
fi
exec su postgres -c "exec postgres -D '$PGDATA' -c listen_addresses='*'"
