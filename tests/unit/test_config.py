"""Settings: sources in order (flags > env > TOML > defaults), one clear line for a bad or
unknown key, and config.example.toml in step with the model."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from agent.config import Settings, load_settings
from agent.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("CHRONICLE_AGENT_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "nocfg"))


def test_sources_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[upload]\nconcurrency = 3\nmax_attempts = 4\nstall_timeout_s = 9\n")
    monkeypatch.setenv("CHRONICLE_AGENT_UPLOAD__MAX_ATTEMPTS", "5")
    monkeypatch.setenv("CHRONICLE_AGENT_UPLOAD__STALL_TIMEOUT_S", "7")
    s = load_settings(cfg, overrides={"upload": {"stall_timeout_s": 1.5}})
    assert s.upload.concurrency == 3  # TOML over default
    assert s.upload.max_attempts == 5  # env over TOML
    assert s.upload.stall_timeout_s == 1.5  # flag over env
    assert s.upload.backoff_max_s == 20.0  # default


def test_config_file_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[chronicle]\nurl = "http://chronicle.example"\n')
    monkeypatch.setenv("CHRONICLE_AGENT_CONFIG", str(cfg))
    assert load_settings().chronicle.url == "http://chronicle.example"


@pytest.mark.parametrize(("toml", "needle"), [
    ("[upload]\nconcurency = 3\n", "unknown config key 'upload.concurency'"),
    ("[nosuch]\nx = 1\n", "unknown config key 'nosuch'"),
    ("[upload]\nconcurrency = 'many'\n", "'upload.concurrency' = 'many'"),
    ("[upload]\nconcurrency = 0\n", "'upload.concurrency' = 0: Input should be greater"),
    ("[runs]\non_exit = 'explode'\n", "'runs.on_exit' = 'explode'"),
    ("[chronicle]\ntoken = 'sekrit'\n", "chronicle.token is not allowed in the file"),
    ("[upload\n", "not valid TOML"),
])
def test_bad_config_is_one_clear_line(tmp_path: Path, toml: str, needle: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as e:
        load_settings(cfg)
    assert needle in e.value.message
    assert "\n" not in e.value.message
    assert "sekrit" not in e.value.message


def test_bad_env_value_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHRONICLE_AGENT_UPLOAD__CONCURENCY", "3")
    with pytest.raises(ConfigError) as e:
        load_settings()
    assert "upload.concurency" in e.value.message


def test_a_named_config_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(tmp_path / "missing.toml")
    assert "does not exist" in e.value.message


def test_token_from_env_is_hidden_from_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHRONICLE_AGENT_CHRONICLE__TOKEN", "tok-secret-123")
    s = load_settings()
    assert s.token() == "tok-secret-123"
    assert "tok-secret-123" not in repr(s)


def test_example_config_documents_every_key_and_loads() -> None:
    example = REPO / "config.example.toml"
    s = load_settings(example)  # it must load as it is
    assert s == Settings(), "config.example.toml must show the defaults"
    text = example.read_text()
    data = tomllib.loads(text)
    for section, model in Settings.model_fields.items():
        if section == "watch":
            assert "[[watch]]" in text
            continue
        assert section in data, f"[{section}] missing from config.example.toml"
        sub = model.annotation
        for key in sub.model_fields:  # type: ignore[union-attr]
            if key == "token":
                continue  # documented as an environment variable only
            assert f"{key} =" in text, f"{section}.{key} is not documented"
