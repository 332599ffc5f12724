# make demo   installs if needed, trains a small cGAN on digits, generates a folder, prints where and its scores
# make test   installs if needed, runs the test suite
# make docs   serves the docs site (mkdocs); make test-latest: the newest dependencies the bounds allow
# make bench  runs the benchmark scripts (printed tables)
PYTHON ?= python3
export HF_HUB_OFFLINE := 1
export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONUNBUFFERED := 1
DEMO_DIR ?= demo_out
# Test processes (pytest-xdist, one file per worker at a time, one torch thread each): one per core, at most 4.
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(max(1, min(4, len(os.sched_getaffinity(0)))))" 2>/dev/null || echo 1)

.PHONY: install demo test test-all test-latest lint docs bench bench-fewshot bench-novel bench-sd-lora bench-sd-fullsize clean

# Installs (editable, with the dev extras and the known-good pins) unless this checkout is already the
# installed imgaug_gen with its dependencies and the entry points pyproject.toml declares (tests/install_is_current.py).
install:
	@$(PYTHON) tests/install_is_current.py 2>/dev/null || $(PYTHON) -m pip install -c constraints.txt -e ".[dev]"

demo: install
	$(PYTHON) -m imgaug_gen.demo --out $(DEMO_DIR)

# the fast checks first (layers, lint, format, the docs site), then the tests
lint: install
	lint-imports
	ruff check .
	ruff format --check .
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs build --strict --quiet

test: lint
	$(PYTHON) -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile tests

test-all: lint
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# The newest versions the pyproject bounds allow (no constraints.txt; torch and torchvision stay the installed
# ones) in a fresh virtual environment over the installed packages, then the SD, SDXL, metrics and cGAN tests:
# the next dependency drift fails here, not at a user's.
LATEST_VENV ?= build/latest-venv
# SD and SDXL training with text-encoder LoRA, save and reload; the pretrained feature loaders; a cGAN end to end
LATEST_TESTS ?= tests/test_sd_lora.py::test_train_writes_run_in_diffusers_lora_format \
  tests/test_sd_lora.py::test_training_options_and_text_encoder_lora \
  tests/test_sdxl.py::test_sdxl_training_options_and_text_encoder_lora tests/test_sdxl.py::test_per_class_adapters \
  "tests/test_metrics.py::test_fid_inception_fid_and_kid_equal_torchmetrics_on_the_same_file" \
  tests/test_metrics.py::test_fd_dinov2_equals_a_direct_computation tests/test_metrics.py::test_fd_clip_features_and_folder_checks \
  tests/test_gan.py::test_front_ends_end_to_end_on_a_user_folder
test-latest: install
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv --system-site-packages $(LATEST_VENV)
	$(PYTHON) tests/latest_requirements.py > $(LATEST_VENV)/requirements.txt
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -r $(LATEST_VENV)/requirements.txt
	$(LATEST_VENV)/bin/python -m pip freeze | grep -iE "^(diffusers|transformers|peft|pytorch-lightning|torchmetrics|accelerate|huggingface.hub)=" || true
	$(LATEST_VENV)/bin/python -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile $(LATEST_TESTS)

docs: install
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs serve

bench: install
	$(PYTHON) benchmarks/bench_cgan_step.py
	$(PYTHON) benchmarks/bench_generate.py
	$(PYTHON) benchmarks/bench_ddpm.py
	$(PYTHON) benchmarks/bench_sd_lora.py
	$(PYTHON) benchmarks/bench_load.py

# the few-shot headline tables (each about 90 minutes on 2 CPU cores)
bench-fewshot: install
	$(PYTHON) benchmarks/fewshot_digits.py

bench-novel: install
	$(PYTHON) benchmarks/fewshot_novel_digits.py

# SD-LoRA training step: Lightning SDLoRAModule vs a plain diffusers + peft loop (SD-1.x and SDXL, ratio side
# by side), then the tiny-model step / sampling tables (and the 512 px rows where CUDA is available)
bench-sd-lora: install
	$(PYTHON) benchmarks/bench_sd_lora.py

# full-size SD-1.5 / SDXL architectures with random weights: one LoRA step + a 2-step sample (~6 min, 11 GiB RAM)
bench-sd-fullsize: install
	$(PYTHON) benchmarks/bench_sd_fullsize.py

clean:
	rm -rf $(DEMO_DIR) outputs multirun .pytest_cache build
