from __future__ import annotations

import dataclasses
import typing

import pytest

from processor.config import ENV_VARS, MqttUrl, Settings
from processor.errors import ConfigError
from tests.conftest import REPO


def test_defaults_need_no_environment() -> None:
    settings = Settings.from_env({})
    assert settings.mqtt_url == MqttUrl("127.0.0.1", 1883, "processor")
    assert settings.mqtt_protocol == "5"
    assert settings.influx_url is None


def test_environment_is_read_and_flags_override_it() -> None:
    env = {
        "VOTEBOX_MQTT_URL": "mqtt://proc:s3cret@broker.example:1884",
        "VOTEBOX_REDIS_URL": "redis://redis:6379/2",
        "VOTEBOX_BATCH_MAX": "250",
        "VOTEBOX_RESULTS_INTERVAL_S": "0.5",
    }
    settings = Settings.from_env(env)
    assert settings.mqtt_url == MqttUrl("broker.example", 1884, "proc", "s3cret")
    assert settings.batch_max == 250 and settings.results_interval_s == 0.5
    flagged = settings.with_overrides({"batch_max": "100", "redis_url": None})
    assert flagged.batch_max == 100 and flagged.redis_url == "redis://redis:6379/2"


def test_repr_masks_passwords() -> None:
    settings = Settings.from_env(
        {"VOTEBOX_MQTT_URL": "mqtt://u:hunter2@h:1", "VOTEBOX_REDIS_URL": "redis://:pw9@r:1/0"}
    )
    assert "hunter2" not in repr(settings) and "pw9" not in repr(settings)


def test_mqtts_defaults_to_port_8883() -> None:
    assert MqttUrl.parse("mqtts://h") == MqttUrl("h", 8883, tls=True)


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"VOTEBOX_MQTT_URL": "http://h:1"}, "VOTEBOX_MQTT_URL"),
        ({"VOTEBOX_MQTT_URL": "mqtt://h:notaport"}, "VOTEBOX_MQTT_URL"),
        ({"VOTEBOX_REDIS_URL": "http://r"}, "VOTEBOX_REDIS_URL"),
        ({"VOTEBOX_BATCH_MAX": "lots"}, "VOTEBOX_BATCH_MAX"),
        ({"VOTEBOX_BATCH_MAX": "0"}, "VOTEBOX_BATCH_MAX"),
        ({"VOTEBOX_MQTT_PROTOCOL": "4"}, "VOTEBOX_MQTT_PROTOCOL"),
        ({"VOTEBOX_MQTT_RECEIVE_MAX": "70000"}, "VOTEBOX_MQTT_RECEIVE_MAX"),
        (
            {"VOTEBOX_MQTT_SHARE_GROUP": "g", "VOTEBOX_MQTT_PROTOCOL": "3.1.1"},
            "VOTEBOX_MQTT_SHARE_GROUP",
        ),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        Settings.from_env(env)


_TYPES = typing.get_type_hints(Settings)


@pytest.mark.parametrize(
    ("var", "name"), [(var, name) for var, name, _ in ENV_VARS if _TYPES[name] in (int, float)]
)
def test_every_number_setting_is_read_from_its_variable_as_its_type(var: str, name: str) -> None:
    kind = _TYPES[name]
    settings = Settings.from_env({var: "7"})
    assert getattr(settings, name) == kind("7")
    assert settings.given == {name}
    with pytest.raises(ConfigError, match=var):
        Settings.from_env({var: "seven"})


def test_the_commands_passwords_come_from_the_environment_and_flags_win() -> None:
    env = {"VOTEBOX_DASHBOARD_PASSWORD": "d", "VOTEBOX_DEVICE_PASSWORD": "k"}
    settings = Settings.from_env(env)
    assert (settings.dashboard_password, settings.device_password) == ("d", "k")
    assert settings.given == {"dashboard_password", "device_password"}
    assert settings.with_overrides({"dashboard_password": "flag"}).dashboard_password == "flag"
    assert "VOTEBOX_DASHBOARD_PASSWORD" not in {var for var, _, _ in ENV_VARS}


def test_sentinels_name_the_primary_and_replicas_bound_the_wait() -> None:
    settings = Settings.from_env(
        {
            "VOTEBOX_REDIS_URL": "redis://:pw@ignored:6379/2",
            "VOTEBOX_REDIS_SENTINELS": "10.0.0.1:26379, [::1]:26380",
            "VOTEBOX_REDIS_SERVICE": "votebox",
            "VOTEBOX_REDIS_REPLICAS": "1",
        }
    )
    target = settings.redis_target()
    assert target.sentinels == (("10.0.0.1", 26379), ("::1", 26380))
    assert (target.service, target.replicas, target.replica_timeout_ms) == ("votebox", 1, 500)
    assert "pw" not in repr(target)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"VOTEBOX_REDIS_SENTINELS": "h:1"}, "go together"),
        ({"VOTEBOX_REDIS_SERVICE": "votebox"}, "go together"),
        (
            {"VOTEBOX_REDIS_SENTINELS": "h", "VOTEBOX_REDIS_SERVICE": "s"},
            "host:port,host:port",
        ),
        ({"VOTEBOX_REDIS_REPLICAS": "-1"}, "VOTEBOX_REDIS_REPLICAS must be 0"),
        ({"VOTEBOX_REDIS_REPLICA_TIMEOUT_MS": "0"}, "at least 1"),  # WAIT 0 waits forever
        ({"VOTEBOX_REDIS_REPLICA_TIMEOUT_MS": "5000"}, "below the Redis timeout"),
    ],
)
def test_redis_replication_settings_refuse_what_cannot_work(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_a_share_group_member_asks_for_a_short_session_unless_told() -> None:
    assert Settings.from_env({}).session_expiry_s() == 7 * 24 * 3600
    shared = Settings.from_env({"VOTEBOX_MQTT_SHARE_GROUP": "g"})
    assert shared.session_expiry_s() == 60
    told = {"VOTEBOX_MQTT_SHARE_GROUP": "g", "VOTEBOX_MQTT_SESSION_EXPIRY_S": "600"}
    assert Settings.from_env(told).session_expiry_s() == 600
    with pytest.raises(ConfigError, match="VOTEBOX_MQTT_SESSION_EXPIRY_S must be 1"):
        Settings.from_env({"VOTEBOX_MQTT_SESSION_EXPIRY_S": "0"})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"VOTEBOX_REDIS_CLUSTER": "maybe"}, "VOTEBOX_REDIS_CLUSTER must be 1 or 0"),
        (
            {
                "VOTEBOX_REDIS_CLUSTER": "1",
                "VOTEBOX_REDIS_SENTINELS": "h:1",
                "VOTEBOX_REDIS_SERVICE": "s",
            },
            "exclude each other",
        ),
    ],
)
def test_cluster_settings_refuse_what_cannot_work(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_a_cluster_is_named_by_any_node() -> None:
    target = Settings.from_env({"VOTEBOX_REDIS_CLUSTER": "1"}).redis_target()
    assert target.cluster and not target.sentinels
    assert not Settings.from_env({"VOTEBOX_REDIS_CLUSTER": "0"}).redis_target().cluster


def test_the_readme_settings_table_names_every_setting() -> None:
    table = (REPO / "README.md").read_text()
    for f in dataclasses.fields(Settings):
        if "env" in f.metadata:
            assert f"`{f.metadata['env']}`" in table, f"README misses {f.metadata['env']}"
