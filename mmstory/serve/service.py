"""What the server does with a model, without HTTP: check and prepare uploaded bytes, run a batch of prepared
requests through the library's inference functions, index a gallery folder for retrieval.

Uploads are checked before they reach the model (``BadInput`` names the problem and carries the HTTP status):
an image is opened lazily and refused when it has more than ``max_image_pixels`` pixels, before it is decoded;
audio is refused when longer than ``max_audio_seconds``; questions are refused when empty, longer than
``max_question_chars`` or too long for the decoder. Prepared inputs are the model's own tensors (images
resized and normalised, audio resampled), so a batch is only a stack of them and ``run_batch`` cannot meet a
bad file.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Hashable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mmstory import inference
from mmstory.data.transforms import AUDIO_EXTS, IMAGE_EXTS, decode_audio, decode_image
from mmstory.generation import DecodeOptions

class BadInput(Exception):
    """An input the server refuses; ``status`` is the HTTP status (413 too large, 415 not a known format,
    422 unusable), the message names the field and the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Limits:
    max_image_pixels: int = 25_000_000   # 5000 x 5000; an 8000 x 8000 upload is refused before decoding
    max_audio_seconds: float = 60.0
    max_question_chars: int = 500
    max_text_chars: int = 1000           # embed / retrieve text queries
    max_k: int = 50                      # retrieval results per query
    max_new_tokens: int = 64


@dataclass(frozen=True)
class Decode:
    """The decoding options a request may set (``DecodeOptions`` fields), hashable so that requests with equal
    options share a batch."""
    max_new_tokens: int = DecodeOptions.max_new_tokens
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    seed: int | None = None

    def as_kwargs(self) -> dict:
        return asdict(self)


DECODE_FIELDS = tuple(f.name for f in fields(Decode))


@dataclass
class GalleryItem:
    name: str       # path relative to the gallery folder
    modality: str   # "image" or "audio"
    path: Path


class Service:
    def __init__(self, model, limits: Limits | None = None):
        self.model = model.eval()
        self.limits = limits or Limits()
        self.modalities = [m for m in ("image", "audio", "text") if m in model.encoders]
        self.gallery: list[GalleryItem] = []
        self.gallery_embeds: torch.Tensor | None = None
        self.gallery_skipped: list[str] = []

    # ------------------------------------------------------------------ what the model is
    def describe(self) -> dict:
        m = self.model
        cfg = getattr(m, "config", None)
        media = [x for x in self.modalities if x != "text"]
        return {
            "modalities": self.modalities,
            "tasks": (["caption", "answer"] if media else []) + ["embed"] + (["retrieve"] if self.gallery else []),
            "parameters": sum(p.numel() for p in m.parameters()),
            "encoders": {k: {"name": type(e).__name__, **({"image_size": e.preprocess.get("image_size")}
                                                          if k == "image" else {})}
                         for k, e in m.encoders.items()},
            "fusion": None if cfg is None else cfg.fusion.name,
            "decoder": {k: m.decoder.args[k] for k in ("dim", "depth", "heads", "max_len", "vocab_size")},
            "embed_dim": None if cfg is None else cfg.embed_dim,
            "fuse_question": inference.fuses_question(m),
            "prompts": {"caption": m.prompts.caption, "answer": m.prompts.qa},
            "decode_defaults": asdict(Decode()),
            "limits": asdict(self.limits),
            "gallery": {"items": len(self.gallery), "skipped": len(self.gallery_skipped),
                        "modalities": sorted({g.modality for g in self.gallery})},
        }

    def require(self, modality: str, field: str) -> None:
        if modality not in self.model.encoders:
            raise BadInput(422, f"{field}: this model has no {modality} encoder (it takes: "
                                f"{', '.join(self.modalities)})")

    # ------------------------------------------------------------------ inputs
    def prepare_image(self, data: bytes, field: str = "image", name: str | None = None) -> torch.Tensor:
        """Upload bytes -> the image encoder's input (3, S, S), after checking its size in pixels."""
        self.require("image", field)
        what = f"{field} ({name})" if name else field
        if not data:
            raise BadInput(422, f"{what}: the file is empty")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))  # reads the header only
                w, h = img.size
        except UnidentifiedImageError:
            raise BadInput(415, f"{what}: not an image file that PIL can read ({len(data):,} bytes, starting "
                                f"{data[:8]!r})") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise BadInput(413, f"{what}: the image has too many pixels to decode safely") from None
        except Exception as e:
            raise BadInput(422, f"{what}: cannot read the image: {type(e).__name__}: {e}") from None
        if w * h > self.limits.max_image_pixels:
            raise BadInput(413, f"{what}: the image is {w}x{h} = {w * h / 1e6:.1f} megapixels; this server takes at "
                                f"most {self.limits.max_image_pixels / 1e6:.1f} (--max-image-pixels)")
        try:
            pil = decode_image(data)
        except Exception as e:  # truncated or corrupt: PIL raises OSError, SyntaxError, ValueError...
            raise BadInput(422, f"{what}: cannot decode the image: {type(e).__name__}: {e}") from None
        return inference.prepare_images(self.model, pil)[0]

    def prepare_audio(self, data: bytes, field: str = "audio", name: str | None = None) -> np.ndarray:
        """Upload bytes -> a mono waveform at the audio encoder's rate, after checking its duration."""
        import soundfile as sf

        self.require("audio", field)
        what = f"{field} ({name})" if name else field
        if not data:
            raise BadInput(422, f"{what}: the file is empty")
        try:
            info = sf.info(io.BytesIO(data))
        except Exception as e:
            raise BadInput(415, f"{what}: not an audio file that soundfile can read (WAV, FLAC, OGG): "
                                f"{type(e).__name__}: {e}") from None
        if info.duration > self.limits.max_audio_seconds:
            raise BadInput(413, f"{what}: the clip is {info.duration:.1f} s; this server takes at most "
                                f"{self.limits.max_audio_seconds:g} s (--max-audio-seconds)")
        try:
            return decode_audio(data, self.model.encoders["audio"].preprocess["sample_rate"])
        except Exception as e:
            raise BadInput(422, f"{what}: cannot decode the audio: {type(e).__name__}: {e}") from None

    def check_question(self, question: str | None) -> str:
        if question is None or not question.strip():
            raise BadInput(422, "question: the question is empty")
        if len(question) > self.limits.max_question_chars:
            raise BadInput(422, f"question: the question is {len(question):,} characters; the limit is "
                                f"{self.limits.max_question_chars:,}")
        return question.strip()

    def check_text(self, text: str | None, field: str = "text") -> str:
        self.require("text", field)
        if text is None or not text.strip():
            raise BadInput(422, f"{field}: the text is empty")
        if len(text) > self.limits.max_text_chars:
            raise BadInput(422, f"{field}: the text is {len(text):,} characters; the limit is "
                                f"{self.limits.max_text_chars:,}")
        return text.strip()

    def fit_decode(self, options: Decode, prompt: str) -> Decode:
        """``options`` with ``max_new_tokens`` lowered to what the decoder has room for after ``prompt``, so
        every request of a batch keeps its own limit (the library would lower it to the longest prompt's)."""
        prompt_tokens = 1 + len(self.model.tokenizer.encode(prompt))  # + bos
        room = self.model.decoder.max_len - prompt_tokens
        if room < 1:
            raise BadInput(422, f"question: too long for this model: the prompt takes {prompt_tokens} of the "
                                f"decoder's {self.model.decoder.max_len} positions")
        if options.max_new_tokens > room:
            options = Decode(**{**options.as_kwargs(), "max_new_tokens": room})
        return options

    # ------------------------------------------------------------------ batches
    @staticmethod
    def batch_key(task: str, payload: dict, options: Decode | None = None, alone: object = None) -> Hashable:
        """Requests with equal keys share a batch: same task, same inputs given, same decoding options. A
        seeded sampling request runs alone (``alone`` unique), so its output depends only on its seed."""
        present = tuple(k for k in ("image", "audio", "text") if payload.get(k) is not None)
        return (task, present, options, alone)

    def run_batch(self, key: Hashable, payloads: Sequence[dict]) -> list[Any]:
        """One batched call of the library's inference for requests of equal ``key``."""
        task, present, options, _ = key
        m, n = self.model, len(payloads)
        image = [p["image"] for p in payloads] if "image" in present else None
        audio = [p["audio"] for p in payloads] if "audio" in present else None
        with torch.inference_mode():
            if task == "caption":
                return inference.caption(m, image, audio=audio, batch_size=n, **options.as_kwargs())
            if task == "answer":
                return inference.answer(m, question=[p["question"] for p in payloads], image=image, audio=audio,
                                        batch_size=n, **options.as_kwargs())
            if task == "embed":
                if present == ("text",):
                    out = inference.embed_texts(m, [p["text"] for p in payloads], batch_size=n)
                elif present == ("image",):
                    out = inference.embed_images(m, image, batch_size=n)
                else:
                    out = inference.embed_audio(m, audio, batch_size=n)
                return list(out)
        raise ValueError(f"unknown task {task!r}")

    # ------------------------------------------------------------------ gallery
    def index_gallery(self, folder: str | Path, *, max_items: int = 50_000, batch_size: int = 64,
                      progress: bool = True) -> dict:
        """Embed every image and audio file under ``folder`` once; unreadable files are skipped and named."""
        from tqdm.auto import tqdm

        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"gallery folder not found: {folder}")
        exts = {"image": set(IMAGE_EXTS) | {"gif", "bmp"}, "audio": set(AUDIO_EXTS) | {"ogg"}}
        items = []
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
            ext = path.suffix.lower().lstrip(".")
            modality = next((m for m, e in exts.items() if ext in e and m in self.model.encoders), None)
            if modality is not None:
                items.append(GalleryItem(str(path.relative_to(folder)), modality, path))
        if len(items) > max_items:
            raise ValueError(f"gallery {folder} has {len(items):,} files; the limit is {max_items:,} (--max-gallery)")
        kept, embeds, skipped = [], [], []
        for modality in ("image", "audio"):
            group = [g for g in items if g.modality == modality]
            for start in tqdm(range(0, len(group), batch_size), desc=f"gallery {modality}", unit="batch",
                              disable=not progress or not group):
                prepared, ok = [], []
                for g in group[start:start + batch_size]:
                    try:
                        data = g.path.read_bytes()
                        prepared.append(self.prepare_image(data, "gallery", g.name) if modality == "image"
                                        else self.prepare_audio(data, "gallery", g.name))
                        ok.append(g)
                    except (BadInput, OSError) as e:
                        skipped.append(f"{g.name}: {getattr(e, 'message', e)}")
                if ok:
                    payloads = [{modality: x} for x in prepared]
                    embeds += self.run_batch(("embed", (modality,), None, None), payloads)
                    kept += ok
        if skipped:
            warnings.warn(f"gallery: skipped {len(skipped)} unreadable files: " + "; ".join(skipped[:10])
                          + (" ..." if len(skipped) > 10 else ""), RuntimeWarning, stacklevel=2)
        self.gallery, self.gallery_skipped = kept, skipped
        self.gallery_embeds = torch.stack(embeds) if embeds else None
        return {"items": len(kept), "skipped": len(skipped)}

    def rank(self, query: torch.Tensor, k: int) -> list[dict]:
        """The gallery's ``k`` nearest items to one normalised embedding, best first."""
        if self.gallery_embeds is None:
            raise BadInput(409, "this server has no gallery to retrieve from (start it with --gallery FOLDER)")
        scores, idx = inference.rank(query[None], self.gallery_embeds, k)
        return [{"rank": r + 1, "index": int(i), "name": self.gallery[int(i)].name,
                 "modality": self.gallery[int(i)].modality, "score": round(float(s), 5), "url": f"/v1/gallery/{int(i)}"}
                for r, (s, i) in enumerate(zip(scores[0].tolist(), idx[0].tolist()))]
