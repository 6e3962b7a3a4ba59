"""Checks on the committed emoji dataset (data_manifests/emoji*): reads files only, no full rebuild (that needs
fonts and tools); the builder's shard writing and tokenizer training are checked against the committed files."""

import hashlib
import importlib.util
import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "data_manifests"
MANIFEST = ROOT / "emoji.json"
IMAGE_SPLITS = ("train", "val_style", "val_novel")
STYLES = ("noto", "twemoji")

pytestmark = pytest.mark.skipif(not MANIFEST.exists(), reason="emoji dataset not built")


def _read_tar(path):
    """{key: {ext: bytes}} of a webdataset tar (key = name up to the first dot)."""
    samples = defaultdict(dict)
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            samples[key][ext] = tf.extractfile(m).read()
    return samples


@pytest.fixture(scope="module")
def manifest():
    return json.loads(MANIFEST.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def data(manifest):
    """split name -> {key: {ext: bytes}} for every split in the manifest."""
    out = {}
    for name, split in manifest["splits"].items():
        samples = {}
        for sh in split["shards"]:
            part = _read_tar(ROOT / sh["path"])
            assert not set(part) & set(samples), f"duplicate key across shards of {name}"
            samples.update(part)
        out[name] = samples
    return out


def _meta(fields):
    return json.loads(fields["json"].decode("utf-8"))


def test_manifest_matches_files(manifest):
    assert manifest["format_version"] == 1 and manifest["name"] == "emoji"
    expected = set(IMAGE_SPLITS) | {f"audio_{s}" for s in IMAGE_SPLITS}
    assert set(manifest["splits"]) == expected
    total = 0
    for name, split in manifest["splits"].items():
        n = 0
        for sh in split["shards"]:
            data = (ROOT / sh["path"]).read_bytes()
            assert len(data) == sh["bytes"], sh["path"]
            assert hashlib.sha256(data).hexdigest() == sh["sha256"], sh["path"]
            with tarfile.open(fileobj=io.BytesIO(data)) as tf:
                keys = {m.name.split(".", 1)[0] for m in tf.getmembers()}
            assert len(keys) == sh["samples"], sh["path"]
            n += sh["samples"]
            total += len(data)
        assert n == split["samples"], name
    assert total <= 40_000_000
    assert (ROOT / manifest["tokenizer"]).exists()


def test_split_disjointness(data):
    where = {}
    for s in IMAGE_SPLITS:
        for key in data[s]:
            assert key not in where, f"{key} in {where.get(key)} and {s}"
            where[key] = s
    concepts = {s: {_meta(f)["concept"] for f in data[s].values()} for s in IMAGE_SPLITS}
    assert not concepts["val_novel"] & concepts["train"]
    assert not concepts["val_novel"] & concepts["val_style"]
    # every val_style concept is in train in exactly the other style only
    train_styles = defaultdict(set)
    for f in data["train"].values():
        m = _meta(f)
        train_styles[m["concept"]].add(m["style"])
    for f in data["val_style"].values():
        m = _meta(f)
        other = {"noto": "twemoji", "twemoji": "noto"}[m["style"]]
        assert train_styles[m["concept"]] == {other}, m["concept"]
    # both styles are held out, and val_novel has both styles of each concept
    assert {_meta(f)["style"] for f in data["val_style"].values()} == set(STYLES)
    nov = defaultdict(set)
    for f in data["val_novel"].values():
        nov[_meta(f)["concept"]].add(_meta(f)["style"])
    assert all(v == set(STYLES) for v in nov.values())
    # every group appears in every split
    groups = {s: {_meta(f)["labels"]["group"] for f in data[s].values()} for s in IMAGE_SPLITS}
    assert groups["train"] == groups["val_style"] == groups["val_novel"]
    # audio: one clip per concept, in the concept's split
    for s in IMAGE_SPLITS:
        audio = set(data[f"audio_{s}"])
        assert all(_meta(f)["split"] == s for f in data[f"audio_{s}"].values())
        if s != "train":
            assert audio == concepts[s]
    all_audio = [k for s in IMAGE_SPLITS for k in data[f"audio_{s}"]]
    assert len(all_audio) == len(set(all_audio))


def test_sample_schema_and_captions(data):
    keys = {"concept", "captions", "captions_zh", "qa", "labels", "label_zh", "tags",
            "tags_zh", "split"}
    for name, samples in data.items():
        for key, fields in samples.items():
            m = _meta(fields)
            want = keys if name.startswith("audio_") else keys | {"style"}
            assert set(m) == want, key
            if not name.startswith("audio_"):
                assert key == f"{m['style']}_{m['concept']}"
                assert m["split"] == name
            else:
                assert key == m["concept"]
            assert len(m["captions"]) >= 3 and all(isinstance(c, str) and c for c in m["captions"])
            assert 1 <= len(m["captions_zh"]) <= 3
            assert set(m["labels"]) == {"label", "group", "subgroup"}
            for qa in m["qa"]:
                assert set(qa) == {"question", "answers", "type"}
                assert qa["type"] in ("what", "category", "yesno") and qa["answers"]


def test_yesno_balanced(data):
    yes = no = 0
    for s in IMAGE_SPLITS:
        for f in data[s].values():
            for qa in _meta(f)["qa"]:
                if qa["type"] == "yesno":
                    yes += qa["answers"] == ["yes"]
                    no += qa["answers"] == ["no"]
    assert yes + no > 0
    assert 0.45 <= yes / (yes + no) <= 0.55


def test_images_are_64_rgb(data):
    from PIL import Image
    for s in IMAGE_SPLITS:
        for key, f in data[s].items():
            im = Image.open(io.BytesIO(f["png"]))
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (64, 64), key


def test_audio_decodes_16k_mono(data):
    import soundfile as sf
    for s in IMAGE_SPLITS:
        for key, f in sorted(data[f"audio_{s}"].items())[:50]:  # a sample keeps the test fast
            wav, sr = sf.read(io.BytesIO(f["flac"]))
            assert sr == 16000 and wav.ndim == 1 and 0.1 < len(wav) / sr < 10, key


def test_tokenizer_round_trip(manifest, data):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(ROOT / manifest["tokenizer"]))
    for i, t in enumerate(["<pad>", "<bos>", "<eos>", "<unk>"]):
        assert tok.token_to_id(t) == i
    assert 4000 <= tok.get_vocab_size() <= 8000
    m = _meta(next(iter(data["train"].values())))
    for text in (m["captions"][1], m["captions_zh"][-1], "an emoji of a grinning face", "红苹果的表情符号"):
        ids = tok.encode(text).ids
        assert tok.get_vocab_size() > max(ids)
        assert tok.decode(ids) == text


def _builder():
    """tools/build_emoji.py, a script outside the package, imported from its file."""
    spec = importlib.util.spec_from_file_location("build_emoji", ROOT.parent / "tools" / "build_emoji.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_builder_writes_the_committed_shards_byte_for_byte(manifest, data, tmp_path):
    """The builder's shard writing (mmstory's writer with the builder's tar headers) gives every committed shard
    back from its samples, so a rebuild keeps the manifest's sha256."""
    build = _builder()
    for name, split in manifest["splits"].items():
        prefix = Path(split["shards"][0]["path"]).name.rsplit("-", 1)[0]
        assert build.write_split(tmp_path / "emoji", prefix, sorted(data[name].items())) == split["shards"], name


def test_builder_trains_the_committed_tokenizer(manifest, data, tmp_path, monkeypatch):
    """The tokenizer trained on the train concepts' text gives the committed tokenizer.json. Each audio_train
    clip carries its concept's json, and its key order is the builder's concept order."""
    build = _builder()
    # the builder sets these in os.environ; set through monkeypatch first, they are undone after the test
    monkeypatch.setenv("RAYON_NUM_THREADS", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    metas = [_meta(fields) for _, fields in sorted(data["audio_train"].items())]
    build.train_tokenizer(build.tokenizer_texts(metas), tmp_path / "tokenizer.json")
    assert (tmp_path / "tokenizer.json").read_bytes() == (ROOT / manifest["tokenizer"]).read_bytes()
