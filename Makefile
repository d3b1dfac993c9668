# One entry point for developer tasks. `make help` lists them.
.PHONY: help fmt clippy test e2e generate bench demo ci

help: ## this list
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

fmt: ## format the code
	cargo fmt --all

clippy: ## lint, warnings are errors
	cargo clippy --all-targets --locked -- -D warnings

test: ## the test suite (starts its own OpenBao dev servers; needs `bao`, see scripts/tools.sh)
	bash -c 'source scripts/tools.sh && ensure_bao && cargo nextest run --locked --no-fail-fast'

e2e: ## end-to-end against the current kube context and VAULT_ADDR/VAULT_TOKEN
	SCOPED_SECRETS_E2E=1 cargo nextest run --locked --test e2e --no-capture

generate: ## regenerate crds/ from the Rust types
	cargo run --quiet -- crd > crds/scopedsecrets.yaml

bench: ## print performance figures
	bash -c 'source scripts/tools.sh && ensure_bao && cargo bench --bench scale'

demo: ## the main job: see README
	./scripts/demo.sh

ci: ## what CI runs
	bash .ci/run
