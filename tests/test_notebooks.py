"""The notebooks in notebooks/ run top to bottom in a fresh kernel and print what they promise.

Each notebook is executed with nbclient in the ``python3`` kernel, working directory ``notebooks/``,
with a tiny model and a few training steps (environment variables the notebooks read), writing its
runs into a temporary folder. The ``python3`` kernelspec's ``argv[0]`` is ``python``, which
jupyter_client replaces by the interpreter running these tests, so the kernel is this venv's Python;
``test_kernel_is_this_python`` checks it. The committed notebooks are only read, never rewritten.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import yaml

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ["01_caption_images.ipynb", "02_multimodal_qa.ipynb", "03_reproduce_an_experiment.ipynb"]

# A seconds-long version of everything: tiny towers, small batches, no loader worker processes.
TINY_OVERRIDES = " ".join(
    ["--model.dim=32", "--model.embed_dim=32", "--model.decoder.dim=32", "--model.decoder.depth=1",
     "--model.decoder.heads=2", "--data.loader.batch_size=8", "--data.loader.shuffle_buffer=32",
     "--data.loader.workers=0", "--data.loader.audio_seconds=1.0", "--report.num_beams=2",
     "--report.max_new_tokens=8", "--threads=2"]
    + ["--model.encoders.image.args.model_name=test_resnet",  # timm's 0.4M-parameter test ResNet, random
       "--model.encoders.image.args.pretrained=null", "--report.fit_samples=8"]
    + [f"--model.encoders.{m}.args.{k}={v}" for m in ("text", "audio")
       for k, v in (("width", 32), ("depth", 1), ("heads", 2))])


@pytest.fixture(scope="module")
def run_notebook(tmp_path_factory):
    """name -> (executed notebook, seconds). Executed once per module; 02 reuses the quick model 01
    trained (both look in the same runs folder) but trains its own when run alone."""
    runs = tmp_path_factory.mktemp("notebook_runs")
    env = {
        "MMSTORY_NOTEBOOK_CHECKPOINT": "",  # never use a model from runs/emoji_tiny: always the quick path
        "MMSTORY_NOTEBOOK_STEPS": "8",
        "MMSTORY_NOTEBOOK_RUNS": str(runs),
        "MMSTORY_NOTEBOOK_OVERRIDES": TINY_OVERRIDES,
        "MMSTORY_NOTEBOOK_EVAL_SAMPLES": "8",
    }
    done: dict[str, tuple] = {}

    def run(name: str):
        if name not in done:
            nb = nbformat.read(NOTEBOOKS / name, as_version=4)
            client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                             resources={"metadata": {"path": str(NOTEBOOKS)}})
            start = time.perf_counter()
            with pytest.MonkeyPatch.context() as mp:
                for k, v in env.items():
                    mp.setenv(k, v)
                client.execute()  # raises CellExecutionError (with the traceback) if a cell fails
            done[name] = (nb, time.perf_counter() - start, runs)
        return done[name]

    return run


def text_of(nb) -> str:
    """All text the notebook's cells produced: streams, results, displays (plain and markdown)."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out["output_type"] == "stream":
                parts.append(out["text"])
            elif out["output_type"] in ("execute_result", "display_data"):
                for mime in ("text/plain", "text/markdown"):
                    if mime in out.get("data", {}):
                        parts.append(out["data"][mime])
    return "\n".join(parts)


def count_outputs(nb, mime: str) -> int:
    return sum(mime in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))


def assert_no_errors(nb):
    errors = [out for cell in nb.cells for out in cell.get("outputs", []) if out["output_type"] == "error"]
    assert not errors, errors
    assert all(c.get("execution_count") for c in nb.cells if c.cell_type == "code"), "a code cell did not run"


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebooks_are_clean(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: outputs are not stripped"


def test_kernel_is_this_python(run_notebook):
    nb, _, _ = run_notebook(NAMES[0])
    assert f"sys.prefix: {sys.prefix}\n" in text_of(nb), "the notebook kernel is not this environment's Python"


def test_01_caption_images(run_notebook):
    nb, seconds, runs = run_notebook(NAMES[0])
    assert_no_errors(nb)
    text = text_of(nb)
    assert "training a small one for 8 steps" in text
    assert (runs / "quick" / "model" / "model.safetensors").is_file()
    assert text.count("  greedy:    '") == 8 and text.count("  beam (3):  '") == 8
    assert text.count("  reference: '") == 8
    assert "caption of my_emoji.png: '" in text
    assert count_outputs(nb, "image/png") >= 1  # the caption grid
    print(f"01: {seconds:.1f} s")


def test_02_multimodal_qa(run_notebook):
    nb, seconds, _ = run_notebook(NAMES[1])
    assert_no_errors(nb)
    text = text_of(nb)
    for question in ("what is shown?", "which category is this?", "is this an animal?"):
        assert f"Q: {question}" in text
    assert text.count("  caption: '") == 3 and "answer to 'what is shown?'" in text
    assert count_outputs(nb, "text/html") >= 3  # IPython.display.Audio players
    assert "top-3 = [(" in text
    assert "classes (labels): top-1 accuracy" in text and "classes (categories" in text
    assert count_outputs(nb, "image/png") >= 2  # QA images, retrieval grid
    print(f"02: {seconds:.1f} s")


def test_03_reproduce_an_experiment(run_notebook):
    nb, seconds, runs = run_notebook(NAMES[2])
    assert_no_errors(nb)
    text = text_of(nb)
    steps = yaml.safe_load((ROOT / "experiments/emoji_tiny.yaml").read_text())["steps"]
    assert "name: emoji_tiny" in text and f"steps: {steps}" in text  # the resolved experiment config
    assert f"steps: {steps} -> 8" in text
    run_dir = runs / "emoji_tiny_short"
    assert (run_dir / "metrics.jsonl").is_file() and (run_dir / "model" / "config.yaml").is_file()
    for split in ("val_style", "val_novel"):
        assert (run_dir / "report" / split / "metrics.json").is_file()
        assert f"{split}: 8 samples" in text
    assert '"CIDEr":' in text and "| caption/CIDEr |" in text and "| zeroshot/top1 |" in text
    assert count_outputs(nb, "image/png") >= 1  # loss curves
    print(f"03: {seconds:.1f} s")
