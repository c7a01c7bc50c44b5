"""The config file (tupper.config): a flag beats an environment variable, which beats the file, which beats
the built-in default; a bad file is refused in one line naming the file and the key."""

from __future__ import annotations

import pytest

from tupper import config
from tupper.cli.main import main
from tupper.errors import InvalidInput
from tupper.model import spec


@pytest.fixture
def conf(tmp_path, monkeypatch):
    """Write a config file, point $TUPPER_CONFIG at it, and forget what was read before."""
    for var in ("TUPPER_CONFIG", "TUPPER_ROOT", "TUPPER_ADMIN_GROUP", "TUPPER_POOL_SIZE"):
        monkeypatch.delenv(var, raising=False)
    config.current.cache_clear()

    def write(text: str):
        path = tmp_path / "tupper.toml"
        path.write_text(text)
        monkeypatch.setenv("TUPPER_CONFIG", str(path))
        config.current.cache_clear()
        return path

    yield write
    config.current.cache_clear()


def test_without_a_file_the_built_in_defaults_apply(conf, monkeypatch, tmp_path):
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "absent.toml")
    assert config.load() == config.Config()
    assert (config.root(), config.admin_group(), config.pool_size()) == (config.DEFAULT_ROOT, "tupper", "20G")


def test_the_file_beats_the_built_in_default(conf):
    path = conf('root = "/srv/tupper"\nadmin_group = "ops"\n[defaults]\npool_size = "2G"\nstop_timeout = 3\nstart_timeout = 30.5\n')
    assert config.load() == config.Config(path=path, root=config.Path("/srv/tupper"), admin_group="ops",
                                          defaults=config.Defaults(pool_size="2G", stop_timeout=3.0, start_timeout=30.5))
    assert (str(config.root()), config.admin_group(), config.pool_size()) == ("/srv/tupper", "ops", "2G")


def test_the_environment_beats_the_file(conf, monkeypatch):
    conf('root = "/srv/tupper"\nadmin_group = "ops"\n[defaults]\npool_size = "2G"\n')
    monkeypatch.setenv("TUPPER_ROOT", "/var/lib/other")
    monkeypatch.setenv("TUPPER_ADMIN_GROUP", "wheel")
    monkeypatch.setenv("TUPPER_POOL_SIZE", "1T")
    assert (str(config.root()), config.admin_group(), config.pool_size()) == ("/var/lib/other", "wheel", "1T")


def test_a_flag_beats_the_environment_and_the_file(conf, monkeypatch):
    """--root is given to Store.open, which asks for the default only without it."""
    conf('root = "/srv/tupper"\n')
    monkeypatch.setenv("TUPPER_ROOT", "/var/lib/other")
    seen = []

    def fake_open(cls, root=None, **kw):
        seen.append(root)
        raise InvalidInput("stop here")

    monkeypatch.setattr("tupper.store.store.Store.open", classmethod(fake_open))
    assert main(["--root", "/flag/root", "store", "info"]) == 2
    assert [str(r) for r in seen] == ["/flag/root"]


def test_spec_defaults_come_from_the_file_and_a_spec_value_wins(conf, tmp_path):
    conf("[defaults]\nstop_timeout = 3\nstart_timeout = 120\n")
    (tmp_path / "a.toml").write_text('name = "a"\n')
    (tmp_path / "b.toml").write_text('name = "b"\n[stop]\ntimeout = 7\n')
    a, b = spec.load(tmp_path / "a.toml"), spec.load(tmp_path / "b.toml")
    assert (a.stop_timeout, a.start_timeout, b.stop_timeout) == (3.0, 120.0, 7.0)


@pytest.mark.parametrize("text,message", [
    ('rot = "/srv"\n', "tupper.toml: rot: unknown key (did you mean 'root'?)"),
    ('root = "relative/path"\n', "tupper.toml: root: must be an absolute path, got 'relative/path'"),
    ("root = 5\n", "tupper.toml: root: expected a string, got an integer (5)"),
    ('admin_group = "Bad Group"\n', "tupper.toml: admin_group: not a group name: 'Bad Group'"),
    ('[defaults]\npool_size = "lots"\n', "tupper.toml: defaults.pool_size: expected a size such as 512M, 20G or 1T, got 'lots'"),
    ("[defaults]\nstop_timeout = -1\n", "tupper.toml: defaults.stop_timeout: must be a positive number of seconds"),
    ("[defaults]\nstop_timeout = nan\n", "tupper.toml: defaults.stop_timeout: must be a positive number of seconds"),
    ("[defaults]\nstop_timout = 5\n", "tupper.toml: defaults.stop_timout: unknown key (did you mean 'stop_timeout'?)"),
    ("defaults = 5\n", "tupper.toml: defaults: expected a table, got an integer (5)"),
    ("root = \n", "tupper.toml: malformed TOML"),
])
def test_a_bad_file_names_the_file_and_the_key(conf, text, message):
    conf(text)
    with pytest.raises(InvalidInput) as exc:
        config.load()
    assert message in exc.value.message


def test_a_tupper_config_that_does_not_exist_is_an_error(conf, monkeypatch, tmp_path):
    monkeypatch.setenv("TUPPER_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(InvalidInput, match="nope.toml: no such config file"):
        config.load()


def test_the_cli_turns_a_bad_file_into_one_line_and_exit_2(conf, capsys):
    path = conf("[defaults]\npool_size = 20\n")
    assert main(["image", "ls"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"tupper: {path}: defaults.pool_size: expected a string, got an integer (20)"]


def test_container_verbs_sent_to_tupperd_never_read_the_file(conf, monkeypatch):
    """The fast path stays fast: the parser and the client path ask nothing of tupper.config."""
    conf("this is not toml\n")
    from tupper.cli import main as cli

    args = cli.build_parser("ps").parse_args(["ps"])
    assert args.root is None and config.current.cache_info().currsize == 0
