# The two commands a newcomer needs:
#   make demo   archive and back up a throwaway PostgreSQL into a file:// repository,
#               then pgrestore it to a noted second and check the rows
#   make test   unit, conformance and end-to-end tests (real PostgreSQL, real S3 servers)
# Both install what is missing when run as root, or say what to install.

# PostgreSQL majors besides Debian's 15 that the end-to-end tests run on:
# the WAL reader and everything that restores must hold on each.
EXTRA_PG_MAJORS ?= 14 16 17 18
# What runs on them (the rehearsal too on 17; everything on 15; one-tenant
# restores on 15, 17 and 18). On 14 and
# 16 the restore tests whose subject is the store (S3, faults, load) are
# left to the other majors, to keep CI within its time.
E2E_ON_EXTRA ?= walread:: trust:: archiving:: backup:: restore:: stream:: tenant:: security::tls
E2E_ON_OLD ?= walread:: trust:: archiving:: backup:: stream:: \
	restore::life_after_a_restore_on_a_file restore::randomized_point_in_time_restores_from_a_file \
	restore::refusals restore::a_gap_after

.PHONY: demo test test-long test-repeat test-unit test-e2e bench lint deps images release

demo:
	.ci/install-deps.sh --demo
	cargo build --quiet --workspace --all-targets
	target/debug/demo

deps:
	.ci/install-deps.sh

test: deps
	cargo test --workspace --locked
	@for major in $(EXTRA_PG_MAJORS); do \
		bin=$$(.ci/pg-binaries.sh $$major) || exit 1; \
		filters="$(E2E_ON_EXTRA)"; \
		case $$major in 14|16) filters="$(E2E_ON_OLD)" ;; 17) filters="$$filters rehearse::" ;; esac; \
		echo "== end-to-end tests on PostgreSQL $$major ($$bin): $$filters"; \
		PG_BIN=$$bin cargo test --workspace --test e2e --locked -- $$filters || exit 1; \
	done

# Soak and fault loops CI does not run: 200 SIGKILLed pushes.
test-long: deps
	PITR_KILL_LOOPS=200 cargo test --workspace --test e2e --locked -- killed_pushes

# make test-repeat [N=3]: the end-to-end suite N times in a row, stopping at
# the first failure. Run it with a CPU hog beside it before resolving an issue
# that touches the e2e suite, e.g. `stress-ng --cpu 2 & make test-repeat N=3`.
N ?= 3
test-repeat: deps
	@for i in $$(seq 1 $(N)); do \
		echo "== end-to-end run $$i of $(N)"; \
		cargo test --workspace --test e2e --locked || { echo "== end-to-end run $$i of $(N) FAILED"; exit 1; }; \
	done; echo "== $(N) of $(N) end-to-end runs passed"

# Both images, built with buildah on stand-in bases (no Docker engine),
# sized against seed 003's 1 GB and run: see .ci/images.sh and docs/images.md.
# As root. PITR_IMAGES_PROFILE=debug reuses the binaries `make test` built.
images:
	.ci/images.sh

bench:
	.ci/install-deps.sh --bench
	cargo bench --workspace --bench archive
	cargo bench --workspace --bench backup
	cargo bench --workspace --bench restore
	cargo bench --workspace --bench stream
	cargo bench --workspace --bench filestore
	cargo bench --workspace --bench tenant

# Release binaries and a CycloneDX SBOM of each (target/release/sbom/),
# after the supply-chain checks.
release:
	.ci/supply-chain.sh
	command -v cargo-cyclonedx >/dev/null || cargo install --locked cargo-cyclonedx@0.5.7
	cargo build --release --locked -p pitr-agent -p pgrestore
	cargo cyclonedx --format json --spec-version 1.5
	mkdir -p target/release/sbom
	mv agent/pitr-agent.cdx.json restore-cli/pgrestore.cdx.json target/release/sbom/
	rm -f tests/pitr-tests.cdx.json
	@echo "== target/release/pitr-agent, target/release/pgrestore, target/release/sbom/*.cdx.json"

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	.ci/supply-chain.sh
