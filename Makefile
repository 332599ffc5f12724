# make demo   installs if needed, trains a small cGAN on digits, generates a folder, prints where and its scores
# make test   installs if needed, runs the test suite
# make bench  runs the benchmark scripts (printed tables)
PYTHON ?= python3
export HF_HUB_OFFLINE := 1
export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONUNBUFFERED := 1
DEMO_DIR ?= demo_out
# Test processes (pytest-xdist, one file per worker at a time, one torch thread each): one per core, at most 4.
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(max(1, min(4, len(os.sched_getaffinity(0)))))" 2>/dev/null || echo 1)

.PHONY: install demo test test-all bench bench-fewshot bench-sd-lora bench-sd-fullsize clean

# Installs (editable, with the dev extras and the known-good pins) unless this checkout is
# already the importable imgaug_gen with its dependencies and its generator entry points present.
install:
	@$(PYTHON) -c "import os, imgaug_gen, torch, torchvision, pytorch_lightning, diffusers, transformers, peft, torchmetrics, torch_fidelity, albumentations, hydra, sklearn, pytest, nbclient, importlinter, prdc, datasets; import xdist; from importlib.metadata import entry_points; assert {'cgan', 'ddpm', 'sd_lora'} <= set(entry_points(group='imgaug_gen.generators').names); assert {'digits', 'folder'} <= set(entry_points(group='imgaug_gen.data').names); assert os.path.samefile(os.path.dirname(os.path.dirname(imgaug_gen.__file__)), '$(CURDIR)')" 2>/dev/null \
	  || $(PYTHON) -m pip install -c constraints.txt -e ".[dev]"

demo: install
	$(PYTHON) -m imgaug_gen.demo --out $(DEMO_DIR)

# the layer contract (pyproject.toml [tool.importlinter]) first: a wrong-way import fails in seconds
test: install
	lint-imports
	$(PYTHON) -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile tests

test-all: install
	lint-imports
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

bench: install
	$(PYTHON) benchmarks/bench_cgan_step.py
	$(PYTHON) benchmarks/bench_generate.py
	$(PYTHON) benchmarks/bench_ddpm.py
	$(PYTHON) benchmarks/bench_sd_lora.py
	$(PYTHON) benchmarks/bench_load.py

# the few-shot headline table (about an hour on 2 CPU cores)
bench-fewshot: install
	$(PYTHON) benchmarks/fewshot_digits.py

# SD-LoRA training step: Lightning SDLoRAModule vs a plain diffusers + peft loop (SD-1.x and SDXL, ratio side
# by side), then the tiny-model step / sampling tables (and the 512 px rows where CUDA is available)
bench-sd-lora: install
	$(PYTHON) benchmarks/bench_sd_lora.py

# full-size SD-1.5 / SDXL architectures with random weights: one LoRA step + a 2-step sample (~6 min, 11 GiB RAM)
bench-sd-fullsize: install
	$(PYTHON) benchmarks/bench_sd_fullsize.py

clean:
	rm -rf $(DEMO_DIR) outputs multirun .pytest_cache
