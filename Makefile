# Two commands do all set-up on a fresh machine:
#   make main   build the environment, then run the main job on the bundled emoji data
#   make test   build the environment, then run the test suite
# torch/torchvision are pinned first: on these machines those exact releases install from local files,
# while an unpinned `pip install torch` would download several GB.
PY := .venv/bin/python
TORCH := torch==2.14.1 torchvision==0.29.1

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

env: .venv/.installed

test: .venv/.installed
	$(PY) -m pytest -q

main: .venv/.installed
	.venv/bin/mmstory train experiments/emoji_tiny.yaml

.PHONY: env test main
