"""Hydra entry points: `crv` runs the pipeline, `crv-verify` checks a user's traces.

`crv` resolves the config, runs (or reuses) every stage in `pipeline.stages` and their
dependencies, and writes into Hydra's run directory:
- `artifacts.json`: stage name -> absolute artifact directory,
- `report.json`: what each stage measured, under stable keys, plus timings and peak memory,
- `report.md`: the same as tables, with the plots copied next to it.

Config names of the previous release (`model=`, `transcoder.`, `attribution.`,
`intervention.`) are rewritten to the stage names, with a warning, for one release.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from crv.errors import ConfigError, CRVError

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
log = logging.getLogger("crv")

DEPRECATED_SECTIONS = {
    "model": "subject",
    "transcoder": "transcoders",
    "attribution": "graphs",
    "intervention": "interventions",
}
"""Old config group / section names -> the stage names; accepted until the next release."""


def rewrite_deprecated(argv: list[str]) -> list[str]:
    """`argv` with overrides of deprecated sections renamed (`model=x` -> `subject=x`,
    `transcoder.k=8` -> `transcoders.k=8`, also after `+`, `++` or `~`), printing one
    warning line per rewritten override on stderr."""
    out = []
    for arg in argv:
        body = arg.lstrip("+~")
        prefix = arg[: len(arg) - len(body)]
        key, eq, value = body.partition("=")
        head, dot, tail = key.partition(".")
        if arg.startswith("-") or not eq or head not in DEPRECATED_SECTIONS:
            out.append(arg)
            continue
        new = f"{prefix}{DEPRECATED_SECTIONS[head]}{dot}{tail}{eq}{value}"
        print(f"crv: warning: {arg!r} is deprecated, use {new!r}", file=sys.stderr)
        out.append(new)
    return out


_RUN_STARTED = False
"""Set once Hydra has composed the config and called `run`: a Hydra exit before that is a
composition error that `check_invocation` did not see (a config tree of the user's own)."""


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `message` as one line on stderr and exit (2: bad config or input)."""
    print(f"crv: error: {message}", file=sys.stderr)
    sys.exit(code)


def preflight(obj: Any, hydra_cfg: DictConfig, multirun: bool) -> None:
    """Checks that need the machine, run before Hydra makes the run folder: the device
    exists (and Ray, for `runtime.executor=ray`), input files exist, the cache and run
    directories can be written, and a hub model can be fetched."""
    from crv.cli.checks import check_writable_dir
    from crv.device import require_device
    from crv.executor import check_runtime

    option = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    check_writable_dir(str(hydra_cfg.sweep.dir if multirun else hydra_cfg.run.dir), option)
    check_writable_dir(obj.pipeline.cache_dir, "pipeline.cache_dir")
    device = require_device(obj.device)
    check_runtime(obj.runtime, device)
    gsm8k = obj.traces.gsm8k_path
    if gsm8k and not Path(hydra.utils.to_absolute_path(gsm8k)).exists():
        raise ConfigError(f"traces.gsm8k_path={gsm8k}: no such file")
    check_subject(obj)


def check_subject(obj: Any) -> None:
    """A hub subject that is not cached yet must be reachable: one line when offline."""
    from crv.cli.checks import check_hub_model
    from crv.pipeline import ArtifactCache, artifact_keys
    from crv.subject.sources import SHIPPED

    if obj.subject.name in SHIPPED or Path(obj.subject.name).exists():
        return
    from crv.subject.sources import resolve_source

    if resolve_source(obj.subject) != "hf":
        return
    cache = ArtifactCache(hydra.utils.to_absolute_path(obj.pipeline.cache_dir))
    if not cache.is_complete("subject", artifact_keys(obj, obj.seed)["subject"]):
        check_hub_model(obj.subject.name, "subject.name")


def check_invocation(argv: list[str]) -> None:
    """Compose and check every configuration `argv` asks for (each value of a sweep) before
    Hydra runs anything; CRVError with one line for the first problem."""
    from crv.cli.checks import checked_configs
    from crv.config import CRVConfig

    args = hydra_args(argv)
    machine = args.cfg is None  # printing a config needs no device and writes nothing
    for obj, hydra_cfg in checked_configs(CRVConfig, args.overrides, CONF_DIR, "config"):
        if machine:
            preflight(obj, hydra_cfg, args.multirun)


def hydra_args(argv: list[str]) -> Any:
    """Hydra's own reading of the command line (flags, overrides)."""
    from hydra._internal.utils import get_args_parser

    return get_args_parser().parse_args(argv)


def run(cfg: DictConfig) -> dict:
    """Run the pipeline for a composed (and already checked) config; returns the report."""
    from crv.device import require_device
    from crv.io import atomic_write_json
    from crv.pipeline import run_pipeline
    from crv.report import build_report, write_report

    global _RUN_STARTED
    _RUN_STARTED = True
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        obj = OmegaConf.to_object(cfg)
        device = require_device(obj.device)
    except (ValueError, CRVError) as exc:
        fail(str(exc).splitlines()[0])
    sections = {name: getattr(obj, name) for name in vars(obj)}
    try:
        results = run_pipeline(
            sections,
            cfg.pipeline.stages,
            cache_root=Path(hydra.utils.to_absolute_path(cfg.pipeline.cache_dir)),
            seed=cfg.seed,
            device=device,
            verify_cache=obj.pipeline.verify_cache,
            on_damage=obj.pipeline.on_damage.value,
            runtime=obj.runtime,
        )
    except CRVError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted; finished stages stay cached and a rerun resumes", 130)
    atomic_write_json(run_dir / "artifacts.json", {r.name: str(r.path) for r in results})
    report = build_report(results)
    write_report(report, results, run_dir)
    log.info("report: %s", run_dir / "report.md")
    return report


def preset_lines(group: str) -> list[str]:
    """`group=name  first sentence of the preset's comment` for each preset in conf/."""
    lines = []
    for path in sorted((Path(CONF_DIR) / group).glob("*.yaml")):
        comment = []
        for text in path.read_text().splitlines():
            if not text.startswith("#"):
                break
            if not text.startswith("# @package"):
                comment.append(text.lstrip("# ").strip())
        about = " ".join(comment).split(". ")[0].rstrip(".")
        about = about if len(about) <= 90 else about[:87] + "..."
        lines.append(f"  {group}={path.stem}".ljust(32) + f"  {about}".rstrip())
    return lines


def print_help(overrides: list[str]) -> None:
    """`crv [overrides] --help`: every option with the value the composed config gives it
    (`crv experiment=smoke --help` shows what smoke runs), and the presets."""
    import signal

    from crv.cli.checks import checked_configs
    from crv.config import CRVConfig
    from crv.options import options_help

    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `crv --help | head` ends quietly
    try:
        obj, _ = next(checked_configs(CRVConfig, overrides, CONF_DIR, "config"))
    except CRVError as exc:
        fail(str(exc))
    given = f" (composed from: {' '.join(overrides)})" if overrides else ""
    print("crv: Circuit-based Reasoning Verification pipeline.\n")
    print("Usage: crv [experiment=smoke] [section.field=value ...] [-m for sweeps]\n")
    for group, what in (("experiment", "Experiment presets"), ("subject", "Subject models")):
        print(f"{what} ({group}=NAME, from conf/{group}/):")
        print("\n".join(preset_lines(group)) + "\n")
    print(f"Options (section.field=value{given}, then the help):")
    print("\n".join(options_help(CRVConfig, values=obj)))
    print("\nHydra's own flags (--cfg job, --multirun, ...) work as usual; see `crv --hydra-help`.")


def main() -> None:
    """Console script `crv`."""
    from crv.config import register_configs

    register_configs()
    sys.argv[1:] = rewrite_deprecated(sys.argv[1:])
    args = hydra_args(sys.argv[1:])
    if args.help:
        print_help(args.overrides)
        return
    own_tree = args.config_path or args.config_name or args.config_dir or args.experimental_rerun
    if not (args.hydra_help or args.info or args.shell_completion or own_tree):
        try:
            check_invocation(sys.argv[1:])
        except CRVError as exc:
            fail(str(exc))
    try:
        hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")(run)()
    except SystemExit as exc:
        if exc.code == 1 and not _RUN_STARTED:  # Hydra printed its composition error
            sys.exit(2)
        raise
    except KeyboardInterrupt:
        fail("interrupted", 130)


def verify_main() -> None:
    """Console script `crv-verify`."""
    from crv.check.config import VerifyConfig
    from crv.cli.checks import command_config, print_command_help
    from crv.cli.verify import USAGE, verify_command

    argv = sys.argv[1:]
    if "--help" in argv or "-h" in argv:
        print_command_help(USAGE, VerifyConfig)
        return
    sys.exit(verify_command(command_config("crv-verify", VerifyConfig, argv)))
