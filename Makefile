# One task runner; CI runs `lint` and `test` (see .ci/run).
.PHONY: test lint fmt ci bench fuzz lambda

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

# Lambda zips (bootstrap per function, provided.al2023, glibc <= 2.34); ARCH=arm64 untested here.
lambda:
	bash scripts/lambda-build.sh
