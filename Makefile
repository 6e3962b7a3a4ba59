# Two commands do all set-up on a fresh machine:
#   make main   build the environment, then run the main job on the bundled emoji data
#   make test   build the environment, then run the test suite
# torch/torchvision are pinned first: on these machines those exact releases install from local files,
# while an unpinned `pip install torch` would download several GB.
PY := .venv/bin/python
TORCH := torch==2.14.1 torchvision==0.29.1

.venv/.installed: pyproject.toml
	@# torch's CUDA build makes the venv ~6.5 GB; say so up front instead of pip's "No space left on device".
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); if [ "$$free" -lt 8 ]; then \
	  echo "make: the environment needs ~8 GB free disk in $$(pwd) (torch's CUDA build); $$free GB free" >&2; exit 1; fi
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

env: .venv/.installed

test: .venv/.installed
	$(PY) -m pytest -q

# a second `make main` is refused (the run folder holds a run): `make main ARGS=--overwrite` replaces it,
# `make main ARGS=--resume` continues an interrupted one
main: .venv/.installed
	.venv/bin/mmstory train experiments/emoji_tiny.yaml $(ARGS)

.PHONY: env test main
