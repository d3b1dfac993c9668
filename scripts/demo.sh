#!/usr/bin/env bash
# The main job, end to end: with the current kube context (kind, k3d, any cluster) and
# VAULT_ADDR/VAULT_TOKEN — or a local OpenBao dev server this script starts when VAULT_ADDR
# is unset — install the CRDs, seed the example scopes, run the operator on this machine and
# apply the example ScopedSecrets, then show the inherited values that landed in Secrets.
# The operator keeps running in the foreground; Ctrl-C stops it (and the dev server).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/tools.sh
source scripts/tools.sh

ensure_kube_tools
if ! "$KUBECTL_BIN" cluster-info --request-timeout=5s >/dev/null 2>&1; then
  echo "demo: no reachable Kubernetes cluster in the current kube context." >&2
  echo "      Create one (kind create cluster, k3d cluster create) or point KUBECONFIG at one, then run again." >&2
  exit 1
fi
k() { "$KUBECTL_BIN" "$@"; }

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM

if [ -z "${VAULT_ADDR:-}" ]; then
  ensure_bao
  port=${DEMO_VAULT_PORT:-8200}
  echo "== starting a local OpenBao dev server on 127.0.0.1:$port (token: root)"
  "$BAO_BIN" server -dev -dev-root-token-id=root -dev-listen-address="127.0.0.1:$port" >/tmp/scoped-secrets-demo-bao.log 2>&1 &
  pids+=($!)
  export VAULT_ADDR="http://127.0.0.1:$port" VAULT_TOKEN=root
  for _ in $(seq 50); do BAO_ADDR=$VAULT_ADDR "$BAO_BIN" status >/dev/null 2>&1 && break; sleep 0.2; done
else
  ensure_bao
  : "${VAULT_TOKEN:?set VAULT_TOKEN (a token that may write secret/) along with VAULT_ADDR}"
fi

echo "== building scoped-secrets"
cargo build --locked --quiet
bin=target/debug/scoped-secrets

echo "== installing the CRDs"
k apply -f crds/
k wait --for=condition=Established --timeout=60s crd/scopedsecrets.scopedsecrets.io crd/vaultstores.scopedsecrets.io crd/clustervaultstores.scopedsecrets.io >/dev/null

echo "== seeding the example scopes of project shop into $VAULT_ADDR"
PATH="$(dirname "$BAO_BIN"):$PATH" examples/seed-scopes.sh

echo "== the operator's namespace, its Vault token and the store"
k create namespace scoped-secrets --dry-run=client -o yaml | k apply -f - >/dev/null
k -n scoped-secrets create secret generic vault-token --from-literal=token="$VAULT_TOKEN" --dry-run=client -o yaml | k apply -f - >/dev/null
k apply -f examples/00-namespace.yaml
sed "s#address: http://127.0.0.1:8200#address: $VAULT_ADDR#" examples/10-cluster-vault-store.yaml | k apply -f -

echo "== running the operator (log: /tmp/scoped-secrets-demo.log)"
"$bin" run --namespace scoped-secrets --metrics-addr 127.0.0.1:8080 >/tmp/scoped-secrets-demo.log 2>&1 &
op=$!
pids+=("$op")

echo "== applying the example ScopedSecrets"
k apply -f examples/20-scopedsecret-api.yaml -f examples/21-scopedsecret-web-selected.yaml
for _ in $(seq 60); do
  k -n shop-dev get secret api web-env >/dev/null 2>&1 && break
  kill -0 "$op" 2>/dev/null || { echo "demo: the operator exited; see /tmp/scoped-secrets-demo.log" >&2; tail -20 /tmp/scoped-secrets-demo.log >&2; exit 1; }
  sleep 1
done
k -n shop-dev get scopedsecrets
for s in api web-env; do
  echo
  echo "== Secret shop-dev/$s (demo values, decoded)"
  k -n shop-dev get secret "$s" -o go-template='{{range $k, $v := .data}}{{printf "  %-12s %s\n" $k ($v | base64decode)}}{{end}}'
done
echo
echo "== where each key of api comes from (status.keys)"
k -n shop-dev get scopedsecret api -o go-template='{{range .status.keys}}{{printf "  %-12s %-20s %s v%v\n" .name .scope .path .version}}{{end}}'
echo
echo "The operator keeps running: change a value (bao kv patch -mount=secret shop/envs/dev LOG_LEVEL=warn),"
echo "annotate to refresh now (kubectl -n shop-dev annotate scopedsecret api scopedsecrets.io/force-sync=\$(date +%s) --overwrite)"
echo "and watch the Secret follow. Ctrl-C to stop."
wait "$op"
