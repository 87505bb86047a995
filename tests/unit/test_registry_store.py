"""Behaviour of the registry's storage layer: the blob directory and the model store."""

from __future__ import annotations

import dataclasses
import hashlib
import sqlite3
import threading
from pathlib import Path

import pytest

from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from services.registry.blobs import LocalBlobStore
from services.registry.records import FileRecord, Task
from services.registry.store import SCHEMA_VERSION, ModelStore

CONFIG = {"max_batch_size": 8}


@pytest.fixture
def blobs(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs")


@pytest.fixture
def store(tmp_path: Path, blobs: LocalBlobStore):
    with ModelStore(tmp_path / "registry.db", blobs) as model_store:
        yield model_store


def stored_file(blobs: LocalBlobStore, path: str, content: bytes) -> FileRecord:
    sha256_hex, size_bytes = blobs.put_stream([content])
    return FileRecord(path, sha256_hex, size_bytes)


def blob_files(blobs: LocalBlobStore) -> list[Path]:
    return [p for p in (blobs.root / "sha256").rglob("*") if p.is_file()]


def temp_files(blobs: LocalBlobStore) -> list[Path]:
    return list((blobs.root / "tmp").iterdir())


def write_model_folder(folder: Path, files: dict[str, bytes]) -> Path:
    for relative_path, content in files.items():
        (folder / relative_path).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative_path).write_bytes(content)
    return folder


# -- blobs ----------------------------------------------------------------------------------


def test_put_stream_stores_blob_under_its_sha256(blobs: LocalBlobStore):
    content = b"hello " * 1000
    sha256_hex, size_bytes = blobs.put_stream([content[:10], content[10:]])

    assert sha256_hex == hashlib.sha256(content).hexdigest()
    assert size_bytes == len(content)
    assert blobs.path_for(sha256_hex) == blobs.root / "sha256" / sha256_hex[:2] / sha256_hex[2:]
    assert blobs.path_for(sha256_hex).read_bytes() == content
    assert blobs.exists(sha256_hex)


def test_empty_blob_is_storable(blobs: LocalBlobStore):
    sha256_hex, size_bytes = blobs.put_stream([])

    assert (sha256_hex, size_bytes) == (hashlib.sha256(b"").hexdigest(), 0)
    assert blobs.exists(sha256_hex)


def test_same_content_is_stored_once(blobs: LocalBlobStore, tmp_path: Path):
    source = tmp_path / "weights.bin"
    source.write_bytes(b"w" * 4096)

    first = blobs.put_stream([b"w" * 4096])
    second = blobs.put_file(source)

    assert first == second
    assert len(blob_files(blobs)) == 1
    assert temp_files(blobs) == []


def test_interrupted_put_leaves_no_blob_and_no_temp_file(blobs: LocalBlobStore):
    def failing_upload():
        yield b"first chunk"
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        blobs.put_stream(failing_upload())

    assert blob_files(blobs) == []
    assert temp_files(blobs) == []


def test_blob_is_not_visible_until_fully_written(blobs: LocalBlobStore):
    content = b"a" * 100 + b"b" * 100
    sha256_hex = hashlib.sha256(content).hexdigest()
    seen_while_writing = []

    def upload():
        yield content[:100]
        seen_while_writing.append(blobs.exists(sha256_hex))
        yield content[100:]

    blobs.put_stream(upload())

    assert seen_while_writing == [False]
    assert blobs.exists(sha256_hex)


def test_iter_chunks_returns_content_in_bounded_chunks(blobs: LocalBlobStore):
    content = bytes(range(256)) * 10
    sha256_hex, _ = blobs.put_stream([content])

    chunks = list(blobs.iter_chunks(sha256_hex, chunk_bytes=1000))

    assert [len(c) for c in chunks] == [1000, 1000, 560]
    assert b"".join(chunks) == content


def test_missing_blob_raises_not_found_before_iteration(blobs: LocalBlobStore):
    missing = "0" * 64
    assert not blobs.exists(missing)
    with pytest.raises(NotFound, match=missing):
        blobs.open(missing)
    with pytest.raises(NotFound):
        blobs.iter_chunks(missing)  # no next(): a streaming reply must fail before it starts


def test_intact_blob_passes_verify(blobs: LocalBlobStore):
    sha256_hex, _ = blobs.put_stream([b"safetensors bytes"])
    assert blobs.verify(sha256_hex)


def test_corrupted_blob_fails_verify(blobs: LocalBlobStore):
    sha256_hex, _ = blobs.put_stream([b"safetensors bytes"])
    path = blobs.path_for(sha256_hex)
    path.chmod(0o644)  # blobs are stored read-only
    path.write_bytes(b"safetensors bytez")

    assert not blobs.verify(sha256_hex)


def test_stored_blobs_are_read_only(blobs: LocalBlobStore):
    sha256_hex, _ = blobs.put_stream([b"x"])
    assert blobs.path_for(sha256_hex).stat().st_mode & 0o222 == 0


@pytest.mark.parametrize(
    "bad_sha256",
    [
        "../../etc/passwd",
        "ab/" + "c" * 61,
        "A" * 64,  # uppercase
        "a" * 63,
        "a" * 65,
        "g" * 64,
        "a" * 64 + "\n",
        "",
        None,
    ],
)
def test_malformed_sha256_is_rejected_before_touching_disk(blobs: LocalBlobStore, bad_sha256):
    with pytest.raises(InvalidArgument):
        blobs.path_for(bad_sha256)
    with pytest.raises(InvalidArgument):
        blobs.open(bad_sha256)


# -- models ---------------------------------------------------------------------------------


def test_created_model_can_be_read_back(tmp_path: Path, blobs: LocalBlobStore):
    with ModelStore(tmp_path / "r.db", blobs, clock=lambda: 1234.5) as model_store:
        created = model_store.create_model("minilm", "embedding", "sentence embeddings")

        assert created.task is Task.EMBEDDING
        assert created.created_at_s == 1234.5
        assert model_store.get_model("minilm") == created


def test_duplicate_model_raises_already_exists(store: ModelStore):
    store.create_model("minilm", "embedding")
    with pytest.raises(AlreadyExists, match="minilm"):
        store.create_model("minilm", "generation")


def test_unknown_model_raises_not_found_naming_only_that_model(store: ModelStore):
    store.create_model("secret-model", "tensor")
    with pytest.raises(NotFound, match="'nope'") as raised:
        store.get_model("nope")
    assert "secret-model" not in raised.value.message


def test_list_models_is_sorted_by_name(store: ModelStore):
    for name in ["zeta", "alpha", "Mid"]:
        store.create_model(name, "tensor")
    assert [m.name for m in store.list_models()] == ["Mid", "alpha", "zeta"]


@pytest.mark.parametrize(
    "bad_name",
    ["", "-leading-dash", ".hidden", "_under", "a/b", "../x", "a b", "name\n", "é", "a" * 129, 7],
)
def test_invalid_model_name_is_rejected(store: ModelStore, bad_name):
    with pytest.raises(InvalidArgument):
        store.create_model(bad_name, "tensor")


@pytest.mark.parametrize("good_name", ["a", "all-MiniLM-L6-v2", "SmolLM2_135M.instruct", "a" * 128])
def test_valid_model_name_is_accepted(store: ModelStore, good_name):
    assert store.create_model(good_name, "tensor").name == good_name


def test_unknown_task_is_rejected(store: ModelStore):
    with pytest.raises(InvalidArgument, match="embedding, generation, tensor"):
        store.create_model("m", "classification")


# -- versions -------------------------------------------------------------------------------


def test_versions_start_at_one_and_increase(store: ModelStore, blobs: LocalBlobStore):
    store.create_model("m", "tensor")
    numbers = [
        store.add_version("m", [stored_file(blobs, "model.bin", bytes([i]))], CONFIG).version
        for i in range(3)
    ]
    assert numbers == [1, 2, 3]
    assert [v.version for v in store.list_versions("m")] == [1, 2, 3]
    assert store.version_numbers("m") == [1, 2, 3]


def test_version_keeps_files_sorted_and_sums_their_bytes(store: ModelStore, blobs: LocalBlobStore):
    store.create_model("m", "generation")
    files = [
        stored_file(blobs, "tokenizer.json", b"{}"),
        stored_file(blobs, "config.json", b'{"a": 1}'),
        stored_file(blobs, "weights/model.safetensors", b"w" * 100),
    ]

    version = store.add_version("m", files, {"max_batch_size": 4, "dtype": "float16"})

    assert [f.path for f in version.files] == [
        "config.json",
        "tokenizer.json",
        "weights/model.safetensors",
    ]
    assert version.total_bytes == 2 + 8 + 100
    assert store.get_version("m", 1) == version


def test_latest_version_is_returned_when_none_is_asked_for(store: ModelStore, blobs: LocalBlobStore):
    store.create_model("m", "tensor")
    store.add_version("m", [stored_file(blobs, "a", b"1")], {"v": 1})
    store.add_version("m", [stored_file(blobs, "a", b"2")], {"v": 2})

    latest = store.get_version("m", None)

    assert (latest.version, latest.config) == (2, {"v": 2})
    assert store.get_version("m", 1).config == {"v": 1}


def test_unknown_version_raises_not_found_naming_model_and_version(
    store: ModelStore, blobs: LocalBlobStore
):
    store.create_model("m", "tensor")
    store.add_version("m", [stored_file(blobs, "a", b"1")], CONFIG)
    with pytest.raises(NotFound, match=r"'m'.*version 7.*latest is 1"):
        store.get_version("m", 7)


def test_model_without_versions_has_no_latest(store: ModelStore):
    store.create_model("m", "tensor")
    with pytest.raises(NotFound, match="'m' has no versions"):
        store.get_version("m")


def test_versions_of_unknown_model_raise_not_found(store: ModelStore, blobs: LocalBlobStore):
    with pytest.raises(NotFound, match="'ghost'"):
        store.get_version("ghost", 1)
    with pytest.raises(NotFound, match="'ghost'"):
        store.list_versions("ghost")
    with pytest.raises(NotFound, match="'ghost'"):
        store.add_version("ghost", [stored_file(blobs, "a", b"1")], CONFIG)


@pytest.mark.parametrize("bad_version", [0, -1, 1.0, "1", True])
def test_non_positive_or_non_int_version_is_rejected(store: ModelStore, bad_version):
    store.create_model("m", "tensor")
    with pytest.raises(InvalidArgument):
        store.get_version("m", bad_version)


def test_version_needs_its_blobs_uploaded_first(store: ModelStore):
    store.create_model("m", "tensor")
    missing = FileRecord("model.bin", hashlib.sha256(b"never uploaded").hexdigest(), 14)

    with pytest.raises(FailedPrecondition, match="model.bin"):
        store.add_version("m", [missing], CONFIG)
    with pytest.raises(NotFound):
        store.get_version("m")


def test_file_size_must_match_the_stored_blob(store: ModelStore, blobs: LocalBlobStore):
    store.create_model("m", "tensor")
    real = stored_file(blobs, "model.bin", b"12345")
    with pytest.raises(InvalidArgument, match="5 bytes"):
        store.add_version("m", [dataclasses.replace(real, size_bytes=99)], CONFIG)


@pytest.mark.parametrize(
    "bad_path",
    ["", "/etc/passwd", "../outside", "a/../../b", "..", "a\\b", "a//b", "./a", "a/", "a\0b"],
)
def test_unsafe_file_path_is_rejected(bad_path):
    with pytest.raises(InvalidArgument):
        FileRecord(bad_path, "0" * 64, 1)


def test_same_path_twice_in_one_version_is_rejected(store: ModelStore, blobs: LocalBlobStore):
    store.create_model("m", "tensor")
    with pytest.raises(InvalidArgument, match="listed twice"):
        store.add_version(
            "m", [stored_file(blobs, "a", b"1"), stored_file(blobs, "a", b"2")], CONFIG
        )


@pytest.mark.parametrize("bad_config", [["not", "a", "dict"], {"x": object()}, {"x": float("nan")}])
def test_config_must_be_a_json_object(store: ModelStore, blobs: LocalBlobStore, bad_config):
    store.create_model("m", "tensor")
    with pytest.raises(InvalidArgument):
        store.add_version("m", [stored_file(blobs, "a", b"1")], bad_config)


def test_version_records_cannot_be_changed_through_the_api(store: ModelStore, blobs: LocalBlobStore):
    store.create_model("m", "tensor")
    version = store.add_version("m", [stored_file(blobs, "a", b"1")], {"max_batch_size": 8})

    with pytest.raises(dataclasses.FrozenInstanceError):
        version.version = 2
    version.config["max_batch_size"] = 1000

    assert store.get_version("m", 1).config == {"max_batch_size": 8}


def test_database_refuses_to_update_a_version(tmp_path: Path, store: ModelStore, blobs: LocalBlobStore):
    store.create_model("m", "tensor")
    store.add_version("m", [stored_file(blobs, "a", b"1")], CONFIG)

    raw = sqlite3.connect(tmp_path / "registry.db")
    try:
        with pytest.raises(sqlite3.IntegrityError, match="immutable"):
            raw.execute("UPDATE versions SET config_json = '{}'")
        with pytest.raises(sqlite3.IntegrityError, match="immutable"):
            raw.execute("UPDATE version_files SET sha256 = ?", ("f" * 64,))
    finally:
        raw.close()


# -- import_folder --------------------------------------------------------------------------


def test_import_folder_creates_model_and_skips_hidden_files(store: ModelStore, tmp_path: Path):
    folder = write_model_folder(
        tmp_path / "minilm",
        {
            "config.json": b"{}",
            "model.safetensors": b"weights",
            "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
            ".gitattributes": b"*.safetensors filter=lfs",
            ".cache/huggingface/download.lock": b"",
        },
    )

    version = store.import_folder("minilm", "embedding", folder, CONFIG, "demo")

    assert store.get_model("minilm").description == "demo"
    assert version.version == 1
    assert [f.path for f in version.files] == [
        "1_Pooling/config.json",
        "config.json",
        "model.safetensors",
    ]
    assert all(store.blobs.exists(f.sha256) for f in version.files)


def test_import_folder_twice_adds_no_version(store: ModelStore, tmp_path: Path):
    folder = write_model_folder(tmp_path / "m", {"a.bin": b"1", "b.bin": b"2"})

    first = store.import_folder("m", "tensor", folder, {"max_batch_size": 8, "b": [1, 2]})
    again = store.import_folder("m", "tensor", folder, {"b": [1, 2], "max_batch_size": 8})

    assert again == first
    assert len(store.list_versions("m")) == 1


def test_import_folder_adds_a_version_when_files_or_config_change(
    store: ModelStore, tmp_path: Path
):
    folder = write_model_folder(tmp_path / "m", {"a.bin": b"1"})
    store.import_folder("m", "tensor", folder, CONFIG)

    (folder / "a.bin").write_bytes(b"retrained")
    changed_files = store.import_folder("m", "tensor", folder, CONFIG)
    changed_config = store.import_folder("m", "tensor", folder, {"max_batch_size": 16})

    assert (changed_files.version, changed_config.version) == (2, 3)


def test_import_folder_stores_identical_files_once(store: ModelStore, tmp_path: Path):
    folder = write_model_folder(tmp_path / "m", {"a.bin": b"same", "copy/a.bin": b"same"})

    version = store.import_folder("m", "tensor", folder, CONFIG)

    assert version.files[0].sha256 == version.files[1].sha256
    assert len(blob_files(store.blobs)) == 1


def test_import_folder_refuses_a_different_task(store: ModelStore, tmp_path: Path):
    store.create_model("m", "embedding")
    folder = write_model_folder(tmp_path / "m", {"a.bin": b"1"})
    with pytest.raises(FailedPrecondition, match="'embedding'"):
        store.import_folder("m", "generation", folder, CONFIG)


def test_import_folder_needs_a_folder_with_files(store: ModelStore, tmp_path: Path):
    (tmp_path / "empty").mkdir()
    write_model_folder(tmp_path / "only-hidden", {".gitattributes": b""})
    with pytest.raises(InvalidArgument, match="no files"):
        store.import_folder("m", "tensor", tmp_path / "empty", CONFIG)
    with pytest.raises(InvalidArgument, match="no files"):
        store.import_folder("m", "tensor", tmp_path / "only-hidden", CONFIG)
    with pytest.raises(InvalidArgument, match="not a folder"):
        store.import_folder("m", "tensor", tmp_path / "missing", CONFIG)
    with pytest.raises(NotFound):
        store.get_model("m")


def test_import_folder_follows_a_snapshots_links_into_its_blob_cache(store: ModelStore, tmp_path: Path):
    # A Hugging Face cache snapshot is links into its repository's blobs/ folder.
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc123").write_bytes(b"weights")
    snapshot = repo / "snapshots" / "rev1"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(Path("../../blobs/abc123"))

    version = store.import_folder("m", "tensor", snapshot, CONFIG)

    assert version.files[0].sha256 == hashlib.sha256(b"weights").hexdigest()


def test_import_folder_refuses_a_link_out_of_the_folder(store: ModelStore, tmp_path: Path):
    secret = tmp_path / "elsewhere" / "secret"
    secret.parent.mkdir()
    secret.write_bytes(b"not a model file")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "model" / "weights.bin").symlink_to(secret)

    with pytest.raises(InvalidArgument, match="outside the model folder"):
        store.import_folder("m", "tensor", tmp_path / "model", CONFIG)
    with pytest.raises(NotFound):
        store.get_model("m")


# -- durability and concurrency -------------------------------------------------------------


def test_data_survives_reopening_the_store(tmp_path: Path):
    db_path, blob_root = tmp_path / "registry.db", tmp_path / "blobs"
    with ModelStore(db_path, LocalBlobStore(blob_root)) as first:
        first.create_model("m", "generation", "chat")
        written = first.add_version("m", [stored_file(first.blobs, "w", b"w")], CONFIG)

    with ModelStore(db_path, LocalBlobStore(blob_root)) as reopened:
        assert reopened.get_model("m").description == "chat"
        assert reopened.get_version("m") == written
        assert reopened.blobs.verify(written.files[0].sha256)


def test_store_uses_wal_and_records_its_schema_version(tmp_path: Path, store: ModelStore):
    raw = sqlite3.connect(tmp_path / "registry.db")
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    finally:
        raw.close()


def test_database_from_a_newer_release_is_refused(tmp_path: Path, blobs: LocalBlobStore):
    ModelStore(tmp_path / "r.db", blobs).close()
    raw = sqlite3.connect(tmp_path / "r.db")
    with raw:
        raw.execute("UPDATE schema_version SET version = 999")
    raw.close()

    with pytest.raises(FailedPrecondition, match="999"):
        ModelStore(tmp_path / "r.db", blobs)


def run_in_threads(num_threads: int, work) -> list:
    """Run `work(i)` on `num_threads` threads released together; their results in order."""
    barrier = threading.Barrier(num_threads)
    results: list = [None] * num_threads
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except BaseException as error:  # re-raised below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(num_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def test_concurrent_add_version_gives_distinct_numbers(store: ModelStore, blobs: LocalBlobStore):
    store.create_model("m", "tensor")
    files = [[stored_file(blobs, "a", bytes([i]))] for i in range(4)]

    versions = run_in_threads(4, lambda i: store.add_version("m", files[i], {"i": i}))

    assert sorted(v.version for v in versions) == [1, 2, 3, 4]
    assert {store.get_version("m", v.version).config["i"] for v in versions} == {0, 1, 2, 3}


def test_two_store_instances_on_one_database_never_reuse_a_number(
    tmp_path: Path, blobs: LocalBlobStore
):
    # Separate connections behave like separate processes: SQLite's write lock decides.
    stores = [ModelStore(tmp_path / "shared.db", blobs) for _ in range(2)]
    try:
        stores[0].create_model("m", "tensor")
        file = stored_file(blobs, "a", b"1")

        versions = run_in_threads(
            4, lambda i: stores[i % 2].add_version("m", [file], {"i": i}).version
        )

        assert sorted(versions) == [1, 2, 3, 4]
    finally:
        for model_store in stores:
            model_store.close()


def test_concurrent_imports_of_one_folder_add_one_version(store: ModelStore, tmp_path: Path):
    folder = write_model_folder(tmp_path / "m", {"a.bin": b"1", "b.bin": b"2"})

    versions = run_in_threads(4, lambda _: store.import_folder("m", "tensor", folder, CONFIG))

    assert {v.version for v in versions} == {1}
    assert len(store.list_versions("m")) == 1


def test_a_schema_1_database_is_upgraded_and_its_versions_read_back(tmp_path: Path, blobs: LocalBlobStore):
    from services.registry import schema

    file = stored_file(blobs, "w", b"old weights")
    raw = sqlite3.connect(tmp_path / "old.db")
    with raw:
        raw.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for statement in schema.SQLITE_MIGRATIONS[0]:
            raw.execute(statement)
        raw.execute("INSERT INTO schema_version VALUES (1)")
        raw.execute("INSERT INTO models VALUES ('m', 'tensor', '', 1.0)")
        raw.execute("INSERT INTO versions VALUES ('m', 1, '{}', 2.0)")
        raw.execute("INSERT INTO version_files VALUES ('m', 1, 'w', ?, ?)", (file.sha256, file.size_bytes))
    raw.close()

    with ModelStore(tmp_path / "old.db", blobs) as upgraded:
        version = upgraded.get_version("m", 1)
        upgraded.set_alias("m", "production", 1)

        assert version.files == (file,)
        assert version.metadata.config_digest == hashlib.sha256(b"{}").hexdigest()
        assert upgraded.get_version_by_ref("m", "production").version == 1
        assert upgraded.verify().problems == ()
