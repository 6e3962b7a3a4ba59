"""The HTTP API and web page over one model: FastAPI routes, upload limits, JSON errors.

    app = create_app(mmstory.load("runs/emoji_tiny/model"), ServeSettings(gallery="my_images/"))
    uvicorn.run(app, host="127.0.0.1", port=8000)      # what ``mmstory serve`` does

Routes (OpenAPI docs at ``/docs``, served from local files):
    GET  /                   the web page (mmstory/serve/static/)
    GET  /healthz            {"status": "ok", ...}
    GET  /v1/model           modalities, tasks, config summary, decoding defaults, limits
    GET  /v1/stats           batching so far: batches, mean batch size, model seconds
    POST /v1/caption         image and/or audio file (+ decoding options)        -> {"caption", ...}
    POST /v1/answer          image and/or audio file + question (+ options)      -> {"answer", ...}
    POST /v1/embed           one of image / audio file or text                   -> {"embedding", ...}
    POST /v1/retrieve        one of text / image / audio, k                      -> {"matches": [...]}
    GET  /v1/gallery/{i}     the i-th gallery file (by index only: no request names a path)

Every request body is multipart/form-data (``curl -F``). Every response carries ``timings`` (ms) and every
error is ``{"error": message, "status": code}`` naming the field and the problem: 413 body or image too
large, 415 not an image/audio file, 422 unusable input or unknown field, 503 queue full (with Retry-After).
"""
from __future__ import annotations

import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from mmstory.inference import asked_as_trained
from mmstory.serve.batcher import DynamicBatcher, QueueFull
from mmstory.serve.service import DECODE_FIELDS, BadInput, Decode, Limits, Service

STATIC = Path(__file__).parent / "static"


@dataclass
class ServeSettings:
    max_batch: int = 32          # requests per batched forward; 1 turns batching off
    max_wait_ms: float = 5.0     # how long the first request of a batch waits for others
    max_queue: int = 256         # waiting requests beyond this get 503 + Retry-After
    max_body_mb: float = 20.0    # request bodies beyond this get 413
    gallery: str | None = None   # folder of images/audio indexed at start-up for /v1/retrieve
    limits: Limits = field(default_factory=Limits)


# ---------------------------------------------------------------------------------------------- response shapes
class Timings(BaseModel):
    preprocess_ms: float
    queue_ms: float
    model_ms: float
    total_ms: float
    batch_size: int


class CaptionResponse(BaseModel):
    caption: str
    decode: dict
    timings: Timings


class AnswerResponse(BaseModel):
    question: str
    answer: str
    decode: dict
    timings: Timings
    asked_as: str | None = None  # the training question the model was asked instead (its question bank), if any


class EmbedResponse(BaseModel):
    modality: str
    dim: int
    embedding: list[float]
    timings: Timings


class Match(BaseModel):
    rank: int
    index: int
    name: str
    modality: str
    score: float
    url: str


class RetrieveResponse(BaseModel):
    query_modality: str
    matches: list[Match]
    timings: Timings


class ErrorResponse(BaseModel):
    error: str
    status: int


ERRORS = {code: {"model": ErrorResponse} for code in (413, 415, 422, 503)}
# module level: route signatures are resolved from this module's globals (annotations are strings here)
ImageFile = Annotated[UploadFile | None, File(description="an image file (PNG, JPEG, WebP, ...)")]
AudioFile = Annotated[UploadFile | None, File(description="an audio file (WAV, FLAC, OGG)")]


# ---------------------------------------------------------------------------------------------- limits and errors
class BodyLimit:
    """ASGI middleware: a body over ``max_bytes`` gets 413, by its Content-Length before anything is read, or
    (chunked uploads) as soon as the bytes received pass the limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _json(scope, receive, send, 413, f"the request body is {int(length) / 1e6:.1f} MB; this server takes at "
                                          f"most {self.max_bytes / 1e6:.1f} MB (--max-body-mb)")
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # FastAPI re-raises an HTTPException met while reading the body
                    raise HTTPException(413, f"the request body is over {self.max_bytes / 1e6:.1f} MB, the most "
                                             f"this server takes (--max-body-mb)")
            return message

        await self.app(scope, limited, send)


async def _json(scope, receive, send, status: int, message: str) -> None:
    await _error(status, message)(scope, receive, send)


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors():
        where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path"))
        msg = e.get("msg", "invalid")
        if e.get("type") == "missing":
            msg = "required"
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------- the app
def create_app(model, settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    service = Service(model, settings.limits)
    if settings.gallery:
        service.index_gallery(settings.gallery)
    batcher = DynamicBatcher(service.run_batch, max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms,
                             max_queue=settings.max_queue)
    started = time.time()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="mmstory", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Captions, answers, embeddings and retrieval from one mmstory model. Bodies are "
                              "multipart/form-data; errors are JSON {error, status}.")
    app.state.service, app.state.batcher, app.state.settings = service, batcher, settings
    app.add_middleware(BodyLimit, max_bytes=int(settings.max_body_mb * 1e6))

    @app.exception_handler(BadInput)
    async def bad_input(_, exc: BadInput):
        return _error(exc.status, exc.message)

    @app.exception_handler(QueueFull)
    async def queue_full(_, exc: QueueFull):
        return _error(503, str(exc), {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        return _error(422, _validation_message(exc))

    @app.exception_handler(HTTPException)
    async def http_error(_, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def crashed(_, exc: Exception):  # a bug: say so in JSON; uvicorn logs the traceback
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ shared pieces
    def only_fields(*names: str):
        """A dependency that refuses form fields the route does not take (a misspelt field would otherwise be
        ignored and the request answered without it)."""
        allowed = set(names)

        async def check(request: Request):
            form = await request.form()  # parsed once; FastAPI cached it
            unknown = sorted(set(form.keys()) - allowed)
            if unknown:
                raise BadInput(422, f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                                    f"{request.url.path} takes: {', '.join(names)}")
        return Depends(check)

    def decode_form(
        max_new_tokens: Annotated[int, Form(ge=1, description="tokens to generate at most")] = Decode.max_new_tokens,
        num_beams: Annotated[int, Form(ge=1, le=8)] = 1,
        do_sample: Annotated[bool, Form()] = False,
        temperature: Annotated[float, Form(gt=0, le=10)] = 1.0,
        top_k: Annotated[int, Form(ge=0, le=1000)] = 0,
        top_p: Annotated[float, Form(gt=0, le=1)] = 1.0,
        repetition_penalty: Annotated[float, Form(gt=0, le=10)] = 1.0,
        length_penalty: Annotated[float, Form(ge=-10, le=10)] = 1.0,
        seed: Annotated[int | None, Form(ge=0, le=2**31 - 1)] = None,
    ) -> Decode:
        if max_new_tokens > settings.limits.max_new_tokens:
            raise BadInput(422, f"max_new_tokens: {max_new_tokens} is over this server's limit of "
                                f"{settings.limits.max_new_tokens}")
        return Decode(max_new_tokens, num_beams, do_sample, temperature, top_k, top_p, repetition_penalty,
                      length_penalty, seed)

    async def media(image: UploadFile | None, audio: UploadFile | None, *, required: bool = True) -> dict:
        payload: dict[str, Any] = {}
        if image is not None:
            payload["image"] = await run_in_threadpool(service.prepare_image, await image.read(), "image",
                                                       image.filename)
        if audio is not None:
            payload["audio"] = await run_in_threadpool(service.prepare_audio, await audio.read(), "audio",
                                                       audio.filename)
        if required and not payload:
            have = [m for m in ("image", "audio") if m in service.modalities]
            raise BadInput(422, f"give a file in the form field {' or '.join(map(repr, have))}")
        return payload

    async def run(task: str, payload: dict, options: Decode | None, t0: float, t1: float) -> tuple[Any, dict]:
        alone = object() if options is not None and options.do_sample and options.seed is not None else None
        result, timed = await batcher.submit(Service.batch_key(task, payload, options, alone), payload)
        return result, {"preprocess_ms": round((t1 - t0) * 1e3, 2), **timed.as_dict(),
                        "total_ms": round((time.perf_counter() - t0) * 1e3, 2)}

    # ------------------------------------------------------------------ routes
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "uptime_s": round(time.time() - started, 1), "waiting": batcher.waiting}

    @app.get("/v1/model")
    async def describe():
        return service.describe()

    @app.get("/v1/stats")
    async def stats():
        return batcher.stats()

    @app.post("/v1/caption", response_model=CaptionResponse, responses=ERRORS)
    async def caption(image: ImageFile = None, audio: AudioFile = None, options: Decode = Depends(decode_form),
                      _=only_fields("image", "audio", *DECODE_FIELDS)):
        """Caption an image, an audio clip, or the pair."""
        t0 = time.perf_counter()
        payload = await media(image, audio)
        options = service.fit_decode(options, service.model.prompts.caption)
        text, timings = await run("caption", payload, options, t0, time.perf_counter())
        return {"caption": text, "decode": asdict(options), "timings": timings}

    @app.post("/v1/answer", response_model=AnswerResponse, responses=ERRORS)
    async def answer(question: Annotated[str, Form(description="the question about the image/audio")],
                     image: ImageFile = None, audio: AudioFile = None, options: Decode = Depends(decode_form),
                     _=only_fields("question", "image", "audio", *DECODE_FIELDS)):
        """Answer a question about an image, an audio clip, or both (the question is the decoder's prompt)."""
        t0 = time.perf_counter()
        question = service.check_question(question)
        payload = await media(image, audio)
        # the question bank's choice, made once here: the worker's answer() finds it in the bank as it is
        payload["question"] = asked = (await run_in_threadpool(asked_as_trained, service.model, [question]))[0]
        options = service.fit_decode(options, service.model.prompts.question(asked))
        text, timings = await run("answer", payload, options, t0, time.perf_counter())
        return {"question": question, "answer": text, "decode": asdict(options), "timings": timings,
                "asked_as": asked if asked != question else None}

    async def one_query(image, audio, text) -> dict:
        given = [n for n, v in (("image", image), ("audio", audio), ("text", text)) if v is not None]
        if len(given) != 1:
            raise BadInput(422, f"give exactly one of the fields 'image', 'audio', 'text' (got "
                                f"{', '.join(map(repr, given)) or 'none'})")
        if text is not None:
            return {"text": service.check_text(text)}
        return await media(image, audio)

    @app.post("/v1/embed", response_model=EmbedResponse, responses=ERRORS)
    async def embed(image: ImageFile = None, audio: AudioFile = None,
                    text: Annotated[str | None, Form(description="a text to embed")] = None,
                    _=only_fields("image", "audio", "text")):
        """The L2-normalised embedding of one image, audio clip or text (the contrastive space)."""
        t0 = time.perf_counter()
        payload = await one_query(image, audio, text)
        vector, timings = await run("embed", payload, None, t0, time.perf_counter())
        return {"modality": next(iter(payload)), "dim": len(vector), "embedding": vector.tolist(), "timings": timings}

    @app.post("/v1/retrieve", response_model=RetrieveResponse, responses={**ERRORS, 409: {"model": ErrorResponse}})
    async def retrieve(image: ImageFile = None, audio: AudioFile = None,
                       text: Annotated[str | None, Form(description="a text query")] = None,
                       k: Annotated[int, Form(ge=1)] = 5, _=only_fields("image", "audio", "text", "k")):
        """The gallery items nearest to a text, image or audio query."""
        t0 = time.perf_counter()
        if k > settings.limits.max_k:
            raise BadInput(422, f"k: {k} is over this server's limit of {settings.limits.max_k}")
        if service.gallery_embeds is None:
            service.rank(None, k)  # raises the 409 that names --gallery
        payload = await one_query(image, audio, text)
        vector, timings = await run("embed", payload, None, t0, time.perf_counter())
        return {"query_modality": next(iter(payload)), "matches": service.rank(vector, k), "timings": timings}

    @app.get("/v1/gallery/{index}", responses={404: {"model": ErrorResponse}})
    async def gallery_file(index: int):
        """A gallery file by its index in the listing (the only files this server sends)."""
        if not 0 <= index < len(service.gallery):
            raise BadInput(404, f"no gallery item {index} (the gallery has {len(service.gallery)})")
        return FileResponse(service.gallery[index].path)

    # ------------------------------------------------------------------ docs and page assets, all local
    swagger = _swagger_assets()
    if swagger is not None:
        app.mount("/static/swagger", StaticFiles(directory=swagger), name="swagger")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        if swagger is None:
            return HTMLResponse("<p>Interactive docs need the fastapi-swagger package (pip install "
                                "'mmstory[serve]'); the schema is at <a href='/openapi.json'>/openapi.json</a>.</p>")
        return get_swagger_ui_html(openapi_url="/openapi.json", title="mmstory API",
                                   swagger_js_url="/static/swagger/swagger-ui-bundle.js",
                                   swagger_css_url="/static/swagger/swagger-ui.css",
                                   swagger_favicon_url="/static/swagger/favicon-32x32.png")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _swagger_assets() -> Path | None:
    """Swagger UI 5's files as the fastapi-swagger package ships them (FastAPI's default /docs loads them from a
    CDN, which a machine without internet cannot reach)."""
    try:
        import fastapi_swagger.resources as resources
    except ImportError:
        return None
    return Path(resources.__file__).parent
