# Two commands from a fresh clone: `make demo` (the main job on bundled samples) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SAMPLES := tests/data/dataloop
OUT := out

.PHONY: demo convert test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-demo: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[demo]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

## demo: the sample in a local Label Studio, with the dl2ls ML backend connected (Ctrl-C stops it)
demo: $(VENV)/.installed-demo
	$(BIN)/python -m dl2ls.demo

## convert: convert the bundled Dataloop samples into Label Studio tasks and verify them frame by frame
convert: $(VENV)/.installed
	$(BIN)/dl2ls label-config $(SAMPLES)/video_tracker_webm_2024.json -o $(OUT)/video/label_config.xml
	$(BIN)/dl2ls convert $(SAMPLES)/video_tracker_webm_2024.json --label-config $(OUT)/video/label_config.xml \
		-o $(OUT)/video/tasks.json --report $(OUT)/video/report.json
	$(BIN)/dl2ls verify $(SAMPLES)/video_tracker_webm_2024.json $(OUT)/video/tasks.json
	$(BIN)/dl2ls convert $(SAMPLES)/video_annotations_2019_list.json --fps 25 --width 1920 --height 1080 \
		-o $(OUT)/video_2019/tasks.json --report $(OUT)/video_2019/report.json
	$(BIN)/dl2ls verify $(SAMPLES)/video_annotations_2019_list.json $(OUT)/video_2019/tasks.json \
		--fps 25 --width 1920 --height 1080
	$(BIN)/dl2ls label-config $(SAMPLES)/image_segment_binary.json $(SAMPLES)/image_box_point_class.json \
		-o $(OUT)/images/label_config.xml
	$(BIN)/dl2ls convert $(SAMPLES)/image_segment_binary.json $(SAMPLES)/image_box_point_class.json \
		--label-config $(OUT)/images/label_config.xml -o $(OUT)/images/tasks.json --report $(OUT)/images/report.json
	@echo "Label Studio projects to import: $(OUT)/video/ (label_config.xml + tasks.json), $(OUT)/images/"

## test: set up and run the whole test suite
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

## bench: conversion speed against plain JSON parsing and against dtlpy
bench: $(VENV)/.installed-test
	$(BIN)/python bench/bench_convert.py
	$(BIN)/python bench/bench_push.py
	$(BIN)/python bench/bench_sync.py
	$(BIN)/python bench/bench_service.py
	$(BIN)/python bench/bench_workers.py
	$(BIN)/python bench/bench_media.py

clean:
	rm -rf $(OUT) bench/data .pytest_cache .demo test-artifacts
