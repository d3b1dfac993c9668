#!/usr/bin/env bash
# The main job. With a reachable cluster in the current kube context (kind, k3d, any) and
# VAULT_ADDR/VAULT_TOKEN — or a local OpenBao dev server this script starts when VAULT_ADDR
# is unset — it installs the CRDs, seeds the example scopes, runs the operator on this machine
# and applies the example ScopedSecrets, then shows the inherited values that landed in
# Secrets; the operator keeps running in the foreground (Ctrl-C stops it and the dev server).
#
# Without a cluster it says so in one line and runs the offline tour instead: a local
# OpenBao dev server (on a free port, stopped at the end), the example scopes, `resolve` with
# sources for two services, `render` of the example ScopedSecrets into the Secrets the
# operator would write, a change previewed with `--dry-run` against the example workloads,
# the change made, and the Secrets rendered again. Needs only Rust, Python 3 and this repo.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/tools.sh
source scripts/tools.sh

cluster_reachable() {
  # No kube config at all: no cluster, and no need to fetch kubectl to find that out.
  if [ -z "${KUBECONFIG:-}" ] && [ ! -f "$HOME/.kube/config" ] && [ -z "${KUBERNETES_SERVICE_HOST:-}" ]; then
    return 1
  fi
  ensure_kube_tools >/dev/null 2>&1 || return 1
  "$KUBECTL_BIN" cluster-info --request-timeout=5s >/dev/null 2>&1
}

offline_tour() {
  ensure_bao
  local port bin dir
  port=${DEMO_VAULT_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
  dir=$(mktemp -d)
  # The tour writes to Vault: always its own dev server, never the VAULT_ADDR of the shell.
  "$BAO_BIN" server -dev -dev-root-token-id=root -dev-listen-address="127.0.0.1:$port" >"$dir/bao.log" 2>&1 &
  local bao_pid=$!
  trap 'kill '"$bao_pid"' 2>/dev/null || true; wait '"$bao_pid"' 2>/dev/null || true; rm -rf '"$dir" EXIT
  export VAULT_ADDR="http://127.0.0.1:$port" VAULT_TOKEN=root
  unset BAO_ADDR BAO_TOKEN VAULT_NAMESPACE
  echo "== a local OpenBao dev server on $VAULT_ADDR (stopped at the end)"
  for _ in $(seq 100); do BAO_ADDR=$VAULT_ADDR "$BAO_BIN" status >/dev/null 2>&1 && break; sleep 0.1; done

  bin=${SCOPED_SECRETS_BIN:-}
  if [ -z "$bin" ]; then
    echo "== building scoped-secrets"
    cargo build --locked --quiet
    bin=${CARGO_TARGET_DIR:-target}/debug/scoped-secrets
  fi
  ss() { echo "\$ scoped-secrets $*"; "$bin" "$@"; }

  echo "== seeding the example scopes of project shop"
  PATH="$(dirname "$BAO_BIN"):$PATH" examples/seed-scopes.sh

  echo
  echo "== what api and web get in dev, and where each value comes from"
  ss resolve -p shop -e dev -s api --show-values
  echo
  ss resolve -p shop -e dev -s web --show-values
  echo
  echo "== the Secrets the operator would write for examples/ (values masked; sources above each)"
  ss render -f examples/
  echo
  echo "== preview a change: LOG_LEVEL=warn for every service in dev"
  ss secret set -p shop -e dev -k LOG_LEVEL -v warn --dry-run -f examples/ --workloads examples/30-workloads.yaml
  echo
  echo "== make it"
  ss secret set -p shop -e dev -k LOG_LEVEL -v warn
  echo
  echo "== the Secrets now (demo values shown, decoded)"
  "$bin" render -f examples/ -o json --show-values | python3 -c '
import base64, json, sys
for s in json.load(sys.stdin)["items"]:
    print("Secret %s/%s" % (s["metadata"]["namespace"], s["metadata"]["name"]))
    for k, v in sorted(s.get("data", {}).items()):
        print("  %-12s %s" % (k, base64.b64decode(v).decode()))'
  echo
  echo "Done. With a cluster (kind create cluster), ./scripts/demo.sh runs the operator itself."
}

if ! cluster_reachable; then
  echo "demo: no reachable Kubernetes cluster in the current kube context: running the offline tour (Vault, resolve, render, a previewed change)."
  offline_tour
  exit 0
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
