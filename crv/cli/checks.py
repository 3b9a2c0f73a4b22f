"""Command-line options checked before anything runs, for every Hydra-configured command.

Hydra reports a bad override in several lines (and recommends `+key=value`, which then adds
a key no stage reads); it creates the run directory before the task runs. So each command
composes its overrides here first: every key must name a field of the command's config
dataclass (`+` keys too), every group choice a preset in `conf/`, every value must pass the
dataclasses' `__post_init__` checks, and a directory the run will write must be writable.
Any problem is a `ConfigError` whose message is one line naming the option, with "did you
mean" where a known name is close; the command prints it and exits 2 before a stage runs
and before Hydra has made a folder.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import typing
from collections.abc import Iterator
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from crv.errors import ConfigError
from crv.options import did_you_mean, option_names

HUB_TIMEOUT_S = 1.5
"""How long the hub's host may take to accept a connection before crv calls it unreachable
(instead of letting huggingface_hub retry for half a minute)."""


def parse_overrides(overrides: list[str]) -> list[Any]:
    """Hydra's parsed overrides; ConfigError on one that does not parse."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        try:
            parsed += parser.parse_overrides([text])
        except OverrideParseException as exc:
            raise ConfigError(f"{text!r} is not an override: {_first_line(exc)}") from None
    return parsed


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _free_keys(hint: Any) -> bool:
    """Whether a field of type `hint` takes keys of its own (a dict or an untyped value)."""
    if hint is Any or hint is dict or typing.get_origin(hint) is dict:
        return True
    return any(_free_keys(arg) for arg in typing.get_args(hint))


def check_key(schema: type, key: str) -> None:
    """ConfigError when the dotted `key` names no field of the dataclass `schema`."""
    cls: Any = schema
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            break
        hint = hints[part]
        if is_dataclass(hint):
            cls = hint
            continue
        if _free_keys(hint) or i == len(parts) - 1:
            return
        break
    raise ConfigError(f"unknown option {key}{did_you_mean(key, option_names(schema))}")


def conf_groups(conf_dir: str | Path) -> dict[str, list[str]]:
    """Config group -> its presets (the `*.yaml` stems) under `conf_dir`, Hydra's own aside."""
    root = Path(conf_dir)
    return {
        d.name: sorted(p.stem for p in d.glob("*.yaml"))
        for d in sorted(root.iterdir())
        if d.is_dir() and d.name != "hydra"
    }


def _values(override: Any) -> list[str]:
    """The values an override sets: one, or each of a sweep's (`k=8,16` -> 8 and 16)."""
    if override.is_delete():
        return []
    if override.is_sweep_override():
        try:
            return list(override.sweep_string_iterator())
        except Exception:  # a glob or an interval: Hydra expands it against the config
            return []
    return [override.get_value_element_as_str()]


def check_overrides(
    overrides: list[Any], schema: type, groups: dict[str, list[str]] | None = None
) -> None:
    """Every override names an option of `schema` or a preset of a config group; Hydra's
    own settings (`hydra.*`, `hydra/...`) are left to Hydra."""
    groups = groups or {}
    for o in overrides:
        key = o.key_or_group
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            continue
        if key in groups and "." not in key:
            for value in _values(o):
                if value not in groups[key]:
                    raise ConfigError(
                        f"{key}={value}: no such preset{did_you_mean(value, groups[key])}; "
                        f"known: {', '.join(groups[key])}"
                    )
            continue
        check_key(schema, key)


def variants(overrides: list[Any]) -> Iterator[list[str]]:
    """Override lists that cover every value of a sweep (`-m a=1,2 b=3,4`): each sweep's
    first value, then each other value of one sweep at a time; a plain run is one list."""

    def line(o: Any, value: str | None) -> str:
        return o.input_line if value is None else f"{o.get_key_element()}={value}"

    values = [_values(o) if o.is_sweep_override() else [None] for o in overrides]
    first = [line(o, v[0]) if v else None for o, v in zip(overrides, values, strict=True)]
    yield [x for x in first if x is not None]
    for i, o in enumerate(overrides):
        for value in values[i][1:]:
            lines = [*first[:i], line(o, value), *first[i + 1 :]]
            yield [x for x in lines if x is not None]


def compose(config_dir: str | None, config_name: str, overrides: list[str]) -> DictConfig:
    """Hydra's composed config (with its `hydra` node) for `overrides`; Hydra's several-line
    composition errors become one ConfigError line."""
    from hydra import compose as hydra_compose
    from hydra import initialize, initialize_config_dir

    context = (
        initialize_config_dir(config_dir=config_dir, version_base="1.3")
        if config_dir
        else initialize(config_path=None, version_base="1.3")
    )
    try:
        with context:
            return hydra_compose(config_name, overrides, return_hydra_config=True)
    except Exception as exc:  # Hydra's composition errors, whatever their class
        cause = exc.__cause__
        detail = f": {_first_line(cause)}" if cause is not None else ""
        head = _first_line(exc).removeprefix("Error merging override ")
        raise ConfigError(f"{head}{detail}") from None


def to_object(cfg: DictConfig) -> Any:
    """The config's dataclass instance (the `hydra` node dropped), running every section's
    `__post_init__` checks; their ValueError becomes a ConfigError."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf.errors import OmegaConfBaseException

    if "hydra" in cfg:  # presets may read it (`${hydra:runtime.cwd}`)
        HydraConfig.instance().set_config(cfg)
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    try:
        return OmegaConf.to_object(cfg)
    except (ValueError, OmegaConfBaseException) as exc:
        raise ConfigError(_first_line(exc)) from None


def checked_configs(
    schema: type, overrides: list[str], config_dir: str | None, config_name: str
) -> Iterator[tuple[Any, DictConfig]]:
    """(the dataclass instance, the `hydra` node) of every configuration `overrides` ask
    for (`variants`), each composed and checked."""
    parsed = parse_overrides(overrides)
    check_overrides(parsed, schema, conf_groups(config_dir) if config_dir else None)
    for variant in variants(parsed):
        cfg = compose(config_dir, config_name, variant)
        yield to_object(cfg), cfg.hydra


def command_config(prog: str, schema: type, argv: list[str]) -> Any:
    """The checked options of a command configured by `schema` alone (crv-verify,
    crv-graphs export): one line on stderr and exit 2 for a bad one, a device included."""
    import sys

    from hydra.core.config_store import ConfigStore

    from crv.device import require_device
    from crv.errors import CRVError

    name = f"{prog}-options"
    ConfigStore.instance().store(name=name, node=schema)
    try:
        obj, _ = next(checked_configs(schema, argv, None, name))
        if hasattr(obj, "device"):
            require_device(obj.device)
    except CRVError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    return obj


def print_command_help(usage: str, schema: type) -> None:
    """A command's usage and one line per option with its default and help text."""
    import signal

    from crv.options import options_help

    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `... --help | head` ends quietly
    print(f"{usage}\n\nOptions (name=default, then the help):")
    print("\n".join(options_help(schema)))


def check_writable_dir(directory: str | Path, option: str) -> None:
    """ConfigError naming `option` when `directory` could not be created or written, found
    without creating it: a temporary folder is made (and removed) in its nearest existing
    ancestor, or in it."""
    path = Path(directory)
    absolute = path if path.is_absolute() else Path.cwd() / path
    ancestor = absolute
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{option}={directory} is not writable: {ancestor} is not a directory")
    try:
        Path(tempfile.mkdtemp(dir=ancestor, prefix=".crv-check-")).rmdir()
    except OSError as exc:
        where = (
            f"the working directory {ancestor}"
            if not path.is_absolute() and Path.cwd().is_relative_to(ancestor)
            else str(ancestor)
        )
        raise ConfigError(
            f"{option}={directory} is not writable: cannot write in {where} ({exc.strerror or exc})"
        ) from None


def hub_unreachable() -> str | None:
    """Why the model hub cannot be reached (the offline switches, or no connection to its
    host within HUB_TIMEOUT_S), or None when it can."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var}={os.environ[var]}"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0]
    name, _, port = host.partition(":")
    result: list[BaseException | None] = []

    def connect() -> None:  # in a thread: name resolution has no timeout of its own
        try:
            socket.create_connection((name, int(port or 443)), timeout=HUB_TIMEOUT_S).close()
            result.append(None)
        except OSError as exc:
            result.append(exc)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(HUB_TIMEOUT_S + 0.5)
    if result and result[0] is None:
        return None
    return f"no connection to {host}" + (f": {result[0]}" if result else f" in {HUB_TIMEOUT_S} s")


def check_hub_model(name: str, option: str) -> None:
    """ConfigError naming `option` when the hub model `name` is neither a local directory
    nor in the local hub cache and the hub is unreachable: one line at once, instead of
    huggingface_hub's retries."""
    if Path(name).exists():
        return
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return
    except Exception:  # not a valid repository id: transformers will say so
        return
    why = hub_unreachable()
    if why is not None:
        raise ConfigError(
            f"{option}={name!r}: no such local directory, not in the hub cache, and the hub "
            f"is unreachable ({why})"
        )
