"""Per-sample transforms: image and audio ops, and ``SampleDecoder`` (raw shard sample -> decoded
sample with its task, prompt and target), drawing every random number from an explicit RNG.

torchvision's random transforms read the global torch RNG, so the same sample would be augmented
differently depending on what ran before it. Here each transform takes a ``random.Random`` seeded
from (seed, epoch, sample key), which keeps a batch a pure function of the loader's arguments and
lets a resumed run skip samples without changing the ones after them. The image ops themselves are
torchvision's functional ones.
"""
from __future__ import annotations

import io
import json
import math
import random
from collections import Counter
from typing import Any, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError

from mmstory.config import DataConfig
from mmstory.data.wordings import Wordings
from mmstory.prompts import Prompts

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
AUDIO_EXTS = ("flac", "wav")

DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)


# ---------------------------------------------------------------------------------------------- image
def decode_image(data: bytes) -> Image.Image:
    """Decode PNG/JPEG/WebP bytes to RGB (``to_rgb``). The one image decoder of training, evaluation,
    inference, ``data build`` and ``data verify``."""
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # its message names an in-memory buffer, which helps nobody
        raise ValueError(f"not an image file that PIL can read ({len(data):,} bytes, starting {data[:8]!r})") from None
    img.load()  # decode now, so a corrupt file fails here and not inside a transform
    return to_rgb(img)


# PIL's single-channel modes beyond 8 bits, and the pixel value each mode's range maps to white. PIL's
# convert("RGB") clips them at 255, so a 16-bit greyscale PNG (values up to 65535) came out all white. They are
# scaled by the mode's range, not by the image's own min/max: a dark 16-bit image must stay dark, and the same
# pixel value must give the same grey in every image. "I" is what 16-bit PNGs open as in older Pillow (and
# what PIL converts I;16 to), so its range is taken as 16-bit. "F" (float TIFF, PFM) has no fixed range; 0-1
# is the convention of float image files and of float pixels everywhere else in mmstory (inference.to_pil).
_HIGH_BIT_DEPTH = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB, the one conversion behind ``decode_image`` (training, evaluation, ``data
    verify``), ``data build`` and inference: 16-bit greyscale and float images rescaled by their mode's range
    (``_HIGH_BIT_DEPTH``); transparent pixels composited on white (emoji are drawn on a transparent
    background, and black-on-black would erase their outlines)."""
    if img.mode in _HIGH_BIT_DEPTH:  # PNG 16-bit greyscale opens as I;16 (older Pillow: I)
        unit = np.clip(np.asarray(img, dtype=np.float64) / _HIGH_BIT_DEPTH[img.mode], 0.0, 1.0)
        unit = np.nan_to_num(unit)  # an F image's NaN pixels: black (inf was clipped to white)
        img = Image.fromarray(np.round(unit * 255.0).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(canvas, img)
    return img.convert("RGB")


def random_resized_crop_params(width: int, height: int, rng: random.Random, *,
                               scale: tuple[float, float] = (0.7, 1.0),
                               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` as in torchvision's ``RandomResizedCrop.get_params``, drawn from ``rng``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    # fallback: the largest centred crop within the ratio range
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class ImageTransform:
    """PIL RGB image -> normalised float tensor ``(3, S, S)``.

    train: RandomResizedCrop(S, scale) + mild colour jitter. No horizontal flip: emoji and rendered
    text have a direction ("facing right"), which a flip would make a wrong caption.
    eval: resize the short side to S, centre crop.
    """

    def __init__(self, *, size: int, train: bool, augment: bool = True, scale=(0.7, 1.0),
                 jitter: float = 0.1, mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD):
        self.size, self.train, self.augment = size, train, augment
        self.scale, self.jitter = tuple(scale), jitter
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        s = self.size
        if self.train and self.augment:
            top, left, h, w = random_resized_crop_params(img.width, img.height, rng, scale=self.scale)
            img = TF.resized_crop(img, top, left, h, w, [s, s], interpolation=TF.InterpolationMode.BICUBIC,
                                  antialias=True)
            if self.jitter > 0:
                img = self.color_jitter(img, rng)
        else:
            img = TF.center_crop(TF.resize(img, s, interpolation=TF.InterpolationMode.BICUBIC, antialias=True), s)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)  # (3, S, S) in [0, 255]
        return (x / 255.0 - self.mean) / self.std

    def color_jitter(self, img: Image.Image, rng: random.Random) -> Image.Image:
        """Brightness, contrast and saturation each scaled by a factor in [1-j, 1+j], on the PIL image
        (C code, several times faster than tensor ops at this size). No hue shift: colour words like
        "red heart" must stay true."""
        j = self.jitter
        b, c, s = (rng.uniform(1 - j, 1 + j) for _ in range(3))
        return TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(img, b), c), s)


# ---------------------------------------------------------------------------------------------- audio
def decode_audio(data: bytes, sample_rate: int | None) -> np.ndarray:
    """FLAC/WAV bytes -> mono float32 waveform at ``sample_rate`` (polyphase resampling; None: as stored).
    Raises ValueError for a clip with no samples or with NaN/inf samples (which would make a NaN loss in
    training and an empty caption in inference)."""
    import soundfile as sf

    wav, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)  # (T, C)
    wav = wav.mean(axis=1)
    if wav.size == 0:
        raise ValueError("empty audio")
    bad = int(np.count_nonzero(~np.isfinite(wav)))
    if bad:
        raise ValueError(f"{bad} of {wav.size} samples are not finite (NaN or inf)")
    if sample_rate is not None and sr != sample_rate:
        from scipy.signal import resample_poly

        g = math.gcd(int(sr), int(sample_rate))
        wav = resample_poly(wav, sample_rate // g, sr // g).astype(np.float32)
    return np.ascontiguousarray(wav, dtype=np.float32)


def crop_audio(wav: np.ndarray, length: int, rng: random.Random | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crop (``rng`` given) or the start (``rng=None``) to ``length`` samples, zero-padded.
    Returns waveform ``(T,)`` float and mask ``(T,)`` bool (True = real sample)."""
    start = rng.randint(0, len(wav) - length) if (rng is not None and len(wav) > length) else 0
    piece = torch.from_numpy(wav[start:start + length].copy())
    out = torch.zeros(length, dtype=torch.float32)
    mask = torch.zeros(length, dtype=torch.bool)
    out[: len(piece)] = piece
    mask[: len(piece)] = True
    return out, mask


# ---------------------------------------------------------------------------------------------- sample
class BadSample(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def strings(value: Any) -> list[str]:
    """The non-blank strings of a sample json's list field, stripped ([] for anything else)."""
    return [v.strip() for v in value if isinstance(v, str) and v.strip()] if isinstance(value, list) else []


def qa_items(meta: dict) -> list[dict]:
    """A sample json's usable ``qa`` items as ``{"question", "answers", "type"}``: question stripped, answers
    through ``strings``; items without a question or without an answer are left out."""
    items = meta.get("qa") if isinstance(meta.get("qa"), list) else []
    return [{"question": q["question"].strip(), "answers": answers, "type": str(q.get("type", ""))}
            for q in items if isinstance(q, dict) and isinstance(q.get("question"), str)
            and (answers := strings(q.get("answers")))]


def _most_common(answers: list[str]) -> str:
    counts = Counter(answers)
    return max(answers, key=lambda a: counts[a])  # ties: the first listed


class SampleDecoder:
    """Raw sample -> decoded sample dict (the input of ``collate``)::

        {"__key__", "image": (3, H, W)?, "audio": (T,)?, "audio_mask": (T,)?, "caption": str,
         "question": str, "task": str, "prompt": str, "prompt_filled": (str, str), "target": str,
         "references": [str], "meta": dict}

    ``prompt`` and ``prompt_filled`` come from ``prompts`` (the model's, ``Prompts.fill``).

    Raises BadSample(reason, detail) for data it cannot use.
    """

    def __init__(self, cfg: DataConfig, *, train: bool, prompts: Prompts = Prompts(), mean=DEFAULT_MEAN,
                 std=DEFAULT_STD):
        self.cfg, self.train, self.prompts = cfg, train, prompts
        self.image_tf = ImageTransform(size=cfg.image_size, train=train, augment=cfg.augment,
                                       scale=cfg.crop_scale, jitter=cfg.color_jitter, mean=mean, std=std)
        self.audio_len = int(round(cfg.audio_seconds * cfg.sample_rate))
        self.wordings = Wordings.load(cfg.wordings) if (train and cfg.wordings) else None

    def __call__(self, raw: dict, rng: random.Random) -> dict:
        cfg, train = self.cfg, self.train
        meta: dict = {}
        if "json" in raw:
            try:
                meta = json.loads(raw["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise BadSample("bad_json", str(e)) from None
            if not isinstance(meta, dict):
                raise BadSample("bad_json", "json is not an object")
        captions = strings(meta.get("captions"))
        if not captions and "txt" in raw:  # img2dataset: the caption is a .txt file
            captions = strings([raw["txt"].decode("utf-8", errors="replace")])
        captions_zh, questions = strings(meta.get("captions_zh")), qa_items(meta)

        image_ext = next((e for e in IMAGE_EXTS if e in raw), None)
        audio_ext = next((e for e in AUDIO_EXTS if e in raw), None)
        if image_ext is None and audio_ext is None:
            raise BadSample("missing_input", f"no image ({'/'.join(IMAGE_EXTS)}) or audio "
                                             f"({'/'.join(AUDIO_EXTS)}); has {sorted(raw)}")
        out: dict[str, Any] = {"__key__": raw["__key__"], "meta": meta}
        if image_ext is not None:
            try:
                img = decode_image(raw[image_ext])
            except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...)
                raise BadSample("bad_image", f"{image_ext}: {type(e).__name__}: {e}") from None
            out["image"] = self.image_tf(img, rng)
        if audio_ext is not None:
            try:
                wav = decode_audio(raw[audio_ext], cfg.sample_rate)
            except Exception as e:  # soundfile raises LibsndfileError/RuntimeError/ValueError
                raise BadSample("bad_audio", f"{audio_ext}: {type(e).__name__}: {e}") from None
            out["audio"], out["audio_mask"] = crop_audio(wav, self.audio_len,
                                                         rng if (train and cfg.augment) else None)

        weights = cfg.tasks if image_ext is not None else cfg.audio_tasks
        has_text = {"caption": bool(captions), "caption_zh": bool(captions_zh), "qa": bool(questions)}
        choices = [(t, w) for t, w in weights.items() if w > 0 and has_text[t]]
        if not choices:
            raise BadSample("missing_text", f"no text for any of the tasks {sorted(weights)}")
        task = rng.choices([t for t, _ in choices], weights=[w for _, w in choices])[0]

        pick = rng.choice if train else (lambda xs: xs[0])
        question = ""
        if task == "qa":
            item = pick(questions)
            question, references = item["question"], item["answers"]
            if self.wordings is not None:
                question = self.wordings.reword(question, rng, keep=1.0 - cfg.reword_prob)
            target = rng.choice(references) if train else _most_common(references)
        else:
            references = captions if task == "caption" else captions_zh
            target = pick(references)
        # the prompt's part filled in from the sample (the question), as the prompt text up to its end:
        # the caption loss's prompt_weight scores those tokens and never the template's own words
        prompt, filled = self.prompts.fill(task, question)
        out.update(caption=pick(captions) if captions else "", question=question, task=task,
                   prompt=prompt, prompt_filled=filled, target=target, references=references)
        return out
