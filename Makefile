# The two commands of the README, on a fresh machine with Python 3.10+:
#   make run    the main job: `jedi demo` (train a tiny JeDi on synthetic sets on the CPU, personalize unseen
#               subjects from one reference, score identity against a no-reference baseline) -> out/demo/
#   make test   the whole test suite (what CI runs)
# Both create .venv (CPU torch 2.13, triton 3.6) and build the package on first use.
.PHONY: run bench test setup gpu-check clean

run: setup
	.venv/bin/jedi demo --out out/demo

bench: setup
	.venv/bin/python -m pytest benchmarks --benchmark-only -q -p no:cacheprovider

test:
	scripts/test.sh

setup:
	scripts/setup_env.sh

# on a GPU machine with torch+CUDA already installed: make gpu-check OUT=/tmp/out
gpu-check:
	benchmarks/gpu_check.sh $(OUT)

clean:
	rm -rf build .venv jedi_kernels/_C*.so *.egg-info
