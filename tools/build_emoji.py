"""Build mmstory's bundled real dataset: emoji images, captions, QA and spoken labels.

Usage, from the repository root in the project's environment (mmstory installed, as ``make env`` does;
prerequisites: ``bash tools/build_emoji_prereqs.sh``)::

    python tools/build_emoji.py --out data_manifests/emoji

What it makes (all under ``--out``, plus ``<out>.json`` beside it):

* ``{split}-{NNNNNN}.tar``: webdataset shards of images, keyed ``{style}_{concept}``
  with ``png`` (64x64 RGB on white) and ``json`` (captions, QA, labels).
* ``audio-{split}-{NNNNNN}.tar``: one spoken English label per concept, keyed
  ``{concept}`` with ``flac`` (16 kHz mono) and the same ``json`` minus ``style``.
* ``tokenizer.json``: byte-level BPE trained on the train split's text.
* ``README.md``: the dataset card.

Sources (see ../shared/DATA.md beside the repository and the dataset card for licences):

* Noto Color Emoji, rendered from the Debian font ``fonts-noto-color-emoji``.
* Twemoji PNGs from npm ``emoji-datasource-twitter@16.0.0`` (CC BY 4.0).
* Unicode CLDR annotations (en, zh) from npm ``emojibase-data@17.0.0``.
* Speech from ``espeak-ng`` (voice en-us), resampled by ``sox``, encoded by ``flac``.

The build is deterministic: inputs are sorted, every random choice comes from a
fixed seed, tar members get fixed mtime/uid/gid/names, sox runs without dither
(``-D``), flac runs with fixed settings, and the tokenizer is trained single-threaded
on text in a fixed order. Re-running reproduces every file byte for byte (on the same
versions of the Debian packages and Python libraries).

The shards are written by mmstory's shard writer (``mmstory.data.writer``, which ``mmstory data
build`` uses too) and the tokenizer is trained by ``mmstory.tokenizer.train_bpe``; this script adds
only what is particular to the emoji set.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

from mmstory.data.writer import TarHeader, write_shards
from mmstory.tokenizer import BPETokenizer, train_bpe

# Pinned npm sources: name -> version. Pinning keeps the annotations and the Twemoji art
# fixed, so the committed manifest's checksums stay valid.
NPM_PACKAGES = {
    "emojibase-data": "17.0.0",
    "emoji-datasource-twitter": "16.0.0",
}
NOTO_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
# Noto Color Emoji is a CBDT bitmap font with a single 109 px strike; any other size fails.
NOTO_SIZE = 109
# Debian bookworm ships Noto Color Emoji 2.042, which covers Emoji 15.0. Newer sequences
# sometimes get a *wrong* ligature instead of a fallback (e.g. "head shaking horizontally"
# renders as "face exhaling"), so anything newer than the font is left out.
MAX_EMOJI_VERSION = 15.0

IMAGE_SIZE = 64
# Every image is cropped to its visible content and re-centred with this margin, so that
# the styles' different built-in padding cannot reveal the style.
MARGIN = 3
ALPHA_THRESHOLD = 8  # alpha <= this counts as background when cropping
STYLES = ("noto", "twemoji")
SEED = 20240917
VAL_FRACTION = 0.08  # each of val_style and val_novel
SHARD_SIZE = 1000
TOKENIZER_VOCAB = 6000
SPLITS = ("train", "val_style", "val_novel")

# Readable CLDR group names (emojibase's meta/groups.json has slugs such as "food-drink").
GROUP_NAMES = {
    "smileys-emotion": "smileys & emotion",
    "people-body": "people & body",
    "animals-nature": "animals & nature",
    "food-drink": "food & drink",
    "travel-places": "travel & places",
    "activities": "activities",
    "objects": "objects",
    "symbols": "symbols",
    "flags": "flags",
}

# Yes/no categories, defined only by CLDR subgroup membership. "no_groups" lists the groups
# for which a "no" answer is safe: e.g. "is this a face?" is never asked with answer "no"
# of people-body (a baby is drawn as a face) or animals-nature ("dog face").
YESNO_CATEGORIES = [
    ("animal", "is this an animal?", {"animal-mammal", "animal-bird", "animal-amphibian",
     "animal-reptile", "animal-marine", "animal-bug"},
     {"food-drink", "travel-places", "activities", "objects", "symbols", "flags"}),
    ("plant", "is this a plant?", {"plant-flower", "plant-other"},
     {"smileys-emotion", "people-body", "objects", "symbols", "flags", "activities"}),
    ("food", "is this food?", {"food-fruit", "food-vegetable", "food-prepared", "food-asian",
     "food-sweet"},
     {"smileys-emotion", "people-body", "travel-places", "activities", "objects", "symbols",
      "flags"}),
    ("drink", "is this a drink?", {"drink"},
     {"smileys-emotion", "people-body", "animals-nature", "travel-places", "activities",
      "symbols", "flags"}),
    ("face", "is this a face?", {"face-smiling", "face-affection", "face-tongue", "face-hand",
     "face-neutral-skeptical", "face-sleepy", "face-unwell", "face-hat", "face-glasses",
     "face-concerned", "face-negative", "face-costume", "cat-face", "monkey-face"},
     {"food-drink", "objects", "symbols", "flags"}),
    ("person", "is this a person?", {"person", "person-gesture", "person-role",
     "person-fantasy", "person-activity", "person-sport", "person-resting", "family",
     "person-symbol"},
     {"animals-nature", "food-drink", "travel-places", "activities", "objects", "symbols",
      "flags"}),
    ("hand", "is this a hand?", {"hand-fingers-open", "hand-fingers-partial",
     "hand-single-finger", "hand-fingers-closed", "hands", "hand-prop"},
     {"animals-nature", "food-drink", "travel-places", "activities", "objects", "symbols",
      "flags"}),
    ("transport", "is this about transport?", {"transport-ground", "transport-water",
     "transport-air"},
     {"smileys-emotion", "animals-nature", "food-drink", "objects", "flags"}),
    ("building", "is this a building?", {"place-building", "place-religious"},
     {"smileys-emotion", "people-body", "animals-nature", "food-drink", "activities",
      "objects", "flags"}),
    ("sky", "is this about the sky or weather?", {"sky-weather"},
     {"smileys-emotion", "people-body", "food-drink", "objects", "flags"}),
    ("heart", "is this a heart?", {"heart"},
     {"animals-nature", "food-drink", "travel-places", "objects", "flags"}),
    ("clothing", "is this clothing?", {"clothing"},
     {"smileys-emotion", "animals-nature", "food-drink", "travel-places", "symbols", "flags"}),
    ("music", "is this about music?", {"music", "musical-instrument"},
     {"smileys-emotion", "animals-nature", "food-drink", "travel-places", "flags"}),
    ("sport", "is this about sport?", {"sport"},
     {"smileys-emotion", "animals-nature", "food-drink", "travel-places", "symbols", "flags"}),
    ("flag", "is this a flag?", {"flag"},
     {"smileys-emotion", "people-body", "animals-nature", "food-drink", "activities"}),
    ("arrow", "is this an arrow?", {"arrow"},
     {"smileys-emotion", "people-body", "animals-nature", "food-drink", "flags"}),
    ("time", "is this about time?", {"time"},
     {"smileys-emotion", "animals-nature", "food-drink", "flags"}),
]
QUESTION_WHAT = "what is shown?"
QUESTION_CATEGORY = "which category is this?"


# ----------------------------------------------------------------------------- sources

def run(cmd, **kw):
    """Run a command, failing loudly (a silently missing tool would give a broken set)."""
    return subprocess.run(cmd, check=True, **kw)


def fetch_npm(cache: Path) -> dict:
    """Download and unpack the pinned npm packages into ``cache``; return name -> package dir.

    Uses ``npm pack`` (no Node project needed); tarballs stay in the cache, never the repo.
    """
    cache.mkdir(parents=True, exist_ok=True)
    dirs = {}
    for name, ver in sorted(NPM_PACKAGES.items()):
        tgz = cache / f"{name}-{ver}.tgz"
        dest = cache / f"{name}-{ver}"
        if not tgz.exists():
            run(["npm", "pack", f"{name}@{ver}", "--silent"], cwd=cache, stdout=subprocess.DEVNULL)
        if not (dest / "package").exists():
            dest.mkdir(parents=True, exist_ok=True)
            with tarfile.open(tgz) as tf:
                tf.extractall(dest, filter="data")
        dirs[name] = dest / "package"
    return dirs


def concept_id(hexcode: str) -> str:
    """Join key: lower-case code points without FE0F (packages disagree on FE0F)."""
    return "-".join(c for c in hexcode.lower().split("-") if c != "fe0f")


def load_annotations(emojibase: Path):
    """Return (en entries, zh by concept id, group names by id, subgroup names by id)."""
    en = json.loads((emojibase / "en" / "data.json").read_text(encoding="utf-8"))
    zh = json.loads((emojibase / "zh" / "data.json").read_text(encoding="utf-8"))
    meta = json.loads((emojibase / "meta" / "groups.json").read_text(encoding="utf-8"))
    zh_by_id = {concept_id(e["hexcode"]): e for e in zh}
    groups = {int(k): v for k, v in meta["groups"].items()}
    subgroups = {int(k): v for k, v in meta["subgroups"].items()}
    return en, zh_by_id, groups, subgroups


def twemoji_index(twitter: Path) -> dict:
    """Map concept id -> Twemoji 64 px PNG path, for images the package really has."""
    data = json.loads((twitter / "emoji.json").read_text(encoding="utf-8"))
    out = {}
    for e in data:
        if not e.get("has_img_twitter"):
            continue
        p = twitter / "img" / "twitter" / "64" / e["image"]
        if p.exists():
            out[concept_id(e["unified"])] = p
    return out


# ----------------------------------------------------------------------------- selection

_GENDER_SUBS = [("women", "people"), ("men", "people"), ("woman", "person"), ("man", "person")]


def neutral_label(label: str) -> str:
    """The label with man/woman words replaced by person/people (to find gendered twins)."""
    words = label.replace(",", " ,").replace(":", " :").split()
    subs = dict(_GENDER_SUBS)
    return " ".join(subs.get(w, w) for w in words).replace(" ,", ",").replace(" :", ":")


def select_concepts(en, zh_by_id, groups, subgroups, twemoji, noto_ok):
    """Filter the CLDR entries down to the concepts in the set.

    Returns (kept entries sorted by concept id, Counter of exclusion reasons). Skin-tone
    variants never appear: emojibase nests them under ``skins`` and we ignore that field.
    """
    excluded = Counter()
    labels = {e["label"] for e in en}
    kept = []
    for e in en:
        cid = concept_id(e["hexcode"])
        group = groups.get(e.get("group"))
        sub = subgroups.get(e.get("subgroup"))
        label = e["label"]
        if group is None:  # regional indicator letters carry no group
            excluded["regional_indicator"] += 1
            continue
        if group == "component":  # skin-tone and hair swatches, not pictures of things
            excluded["component"] += 1
            continue
        if sub in ("country-flag", "subdivision-flag"):  # one template, flag trivia
            excluded["country_or_subdivision_flag"] += 1
            continue
        if label.endswith(": facing right"):  # mirror image of the kept left-facing one
            excluded["facing_right_mirror"] += 1
            continue
        if "gender" in e:  # man/woman version of a kept gender-neutral emoji
            excluded["gendered_variant"] += 1
            continue
        if sub == "family" and ({"man", "woman", "men", "women"} & set(label.replace(",", " ").split())
                                or ":" in label):
            # "family: man, woman, boy", "kiss: woman, man", "men holding hands": explicit-
            # member versions of the kept neutral "kiss"/"couple with heart"/"people holding
            # hands"; near-duplicates (Noto 2.042 draws the families as one silhouette).
            excluded["gendered_variant"] += 1
            continue
        if len(label.split()) > 1 and neutral_label(label) != label and neutral_label(label) in labels:
            # e.g. "man: red hair" when "person: red hair" exists
            excluded["gendered_variant"] += 1
            continue
        if zh_by_id.get(cid) is None:
            excluded["no_zh_annotation"] += 1
            continue
        if float(e.get("version", 0)) > MAX_EMOJI_VERSION:
            excluded["newer_than_noto_font"] += 1
            continue
        if cid not in twemoji:
            excluded["no_twemoji_image"] += 1
            continue
        if not noto_ok(e["emoji"]):
            excluded["noto_not_single_glyph"] += 1
            continue
        kept.append(e)
    kept.sort(key=lambda e: concept_id(e["hexcode"]))
    return kept, excluded


# ----------------------------------------------------------------------------- images

class NotoRenderer:
    """Renders emoji from the Noto Color Emoji bitmap font at its only strike (109 px)."""

    def __init__(self, path=NOTO_FONT):
        from PIL import ImageFont
        self.font = ImageFont.truetype(path, size=NOTO_SIZE, layout_engine=ImageFont.Layout.RAQM)
        # One glyph is ~136 px wide; a sequence the font cannot ligate falls back to
        # several glyphs side by side and comes out much wider.
        self.glyph_w = self.font.getlength("\U0001F600")
        self.notdef = self._raw("\U0010FFFD").tobytes()

    def _raw(self, text):
        from PIL import Image, ImageDraw
        w = int(self.font.getlength(text)) + 40
        im = Image.new("RGBA", (max(w, 200), 180), (0, 0, 0, 0))
        ImageDraw.Draw(im).text((20, 20), text, font=self.font, embedded_color=True)
        return im

    def ok(self, text) -> bool:
        """True if the font draws ``text`` as one real glyph (not fallback, not .notdef)."""
        if self.font.getlength(text) > 1.2 * self.glyph_w:
            return False
        im = self._raw(text)
        if im.tobytes() == self.notdef:
            return False
        box = im.getchannel("A").point(lambda a: 255 if a > ALPHA_THRESHOLD else 0).getbbox()
        return box is not None and (box[2] - box[0]) <= 1.2 * self.glyph_w

    def render(self, text):
        return self._raw(text)


def normalise_image(rgba) -> bytes:
    """Crop to visible content, scale to fit 64-2*MARGIN, centre on white; return PNG bytes.

    Resizing happens in premultiplied alpha (``RGBa``) so transparent pixels' colours don't
    bleed into the edges; compositing onto white comes last.
    """
    from PIL import Image
    rgba = rgba.convert("RGBA")
    box = rgba.getchannel("A").point(lambda a: 255 if a > ALPHA_THRESHOLD else 0).getbbox()
    if box is None:
        raise ValueError("empty image")
    crop = rgba.crop(box)
    inner = IMAGE_SIZE - 2 * MARGIN
    w, h = crop.size
    scale = inner / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    small = crop.convert("RGBa").resize((nw, nh), Image.Resampling.LANCZOS).convert("RGBA")
    canvas = Image.new("RGBA", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255, 255))
    canvas.alpha_composite(small, ((IMAGE_SIZE - nw) // 2, (IMAGE_SIZE - nh) // 2))
    buf = io.BytesIO()
    canvas.convert("RGB").save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# ----------------------------------------------------------------------------- text

def article(phrase: str) -> str:
    """'a' or 'an' by the first letter (a heuristic; the labels carry no grammar)."""
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def words(slug: str) -> str:
    return slug.replace("-", " ")


def make_captions(label, tags, group_name, subgroup_slug):
    """4-6 English reference captions, built only from the CLDR annotations."""
    extra = [t for t in tags if t.lower() != label.lower() and t.lower() not in label.lower()]
    sub = words(subgroup_slug)
    caps = [
        label,
        f"an emoji of {article(label)} {label}",
        f"{article(sub)} {sub} emoji: {label}",
        f"{label}, in the {group_name} category",
    ]
    if extra:
        caps.append(", ".join([label] + extra[:2]))
    if len(extra) > 2:
        caps.append(f"an emoji of {label}: " + ", ".join(extra[2:5]))
    return list(dict.fromkeys(caps))  # dedupe, keep order


def make_captions_zh(label_zh, tags_zh):
    """1-3 Chinese captions from the zh label and tags."""
    extra = [t for t in tags_zh if t != label_zh]
    caps = [label_zh, f"{label_zh}的表情符号"]
    if extra:
        caps.append("，".join([label_zh] + extra[:2]))
    return list(dict.fromkeys(caps))


def make_qa(cid, label, group_slug, subgroup_slug, all_groups, rng_seed):
    """QA pairs from annotations only; every yes/no "yes" is paired with a "no".

    * what: "what is shown?" -> the label.
    * category: "which category is this?" -> the readable group name.
    * yesno: a specific category the concept belongs to (if any) and its group, each
      paired with a category / group it does not belong to (only where "no" is safe).
    """
    rng = random.Random(f"{rng_seed}:{cid}")
    qa = [
        {"question": QUESTION_WHAT, "answers": [label], "type": "what"},
        {"question": QUESTION_CATEGORY, "answers": [GROUP_NAMES[group_slug]], "type": "category"},
    ]
    mine = [c for c in YESNO_CATEGORIES if subgroup_slug in c[2]]
    for name, question, _subs, _no in mine:
        qa.append({"question": question, "answers": ["yes"], "type": "yesno"})
        others = [c for c in YESNO_CATEGORIES if c[0] != name and group_slug in c[3]]
        q = rng.choice(others)
        qa.append({"question": q[1], "answers": ["no"], "type": "yesno"})
    gname = GROUP_NAMES[group_slug]
    qa.append({"question": f"is this in the {gname} category?", "answers": ["yes"], "type": "yesno"})
    other = rng.choice([g for g in all_groups if g != group_slug])
    qa.append({"question": f"is this in the {GROUP_NAMES[other]} category?", "answers": ["no"],
               "type": "yesno"})
    return qa


# ----------------------------------------------------------------------------- splits

def assign_splits(concepts, seed=SEED):
    """Split concepts by group: ~8% val_novel, ~8% val_style, rest train (>=1 each per group).

    Returns {cid: split} and {cid: held-out style} for val_style concepts; the held-out style
    alternates (in concept-id order) so both styles are held out about equally.
    """
    rng = random.Random(seed)
    by_group = defaultdict(list)
    for cid, group in concepts:
        by_group[group].append(cid)
    split = {}
    for group in sorted(by_group):
        ids = sorted(by_group[group])
        rng.shuffle(ids)
        k = max(1, round(VAL_FRACTION * len(ids)))
        for cid in ids[:k]:
            split[cid] = "val_novel"
        for cid in ids[k:2 * k]:
            split[cid] = "val_style"
        for cid in ids[2 * k:]:
            split[cid] = "train"
    held = {}
    for i, cid in enumerate(sorted(c for c, s in split.items() if s == "val_style")):
        held[cid] = STYLES[i % 2]
    return split, held


# ----------------------------------------------------------------------------- audio

def speak_flac(text: str, tmp: Path) -> bytes:
    """espeak-ng (en-us, 22.05 kHz) -> sox 16 kHz mono 16-bit, no dither, silence trimmed -> FLAC."""
    raw, wav, flac = tmp / "raw.wav", tmp / "s16.wav", tmp / "out.flac"
    # Text goes through stdin so labels starting with "-" are not read as options.
    # 200 words/min (default 175) and amplitude 50 (default 100, peaks stay around -10 dBFS):
    # both cut FLAC size ~20%, which keeps the whole bundle under 40 MB.
    run(["espeak-ng", "-v", "en-us", "-s", "200", "-a", "50", "-w", str(raw)],
        input=text.encode("utf-8"))
    # Trim espeak's leading/trailing silence (~30% of each clip; speech dominates the bundle's
    # size) and pad back a fixed 50 ms each side so words are not clipped at the edges.
    run(["sox", "-D", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(wav),
         "silence", "1", "0.01", "-45d", "reverse", "silence", "1", "0.01", "-45d", "reverse",
         "pad", "0.05", "0.05"])
    run(["flac", "--silent", "--force", "-8", "--no-padding", "--no-seektable",
         "-o", str(flac), str(wav)])
    return flac.read_bytes()


# ----------------------------------------------------------------------------- writing

# The tar headers the committed shards were written with: their sha256 in the manifest depend on them. The
# mtime is an int on purpose (2000-01-01): a float one would add a pax record before every file
# (mmstory.data.writer.TarHeader). webdataset's writer makes PAX-format tars where the first builds made
# USTAR ones; for names of ASCII characters under 100 bytes, which every key here gives, the bytes are the same.
EMOJI_TAR = TarHeader(mtime=946684800, mode=0o644, user="root", group="root")


def write_split(out: Path, prefix: str, samples) -> list[dict]:
    """Write ``samples``, a list of (key, {ext: bytes}) sorted by key, as ``{prefix}-{NNNNNN}.tar`` shards of
    SHARD_SIZE samples with mmstory's shard writer; return the manifest's entries for them.

    The writer puts each sample's files in extension order with fixed headers (``EMOJI_TAR``), so the bytes
    depend only on the content."""
    shards = write_shards(({"__key__": key, **fields} for key, fields in samples), out, prefix,
                          max_samples=SHARD_SIZE, header=EMOJI_TAR)
    return [{"path": f"{out.name}/{Path(s.url).name}", "samples": s.samples, "bytes": s.bytes, "sha256": s.sha256}
            for s in shards]


def dump_json(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")


def tokenizer_texts(train_meta: list[dict]) -> list[str]:
    """What the tokenizer is trained on, in this order: the fixed QA templates (so every template word is
    known), then each train concept's captions, Chinese captions, questions and answers."""
    texts = [QUESTION_WHAT, QUESTION_CATEGORY, "yes", "no"] + [c[1] for c in YESNO_CATEGORIES]
    texts += [f"is this in the {g} category?" for g in sorted(GROUP_NAMES.values())]
    texts += sorted(GROUP_NAMES.values())
    for meta in train_meta:
        texts += meta["captions"] + meta["captions_zh"]
        for qa in meta["qa"]:
            texts.append(qa["question"])
            texts += qa["answers"]
    return texts


def train_tokenizer(texts: list[str], path: Path) -> BPETokenizer:
    """Byte-level BPE on ``texts`` (fixed order), trained as mmstory trains one (``train_bpe``): specials
    <pad> <bos> <eos> <unk> = ids 0-3."""
    os.environ["RAYON_NUM_THREADS"] = "1"  # single-threaded: no scheduling-dependent order
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return train_bpe(texts, TOKENIZER_VOCAB, path)


# ----------------------------------------------------------------------------- main

def build(out: Path, cache: Path, limit: int | None = None, log=print) -> dict:
    """Build everything into ``out`` and the manifest ``out.parent / (out.name + '.json')``."""
    t0 = time.time()
    for tool in ("espeak-ng", "sox", "flac", "npm"):
        if shutil.which(tool) is None:
            raise SystemExit(f"missing {tool}: run tools/build_emoji_prereqs.sh")
    if not Path(NOTO_FONT).exists():
        raise SystemExit(f"missing {NOTO_FONT}: run tools/build_emoji_prereqs.sh")
    pkgs = fetch_npm(cache)
    en, zh_by_id, groups, subgroups = load_annotations(pkgs["emojibase-data"])
    twemoji = twemoji_index(pkgs["emoji-datasource-twitter"])
    noto = NotoRenderer()
    kept, excluded = select_concepts(en, zh_by_id, groups, subgroups, twemoji, noto.ok)
    if limit:  # for quick trials only; the committed set uses all concepts
        kept = kept[:limit]
    log(f"{len(kept)} concepts kept; excluded: {dict(sorted(excluded.items()))}")

    all_groups = sorted({groups[e["group"]] for e in kept})
    split, held = assign_splits([(concept_id(e["hexcode"]), groups[e["group"]]) for e in kept])

    # Clean the output of earlier builds' shards (their count could differ), keep nothing stale.
    out.mkdir(parents=True, exist_ok=True)
    for p in sorted(out.glob("*.tar")):
        p.unlink()

    images = defaultdict(list)  # split -> [(key, fields)]
    audio = defaultdict(list)
    stats_groups = defaultdict(Counter)
    train_meta = []  # each train concept's json, in concept order: the tokenizer's text
    from PIL import Image
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        for i, e in enumerate(kept):
            cid = concept_id(e["hexcode"])
            z = zh_by_id[cid]
            gslug, sslug = groups[e["group"]], subgroups[e["subgroup"]]
            label, tags = e["label"], list(e.get("tags", []))
            meta = {
                "concept": cid,
                "captions": make_captions(label, tags, GROUP_NAMES[gslug], sslug),
                "captions_zh": make_captions_zh(z["label"], list(z.get("tags", []))),
                "qa": make_qa(cid, label, gslug, sslug, all_groups, SEED),
                "labels": {"label": label, "group": GROUP_NAMES[gslug], "subgroup": words(sslug)},
                "label_zh": z["label"],
                "tags": tags,
                "tags_zh": list(z.get("tags", [])),
                "split": split[cid],
            }
            s = split[cid]
            stats_groups[s][meta["labels"]["group"]] += 1
            pngs = {
                "noto": normalise_image(noto.render(e["emoji"])),
                "twemoji": normalise_image(Image.open(twemoji[cid])),
            }
            for style in STYLES:
                if s == "val_style":
                    # held-out style goes to val_style; the other style to train
                    target = "val_style" if style == held[cid] else "train"
                else:
                    target = s
                m = dict(meta, style=style, split=target)
                images[target].append((f"{style}_{cid}", {"png": pngs[style], "json": dump_json(m)}))
            audio[s].append((cid, {"flac": speak_flac(label, tmp), "json": dump_json(meta)}))
            if s == "train":
                train_meta.append(meta)
            if (i + 1) % 200 == 0:
                log(f"  {i + 1}/{len(kept)} concepts ({time.time() - t0:.0f}s)")

    manifest_splits = {}
    for s in SPLITS:
        samples = sorted(images[s], key=lambda kv: kv[0])
        manifest_splits[s] = {"samples": len(samples), "shards": write_split(out, s, samples)}
    for s in SPLITS:
        samples = sorted(audio[s], key=lambda kv: kv[0])
        manifest_splits[f"audio_{s}"] = {"samples": len(samples),
                                         "shards": write_split(out, f"audio-{s}", samples)}

    tok = train_tokenizer(tokenizer_texts(train_meta), out / "tokenizer.json")

    yes = sum(1 for s in images for _, f in images[s]
              for q in json.loads(f["json"])["qa"] if q["type"] == "yesno" and q["answers"] == ["yes"])
    nyn = sum(1 for s in images for _, f in images[s]
              for q in json.loads(f["json"])["qa"] if q["type"] == "yesno")
    stats = {
        "concepts": len(kept),
        "concepts_per_split": {s: sum(1 for v in split.values() if v == s) for s in SPLITS},
        "val_style_held_out_style": dict(sorted(Counter(held.values()).items())),
        "concepts_per_split_and_group": {s: dict(sorted(stats_groups[s].items())) for s in SPLITS},
        "images_per_split": {s: manifest_splits[s]["samples"] for s in SPLITS},
        "excluded": dict(sorted(excluded.items())),
        "yesno_yes_fraction": round(yes / max(1, nyn), 4),
        "tokenizer_vocab_size": tok.vocab_size,
        "total_bytes": sum(sh["bytes"] for v in manifest_splits.values() for sh in v["shards"]),
    }
    manifest = build_manifest(out, manifest_splits, stats)
    (out.parent / f"{out.name}.json").write_text(
        json.dumps(manifest, ensure_ascii=False, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    (out / "README.md").write_text(dataset_card(manifest), encoding="utf-8")
    log(f"done in {time.time() - t0:.0f}s; {stats['total_bytes'] / 1e6:.1f} MB of shards")
    return manifest


def build_manifest(out: Path, splits, stats) -> dict:
    """The manifest in mmstory's format (paths relative to the manifest's folder)."""
    cldr = ("Unicode CLDR annotations via npm emojibase-data@17.0.0 (en/data.json, zh/data.json, "
            "meta/groups.json)")
    cldr_lic = "Unicode License v3 (annotations); emojibase-data package MIT"
    return {
        "format_version": 1,
        "name": out.name,
        "description": ("Emoji concepts in two art styles (Noto Color Emoji, Twemoji) as 64x64 RGB "
                        "images, with English and Chinese captions and QA derived only from Unicode "
                        "CLDR annotations, and the English label spoken by espeak-ng. Split by "
                        "concept: train, val_style (concepts seen in train in the other style), "
                        "val_novel (concepts never in train)."),
        "build": f"bash tools/build_emoji_prereqs.sh && python tools/build_emoji.py --out data_manifests/{out.name}",
        "tokenizer": f"{out.name}/tokenizer.json",
        "card": f"{out.name}/README.md",
        "fields": {
            "png": {"description": "64x64 RGB PNG on white, cropped to content and re-centred with "
                                   f"a {MARGIN}px margin; style in json.style",
                    "source": "noto: Noto Color Emoji font (Debian fonts-noto-color-emoji 2.042); "
                              "twemoji: npm emoji-datasource-twitter@16.0.0 img/twitter/64",
                    "licence": "noto: SIL OFL 1.1; twemoji: CC BY 4.0, (c) Twitter, Inc and other "
                               "contributors, https://github.com/twitter/twemoji"},
            "flac": {"description": "English label spoken by espeak-ng voice en-us, 16 kHz mono "
                                    "16-bit FLAC; one clip per concept (audio_* splits)",
                     "source": "espeak-ng -v en-us -s 200 -a 50 + sox -D (16 kHz, silence trimmed) + flac -8", "licence": "generated; tools GPL, "
                     "output not covered"},
            "json.captions": {"description": "4-6 English reference captions from label, tags, group, "
                                             "subgroup", "source": cldr, "licence": cldr_lic},
            "json.captions_zh": {"description": "1-3 Chinese captions from zh label and tags",
                                 "source": cldr, "licence": cldr_lic},
            "json.qa": {"description": "QA pairs {question, answers, type in what|category|yesno}; "
                                       "yes/no balanced", "source": cldr, "licence": cldr_lic},
            "json.labels": {"description": "{label, group, subgroup} in English", "source": cldr,
                            "licence": cldr_lic},
            "json.label_zh": {"description": "Chinese label", "source": cldr, "licence": cldr_lic},
            "json.tags": {"description": "English CLDR keywords", "source": cldr, "licence": cldr_lic},
            "json.tags_zh": {"description": "Chinese CLDR keywords", "source": cldr, "licence": cldr_lic},
            "json.concept": {"description": "code points, lower-case hex joined by '-', FE0F dropped",
                             "source": cldr, "licence": cldr_lic},
            "json.style": {"description": "noto | twemoji (image samples only)", "source": "build",
                           "licence": "n/a"},
            "json.split": {"description": "train | val_style | val_novel", "source": "build",
                           "licence": "n/a"},
        },
        "splits": splits,
        "stats": stats,
    }


def dataset_card(m: dict) -> str:
    """README.md for the output folder (a dataset card)."""
    st = m["stats"]
    rows = "\n".join(f"| {s} | {st['concepts_per_split'][s]} | {m['splits'][s]['samples']} | "
                     f"{m['splits']['audio_' + s]['samples']} |" for s in SPLITS)
    held = ", ".join(f"{k} {v}" for k, v in st["val_style_held_out_style"].items())
    excl = "\n".join(f"| {k} | {v} |" for k, v in st["excluded"].items())
    return f"""# emoji: mmstory's bundled real multimodal dataset

{m['description']}

Built by `tools/build_emoji.py`; described by `../{m['name']}.json` (shard list with
sample counts, sizes and sha256, field sources and licences, statistics).

## Sources and licences
| part | source | licence |
| --- | --- | --- |
| images, style `noto` | Noto Color Emoji font, Debian `fonts-noto-color-emoji` 2.042, rendered at its 109 px strike | SIL Open Font License 1.1 |
| images, style `twemoji` | Twemoji 64 px PNGs from npm `emoji-datasource-twitter@16.0.0` | **CC BY 4.0** |
| text (captions, QA, labels, tags; en + zh) | Unicode CLDR annotations via npm `emojibase-data@17.0.0` | Unicode License v3; package MIT |
| audio | English label spoken by `espeak-ng` (en-us), resampled by `sox`, encoded by `flac` | generated; the tools' GPL does not cover output |

**Twemoji attribution (CC BY 4.0):** Twemoji graphics Copyright 2019 Twitter, Inc and other
contributors, licensed under CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/);
https://github.com/twitter/twemoji (continued at https://github.com/jdecked/twemoji).
The images here are modified: cropped, rescaled to 64x64 and flattened onto white.

Noto Color Emoji: Copyright Google Inc., SIL Open Font License 1.1.
CLDR annotations: Copyright Unicode, Inc., Unicode License v3.

## Contents
- `{{split}}-NNNNNN.tar`: webdataset shards of images keyed `{{style}}_{{concept}}` with `png`
  (64x64 RGB, cropped to content and re-centred with a {MARGIN}px margin, so padding does not
  give the style away) and `json`.
- `audio-{{split}}-NNNNNN.tar`: one clip per concept keyed `{{concept}}` with `flac` (16 kHz mono)
  and `json` (same schema minus `style`).
- `tokenizer.json`: byte-level BPE (vocab {st['tokenizer_vocab_size']}), specials `<pad> <bos> <eos> <unk>` = ids 0-3,
  trained on the train split's English and Chinese captions and QA text plus the QA templates.

`json` schema: `concept`, `style` (images only), `captions` (4-6 English), `captions_zh` (1-3),
`qa` (list of `{{question, answers, type}}`, type `what` | `category` | `yesno`), `labels`
(`label`, `group`, `subgroup`), `label_zh`, `tags`, `tags_zh`, `split`. All text comes only from
the CLDR annotations, put into fixed templates ("an emoji of a ...", "a ... emoji: ...").
Yes/no questions come in pairs: each "yes" (a category or group the concept belongs to) with a
"no" about a category/group it does not belong to, asked only where "no" is unambiguous
(e.g. "is this a face?" is never answered "no" for people or animals); yes fraction
{st['yesno_yes_fraction']}.

Every question of a type uses one template ("what is shown?", "which category is this?", "is this in the
X category?"). `wordings.yaml` (not part of the shards) lists, per template, everyday wordings to train with
("what's this?", "what type of emoji is this?") and others held out from training ("what's in this
picture?"), which evaluation asks as well (VQA "held-out wordings" in every report): the main job trains
with `data.loader.wordings` pointing at it. Written by hand for this set; edit it freely (a held-out wording
must not also be a training one; the loader checks).

## Splits (by concept; no image is in two splits)
| split | concepts | images | audio clips |
| --- | --- | --- | --- |
{rows}

- `train`: both styles of most concepts, plus ONE style of each val_style concept.
- `val_style`: ~8% of concepts, in the style that train does not have (held-out style
  alternates between noto and twemoji: {held}). Tests style transfer.
- `val_novel`: ~8% of concepts never in train in any style, both styles. Tests new concepts.
- Chosen with a fixed seed, stratified by CLDR group so every group is in every split.
- Audio: one clip per concept, in `audio_{{split}}` by the concept's split (val_style concepts'
  labels are also seen in train text, via their train-style images).

## Exclusions
| reason | entries |
| --- | --- |
{excl}

- Skin-tone variants: never used (emojibase nests them under `skins`); captions would differ
  only by "medium-dark skin tone".
- Components (skin/hair swatches), regional indicator letters, country and subdivision flags
  (one template, flag trivia; generic flags such as "chequered flag" are kept).
- Gendered variants: man/woman versions of an emoji that has a gender-neutral form (emojibase
  `gender` field, "man: red hair" when "person: red hair" exists, and member-listing
  family/kiss/couple sequences) are dropped; the neutral one is kept. They are near-duplicate
  images with near-duplicate captions. Stand-alone "man", "woman", "boy", "girl" are kept.
- "facing right" variants: dropped; they are mirror images of the kept left-facing emoji.
- Emoji newer than the Noto font (Emoji > {MAX_EMOJI_VERSION}), without a Twemoji image, or that
  the font cannot draw as one glyph (a ZWJ sequence falling back to several glyphs).
- FE0F variation selectors are dropped from concept ids when joining the sources.

## Rebuild
```
{m['build']}
```
Deterministic: sorted inputs, fixed seed, fixed tar metadata, `sox -D`, fixed flac settings,
single-threaded tokenizer training; a rebuild with the same package versions reproduces every
file byte for byte (compare with the manifest's sha256).
"""


def main(argv=None):
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="data_manifests/emoji", type=Path,
                    help="output folder; the manifest goes beside it as <out>.json")
    ap.add_argument("--cache", default=Path.home() / ".cache" / "mmstory" / "emoji_sources",
                    type=Path, help="where npm tarballs are downloaded and unpacked")
    ap.add_argument("--limit", type=int, default=None, help="only the first N concepts (trials)")
    args = ap.parse_args(argv)
    build(args.out, args.cache, limit=args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
