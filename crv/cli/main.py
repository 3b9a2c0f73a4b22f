"""Hydra entry points: `crv` runs the pipeline, `crv-verify` checks a user's traces.

`crv` resolves the config, runs (or reuses) every stage in `pipeline.stages` and their
dependencies, and writes into Hydra's run directory:
- `artifacts.json`: stage name -> absolute artifact directory,
- `report.json`: what each stage measured, under stable keys, plus timings and peak memory,
- `report.md`: the same as tables, with the plots copied next to it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
log = logging.getLogger("crv")


def run(cfg: DictConfig) -> dict:
    """Run the pipeline for a composed config; returns the report dict."""
    from crv.device import resolve_device
    from crv.io import atomic_write_json
    from crv.pipeline import run_pipeline
    from crv.report import build_report, write_report

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    obj = OmegaConf.to_object(cfg)
    sections = {name: getattr(obj, name) for name in vars(obj)}
    cache_dir = Path(hydra.utils.to_absolute_path(cfg.pipeline.cache_dir))
    results = run_pipeline(
        sections,
        cfg.pipeline.stages,
        cache_root=cache_dir,
        seed=cfg.seed,
        device=resolve_device(cfg.device),
    )
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
    if "--help" in sys.argv or "-h" in sys.argv:
        print("crv: Circuit-based Reasoning Verification pipeline.\n")
        print("Usage: crv [experiment=smoke] [section.field=value ...] [-m for sweeps]\n")
        print("Options (section.field=default  help):")
        print("\n".join(options_help(CRVConfig)))
        print(
            "\nHydra's own flags (--cfg job, --multirun, ...) work as usual; see `crv --hydra-help`."
        )
        return
    hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")(run)()


def verify_main() -> None:
    """Console script `crv-verify`."""
    from hydra.core.config_store import ConfigStore

    from crv.cli.verify import VerifyConfig
    from crv.cli.verify import verify_main as _verify

    ConfigStore.instance().store(name="crv_verify", node=VerifyConfig)

    def _task(cfg: DictConfig) -> None:
        sys.exit(_verify(OmegaConf.to_object(cfg)))

    # A filter command: no run directory, no log files, stdout kept for the records.
    sys.argv += [
        "hydra.run.dir=.",
        "hydra.output_subdir=null",
        "hydra/job_logging=disabled",
        "hydra/hydra_logging=disabled",
    ]
    hydra.main(config_path=None, config_name="crv_verify", version_base="1.3")(_task)()
