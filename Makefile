# The two set-up commands of the README:
#   make demo   runs the whole SLIM pipeline on the embedded default (configs/demo.yaml)
#   make test   runs the test suite
# Both create the environments they need first (scripts/setup.sh): the demo only .venv (its
# engines are hf), the tests also .venv-vllm (the vllm engine's tests).
.PHONY: setup setup-main demo quick test bench clean

setup:
	scripts/setup.sh all

setup-main:
	scripts/setup.sh

demo: setup-main
	HF_HUB_OFFLINE=1 .venv/bin/slim-ray run --config configs/demo.yaml

quick: setup-main
	HF_HUB_OFFLINE=1 .venv/bin/slim-ray run --config configs/quick.yaml

# The serving-graph tests start Ray Serve on a Ray of their own, so they run in a second session.
test: setup
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -rs --durations=15 tests --ignore=tests/serve/test_serve_graph.py
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -rs tests/serve/test_serve_graph.py

clean:
	rm -rf runs .pytest_cache
