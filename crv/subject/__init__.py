"""The `subject` stage: the model whose reasoning is verified, as a plain HF directory.

Modules: `config` (SubjectConfig), `sources` (HF / GGUF / pip GGUF -> subject artifact),
`stage` (`run_stage`). Public loader: `crv.models.loading.load_subject(dir, device)`;
`crv.models` knows model families.
"""
