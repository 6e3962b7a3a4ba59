"""mmstory serve (issue 17): the JSON API answers what the library answers, batches concurrent requests, and
bad input never hurts the server. On a tiny untrained model saved and loaded like a real checkpoint."""
from __future__ import annotations

import asyncio
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

import mmstory  # noqa: E402
from conftest import serving, tiny_config  # noqa: E402
from mmstory.model import build_model  # noqa: E402
from mmstory.serve.app import ServeSettings, create_app  # noqa: E402
from mmstory.serve.batcher import DynamicBatcher, QueueFull  # noqa: E402
from mmstory.serve.service import Limits  # noqa: E402

DECODE = {"max_new_tokens": "6"}


def png(seed: int, size=(40, 48)) -> bytes:
    rng = np.random.RandomState(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.rand(size[0], size[1], 3) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def wav(seed: int, seconds: float = 0.5) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, (np.random.RandomState(seed).randn(int(seconds * 16000)) * 0.1).astype(np.float32), 16000,
             format="WAV", subtype="FLOAT")
    return buf.getvalue()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    cfg = tiny_config()
    cfg.decoder.max_len = 96  # room for QA prompts with the byte tokenizer
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ckpt")
    build_model(cfg).save(folder)
    return mmstory.load(folder)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gallery")
    for i in range(4):
        (folder / f"img{i}.png").write_bytes(png(100 + i))
    (folder / "sub").mkdir()
    (folder / "sub" / "beep.wav").write_bytes(wav(7))
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "notes.txt").write_text("not indexed")
    return folder


@pytest.fixture(scope="module")
def client(model, gallery):
    settings = ServeSettings(max_batch=8, max_wait_ms=10, max_body_mb=2, gallery=str(gallery),
                             limits=Limits(max_image_pixels=4_000_000))
    with pytest.warns(RuntimeWarning, match=r"gallery: skipped 1 unreadable files: broken.png"):
        app = create_app(model, settings)
    with TestClient(app) as c:
        yield c


def ok(response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


# ---------------------------------------------------------------------------------------------- answers
def test_health_model_and_stats(client):
    assert ok(client.get("/healthz"))["status"] == "ok"
    m = ok(client.get("/v1/model"))
    assert m["modalities"] == ["image", "audio", "text"]
    assert m["tasks"] == ["caption", "answer", "embed", "retrieve"]
    assert m["gallery"] == {"items": 5, "skipped": 1, "modalities": ["audio", "image"]}
    assert m["decoder"]["max_len"] == 96 and m["parameters"] > 0 and m["limits"]["max_image_pixels"] == 4_000_000
    assert set(ok(client.get("/v1/stats"))) >= {"batches", "requests", "mean_batch_size", "batch_sizes"}


def test_caption_answer_embed_equal_the_library(client, model):
    image, audio = png(1), wav(2)
    pil = Image.open(io.BytesIO(image))
    r = ok(client.post("/v1/caption", files={"image": ("a.png", image, "image/png")}, data=DECODE))
    assert r["caption"] == mmstory.caption(model, [pil], max_new_tokens=6)[0]
    assert r["decode"]["max_new_tokens"] == 6
    assert set(r["timings"]) == {"preprocess_ms", "queue_ms", "model_ms", "total_ms", "batch_size"}
    assert r["timings"]["total_ms"] >= r["timings"]["model_ms"] > 0

    wave, _ = sf.read(io.BytesIO(audio), dtype="float32")
    r = ok(client.post("/v1/caption", files={"audio": ("a.wav", audio, "audio/wav")}, data=DECODE))
    assert r["caption"] == mmstory.caption(model, None, audio=[wave], max_new_tokens=6)[0]

    r = ok(client.post("/v1/answer", files={"image": ("a.png", image, "image/png")},
                       data={"question": "  what is shown?  ", **DECODE}))
    assert r["question"] == "what is shown?"
    assert r["answer"] == mmstory.answer(model, image=pil, question="what is shown?", max_new_tokens=6)

    r = ok(client.post("/v1/embed", files={"image": ("a.png", image, "image/png")}))
    assert r["modality"] == "image" and r["dim"] == len(r["embedding"])
    assert torch.allclose(torch.tensor(r["embedding"]), mmstory.embed_images(model, [pil])[0], atol=1e-5)
    r = ok(client.post("/v1/embed", data={"text": "a red heart"}))
    assert torch.allclose(torch.tensor(r["embedding"]), mmstory.embed_texts(model, ["a red heart"])[0], atol=1e-5)
    r = ok(client.post("/v1/embed", files={"audio": ("a.wav", audio, "audio/wav")}))
    assert torch.allclose(torch.tensor(r["embedding"]), mmstory.embed_audio(model, [wave])[0], atol=1e-5)


def test_decoding_options_reach_the_decoder(client, model):
    image = png(3)
    pil = Image.open(io.BytesIO(image))
    r = ok(client.post("/v1/caption", files={"image": ("a.png", image, "image/png")},
                       data={"max_new_tokens": "5", "num_beams": "3", "length_penalty": "0.5"}))
    assert r["caption"] == mmstory.caption(model, [pil], max_new_tokens=5, num_beams=3, length_penalty=0.5)[0]
    seeded = [ok(client.post("/v1/caption", files={"image": ("a.png", image, "image/png")},
                             data={"do_sample": "true", "seed": "11", "temperature": "2", **DECODE}))["caption"]
              for _ in range(2)]
    assert seeded[0] == seeded[1] == mmstory.caption(model, [pil], do_sample=True, seed=11, temperature=2.0, max_new_tokens=6)[0]


def test_retrieve_ranks_the_gallery_indexed_at_start_up(client, model, gallery):
    r = ok(client.post("/v1/retrieve", data={"text": "a red heart", "k": "3"}))
    assert r["query_modality"] == "text" and len(r["matches"]) == 3
    names = [p.relative_to(gallery).as_posix() for p in sorted(gallery.rglob("*"))
             if p.suffix in (".png", ".wav") and p.name != "broken.png"]
    paths = [str(gallery / n) for n in names]
    images = [p for p in paths if p.endswith(".png")]
    want = mmstory.embed_texts(model, ["a red heart"])[0]
    gallery_embeds = {n: e for n, e in zip([n for n in names if n.endswith(".png")], mmstory.embed_images(model, images))}
    gallery_embeds["sub/beep.wav"] = mmstory.embed_audio(model, [str(gallery / "sub/beep.wav")])[0]
    expected = sorted(gallery_embeds, key=lambda n: -float(gallery_embeds[n] @ want))[:3]
    assert [m["name"] for m in r["matches"]] == expected
    assert [m["rank"] for m in r["matches"]] == [1, 2, 3]
    scores = [m["score"] for m in r["matches"]]
    assert scores == sorted(scores, reverse=True)
    first = r["matches"][0]
    assert client.get(first["url"]).content == (gallery / first["name"]).read_bytes()
    by_image = ok(client.post("/v1/retrieve", files={"image": ("q.png", (gallery / "img2.png").read_bytes())},
                              data={"k": "1"}))
    assert by_image["matches"][0]["name"] == "img2.png" and by_image["matches"][0]["score"] == pytest.approx(1, abs=1e-4)


def test_gallery_files_are_served_by_index_only(client):
    assert client.get("/v1/gallery/99").status_code == 404
    assert client.get("/v1/gallery/-1").status_code == 404
    for path in ("/v1/gallery/..%2F..%2Fetc%2Fpasswd", "/v1/gallery/notes.txt", "/static/..%2F..%2Fapp.py"):
        r = client.get(path)
        assert r.status_code in (404, 422) and "root:" not in r.text and "import" not in r.text


def test_the_page_and_the_docs_load_nothing_from_the_internet(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="file-input"' in page.text
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/static/swagger/swagger-ui-bundle.js" in docs.text
    for asset in ("/static/app.js", "/static/style.css", "/static/swagger/swagger-ui-bundle.js",
                  "/static/swagger/swagger-ui.css"):
        assert client.get(asset).status_code == 200, asset
    for text in (page.text, docs.text, client.get("/static/app.js").text, client.get("/static/style.css").text):
        assert "http://" not in text and "https://" not in text
    paths = ok(client.get("/openapi.json"))["paths"]
    assert {"/v1/caption", "/v1/answer", "/v1/embed", "/v1/retrieve", "/v1/model", "/healthz"} <= set(paths)


# ---------------------------------------------------------------------------------------------- bad input
def _big_png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), "white").save(buf, format="PNG")  # one colour: a few hundred kB on the wire
    return buf.getvalue()


BAD = [  # (what, request kwargs, status, part of the message)
    ("not an image", dict(files={"image": ("x.png", b"hello, I am text", "image/png")}), 415,
     "image (x.png): not an image file that PIL can read"),
    ("truncated", dict(files={"image": ("t.png", png(5)[:200], "image/png")}), 422, "image (t.png): cannot decode"),
    ("8000x8000", dict(files={"image": ("big.png", _big_png(8000, 8000), "image/png")}), 413,
     "the image is 8000x8000 = 64.0 megapixels; this server takes at most 4.0"),
    ("empty file", dict(files={"image": ("e.png", b"", "image/png")}), 422, "image (e.png): the file is empty"),
    ("no input", dict(data=DECODE), 422, "give a file in the form field 'image' or 'audio'"),
    ("wrong field", dict(files={"file": ("a.png", png(1), "image/png")}), 422,
     "unknown field 'file'; /v1/caption takes: image, audio, max_new_tokens"),
    ("a path instead of a file", dict(data={"image": "/etc/passwd"}), 422, "image:"),
    ("audio as image", dict(files={"image": ("a.wav", wav(1), "audio/wav")}), 415, "not an image file"),
    ("image as audio", dict(files={"audio": ("a.png", png(1), "image/png")}), 415, "audio (a.png): not an audio file"),
    ("too many beams", dict(files={"image": ("a.png", png(1))}, data={"num_beams": "100"}), 422, "num_beams:"),
    ("too many tokens", dict(files={"image": ("a.png", png(1))}, data={"max_new_tokens": "1000"}), 422,
     "max_new_tokens: 1000 is over this server's limit of 64"),
    ("not a number", dict(files={"image": ("a.png", png(1))}, data={"top_p": "lots"}), 422, "top_p:"),
    ("body over the limit", dict(files={"image": ("huge.png", b"\0" * 3_000_000)}), 413,
     "the request body is 3.0 MB; this server takes at most 2.0 MB"),
]


@pytest.mark.parametrize("what, kwargs, status, message", BAD, ids=[b[0] for b in BAD])
def test_bad_caption_requests_get_a_json_error_and_the_server_goes_on(client, what, kwargs, status, message):
    r = client.post("/v1/caption", **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["status"] == status and message in body["error"], body
    assert "root:" not in r.text  # nothing read from a path the request named
    assert ok(client.post("/v1/caption", files={"image": ("a.png", png(1))}, data=DECODE))["caption"] is not None


BAD_QUESTIONS = [
    ("", "question: required"),
    ("   ", "question: the question is empty"),
    ("why " * 2500, "question: the question is 10,000 characters; the limit is 500"),
    ("x" * 400, "question: too long for this model: the prompt takes"),  # fits the limit, not the decoder
]


@pytest.mark.parametrize("question, message", BAD_QUESTIONS, ids=["missing", "blank", "10000 chars", "too many tokens"])
def test_bad_questions(client, question, message):
    r = client.post("/v1/answer", files={"image": ("a.png", png(1))}, data={"question": question})
    assert r.status_code == 422 and message in r.json()["error"], r.text


def test_bad_embed_and_retrieve_requests(client):
    r = client.post("/v1/embed", data={"text": "x"}, files={"image": ("a.png", png(1))})
    assert r.status_code == 422 and "give exactly one of the fields 'image', 'audio', 'text' (got 'image', 'text')" \
        in r.json()["error"]
    r = client.post("/v1/retrieve", data={"text": "x", "k": "1000"})
    assert r.status_code == 422 and "k: 1000 is over this server's limit of 50" in r.json()["error"]
    r = client.post("/v1/retrieve", data={"txt": "x"})
    assert r.status_code == 422 and "unknown field 'txt'" in r.json()["error"]


def test_a_chunked_body_over_the_limit_is_cut_off_with_413(client):
    def chunks():
        for _ in range(40):
            yield b"-" * 100_000  # 4 MB, no Content-Length

    r = client.post("/v1/caption", content=chunks(), headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 413 and "over 2.0 MB" in r.json()["error"]
    assert ok(client.get("/healthz"))["status"] == "ok"


def test_retrieve_without_a_gallery_says_how_to_give_one(model):
    with TestClient(create_app(model)) as c:
        r = c.post("/v1/retrieve", data={"text": "x"})
    assert r.status_code == 409 and "--gallery FOLDER" in r.json()["error"]


# ---------------------------------------------------------------------------------------------- batching
def _fake_batcher(**kw):
    sizes: list[int] = []

    def run(key, payloads):
        sizes.append(len(payloads))
        if any(p == "bad" for p in payloads):
            raise ValueError("bad payload")
        time.sleep(0.01)
        return [f"{key}:{p}" for p in payloads]

    return DynamicBatcher(run, **kw), sizes


def test_the_batcher_gathers_concurrent_jobs_and_keeps_each_answer_with_its_request():
    async def go():
        b, sizes = _fake_batcher(max_batch=4, max_wait_ms=50)
        await b.start()
        results = await asyncio.gather(*(b.submit("k" if i % 2 else "j", i) for i in range(12)))
        await b.stop()
        return results, sizes

    results, sizes = asyncio.run(go())
    assert [r for r, _ in results] == [f"{'k' if i % 2 else 'j'}:{i}" for i in range(12)]
    assert max(sizes) == 4 and sum(sizes) == 12 and len(sizes) <= 4  # 6 per key, in batches of at most 4
    assert all(t.batch_size in (2, 4) for _, t in results)


def test_a_failing_job_fails_alone():
    async def go():
        b, sizes = _fake_batcher(max_batch=8, max_wait_ms=50)
        await b.start()
        results = await asyncio.gather(*(b.submit("k", p) for p in (1, "bad", 3)), return_exceptions=True)
        await b.stop()
        return results, sizes

    results, sizes = asyncio.run(go())
    assert results[0][0] == "k:1" and results[2][0] == "k:3"
    assert isinstance(results[1], ValueError) and sizes == [3, 1, 1, 1]


def test_max_batch_1_runs_every_job_alone():
    async def go():
        b, sizes = _fake_batcher(max_batch=1, max_wait_ms=50)
        await b.start()
        await asyncio.gather(*(b.submit("k", i) for i in range(5)))
        await b.stop()
        return sizes

    assert asyncio.run(go()) == [1] * 5


def test_a_full_queue_refuses_with_the_expected_wait():
    release = threading.Event()

    async def go():
        b = DynamicBatcher(lambda key, ps: release.wait(10) and list(ps), max_batch=1, max_wait_ms=0, max_queue=2)
        await b.start()
        running = asyncio.ensure_future(b.submit("k", 0))
        await asyncio.sleep(0.1)  # the first job is in the model; the next two wait
        waiting = [asyncio.ensure_future(b.submit("k", i)) for i in (1, 2)]
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull, match=r"queue is full \(2 waiting\)") as e:
            await b.submit("k", 3)
        release.set()
        done = await asyncio.gather(running, *waiting)
        await b.stop()
        return e.value, done

    error, done = asyncio.run(go())
    assert error.retry_after >= 1 and [r for r, _ in done] == [0, 1, 2]


@pytest.fixture
def served(model):
    """A real uvicorn server (requests arrive concurrently, over sockets)."""
    def start(**settings):
        return serving(create_app(model, ServeSettings(**settings)))
    return start


def test_concurrent_requests_share_batches_and_get_their_own_captions(served, model):
    images = [png(200 + i) for i in range(12)]
    with served(max_batch=16, max_wait_ms=200) as url:
        def one(i):
            with httpx.Client(base_url=url, timeout=60) as c:
                return ok(c.post("/v1/caption", files={"image": (f"{i}.png", images[i])}, data=DECODE))
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(one, range(12)))
        stats = ok(httpx.get(url + "/v1/stats"))
    assert stats["requests"] == 12 and stats["batches"] < 12 and max(r["timings"]["batch_size"] for r in results) > 1
    alone = [mmstory.caption(model, [Image.open(io.BytesIO(b))], max_new_tokens=6)[0] for b in images]
    assert [r["caption"] for r in results] == alone


def test_a_full_queue_is_503_with_retry_after_and_health_answers_while_the_model_works(model):
    release, entered = threading.Event(), threading.Event()
    app = create_app(model, ServeSettings(max_batch=1, max_wait_ms=0, max_queue=1))
    batcher = app.state.batcher
    run = batcher.run_batch

    def blocking(key, payloads):
        entered.set()
        release.wait(30)
        return run(key, payloads)

    batcher.run_batch = blocking
    with serving(app) as url, ThreadPoolExecutor(2) as pool, httpx.Client(base_url=url, timeout=60) as c:
        first = pool.submit(c.post, "/v1/caption", files={"image": ("a.png", png(1))}, data=DECODE)
        assert entered.wait(30)
        second = pool.submit(c.post, "/v1/caption", files={"image": ("b.png", png(2))}, data=DECODE)
        deadline = time.monotonic() + 30
        while ok(c.get("/healthz"))["waiting"] < 1:  # the event loop answers while the model is busy
            assert time.monotonic() < deadline
            time.sleep(0.02)
        third = c.post("/v1/caption", files={"image": ("c.png", png(3))}, data=DECODE)
        release.set()
        assert first.result().status_code == 200 and second.result().status_code == 200
    assert third.status_code == 503 and int(third.headers["retry-after"]) >= 1
    assert "the server is busy: its queue is full (1 waiting); retry in" in third.json()["error"]


def test_bounded_load_has_no_failures_and_stable_memory(served):
    """A fixed number of requests, 16 at a time, on localhost: every one answered, and the server's memory after
    the second half is within 40 MB of after the first (no per-request leak)."""
    psutil = pytest.importorskip("psutil")
    proc = psutil.Process()
    images = [png(300 + i) for i in range(8)]
    with served(max_batch=16, max_wait_ms=5) as url:
        def one(i):
            with httpx.Client(base_url=url, timeout=60) as c:
                if i % 4 == 3:
                    return c.post("/v1/answer", files={"image": ("a.png", images[i % 8])},
                                  data={"question": "what is shown?", **DECODE}).status_code
                return c.post("/v1/caption", files={"image": ("a.png", images[i % 8])}, data=DECODE).status_code
        with ThreadPoolExecutor(16) as pool:
            first = list(pool.map(one, range(160)))
            rss_first = proc.memory_info().rss
            second = list(pool.map(one, range(160)))
            rss_second = proc.memory_info().rss
    assert first.count(200) == 160 and second.count(200) == 160
    assert rss_second - rss_first < 40e6, f"memory grew by {(rss_second - rss_first) / 1e6:.1f} MB"


@pytest.mark.parametrize("args, message", [
    (["/nonexistent/model"], "model folder not found: /nonexistent/model"),
    (["MODEL", "--max-batch", "0"], "max-batch must be >= 1, got 0"),
    (["MODEL", "--port", "http"], "port must be an integer, got 'http'"),
])
def test_serve_command_line_errors_are_one_line(tmp_path, args, message):
    import subprocess
    import sys

    args = [str(tmp_path) if a == "MODEL" else a for a in args]
    res = subprocess.run([sys.executable, "-m", "mmstory.cli", "serve", *args], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 2
    assert message in res.stderr and "Traceback" not in res.stderr
