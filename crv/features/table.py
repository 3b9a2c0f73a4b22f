"""The feature table of the `features` stage: building it from step rows, and the public
loaders of the artifact (`features.parquet`, `identity.npz`, `features.json`)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.sparse import csr_matrix, load_npz, save_npz

from crv.features.compute import IDENTITY_NAME, StepRow, feature_names, identity_matrix, step_row
from crv.features.config import FeaturesConfig
from crv.graphs.graph import StepGraph
from crv.io import read_json
from crv.pipeline import artifact_config
from crv.traces.steps import KEY_COLUMNS

TABLE_FILE = "features.parquet"


META_FILE = "features.json"


IDENTITY_FILE = "identity.npz"


def feature_table(
    graphs: Iterable[StepGraph],
    keys: pd.DataFrame,
    n_layers: int,
    cfg: FeaturesConfig,
    seed: int,
) -> pd.DataFrame:
    """The feature table of step graphs held in memory (the stage computes the same from
    the graph files, `trace_rows`)."""
    rows = [step_row(g, n_layers, cfg, seed) for g in graphs]
    return table_from_rows(rows, keys, n_layers, cfg.identity)


def table_from_rows(
    rows: list[StepRow], keys: pd.DataFrame, n_layers: int, identity: bool
) -> pd.DataFrame:
    """The feature table: `KEY_COLUMNS` (from `keys`, n_prefix_tokens = position + 1)
    followed by `feature_names(n_layers)`, one row per step row (every step must be in
    `keys`), sorted by trace and step; with `identity`, then the identity family as pandas
    sparse columns (`identity_matrix`; absent entries are missing)."""
    names = feature_names(n_layers)
    feats = pd.DataFrame(
        [{"step_id": step_id, **f} for step_id, f, _ in rows],
        columns=["step_id", "n_prefix_tokens", *names],
    )
    unknown = feats.loc[~feats["step_id"].isin(keys["step_id"]), "step_id"]
    if len(unknown):
        raise ValueError(f"graphs of steps missing from the traces, e.g. {unknown.iloc[0]}")
    key_cols = [c for c in KEY_COLUMNS if c != "n_prefix_tokens"]
    table = keys[key_cols].merge(feats, on="step_id", how="inner", validate="one_to_one")
    table = table[[*KEY_COLUMNS, *names]].astype({n: np.float64 for n in names})
    table = table.sort_values(["trace_id", "step"], kind="stable").reset_index(drop=True)
    if not identity:
        return table
    identity_of = {step_id: ident for step_id, _, ident in rows}
    matrix, id_names = identity_matrix([identity_of[s] for s in table["step_id"]])
    return with_identity(table, matrix, id_names)


def with_identity(table: pd.DataFrame, matrix: csr_matrix, names: list[str]) -> pd.DataFrame:
    """`table` with the identity block [n_rows, n_names] appended as sparse columns."""
    sparse = pd.DataFrame.sparse.from_spmatrix(matrix, index=table.index, columns=names)
    return pd.concat([table, sparse], axis=1)


def split_identity(table: pd.DataFrame) -> tuple[pd.DataFrame, csr_matrix, list[str]]:
    """(the table without identity columns, the identity block as CSR, its names)."""
    names = [c for c in table.columns if IDENTITY_NAME.match(c)]
    dense = table.drop(columns=names)
    if not names:
        return dense, csr_matrix((len(table), 0)), names
    return dense, table[names].sparse.to_coo().tocsr(), names


def save_identity(path: Path, matrix: csr_matrix) -> None:
    """Write the identity block as a compressed npz (read back by `load_identity`)."""
    with open(path, "wb") as f:
        save_npz(f, matrix, compressed=True)


def load_feature_table(path: str | Path, identity: bool = True) -> pd.DataFrame:
    """The feature table written by the `features` stage (`KEY_COLUMNS` + features); with
    `identity`, and when the artifact has the identity family, its columns are appended as
    pandas sparse columns (absent entries = missing)."""
    table = pd.read_parquet(Path(path) / TABLE_FILE)
    if "planted_rule" not in table.columns:  # artifacts from before the column existed
        table.insert(table.columns.get_loc("label") + 1, "planted_rule", "")
    block = load_identity(path) if identity else None
    return table if block is None else with_identity(table, *block)


def load_identity(path: str | Path) -> tuple[csr_matrix, list[str]] | None:
    """The identity family of a `features` artifact: sparse matrix [n_steps, n_names]
    (rows aligned with `load_feature_table`) and column names; None when it has none."""
    file = Path(path) / IDENTITY_FILE
    if not file.is_file():
        return None
    names = load_feature_meta(path).get("identity_names") or []
    matrix = load_npz(file).tocsr()
    if matrix.shape[1] != len(names):
        raise ValueError(
            f"{file}: {matrix.shape[1]} identity columns, but {len(names)} names in {META_FILE}"
        )
    return matrix, names


def load_feature_names(path: str | Path) -> list[str]:
    """Aggregate feature columns of a `features` artifact, in table order (the identity
    family's names come with `load_identity`)."""
    return list(load_feature_meta(path)["feature_names"])


def load_features_config(path: str | Path) -> FeaturesConfig:
    """The settings a `features` artifact's features were computed with."""
    return FeaturesConfig(**artifact_config(path))


def load_feature_meta(path: str | Path) -> dict:
    """n_layers, feature names, families, config and seed of a `features` artifact: what
    `graph_features` needs to compute identical features for new graphs."""
    return read_json(Path(path) / META_FILE)
