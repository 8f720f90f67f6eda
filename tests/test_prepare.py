"""Sources → token shards: Tiny Shakespeare's download, local text files and streamed `datasets` sources,
the process pool, fixed-size shards, the manifest, and the errors a user can fix."""

import hashlib
import importlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINYSHAKESPEARE_SHA256
from omegaconf import OmegaConf

from gpt2lab import tokenizer
from gpt2lab.data import HFDataset, TextFiles, TinyShakespeare, open_shard, prepare
from gpt2lab.errors import DataError


def test_tinyshakespeare_download_verifies_the_file(tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    (tmp_path / "mirror.txt").write_text(text)
    url = (tmp_path / "mirror.txt").as_uri()  # a real urllib download, from a file:// mirror
    good = TinyShakespeare(url=url, sha256=hashlib.sha256(text.encode()).hexdigest())
    (tmp_path / "a").mkdir()
    assert list(good.documents(tmp_path / "a")) == [text]
    assert (tmp_path / "a" / "input.txt").read_text() == text

    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match="not the right file"):
        list(TinyShakespeare(url=url, sha256=TINYSHAKESPEARE_SHA256).documents(tmp_path / "b"))
    assert not list((tmp_path / "b").iterdir())  # nothing half-downloaded left behind


def test_offline_download_failure_says_how_to_seed_a_copy(tmp_path):
    missing = TinyShakespeare(url=(tmp_path / "nowhere.txt").as_uri(), sha256=TINYSHAKESPEARE_SHA256)
    with pytest.raises(DataError, match="GPT2LAB_TINYSHAKESPEARE"):
        list(missing.documents(tmp_path))
    assert not list(tmp_path.iterdir())


DOCS = [f"Document {i}: " + " ".join(["the quick brown fox jumps over the lazy dog"] * (i % 7 + 1)) for i in range(60)]


def reference_stream(docs) -> np.ndarray:
    """<|endoftext|> + tiktoken's ids, document after document: what every source must produce."""
    enc = tokenizer.encoding()
    return np.array([t for d in docs for t in [enc.eot_token, *enc.encode_ordinary(d)]], dtype=np.uint16)


def read_split(data_dir: Path, split: str) -> list[np.ndarray]:
    return [open_shard(p, vocab_size=50257) for p in sorted(data_dir.glob(f"{split}_*.bin"))]


@pytest.fixture
def jsonl(tmp_path) -> Path:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(DOCS)))
    return path


def test_streamed_hf_source_writes_fixed_size_shards_with_the_first_as_val(tmp_path, jsonl):
    """The `datasets` code path of FineWeb-Edu (load_dataset(..., streaming=True)), offline on a local jsonl,
    tokenized by a pool of 2 processes."""
    source = HFDataset(path="json", data_files=str(jsonl), split="train")
    prepare(source, tmp_path / "out", val_fraction=None, val_shards=1, shard_size=500, num_proc=2)
    stream = reference_stream(DOCS)
    val, train = read_split(tmp_path / "out", "val"), read_split(tmp_path / "out", "train")
    assert [len(s) for s in val + train[:-1]] == [500] * (len(val) + len(train) - 1) and 0 < len(train[-1]) <= 500
    assert np.array_equal(np.concatenate(val + train), stream)  # document order kept through the pool
    counts = np.load(tmp_path / "out" / "train_token_counts.npy")
    assert np.array_equal(counts, np.bincount(np.concatenate(train), minlength=50257))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["tokens"] == {"train": len(stream) - 500, "val": 500}
    assert manifest["settings"]["source"]["path"] == "json" and manifest["settings"]["val_shards"] == 1


def test_text_files_are_documents_and_val_fraction_splits_across_shards(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    for i, doc in enumerate(DOCS[:30]):
        (corpus / ("sub" if i % 2 else "") / f"{i:02d}.txt").write_text(doc)
    files = sorted(corpus.rglob("*.txt"))
    prepare(TextFiles(str(corpus)), tmp_path / "out", val_fraction=0.25, val_shards=None, shard_size=100, num_proc=1)
    stream = reference_stream([f.read_text() for f in files])
    val, train = read_split(tmp_path / "out", "val"), read_split(tmp_path / "out", "train")
    n_val = int(len(stream) * 0.25)
    assert len(val) > 1 and len(train) > 1  # the cut falls inside a shard: both sides span several shards
    assert np.array_equal(np.concatenate(train), stream[:-n_val]) and np.array_equal(
        np.concatenate(val), stream[-n_val:]
    )
    assert np.array_equal(
        np.load(tmp_path / "out" / "train_token_counts.npy"), np.bincount(stream[:-n_val], minlength=50257)
    )


def test_text_source_errors_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match="data.source.path is not set: set data.source.path="):
        TextFiles(None)
    with pytest.raises(DataError, match=f"data.source.path: {tmp_path / 'nope'} does not exist"):
        TextFiles(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="holds no .txt files"):
        TextFiles(str(tmp_path))
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8 text .*iconv"):
        list(TextFiles(str(tmp_path)).documents(tmp_path))


def test_list_from_the_command_line_reaches_the_manifest_as_plain_json(tmp_path, jsonl):
    """data.source.data_files=[a,b] or data.source.path=[a,b] arrive as OmegaConf ListConfigs."""
    other = tmp_path / "more.jsonl"
    other.write_text(json.dumps({"text": "one more document"}) + "\n")
    source = HFDataset(path="json", data_files=OmegaConf.create([str(jsonl), str(other)]), split="train")
    prepare(source, tmp_path / "hf", val_fraction=0.1, val_shards=None, shard_size=10_000, num_proc=1)
    manifest = json.loads((tmp_path / "hf" / "manifest.json").read_text())
    assert manifest["settings"]["source"]["data_files"] == [str(jsonl), str(other)]
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text(DOCS[0])
    texts = TextFiles(OmegaConf.create([str(tmp_path / "txt"), str(tmp_path / "txt" / "a.txt")]))
    prepare(texts, tmp_path / "text", val_fraction=0.1, val_shards=None, shard_size=10_000, num_proc=1)
    assert json.loads((tmp_path / "text" / "manifest.json").read_text())["settings"]["source"]["files"] == 2


def test_one_process_per_cpu_without_sched_getaffinity(tmp_path, jsonl, monkeypatch):
    """macOS has no os.sched_getaffinity: num_proc=null counts os.cpu_count() processes."""
    module = importlib.import_module("gpt2lab.data.prepare")  # not gpt2lab.data.prepare: that is the function
    pools = []
    encode_documents = module.encode_documents
    monkeypatch.setattr(module, "encode_documents", lambda docs, n: pools.append(n) or encode_documents(docs, n))
    monkeypatch.delattr("os.sched_getaffinity", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    source = HFDataset(path="json", data_files=str(jsonl), split="train")
    prepare(source, tmp_path / "out", val_fraction=0.1, val_shards=None, shard_size=400, num_proc=None)
    assert pools == [2] and (tmp_path / "out" / "manifest.json").exists()


def test_hf_source_errors_name_the_setting_to_fix(tmp_path, jsonl):
    with pytest.raises(DataError, match="rows have no field 'body' .*set data.source.text_field"):
        list(HFDataset(path="json", data_files=str(jsonl), text_field="body").documents(tmp_path))
    with pytest.raises(DataError, match="nowhere.jsonl.*check data.source.path and data.source.data_files"):
        list(HFDataset(path="json", data_files=str(tmp_path / "nowhere.jsonl")).documents(tmp_path))


def test_one_process_and_a_pool_write_identical_shards(tmp_path, jsonl):
    source = HFDataset(path="json", data_files=str(jsonl), split="train")
    for num_proc in (1, 2):
        prepare(source, tmp_path / str(num_proc), val_fraction=0.1, val_shards=None, shard_size=400, num_proc=num_proc)
    names = sorted(p.name for p in (tmp_path / "1").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "2").iterdir())
    for name in names:
        if name != "manifest.json":
            assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "2" / name).read_bytes(), name


def test_other_settings_refuse_and_rebuild_replaces_every_shard(tmp_path, jsonl):
    source = HFDataset(path="json", data_files=str(jsonl), split="train")
    out = tmp_path / "out"
    prepare(source, out, val_fraction=None, val_shards=1, shard_size=300, num_proc=1)
    n_small = len(list(out.glob("train_*.bin")))
    with pytest.raises(DataError, match=r"shard_size: 300 → now 1000\): add data.prepare.rebuild=true"):
        prepare(source, out, val_fraction=None, val_shards=1, shard_size=1000, num_proc=1)
    prepare(source, out, val_fraction=None, val_shards=1, shard_size=1000, num_proc=1, rebuild=True)
    train = read_split(out, "train")
    assert len(train) < n_small and all(len(s) <= 1000 for s in train)  # no stale shard of the old layout left
    assert np.array_equal(np.concatenate(read_split(out, "val") + train), reference_stream(DOCS))


class Interrupted(Exception):
    pass


class DiesMidway:
    """A source killed after its first documents: the shards so far are written, the manifest is not."""

    def describe(self) -> dict:
        return {"name": "dies"}

    def documents(self, data_dir):
        yield from DOCS[:40]
        raise Interrupted


def test_interrupted_prepare_is_redone_from_scratch(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Interrupted):
        prepare(DiesMidway(), out, val_fraction=None, val_shards=1, shard_size=200, num_proc=1)
    assert list(out.glob("train_*.bin")) and not (out / "manifest.json").exists()
    assert not list(out.glob("*.tmp"))  # every shard on disk is whole (temp name + rename)

    class Whole(DiesMidway):
        def documents(self, data_dir):
            yield from DOCS[:20]

    prepare(Whole(), out, val_fraction=None, val_shards=1, shard_size=200, num_proc=1)
    assert np.array_equal(
        np.concatenate(read_split(out, "val") + read_split(out, "train")), reference_stream(DOCS[:20])
    )


def test_exactly_one_val_split_setting_is_required(tmp_path, jsonl):
    source = HFDataset(path="json", data_files=str(jsonl), split="train")
    with pytest.raises(ValueError, match="set exactly one of them"):
        prepare(source, tmp_path, val_fraction=0.1, val_shards=1, shard_size=100)
    with pytest.raises(ValueError, match="all of them val: lower data.prepare.shard_size"):
        prepare(source, tmp_path / "x", val_fraction=None, val_shards=1, shard_size=10**6, num_proc=1)
