"""Inference on raw inputs: captions, answers, embeddings, retrieval and zero-shot classification.

Functions of a model, also exported as ``mmstory.caption`` etc.::

    model = mmstory.load("runs/emoji/model")
    mmstory.caption(model, ["cat.png", pil_image], num_beams=3)             # -> ["a cat face", ...]
    mmstory.answer(model, image="cat.png", question="what is shown?")       # -> "cat face"
    mmstory.answer(model, audio="cat.flac", question="what is said?")
    mmstory.retrieve(model, "a red heart", gallery=["a.png", "b.png"], k=1)  # -> [Match(index, score, item)]
    mmstory.zero_shot_classify(model, images, ["cat", "dog"])               # -> Classification

The model itself works on tensors and knows nothing of files; this module sits above it (and above the data
transforms it shares with training). Prompts are the model's own (``model.prompts``, saved with it).

Inputs, and what is done to them (the same eval transforms as ``mmstory.data``, so inference equals
evaluation):

    image  PIL image | path (str / Path) | raw pixels: uint8 array or tensor, (H, W, 3) or (3, H, W),
           or a float numpy array in [0, 1]    -> decode, RGB on white, resize + centre crop, normalise
           float torch tensor (3, S, S) or (N, 3, S, S)  -> taken as ALREADY normalised model input
    audio  path (FLAC/WAV, decoded with soundfile) | 1-D numpy/torch waveform at ``sample_rate``
           (default: the encoder's) or a 2-D (N, T) batch -> mono, resampled to the encoder's rate,
           cut to ``audio_seconds`` from the start (default: the encoder's max_seconds)
    text   str

Every function takes ``batch_size`` (inputs are processed in chunks of that many) and ``device``
(moves the model there first; default: where the model is).
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mmstory.data.transforms import (AUDIO_EXTS, IMAGE_EXTS, ImageTransform, crop_audio, decode_audio, decode_image,
                                     to_rgb)
from mmstory.generation import DecodeOptions
from mmstory.errors import UserError

if TYPE_CHECKING:
    from mmstory.model import MultimodalModel

ImageInput = Union[Image.Image, str, os.PathLike, np.ndarray, torch.Tensor]
AudioInput = Union[str, os.PathLike, np.ndarray, torch.Tensor]

DEFAULT_TEMPLATES = ("an emoji of a {}.", "{}")


@dataclass
class Match:
    index: int    # position in the gallery
    score: float  # cosine similarity
    item: Any     # the gallery entry as given


@dataclass
class Classification:
    labels: list[str]      # (N,) best class name per input
    indices: torch.Tensor  # (N,) long, index of that class
    scores: torch.Tensor   # (N, C) cosine similarity to each class's averaged template embedding


# ---------------------------------------------------------------------------------------------- checks
def require_encoder(model: "MultimodalModel", modality: str) -> None:
    if modality not in model.encoders:
        raise ValueError(f"this model has no {modality} encoder (it has: {', '.join(model.encoders)}); "
                         f"it cannot take {modality} inputs")


def _on_device(model: "MultimodalModel", device: str | torch.device | None) -> torch.device:
    if device is not None and torch.device(device) != model.device:
        model.to(device)
    return model.device


def _chunks(n: int, size: int):
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _read_file(path: str | os.PathLike, what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file not found: {p}")
    return p.read_bytes()


# ---------------------------------------------------------------------------------------------- images
def image_transform(model: "MultimodalModel") -> ImageTransform:
    """The evaluation transform for the model's image encoder (resize short side, centre crop, normalise)."""
    require_encoder(model, "image")
    pp = model.encoders["image"].preprocess
    return ImageTransform(size=pp["image_size"], train=False, mean=pp["mean"], std=pp["std"])


def to_pil(image: ImageInput) -> Image.Image:
    """A raw image input -> RGB PIL image: a path through ``decode_image``, a PIL image through ``to_rgb`` (the
    same conversion: 16-bit and float images rescaled, transparent pixels on white); arrays are uint8 pixels
    or float pixels in [0, 1]."""
    if isinstance(image, (str, os.PathLike)):
        data = _read_file(image, "image")
        try:
            return decode_image(data)
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files
            raise UserError(f"cannot read image {image}: {type(e).__name__}: {e}") from None
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or 3 not in (image.shape[0], image.shape[-1]):
            raise ValueError(f"a raw image array must be (H, W, 3) or (3, H, W); got shape {image.shape}")
        if image.shape[-1] != 3:
            image = image.transpose(1, 2, 0)
        if image.dtype != np.uint8:  # float pixels in [0, 1]
            image = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(image), "RGB")
    if isinstance(image, Image.Image):
        return to_rgb(image)  # as decode_image converts files: 16-bit/float rescaled, alpha on white
    raise TypeError(f"unsupported image input of type {type(image).__name__}; expected a PIL image, a path, "
                    f"an array or a tensor")


def _image_list(images: ImageInput | Sequence[ImageInput]) -> list:
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def prepare_images(model: "MultimodalModel", images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
    """Any image input(s) -> the encoder's input (N, 3, S, S), normalised, on the CPU."""
    tf = image_transform(model)
    out = []
    for img in _image_list(images):
        if isinstance(img, torch.Tensor) and img.is_floating_point():
            if img.shape != (3, tf.size, tf.size):
                raise ValueError(f"a float image tensor is taken as normalised model input and must be "
                                 f"(3, {tf.size}, {tf.size}); got {tuple(img.shape)}. Pass raw pixels as uint8 "
                                 f"(or a PIL image / path) to have them resized and normalised")
            out.append(img.detach().cpu().float())
        else:
            out.append(tf(to_pil(img), rng=None))  # eval mode draws no random numbers
    if not out:
        raise ValueError("no images given")
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------- audio
def _is_path(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


def load_waveform(audio: AudioInput, target_rate: int, sample_rate: int | None = None) -> np.ndarray:
    """A file or a 1-D waveform at ``sample_rate`` -> mono float32 at ``target_rate`` (via ``decode_audio``)."""
    if _is_path(audio):
        data = _read_file(audio, "audio")
        try:
            return decode_audio(data, target_rate)
        except Exception as e:  # soundfile raises LibsndfileError/RuntimeError/ValueError
            raise UserError(f"cannot read audio {audio}: {type(e).__name__}: {e}") from None
    wav = audio.detach().cpu().numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio)
    if wav.ndim != 1 or wav.size == 0:
        raise UserError(f"a waveform must be a non-empty 1-D array; got shape {wav.shape}")
    wav = wav.astype(np.float32)
    if not np.isfinite(wav).all():
        raise UserError(f"the waveform has {int(np.count_nonzero(~np.isfinite(wav)))} samples that are not finite "
                        f"(NaN or inf)")
    rate = sample_rate or target_rate
    if rate == target_rate:
        return wav
    import soundfile as sf

    buf = io.BytesIO()  # resample exactly as the data pipeline does, through decode_audio
    sf.write(buf, wav, rate, format="WAV", subtype="FLOAT")
    return decode_audio(buf.getvalue(), target_rate)


def _audio_list(audio: AudioInput | Sequence[AudioInput]) -> list:
    if isinstance(audio, (torch.Tensor, np.ndarray)) and audio.ndim == 2:
        return list(audio)
    if isinstance(audio, (list, tuple)):
        return list(audio)
    return [audio]


def prepare_audio(model: "MultimodalModel", audio: AudioInput | Sequence[AudioInput], *,
                  sample_rate: int | None = None, audio_seconds: float | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Audio input(s) -> waveforms (N, T) and mask (N, T), padded to the longest clip (at most
    ``audio_seconds``, default the encoder's ``max_seconds``; longer clips keep their start, as in eval)."""
    require_encoder(model, "audio")
    enc = model.encoders["audio"]
    rate = enc.preprocess["sample_rate"]
    seconds = audio_seconds or enc.max_seconds
    waves = [load_waveform(a, rate, sample_rate) for a in _audio_list(audio)]
    if not waves:
        raise ValueError("no audio given")
    longest = max(len(w) for w in waves)
    length = longest if seconds is None else min(longest, int(round(seconds * rate)))
    pairs = [crop_audio(w, length, None) for w in waves]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


# ---------------------------------------------------------------------------------------------- modality
def guess_modality(x: Any) -> str:
    """'text', 'image' or 'audio' for one input: a str is text unless it names a file with an image or
    audio extension; arrays are images when 3-D, audio when 1-D."""
    if isinstance(x, Image.Image):
        return "image"
    if _is_path(x):
        ext = Path(x).suffix.lower().lstrip(".")
        if ext in IMAGE_EXTS or ext in ("gif", "bmp"):
            return "image"
        if ext in AUDIO_EXTS or ext in ("ogg", "mp3"):
            return "audio"
        if isinstance(x, str):
            return "text"
        raise ValueError(f"cannot tell whether {x} is an image or audio file from its extension")
    if isinstance(x, (torch.Tensor, np.ndarray)):
        if x.ndim in (3, 4):
            return "image"
        if x.ndim in (1, 2):
            return "audio"
    raise TypeError(f"cannot tell the modality of a {type(x).__name__}; pass modality= explicitly")


def _as_items(x: Any, modality: str) -> list:
    if modality == "text":
        return [x] if isinstance(x, str) else list(x)
    return _image_list(x) if modality == "image" else _audio_list(x)


# ---------------------------------------------------------------------------------------------- embeddings
@torch.no_grad()
def embed_images(model: "MultimodalModel", images: ImageInput | Sequence[ImageInput], *, batch_size: int = 64,
                 device: str | torch.device | None = None) -> torch.Tensor:
    """Images -> L2-normalised embeddings (N, E), on the CPU."""
    device = _on_device(model, device)
    items = _image_list(images)
    out = [model.embed_inputs({"image": prepare_images(model, items[s]).to(device)})["image"].cpu()
           for s in _chunks(len(items), batch_size)]
    if not out:
        raise ValueError("no images given")
    return torch.cat(out)


@torch.no_grad()
def embed_audio(model: "MultimodalModel", audio: AudioInput | Sequence[AudioInput], *, sample_rate: int | None = None,
                audio_seconds: float | None = None, batch_size: int = 64,
                device: str | torch.device | None = None) -> torch.Tensor:
    """Audio clips -> L2-normalised embeddings (N, E), on the CPU."""
    device = _on_device(model, device)
    items = _audio_list(audio)
    out = []
    for s in _chunks(len(items), batch_size):
        wave, mask = prepare_audio(model, items[s], sample_rate=sample_rate, audio_seconds=audio_seconds)
        out.append(model.embed_inputs({"audio": wave.to(device), "audio_mask": mask.to(device)})["audio"].cpu())
    return torch.cat(out)


@torch.no_grad()
def embed_texts(model: "MultimodalModel", texts: str | Sequence[str], *, batch_size: int = 256,
                device: str | torch.device | None = None) -> torch.Tensor:
    """Texts -> L2-normalised embeddings (N, E) from the text encoder, on the CPU."""
    require_encoder(model, "text")
    _on_device(model, device)
    texts = [texts] if isinstance(texts, str) else list(texts)
    return torch.cat([model.embed_text(texts[s]).cpu() for s in _chunks(len(texts), batch_size)])


def embed_any(model: "MultimodalModel", items: list, modality: str, **kwargs) -> torch.Tensor:
    """Embeddings (N, E) for a list of inputs of one modality."""
    fn = {"text": embed_texts, "image": embed_images, "audio": embed_audio}[modality]
    if modality != "audio":
        kwargs.pop("sample_rate", None)
        kwargs.pop("audio_seconds", None)
    return fn(model, items, **kwargs)


# ---------------------------------------------------------------------------------------------- generation
def _media_inputs(model: "MultimodalModel", image, audio, *, sample_rate: int | None,
                  audio_seconds: float | None) -> tuple[dict[str, torch.Tensor], int]:
    inputs: dict[str, torch.Tensor] = {}
    if image is not None:
        inputs["image"] = prepare_images(model, image)
    if audio is not None:
        inputs["audio"], inputs["audio_mask"] = prepare_audio(model, audio, sample_rate=sample_rate,
                                                              audio_seconds=audio_seconds)
    if not inputs:
        raise ValueError("give an image, audio, or both")
    sizes = {k: v.shape[0] for k, v in inputs.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"image and audio batch sizes differ: {sizes}")
    return inputs, next(iter(sizes.values()))


@torch.no_grad()
def generate_text(model: "MultimodalModel", inputs: dict[str, torch.Tensor], prompts: Sequence[str], *,
                  batch_size: int = 32, fuse_question: Sequence[str] | None = None,
                  exclude: Sequence[str] | None = None, **decode) -> list[str]:
    """Decode one text per row of ``inputs`` (prepared tensors, N rows) with its prompt, in chunks.
    ``fuse_question``: also feed these questions to the fusion (for models trained with
    ``data.fuse_question``; without them such a model fuses the empty question, as its captions were trained:
    the loader gives every non-QA sample the question ""). ``exclude``: per row, a datastore entry retrieval
    may not return. Outputs are stripped of surrounding whitespace."""
    n = len(prompts)
    if fuse_question is None and fuses_question(model):
        fuse_question = [""] * n
    out: list[str] = []
    room = _room_for_prompts(model, prompts, decode.get("max_new_tokens", DecodeOptions.max_new_tokens))
    for s in _chunks(n, batch_size):
        chunk = take_rows(inputs, s)
        if fuse_question is not None:
            chunk["question_ids"], chunk["question_mask"] = model.question_tokenizer.batch(
                list(fuse_question[s]), max_len=model.question_max_len)
        out += [t.strip() for t in model.generate(chunk, list(prompts[s]), exclude=None if exclude is None else
                                                  list(exclude[s]), **{**decode, "max_new_tokens": room})]
    return out


def take_rows(inputs: dict, index) -> dict:
    """Rows ``index`` (a slice, a list or a LongTensor) of a model input dict, including the precomputed encoder
    outputs under ``"features"`` (see ``MultimodalModel.encode``: evaluation encodes each image once and decodes
    captions and answers from the same features)."""
    out = {}
    for k, v in inputs.items():
        if k == "features":
            out[k] = {m: type(f)(*(t[index] for t in f)) for m, f in v.items()}
        else:
            out[k] = v[index]
    return out


def _room_for_prompts(model: "MultimodalModel", prompts: Sequence[str], max_new_tokens: int) -> int:
    """``max_new_tokens``, lowered (with a warning) so the longest prompt plus the output fits the
    decoder's positions; a prompt leaving no room at all is an error."""
    longest = 1 + max((len(model.tokenizer.encode(p)) for p in prompts), default=0)  # + bos
    room = model.decoder.max_len - longest
    if room < 1:
        raise ValueError(f"a prompt of {longest} tokens leaves no room in the decoder's {model.decoder.max_len} "
                         f"positions: {max(prompts, key=len)!r}")
    if room < max_new_tokens:
        warnings.warn(f"max_new_tokens lowered from {max_new_tokens} to {room}: the longest prompt takes "
                      f"{longest} of the decoder's {model.decoder.max_len} positions", RuntimeWarning, stacklevel=3)
        return room
    return max_new_tokens


def caption(model: "MultimodalModel", images: ImageInput | Sequence[ImageInput] | None = None, *,
            prompt: str | None = None, audio: AudioInput | Sequence[AudioInput] | None = None,
            sample_rate: int | None = None, audio_seconds: float | None = None, batch_size: int = 32,
            device: str | torch.device | None = None, **decode) -> list[str]:
    """One caption per image (or audio clip, or image+audio pair). ``prompt``: default the caption prompt the
    model was trained with (``model.prompts.caption``). ``decode``: ``DecodeOptions`` fields."""
    _on_device(model, device)
    inputs, n = _media_inputs(model, images, audio, sample_rate=sample_rate, audio_seconds=audio_seconds)
    prompt = model.prompts.caption if prompt is None else prompt
    return generate_text(model, inputs, [prompt] * n, batch_size=batch_size, **decode)


def fuses_question(model) -> bool:
    """Whether ``model`` was trained with the question fused with the media (its config records it)."""
    return bool(getattr(getattr(model, "config", None), "fuse_question", False))


def asked_as_trained(model: "MultimodalModel", questions: Sequence[str]) -> list[str]:
    """The questions to ask ``model``: with a question bank (``model.config.question_bank``), each one as the
    nearest question it was trained on where one is close enough (mmstory/question_bank.py); else unchanged."""
    bank = getattr(model, "question_bank", None)
    return list(questions) if bank is None else bank.ask_as(questions)


def answer(model: "MultimodalModel", *, question: str | Sequence[str], image=None, audio=None,
           sample_rate: int | None = None, audio_seconds: float | None = None, fuse_question: bool | None = None,
           batch_size: int = 32, device: str | torch.device | None = None, **decode) -> str | list[str]:
    """Answer ``question`` about an image, an audio clip, or both, with the model's QA prompt
    (``model.prompts.qa``, by default ``question: {question} answer:``). One question for one input returns a
    str; otherwise a list, with a single question or a single input broadcast over the other. ``fuse_question``
    (default: as the model was trained) also gives the question to the fusion. A model with a question bank asks
    each question as the nearest training question (``asked_as_trained``)."""
    if fuse_question is None:
        fuse_question = fuses_question(model)
    _on_device(model, device)
    inputs, n = _media_inputs(model, image, audio, sample_rate=sample_rate, audio_seconds=audio_seconds)
    questions = [question] if isinstance(question, str) else list(question)
    empty = [i for i, q in enumerate(questions) if not isinstance(q, str) or not q.strip()]
    if empty:
        raise UserError(f"the question is empty (question {empty[0]} of {len(questions)})" if len(questions) > 1
                        else "the question is empty")
    if n == 1 and len(questions) > 1:
        inputs = {k: v.expand(len(questions), *v.shape[1:]) for k, v in inputs.items()}
    elif len(questions) == 1 and n > 1:
        questions = questions * n
    elif len(questions) != n:
        raise ValueError(f"{len(questions)} questions for {n} inputs")
    questions = asked_as_trained(model, [q.strip() for q in questions])
    out = generate_text(model, inputs, [model.prompts.question(q) for q in questions],
                        batch_size=batch_size, fuse_question=questions if fuse_question else None, **decode)
    return out[0] if isinstance(question, str) and n == 1 else out


# ---------------------------------------------------------------------------------------------- retrieval
def rank(query_embeds: torch.Tensor, gallery_embeds: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, E) x (G, E) normalised -> top-``k`` (scores, indices), each (Q, min(k, G)), best first."""
    if gallery_embeds.shape[0] == 0:
        raise ValueError("empty gallery: nothing to retrieve from")
    sim = query_embeds.float() @ gallery_embeds.float().T  # (Q, G) cosine similarity
    return sim.topk(min(k, sim.shape[1]), dim=1)


def retrieve(model: "MultimodalModel", query, gallery: Sequence, k: int = 5, *, query_modality: str | None = None,
             gallery_modality: str | None = None, **kwargs) -> list[Match] | list[list[Match]]:
    """Rank ``gallery`` by cosine similarity to ``query`` (text->image, image->text, audio<->text, ...).

    ``query``: one input, or a list of inputs of one modality (then a list of results per query).
    Modalities are guessed (``guess_modality``: a str is text unless it is a path with an image/audio
    extension) unless given. ``kwargs``: ``batch_size``, ``device``, ``sample_rate``, ``audio_seconds``."""
    gallery = list(gallery) if not isinstance(gallery, (torch.Tensor, np.ndarray)) else gallery
    if len(gallery) == 0:
        raise ValueError("empty gallery: give at least one item to retrieve from")
    single = not isinstance(query, (list, tuple)) and not (
        isinstance(query, (torch.Tensor, np.ndarray)) and query.ndim in (2, 4))
    queries = [query] if single else list(query)
    qm = query_modality or guess_modality(queries[0])
    gm = gallery_modality or guess_modality(gallery[0])
    gallery_items = _as_items(gallery, gm)
    scores, idx = rank(embed_any(model, _as_items(query, qm), qm, **kwargs),
                       embed_any(model, gallery_items, gm, **kwargs), k)
    results = [[Match(int(i), float(s), gallery_items[int(i)]) for s, i in zip(srow, irow)]
               for srow, irow in zip(scores.tolist(), idx.tolist())]
    return results[0] if single else results


def class_embeddings(model: "MultimodalModel", class_names: Sequence[str],
                     templates: Sequence[str] = DEFAULT_TEMPLATES, **kwargs) -> torch.Tensor:
    """CLIP's prompt ensembling: for each class, the mean of its normalised template embeddings,
    normalised again. Returns (C, E)."""
    if not class_names:
        raise ValueError("no class names given")
    if not templates:
        raise ValueError("no templates given")
    texts = [t.format(c) for c in class_names for t in templates]
    emb = embed_texts(model, texts, **kwargs).view(len(class_names), len(templates), -1)  # (C, T, E)
    return F.normalize(emb.mean(dim=1), dim=-1)


def zero_shot_classify(model: "MultimodalModel", inputs, class_names: Sequence[str],
                       templates: Sequence[str] = DEFAULT_TEMPLATES, *, modality: str | None = None,
                       **kwargs) -> Classification:
    """Classify images (or audio clips) by cosine similarity to each class's template-averaged text
    embedding. ``kwargs``: ``batch_size``, ``device``, ``sample_rate``, ``audio_seconds``."""
    first = inputs[0] if isinstance(inputs, (list, tuple)) else inputs
    modality = modality or guess_modality(first)
    media = embed_any(model, _as_items(inputs, modality), modality, **kwargs)
    text_kwargs = {k: v for k, v in kwargs.items() if k in ("batch_size", "device")}
    scores = media @ class_embeddings(model, class_names, templates, **text_kwargs).T  # (N, C)
    indices = scores.argmax(dim=1)
    return Classification([class_names[i] for i in indices.tolist()], indices, scores)
