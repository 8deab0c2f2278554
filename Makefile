# The two set-up commands of README.md. Each creates .venv on first use (torch's CPU wheel first, then imagegpt).
.PHONY: setup demo test lint bench

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/imagegpt demo

test: setup
	.venv/bin/python -m ruff check .
	.venv/bin/python -m ruff format --check src tests benchmarks
	.venv/bin/python -m pytest
	bash scripts/test-other-cpu.sh

bench: setup
	.venv/bin/python benchmarks/bench_model.py
