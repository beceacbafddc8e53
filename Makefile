# replay-migrate: the two commands of the README, and a few helpers. Every target that needs the
# host runs scripts/setup-host.sh first (idempotent: a second run only checks).
VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test lint unit bench bench-scaling bench-long bench-precopy loadtest fuzz clean-vms

setup:
	bash scripts/setup-host.sh

demo: setup
	$(VENV)/bin/replay-migrate -v demo

# lint + the whole suite, VM tests included (they build/reuse the image and a shared checkpoint)
test: setup lint
	$(PY) -m pytest $(PYTEST_ARGS)

# ruff over everything; mypy --strict over every package, bench/ and tests/ (pyproject.toml's list)
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# the tests that need no guest (seconds)
unit: setup
	$(PY) -m pytest -m "not vm" $(PYTEST_ARGS)

# the benchmarks (< 30 min, the migration one starts VMs; scaling, chain and the load test only when named:
# BENCH="scaling chain service"); BENCH="differ scaling" runs only those
BENCH ?=
bench: setup
	$(PY) bench/run.py $(BENCH)

# only the scaling benchmark (not in the default `make bench`): tree build, walk and transfer against image
# size (1, 4, 16 GiB sparse synthetic images) and divergence, hashing in a 4/8 GiB guest's downtime;
# ~2.5 min here, ~6.5 GiB of temporary disk; writes bench/results/scaling.{md,json,png}
bench-scaling: setup
	$(PY) -m bench.bench_scaling --out bench/results

# the handoff service under load (~8 min, < 10; not part of `make test` nor of the default `make bench`): one `replay-migrate serve`
# pinned to core 0, the load generator's processes on core 1, 10, 100, 1,000 sessions and up until a
# step breaks; bench/results/service.md, service.json, service.png (the py-spy profile at the knee)
LOADTEST_ARGS ?=
loadtest: setup
	$(PY) -m bench.bench_service --out bench/results $(LOADTEST_ARGS)

# the long session (replayer/workloads/long.wl: ~11 min of a user's typing in the xterm and the
# notepad) migrated once over the first shaped link, with its baselines: sync marks met/failed and
# bytes against the plain transfer, in bench/results/long.{md,json} and long-*.png (~12-15 min with the bench
# checkpoint cached; not part of `make bench`, whose migration.* it leaves alone)
bench-long: setup
	$(PY) bench/bench_migration.py --workloads long --out bench/results --name long

# libvirt's pre-copy live migration (site A -> site B) of the `notes` session measured with the veth between the
# sites limited to 100 and 10 Mbit/s (tc tbf; ~8-12 min, the 10 Mbit/s leg alone ~4.5 min; not part of `make bench`):
# bench/results/precopy-shaped.{md,json}, whose times migration.md's libvirt pre-copy rows then use instead of
# the model (PRECOPY_ARGS="--idle" migrates the restored checkpoint without driving the workload)
PRECOPY_ARGS ?=
bench-precopy: setup
	$(PY) -m bench.bench_precopy --out bench/results $(PRECOPY_ARGS)

# every decoder of peer or file bytes on 100,000 generated inputs each (~5 min on 2 cores; not part
# of `make test`, whose unit tests run the same targets on a few hundred inputs); the table goes to
# bench/results/fuzz.md, reproducers of failures to bench/results/fuzz-repro/
FUZZ_ARGS ?=
fuzz: setup
	$(PY) -m bench.fuzz --out bench/results/fuzz.md $(FUZZ_ARGS)

# destroy every domain this project defined (names start with rm-), their clone folders and the images
# killed migrations left in the suspend folder (bench's default /dev/shm, and $REPLAY_MIGRATE_SUSPEND_DIR)
clean-vms: setup
	$(PY) -m cli.cleanup $(if $(wildcard /dev/shm/replay-migrate),--suspend-dir /dev/shm)
