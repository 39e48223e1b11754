"""Configuration: the legacy INI, the 2.x TOML, lookup order, and errors that name file/key/line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedimg.cli import main
from fedimg.config import Config, fallback_config, find_config_file, load_config, load_config_file
from fedimg.errors import ConfigError

LEGACY_4_FIELDS = """\
[general]
clean_up_on_failure = True
delete_images_on_failure = False

[koji]
server = https://koji.example.org/kojihub

[aws]
util_username = ec2-user
test_username = fedora
util_volume_size = 7
test_volume_size = 9
access_id = AKIDEXAMPLE
secret_key = wJalrXUtnFEMI/K7MDENG
keyname = somekey
keypath = /path/to/key
test = /bin/true
amis = us-east-1|x86_64|ami-be6a98d6|aki-919dcaf8
       eu-west-1|x86_64|ami-81f23cf6|aki-52a34525
       us-east-1|i386|ami-acac51c4|aki-8f9dcae6

[rackspace]
username = someuser
api_key = secretk3y
"""

LEGACY_6_FIELDS = """\
[aws]
amis = us-east-1|fedora|40|x86_64|ami-0000aaaa|aki-0000bbbb
       ap-south-1|fedora|40|aarch64|ami-1111aaaa|
"""

TOML_2X = """\
[general]
clean_up_on_failure = true
delete_images_on_failure = true
process_count = 1
active_services = ['aws']

[aws]
volume_size = 7
access_id = "AKIDEXAMPLE"
secret_key = "wJalrXUtnFEMI"
base_region = 'us-east-1'
bucket_name = 'fedora-s3-bucket-fedimg'
volume_types = ['standard', 'gp2']
regions = ['ap-northeast-2', 'us-east-2', 'us-east-1', 'eu-west-1']
"""


def write(tmp_path: Path, text: str, name: str = "fedimg.cfg") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_legacy_ini_loads_as_it_is(tmp_path: Path) -> None:
    config = load_config_file(write(tmp_path, LEGACY_4_FIELDS))
    aws = config.aws
    assert [(e.region, e.arch, e.ami, e.aki) for e in aws.amis] == [
        ("us-east-1", "x86_64", "ami-be6a98d6", "aki-919dcaf8"),
        ("eu-west-1", "x86_64", "ami-81f23cf6", "aki-52a34525"),
        ("us-east-1", "i386", "ami-acac51c4", "aki-8f9dcae6"),
    ]
    assert [e.line for e in aws.amis] == [18, 19, 20]
    assert aws.test == "/bin/true"
    assert (aws.util_volume_size, aws.test_volume_size) == (7, 9)
    assert aws.keyname == "somekey"
    assert aws.access_id is not None
    assert aws.access_id.get_secret_value() == "AKIDEXAMPLE"
    assert config.general.delete_images_on_failure is False
    assert config.base_region() == "us-east-1"
    assert config.aki_for("eu-west-1", "x86_64") == "aki-52a34525"


def test_legacy_six_field_form_and_arch_alias(tmp_path: Path) -> None:
    config = load_config_file(write(tmp_path, LEGACY_6_FIELDS))
    first, second = config.aws.amis
    assert (first.os, first.version, first.arch, first.aki) == (
        "fedora",
        "40",
        "x86_64",
        "aki-0000bbbb",
    )
    assert (second.arch, second.aki) == ("arm64", None)


def test_fedimg_2x_toml_loads(tmp_path: Path) -> None:
    config = load_config_file(write(tmp_path, TOML_2X, "fedimg.toml"))
    assert config.aws.regions == ["ap-northeast-2", "us-east-2", "us-east-1", "eu-west-1"]
    assert config.aws.volume_types == ["standard", "gp2"]
    assert config.aws.bucket_name == "fedora-s3-bucket-fedimg"
    assert config.base_region() == "us-east-1"


def test_reference_configs_load(reference_dir: Path) -> None:
    legacy = load_config_file(reference_dir / "config" / "fedimg-0.7.5.cfg.example")
    assert len(legacy.aws.amis) == 18
    assert legacy.aws.amis[9].arch == "i386"
    toml = load_config_file(reference_dir / "config" / "fedimg-2.4.0-conf.toml.example")
    assert isinstance(toml.aws.regions, list)
    assert len(toml.aws.regions) == 15


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[aws]\namis = us-east-1|x86_64|ami-1|aki-1\n       eu-west-1|x86_64|ami-2\n",
            "fedimg.cfg:3: [aws] amis: malformed entry 'eu-west-1|x86_64|ami-2'",
        ),
        (
            "[aws]\namis = us-east-1|sparc|ami-1|aki-1\n",
            "fedimg.cfg:2: [aws] amis: unknown architecture 'sparc'",
        ),
        (
            "[aws]\nutil_volume_size = seven\n",
            "[aws] util_volume_size: 'seven' is not a whole number",
        ),
        ("[aws]\nregoins = ['us-east-1']\n", "[aws] regoins: Unknown key"),
        (
            "[aws]\nregions = ['us-east-1', 'Europe']\n",
            "[aws] regions: 'Europe' is not a region name",
        ),
        ("[aws]\ntarget = 'azure'\n", "[aws] target: Input should be"),
        (
            "[general]\nactive_services = ['gce']\n",
            "[general] active_services: unsupported services",
        ),
    ],
)
def test_errors_name_file_key_and_line(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config_file(path)
    message = str(caught.value)
    assert expected in message
    assert str(path) in message
    assert "\n" not in message


def test_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert find_config_file(None, {}) is None
    local = write(tmp_path, "[aws]\nworkers = 3\n", "fedimg.toml")
    env_file = write(tmp_path, "[aws]\nworkers = 4\n", "env.toml")
    explicit = write(tmp_path, "[aws]\nworkers = 5\n", "explicit.toml")
    assert find_config_file(None, {}) == Path("fedimg.toml")
    assert load_config(None, {}).aws.workers == 3
    assert load_config(None, {"FEDIMG_CONFIG": str(env_file)}).aws.workers == 4
    assert load_config(explicit, {"FEDIMG_CONFIG": str(env_file)}).aws.workers == 5
    assert local.exists()
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.toml", {})


def test_defaults_target_the_embedded_endpoint() -> None:
    config = Config()
    assert config.aws.target == "embedded"
    assert config.aws.regions is None
    assert config.base_region() == "us-east-1"


def test_fallback_config_reads_only_where_to_record(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[general]\ncatalog_url = 'sqlite:////tmp/x.sqlite'\n[aws]\nbogus = 1\n",
        "broken.toml",
    )
    config = fallback_config(str(path), {})
    assert config.general.catalog_url == "sqlite:////tmp/x.sqlite"
    assert fallback_config(str(tmp_path / "nope.toml"), {}).general.catalog_url is None


def test_config_show_masks_secrets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, LEGACY_4_FIELDS)
    assert main(["config", "show", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "AKIDEXAMPLE" not in out
    assert "wJalrXUtnFEMI" not in out
    shown = json.loads(out)
    assert shown["aws"]["access_id"] == "***"
    assert shown["aws"]["secret_key"] == "***"


def test_config_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path, LEGACY_4_FIELDS)
    assert main(["config", "check", str(good)]) == 0
    assert "3 AMI-list entries" in capsys.readouterr().out
    bad = write(tmp_path, "[aws]\namis = us-east-1|x86_64\n", "bad.cfg")
    assert main(["config", "check", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedimg: ")
    assert "bad.cfg:2" in err
    assert "\n" not in err
