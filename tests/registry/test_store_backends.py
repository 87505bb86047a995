"""The model store's behaviour, the same on SQLite + local disk and on PostgreSQL + S3."""

from __future__ import annotations

import hashlib
import sqlite3

import pytest

from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.registry.records import FileRecord, Lineage, VersionMetadata, canonical_config_json
from services.registry.traffic import AbRoute, TrafficPolicy, TrafficSplit

CONFIG = {"max_batch_size": 8}
GATE = {"golden_prompts": [{"prompt": "2+2=", "max_tokens": 2, "expected_text": "4"}], "latency_budget_s": 0.5}


def stored(store, path: str, content: bytes) -> FileRecord:
    return FileRecord(path, *store.blobs.put_stream([content]))


def publish(store, model: str = "m", content: bytes = b"w", **kwargs):
    return store.add_version(model, [stored(store, "weights.bin", content)], kwargs.pop("config", CONFIG), **kwargs)


def raw_execute(backend, sql: str) -> None:
    """Run `sql` on the store's database behind its back, as an operator's client would."""
    if backend.database_url:
        import psycopg

        with psycopg.connect(backend.database_url, autocommit=True) as conn:
            conn.execute(sql)
    else:
        conn = sqlite3.connect(backend.data_dir / "registry.sqlite3")
        try:
            conn.execute(sql)
            conn.commit()
        finally:
            conn.close()


def test_models_and_versions_round_trip(store):
    store.create_model("m", "generation", "chat")
    first, second = publish(store, content=b"1"), publish(store, content=b"2")

    assert (first.version, second.version) == (1, 2)
    assert store.get_model("m").description == "chat"
    assert store.get_version("m") == second
    assert store.version_numbers("m") == [1, 2]
    with pytest.raises(AlreadyExists):
        store.create_model("m", "generation")
    with pytest.raises(NotFound, match="'ghost'"):
        store.get_model("ghost")


def test_identical_content_is_stored_once_and_reads_back(store):
    a = store.blobs.put_stream([b"same", b" bytes"])
    b = store.blobs.put_stream([b"same bytes"])

    assert a == b == (hashlib.sha256(b"same bytes").hexdigest(), 10)
    assert b"".join(store.blobs.iter_chunks(a[0], 3)) == b"same bytes"
    assert store.blobs.verify(a[0])


def test_version_needs_its_blobs_with_their_size(store):
    store.create_model("m", "tensor")
    missing = FileRecord("w", "ab" * 32, 1)
    with pytest.raises(FailedPrecondition, match="upload it first"):
        store.add_version("m", [missing], CONFIG)
    sha, _ = store.blobs.put_stream([b"abc"])
    with pytest.raises(InvalidArgument, match="holds 3 bytes"):
        store.add_version("m", [FileRecord("w", sha, 4)], CONFIG)
    assert store.version_numbers("m") == []


def test_metadata_is_kept_as_given_and_the_config_digest_is_computed(store):
    store.create_model("m", "generation")
    given = VersionMetadata("LlamaForCausalLM", "bfloat16", 135_000_000, "tokenizer.json", "forged", {"team": "x"})

    version = publish(store, metadata=given, config={"b": 1, "a": 2})

    expected_digest = hashlib.sha256(canonical_config_json({"a": 2, "b": 1}).encode()).hexdigest()
    read = store.get_version("m", version.version).metadata
    assert read.config_digest == expected_digest
    assert (read.architecture, read.dtype, read.parameter_count, read.labels) == (
        "LlamaForCausalLM", "bfloat16", 135_000_000, {"team": "x"})


def test_lineage_records_source_parent_and_the_registry_clock(backend):
    backend.data_dir.mkdir(parents=True)
    with backend.open_store(clock=lambda: 1234.5) as store:
        store.create_model("m", "generation")
        publish(store, content=b"1")
        lineage = Lineage("gguf", "/models/x.gguf", 1, "", 1.0, {"quant": "Q8_0"})

        version = publish(store, content=b"2", lineage=lineage, actor="admin-token")

        read = store.get_version("m", version.version).lineage
        assert (read.source_kind, read.source_uri, read.parent_version, read.details) == (
            "gguf", "/models/x.gguf", 1, {"quant": "Q8_0"})
        assert read.created_at_s == 1234.5  # not the client's 1.0
        assert read.created_by == "admin-token"
        with pytest.raises(NotFound, match="parent_version 9"):
            publish(store, content=b"3", lineage=Lineage("push", parent_version=9))


def test_gate_is_stored_with_the_version(store):
    store.create_model("m", "generation")
    gated, plain = publish(store, content=b"1", gate=GATE), publish(store, content=b"2")

    assert store.get_version("m", gated.version).gate == GATE
    assert store.get_version("m", plain.version).gate is None


def test_aliases_resolve_move_and_are_listed(store):
    store.create_model("m", "tensor")
    publish(store, content=b"1")
    publish(store, content=b"2")

    store.set_alias("m", "production", 1)
    store.set_alias("m", "canary", 2)
    assert store.get_version_by_ref("m", "production").version == 1
    assert store.get_version_by_ref("m", "2").version == 2
    assert store.get_version_by_ref("m", "").version == 2
    store.set_alias("m", "production", 2)

    assert [(a.name, a.version) for a in store.list_aliases("m")] == [("canary", 2), ("production", 2)]
    assert store.get_version("m", 2).aliases == ("canary", "production")
    store.delete_alias("m", "canary")
    with pytest.raises(NotFound, match="no alias 'canary'"):
        store.get_version_by_ref("m", "canary")


def test_an_alias_points_only_at_an_existing_version(store):
    store.create_model("m", "tensor")
    publish(store)
    with pytest.raises(NotFound, match="no version 7"):
        store.set_alias("m", "production", 7)
    assert store.list_aliases("m") == []


@pytest.mark.parametrize("bad_ref", ["..", "a/b", "x\0", "-1", "1.0", "0", " prod", "9" * 10, "_x"])
def test_bad_version_references_are_invalid(store, bad_ref):
    store.create_model("m", "tensor")
    publish(store)
    with pytest.raises(InvalidArgument):
        store.get_version_by_ref("m", bad_ref)


@pytest.mark.parametrize("bad_name", ["", "1prod", "../x", "a/b", "x\0", "a" * 65, "prod\n"])
def test_bad_alias_names_are_invalid(store, bad_name):
    store.create_model("m", "tensor")
    publish(store)
    with pytest.raises(InvalidArgument):
        store.set_alias("m", bad_name, 1)


@pytest.mark.parametrize("bad_path", ["../etc/passwd", "/abs", "a/../b", "a\\b", "nul\0", "./a", "a//b"])
def test_bad_file_paths_are_invalid(store, bad_path):
    store.create_model("m", "tensor")
    sha, size = store.blobs.put_stream([b"x"])
    with pytest.raises(InvalidArgument):
        store.add_version("m", [FileRecord(bad_path, sha, size)], CONFIG)


def test_every_change_is_audited_with_its_actor(store):
    store.create_model("m", "tensor", actor="admin-token")
    publish(store, actor="admin-token")
    store.set_alias("m", "production", 1, reason="launch", actor="admin-token")
    store.set_traffic_policy(TrafficPolicy("m", 1), actor="admin-token")
    store.set_deployment("m", 1, 2, actor="controller")
    store.delete_alias("m", "production", actor="anonymous")
    store.append_audit("gate.pass", "m", 1, {"prompts": 3}, actor="controller")

    entries = store.list_audit("m")
    assert [e.action for e in entries] == [
        "model.create", "version.create", "alias.set", "traffic.set", "deployment.set", "alias.delete", "gate.pass"]
    assert [e.actor for e in entries][-3:] == ["controller", "anonymous", "controller"]
    assert entries[2].details["reason"] == "launch"
    assert [e.sequence for e in entries] == sorted({e.sequence for e in entries})
    assert store.list_audit("m", after_sequence=entries[4].sequence, limit=1) == [entries[5]]


def test_audit_log_refuses_update_and_delete(store, backend):
    store.create_model("m", "tensor")
    for sql in ("UPDATE audit SET actor = 'someone else'", "DELETE FROM audit"):
        with pytest.raises(Exception, match="append-only"):
            raw_execute(backend, sql)
    assert [e.actor for e in store.list_audit()] == ["local"]


def test_versions_refuse_update(store, backend):
    store.create_model("m", "tensor")
    publish(store)
    for sql in ("UPDATE versions SET config_json = '{}'", "UPDATE version_details SET gate_json = '{}'"):
        with pytest.raises(Exception, match="immutable"):
            raw_execute(backend, sql)


def test_traffic_policy_is_validated(store):
    store.create_model("m", "tensor")
    publish(store, content=b"1")
    publish(store, content=b"2")
    splits = (TrafficSplit(1, 90.0), TrafficSplit(2, 10.0))

    with pytest.raises(InvalidArgument, match="sum to 95"):
        store.set_traffic_policy(TrafficPolicy("m", 1, (TrafficSplit(1, 85.0), TrafficSplit(2, 10.0))))
    with pytest.raises(InvalidArgument, match="stable_version 3 is not among"):
        store.set_traffic_policy(TrafficPolicy("m", 3, splits))
    with pytest.raises(InvalidArgument, match="needs a stable_version"):
        store.set_traffic_policy(TrafficPolicy("m", 0, splits))
    with pytest.raises(NotFound, match=r"versions \[5\]"):
        store.set_traffic_policy(TrafficPolicy("m", 1, ab_key="x-exp", ab_routes=(AbRoute("b", 5),)))
    thirds = (TrafficSplit(1, 100 / 3), TrafficSplit(2, 200 / 3))
    assert store.set_traffic_policy(TrafficPolicy("m", 1, thirds)).revision == 1
    store.create_model("n", "tensor")
    with pytest.raises(NotFound, match="no traffic policy"):
        store.get_traffic_policy("n")


def test_traffic_policy_revision_rises_and_compare_and_set_refuses_a_stale_write(store):
    store.create_model("m", "tensor")
    publish(store, content=b"1")
    publish(store, content=b"2")

    first = store.set_traffic_policy(TrafficPolicy("m", 1))
    second = store.set_traffic_policy(TrafficPolicy("m", 1, (TrafficSplit(1, 90), TrafficSplit(2, 10))),
                                      expected_revision=first.revision)
    with pytest.raises(FailedPrecondition, match="revision 2, not 1"):
        store.set_traffic_policy(TrafficPolicy("m", 2), expected_revision=first.revision)

    assert (first.revision, second.revision) == (1, 2)
    assert store.get_traffic_policy("m") == second
    assert store.describe_model("m").traffic_policy == second


def test_deployments_are_set_listed_and_undeployed(store):
    store.create_model("m", "tensor")
    publish(store)
    store.set_deployment("m", 1, 2)
    assert [(d.version, d.replicas) for d in store.list_deployments("m")] == [(1, 2)]
    with pytest.raises(NotFound):
        store.set_deployment("m", 4, 1)
    store.set_deployment("m", 1, 0)
    assert store.list_deployments() == []


def test_delete_version_is_refused_while_in_use_and_frees_unshared_blobs(store):
    store.create_model("m", "tensor")
    shared = stored(store, "shared.bin", b"shared")
    v1 = store.add_version("m", [shared, stored(store, "own.bin", b"only v1")], CONFIG)
    store.add_version("m", [shared], {"v": 2})
    own_sha = next(f.sha256 for f in v1.files if f.path == "own.bin")

    store.set_alias("m", "production", 1)
    with pytest.raises(FailedPrecondition, match="aliased"):
        store.delete_version("m", 1)
    store.delete_alias("m", "production")
    store.set_traffic_policy(TrafficPolicy("m", 1))
    with pytest.raises(FailedPrecondition, match="traffic policy"):
        store.delete_version("m", 1)
    store.set_traffic_policy(TrafficPolicy("m", 2))
    store.set_deployment("m", 1, 1)
    with pytest.raises(FailedPrecondition, match="deployed"):
        store.delete_version("m", 1)
    store.set_deployment("m", 1, 0)

    store.delete_version("m", 1)

    assert store.version_numbers("m") == [2]
    assert store.blobs.exists(shared.sha256)
    assert not store.blobs.exists(own_sha)
    assert store.list_audit("m")[-1].action == "version.delete"
    assert store.verify(rehash=True).problems == ()


def test_verify_finds_a_blob_deleted_behind_the_stores_back(store):
    store.create_model("m", "tensor")
    version = publish(store, content=b"precious")
    assert store.verify(rehash=True).problems == ()

    store.blobs.delete(version.files[0].sha256)

    report = store.verify()
    assert (report.num_versions, report.num_blobs) == (1, 1)
    assert report.problems == (f"model m version 1: file weights.bin: blob {version.files[0].sha256} missing",)


@pytest.mark.parametrize("bad_name", ["", "../m", "a/b", "m\0", "-m", "a" * 129])
def test_bad_model_names_are_invalid(store, bad_name):
    with pytest.raises(InvalidArgument):
        store.create_model(bad_name, "tensor")
