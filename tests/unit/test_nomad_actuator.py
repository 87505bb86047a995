"""The `nomad` actuator against a stand-in of Nomad's documented job scale API on loopback HTTP
(tests/support/nomad_standin.py): what it sends, when it retries, what it refuses."""

from __future__ import annotations

import asyncio

import pytest

from services.autoscale.actuator import ScaleRequest
from services.autoscale.nomad import NomadActuator, ScaleRefused
from services.autoscale.nomad_api import NomadApi, NomadError
from services.common.config import NomadConfig
from tests.conftest import free_port
from tests.support.nomad_standin import Group, NomadStandin

JOB = "tensoryard-workers"


@pytest.fixture
def nomad():
    with NomadStandin() as standin:
        standin.add_job(JOB, [Group("llm-v3", count=2, scaling_min=1, scaling_max=6),
                              Group("embed-v1", count=1, scaling_min=1, scaling_max=2)])
        yield standin


class RecordedSleeps:
    def __init__(self):
        self.delays_s: list[float] = []

    async def __call__(self, delay_s: float) -> None:
        self.delays_s.append(delay_s)


def actuator(nomad: NomadStandin, sleep=None, **settings) -> NomadActuator:
    config = NomadConfig(nomad_address=nomad.address, **settings)
    return NomadActuator(config, sleep=sleep or RecordedSleeps())


def scale(act: NomadActuator, replicas: int, model: str = "llm", version: int = 3, reason: str = "queue deep"):
    asyncio.run(act.set_replicas(ScaleRequest(model, version, replicas, reason)))


def test_scales_the_templated_group_with_the_documented_payload(nomad):
    scale(actuator(nomad), 4)
    (sent,) = nomad.scale_requests()
    assert sent.path == f"/v1/job/{JOB}/scale"
    assert sent.query == {"namespace": "default"}
    assert sent.body == {"Count": 4, "Target": {"Group": "llm-v3"}, "Message": "queue deep",
                         "Meta": {"model": "llm", "version": "3", "previous_count": "2", "source": "tensoryard",
                                  "fencing_token": "1"}}
    assert nomad.count(JOB, "llm-v3") == 4


def test_reads_the_job_and_its_scale_status_before_scaling(nomad):
    scale(actuator(nomad), 3)
    assert [(r.method, r.path) for r in nomad.requests] == [
        ("GET", f"/v1/job/{JOB}"), ("GET", f"/v1/job/{JOB}/scale"), ("POST", f"/v1/job/{JOB}/scale")]


def test_templates_name_the_job_and_group_per_deployment(nomad):
    nomad.add_job("workers-embed", [Group("g-1", count=1, scaling_min=0, scaling_max=3)], namespace="ml")
    act = actuator(nomad, nomad_job_template="workers-{model}", nomad_group_template="g-{version}",
                   nomad_namespace="ml", nomad_region="eu")
    scale(act, 0, model="embed", version=1)
    (sent,) = nomad.scale_requests()
    assert (sent.path, sent.query) == ("/v1/job/workers-embed/scale", {"namespace": "ml", "region": "eu"})
    assert nomad.count("workers-embed", "g-1", namespace="ml") == 0


def test_an_unchanged_count_sends_no_scale_request(nomad):
    scale(actuator(nomad), 2)
    assert nomad.scale_requests() == []


def test_the_acl_token_goes_in_x_nomad_token(tmp_path):
    token_file = tmp_path / "nomad-token"
    token_file.write_text("s3cret-token\n")
    with NomadStandin(tokens={"s3cret-token"}) as nomad:
        nomad.add_job(JOB, [Group("llm-v3", count=1, scaling_min=1, scaling_max=4)])
        scale(actuator(nomad, nomad_token_file=token_file), 2)
        assert {r.headers.get("x-nomad-token") for r in nomad.requests} == {"s3cret-token"}
        assert nomad.count(JOB, "llm-v3") == 2


def test_a_refused_token_surfaces_nomads_403():
    with NomadStandin(tokens={"right"}) as nomad:
        nomad.add_job(JOB, [Group("llm-v3", count=1, scaling_min=1, scaling_max=4)])
        with pytest.raises(NomadError, match="403 Permission denied") as refused:
            scale(actuator(nomad, nomad_token="wrong"), 2)
        assert refused.value.status == 403


def test_retries_with_backoff_while_a_deployment_is_active(nomad):
    nomad.block_scaling(JOB, num_requests=3)
    sleeps = RecordedSleeps()
    scale(actuator(nomad, sleep=sleeps, nomad_retry_initial_s=0.5, nomad_retry_max_s=1.5), 5)
    assert len(nomad.scale_requests()) == 4
    assert sleeps.delays_s == [0.5, 1.0, 1.5]
    assert nomad.count(JOB, "llm-v3") == 5


def test_gives_up_after_the_last_attempt_with_nomads_message(nomad):
    nomad.block_scaling(JOB, num_requests=10)
    with pytest.raises(NomadError, match="job scaling blocked due to active deployment") as blocked:
        scale(actuator(nomad, nomad_max_attempts=3), 5)
    assert blocked.value.deployment_active
    assert len(nomad.scale_requests()) == 3
    assert nomad.count(JOB, "llm-v3") == 2


def test_backs_off_in_real_time_too(nomad):
    """With the default asyncio.sleep: the retry happens after the delay, not at once."""
    nomad.block_scaling(JOB, num_requests=1)
    act = NomadActuator(NomadConfig(nomad_address=nomad.address, nomad_retry_initial_s=0.2))
    loop_time = asyncio.new_event_loop()
    try:
        started = loop_time.time()
        loop_time.run_until_complete(act.set_replicas(ScaleRequest("llm", 3, 4, "ramp")))
        assert loop_time.time() - started >= 0.2
    finally:
        loop_time.close()
    assert nomad.count(JOB, "llm-v3") == 4


def test_other_refusals_are_not_retried(nomad):
    nomad.jobs[("default", JOB)].groups["llm-v3"].scaling_max = 3  # Nomad's own check, behind ours
    api = NomadApi(nomad.address)
    with pytest.raises(NomadError, match="greater than scaling policy maximum: 5 > 3"):
        asyncio.run(api.scale_task_group(JOB, "llm-v3", 5, "direct"))
    assert len(nomad.scale_requests()) == 1


@pytest.mark.parametrize("replicas, bound", [(7, "max 6"), (0, "min 1")])
def test_refuses_a_count_outside_the_scaling_block_without_asking_nomad(nomad, replicas, bound):
    with pytest.raises(ScaleRefused, match=f"{replicas} replicas is outside .*{bound}"):
        scale(actuator(nomad), replicas)
    assert nomad.scale_requests() == []
    assert nomad.count(JOB, "llm-v3") == 2


def test_a_disabled_scaling_block_means_hands_off(nomad):
    nomad.jobs[("default", JOB)].groups["llm-v3"].scaling_enabled = False
    with pytest.raises(ScaleRefused, match="enabled = false"):
        scale(actuator(nomad), 3)
    assert nomad.scale_requests() == []


def test_a_group_without_a_scaling_block_is_not_scaled(nomad):
    nomad.add_job("plain", [Group("llm-v3", count=1)])
    with pytest.raises(ScaleRefused, match="has no scaling block"):
        scale(actuator(nomad, nomad_job_template="plain"), 2)
    assert nomad.scale_requests() == []


def test_a_missing_group_names_the_groups_the_job_has(nomad):
    with pytest.raises(ScaleRefused, match=r"no group 'llm-v9' for llm v9 \(its groups: embed-v1, llm-v3\)"):
        scale(actuator(nomad), 2, version=9)


def test_a_missing_job_surfaces_nomads_404(nomad):
    with pytest.raises(NomadError, match="404 job not found") as missing:
        scale(actuator(nomad, nomad_job_template="nope"), 2)
    assert missing.value.status == 404


def test_an_unreachable_nomad_is_an_error_naming_the_address():
    address = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(NomadError, match=f"cannot reach {address}") as unreachable:
        asyncio.run(NomadActuator(NomadConfig(nomad_address=address)).set_replicas(ScaleRequest("llm", 3, 2, "x")))
    assert unreachable.value.status == 0


def test_the_standin_checks_the_payload_as_nomad_does(nomad):
    api = NomadApi(nomad.address)
    with pytest.raises(NomadError, match="400 missing task group name for scaling action"):
        asyncio.run(api.scale_task_group(JOB, "", 1, "no group"))
    with pytest.raises(NomadError, match="400 scaling action count can't be negative"):
        asyncio.run(api.scale_task_group(JOB, "llm-v3", -1, "negative"))
    with pytest.raises(NomadError, match='400 task group "nope" specified for scaling does not exist in job'):
        asyncio.run(api.scale_task_group(JOB, "nope", 1, "missing"))


def test_the_scale_status_keeps_the_scaling_events(nomad):
    scale(actuator(nomad), 3, reason="kv use 0.93")
    status = asyncio.run(NomadApi(nomad.address).read_scale_status(JOB))
    (event,) = status["TaskGroups"]["llm-v3"]["Events"]
    assert (event["PreviousCount"], event["Count"], event["Message"]) == (2, 3, "kv use 0.93")
    assert event["EvalID"]


@pytest.mark.parametrize("settings, message", [
    ({"nomad_address": "127.0.0.1:4646"}, "must start with http"),
    ({"nomad_group_template": "{model}-{replica}"}, "may name only"),
    ({"nomad_job_template": ""}, "must not be empty"),
    ({"nomad_token": "a", "nomad_token_file": "/x"}, "give one, not both"),
    ({"nomad_max_attempts": 0}, "nomad_max_attempts must be >= 1"),
    ({"nomad_retry_initial_s": 5.0, "nomad_retry_max_s": 1.0}, "at most nomad_retry_max_s"),
])
def test_bad_settings_are_refused_naming_the_field(settings, message):
    with pytest.raises(ValueError, match=message):
        NomadConfig(**settings)


def test_an_empty_token_file_is_refused_at_start(tmp_path):
    (tmp_path / "token").write_text("\n")
    with pytest.raises(ValueError, match="nomad_token_file: .* is empty"):
        NomadActuator(NomadConfig(nomad_token_file=tmp_path / "token"))
