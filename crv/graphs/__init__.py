"""Attribution graphs of reasoning steps (the `graphs` stage).

- `api.py`: `attribute(model, transcoders, input_ids, *, position, ...)`, one graph from
  plain values (also `crv.graphs.attribute`).
- `replacement.py`: the local replacement model of one token sequence and batched rows.
- `attribute.py`: the method (see its docstring), `TraceAttributor`, `attribute_trace`,
  `trace_graphs`; whole-step graphs (`position=step`) and contrastive targets (`LogitNode`).
- `contrastive.py`: where an incorrect step departs from a correct one, and its graph.
- `prune.py`: influence on the logits, pruning, replacement and completeness scores.
- `graph.py`: `StepGraph`, the pruned graph of one step as columnar arrays.
- `store.py`: one file per trace; `load_step_graphs(dir, trace_id)`, `iter_step_graphs(dir)`,
  `load_contrastive_graphs(dir, trace_id)`, `load_graphs_config(dir)`.
- `stage.py`: `run_stage(ctx)`; `config.py`: `GraphsConfig`.
- `export.py`: graphs as circuit-tracer graph JSON for its viewer (`crv-graphs export`).
- `viewer.py`: that viewer offline (its page and libraries, fetched once) and a local
  server (`crv-graphs serve`).
"""

# After the submodule `crv.graphs.attribute` is imported (by `api`), so the name is the function.
from crv.graphs.api import attribute

__all__ = ["attribute"]
