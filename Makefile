# One task runner; CI runs `lint` and `test` (see .ci/run).
.PHONY: test lint fmt ci bench fuzz

test:
	bash scripts/test.sh

lint:
	bash scripts/ensure-build-tools.sh
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

ci: lint test

bench:
	cargo bench -p shared --bench ingest_path
