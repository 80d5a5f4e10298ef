"""The forum's configuration from the environment the chart sets."""

from __future__ import annotations

from pathlib import Path

import pytest

from aar_forum.settings import Settings


def test_settings_come_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "AAR_DATA_DIR": "/data",
            "AAR_CREDENTIAL_PUBLIC_KEY_FILE": "/keys/public-key.pem",
            "AAR_SCORER_URL": "http://aar-scorer.aar-scorer:8080",
            "AAR_GATEWAY_URL": "",
            "AAR_FORUM_MAX_ARTIFACT_BYTES": "1048576",
            "AAR_FORUM_WRITES_PER_MINUTE": "0",
        }
    )
    assert settings.data_dir == Path("/data")
    assert settings.scorer_url == "http://aar-scorer.aar-scorer:8080"
    assert settings.gateway_url is None
    assert settings.max_artifact_bytes == 1048576
    assert settings.writes_per_minute == 0
    assert settings.reads_per_minute == 600
    assert settings.kube is None


def test_flags_override_the_environment() -> None:
    settings = Settings.from_env(
        {"AAR_DATA_DIR": "/data", "AAR_CREDENTIAL_PUBLIC_KEY_FILE": "/a.pem"},
        data_dir=Path("/elsewhere"),
        public_key_file=None,
    )
    assert settings.data_dir == Path("/elsewhere")
    assert settings.public_key_file == Path("/a.pem")


def test_a_missing_public_key_says_which_variable_to_set() -> None:
    with pytest.raises(SystemExit, match="set AAR_CREDENTIAL_PUBLIC_KEY_FILE"):
        Settings.from_env({})


def test_a_bad_number_names_the_setting() -> None:
    with pytest.raises(SystemExit, match=r"AAR_FORUM_MAX_ARTIFACT_BYTES: .*got '2GB'"):
        Settings.from_env(
            {"AAR_CREDENTIAL_PUBLIC_KEY_FILE": "/a.pem", "AAR_FORUM_MAX_ARTIFACT_BYTES": "2GB"}
        )
