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
import tempfile
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
composition error (an unknown option, a value of the wrong type or not among the choices)."""


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `message` as one line on stderr and exit (2: bad config or input)."""
    print(f"crv: error: {message}", file=sys.stderr)
    sys.exit(code)


def preflight(obj: Any) -> str:
    """Checks that need the machine, run before any stage: the device exists (and Ray, for
    `runtime.executor=ray`), input files exist and the cache directory is writable. Returns
    the resolved device."""
    from crv.device import resolve_device
    from crv.executor import check_runtime

    device = resolve_device(obj.device)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"device={obj.device}: CUDA is not available on this machine")
    check_runtime(obj.runtime, device)
    gsm8k = obj.traces.gsm8k_path
    if gsm8k and not Path(hydra.utils.to_absolute_path(gsm8k)).exists():
        raise ConfigError(f"traces.gsm8k_path={gsm8k}: no such file")
    cache = Path(hydra.utils.to_absolute_path(obj.pipeline.cache_dir))
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=cache).close()
    except OSError as exc:
        raise ConfigError(
            f"pipeline.cache_dir={cache} is not writable: {exc.strerror or exc}"
        ) from None
    return device


def run(cfg: DictConfig) -> dict:
    """Run the pipeline for a composed config; returns the report dict."""
    from omegaconf.errors import OmegaConfBaseException

    from crv.io import atomic_write_json
    from crv.pipeline import run_pipeline
    from crv.report import build_report, write_report

    global _RUN_STARTED
    _RUN_STARTED = True
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        obj = OmegaConf.to_object(cfg)  # runs every section's __post_init__ checks
        device = preflight(obj)
    except (ValueError, CRVError, OmegaConfBaseException) as exc:
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


def main() -> None:
    """Console script `crv`."""
    from crv.config import CRVConfig, register_configs
    from crv.options import options_help

    register_configs()
    sys.argv[1:] = rewrite_deprecated(sys.argv[1:])
    if "--help" in sys.argv or "-h" in sys.argv:
        print("crv: Circuit-based Reasoning Verification pipeline.\n")
        print("Usage: crv [experiment=smoke] [section.field=value ...] [-m for sweeps]\n")
        print("Options (section.field=default  help):")
        print("\n".join(options_help(CRVConfig)))
        print(
            "\nHydra's own flags (--cfg job, --multirun, ...) work as usual; see `crv --hydra-help`."
        )
        return
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
    from hydra.core.config_store import ConfigStore

    from crv.cli.verify import verify_main as _verify
    from crv.verify.config import VerifyConfig

    ConfigStore.instance().store(name="crv_verify", node=VerifyConfig)
    started = False

    def _task(cfg: DictConfig) -> None:
        nonlocal started
        started = True
        try:
            obj = OmegaConf.to_object(cfg)
        except ValueError as exc:
            print(f"crv-verify: error: {exc}", file=sys.stderr)
            sys.exit(2)
        sys.exit(_verify(obj))

    # A filter command: no run directory, no log files, stdout kept for the records.
    sys.argv += [
        "hydra.run.dir=.",
        "hydra.output_subdir=null",
        "hydra/job_logging=disabled",
        "hydra/hydra_logging=disabled",
    ]
    try:
        hydra.main(config_path=None, config_name="crv_verify", version_base="1.3")(_task)()
    except SystemExit as exc:
        if exc.code == 1 and not started:  # Hydra printed its composition error
            sys.exit(2)  # nothing could run
        raise
