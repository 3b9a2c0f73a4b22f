"""Attribution graphs of reasoning steps (the `graphs` stage).

- `replacement.py`: the local replacement model of one token sequence and batched rows.
- `attribute.py`: the method (see its docstring), `attribute_trace`, `trace_graphs`.
- `prune.py`: influence on the logits, pruning, replacement and completeness scores.
- `graph.py`: `StepGraph`, the pruned graph of one step as columnar arrays.
- `store.py`: one file per trace; `load_step_graphs(dir, trace_id)`, `iter_step_graphs(dir)`.
- `stage.py`: `run_stage(ctx)`; `config.py`: `GraphsConfig`.
- `export.py`: graphs as circuit-tracer graph JSON for its viewer (`crv-graphs export`).
- `viewer.py`: that viewer offline (its page and libraries, fetched once) and a local
  server (`crv-graphs serve`).
"""
