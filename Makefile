# Set-up, demo and tests for detkit. `make demo` and `make test` create .venv when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.detkit-installed
export NO_ALBUMENTATIONS_UPDATE := 1
DEMO_DIR ?= work_dirs/demo
# make gpu-check [DEVICE=cuda] [QUICK=1] [GPU_CHECK_OUT=dir]: tools/gpu_check.py with the venv's Python
# when `make setup` made one, else the machine's python3 (a bare GPU machine: see the script's docstring).
DEVICE ?= cuda
GPU_CHECK_OUT ?= work_dirs/gpu_check
CHECK_PYTHON := $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))

.PHONY: setup demo test test-quick gpu-check docs clean

setup: $(STAMP)

# torch/torchvision are pinned to the releases this machine keeps on disk (others
# download gigabytes). albumentations pulls in opencv-python-headless, which
# overwrites the contrib build of cv2 (selective search lives in cv2.ximgproc),
# so the contrib build is reinstalled last. detkit-cascade (plugins/detkit_cascade) is a plugin distribution
# of its own, installed beside detkit as a third party's would be. The docs extra is MkDocs (make docs), the tensorboard extra TensorBoard (train.loggers).
$(STAMP): pyproject.toml plugins/detkit_cascade/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev,export,docs,tensorboard]'
	$(BIN)/pip install -q -e plugins/detkit_cascade
	$(BIN)/pip install -q --force-reinstall --no-deps opencv-contrib-python-headless
	$(BIN)/python -c "import cv2; cv2.ximgproc" 
	touch $(STAMP)

# pytest-xdist: TEST_WORKERS processes (default 2, one per core here), each test file kept on one worker
# (its module fixtures are built once); TEST_WORKERS=0 runs the suite in this process.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

test: $(STAMP)
	$(PYTEST)

# the suite without the tests marked slow (pyproject.toml's markers)
test-quick: $(STAMP)
	$(PYTEST) -m "not slow"

gpu-check:
	$(CHECK_PYTHON) tools/gpu_check.py --device $(DEVICE) --out $(GPU_CHECK_OUT) $(if $(QUICK),--quick) $(GPU_CHECK_ARGS)

demo: $(STAMP)
	$(BIN)/detkit data synth --output $(DEMO_DIR)/data/train --format coco --num-images 400 --seed 0 --overwrite
	$(BIN)/detkit data synth --output $(DEMO_DIR)/data/val --format coco --num-images 60 --seed 1 --overwrite
	$(BIN)/detkit data synth-video --output $(DEMO_DIR)/data/demo.mp4 --frames 48 --seed 2
	$(BIN)/python tools/train.py configs/faster_rcnn_tiny_fpn_synth.yaml --set train.work_dir=$(DEMO_DIR) --overwrite
	$(BIN)/python tools/eval.py $(DEMO_DIR)/final.pth --output $(DEMO_DIR)/eval
	$(BIN)/python tools/infer.py $(DEMO_DIR)/final.pth $(DEMO_DIR)/data/val/images --output $(DEMO_DIR)/infer_images
	$(BIN)/python tools/infer.py $(DEMO_DIR)/final.pth $(DEMO_DIR)/data/demo.mp4 --output $(DEMO_DIR)/infer_video
	@echo "demo outputs in $(DEMO_DIR)"

# the manual (mkdocs.yml, docs/) into site/; --strict: a warning, broken link or bad reference fails the build
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) work_dirs site
