# One place for the commands the README gives.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-long bench clean

setup: $(STAMP)

# Idempotent: the stamp is rebuilt only when pyproject.toml or this Makefile changes. torch comes first from the
# local CPU wheel (torch==2.13.0) so that no dependency pulls a CUDA build.
# Reference packages that judge our own code on identical weights and inputs
# (tests/test_reference_judges.py, tests/test_insightface_judge.py), installed without their
# dependencies: insightface's and rtmlib's opencv-python would replace mediapipe's cv2, and
# syncnet-python's torchvision from PyPI is a CUDA build that does not import with CPU torch
# (syncnet_python never imports it); ffmpeg-python and future make its package import (it also needs scenedetect, a runtime dependency of ours).
# `pip check` therefore lists these three as missing opencv-python / torchvision: expected.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps syncnet-python==0.2.3 ffmpeg-python==0.2.0 future==1.0.0 rtmlib==0.0.16
	$(BIN)/pip install -q --no-deps insightface==2.1
	touch $(STAMP)

demo: setup
	$(BIN)/python jobs/curate.py --demo --output demo_output
	$(BIN)/python jobs/stats.py demo_output
	$(BIN)/python jobs/train.py --data demo_output --stage 1 --preset tiny --max-steps 20 --allow-smoke --out demo_output/train/stage1 --resume
	$(BIN)/python jobs/train.py --data demo_output --stage 2 --preset tiny --max-steps 20 --allow-smoke --out demo_output/train/stage2 --init demo_output/train/stage1 --resume
	@echo "demo output: $(CURDIR)/demo_output (report: demo_output/report/index.html, Loopy runs: demo_output/train/)"

# `make test` stays under 20 minutes on 2 cores; the reliability runs (whole bad-input corpora,
# killed workers and nodes, disk full) and the real-cluster runs (`ray job submit` to a local head,
# a 2-node cluster) are marked `long` and run by `make test-long` (CI runs both).
test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not long" --durations=15 tests

test-long: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -m long --durations=15 tests

bench: setup
	$(BIN)/python benchmarks/features.py --out benchmarks/results/features.json
	$(BIN)/python benchmarks/feature_stage.py --out benchmarks/results/feature_stage.json
	$(BIN)/python benchmarks/loader.py --out benchmarks/results/loader.json
	$(BIN)/python benchmarks/curate.py --out benchmarks/results/curate.json
	$(BIN)/python benchmarks/bookkeeping.py --out benchmarks/results/bookkeeping.json
	$(BIN)/python benchmarks/stats_report.py
	$(BIN)/python benchmarks/train_step.py --out benchmarks/results/train_step.json
	$(BIN)/python benchmarks/generate.py --out benchmarks/results/generate.json

clean:
	rm -rf demo_output .pytest_cache
