# The two set-up commands of the README:
#   make demo   runs the whole SLIM pipeline on the embedded default (configs/demo.yaml)
#   make test   runs the test suite
# Both create the environments they need first (scripts/setup.sh).
.PHONY: setup demo quick test bench clean

setup:
	scripts/setup.sh all

demo: setup
	HF_HUB_OFFLINE=1 .venv/bin/slim-ray run --config configs/demo.yaml

quick: setup
	HF_HUB_OFFLINE=1 .venv/bin/slim-ray run --config configs/quick.yaml

test: setup
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -rs --durations=15 tests

clean:
	rm -rf runs .pytest_cache
