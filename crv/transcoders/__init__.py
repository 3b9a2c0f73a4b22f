"""Per-layer transcoders (trained TopK, or published ReLU / JumpReLU / TopK sets, skip
transcoders too): training, evaluation, on-disk format and splicing.

Modules: `config` (TranscodersConfig), `module` (TopKTranscoder, TranscoderSet), `train`,
`activations` (MLP activations from the subject model), `evaluate`, `io` (circuit-tracer
layout), `splice` (replace MLPs, read and edit features), `stage` (the pipeline stage).
"""
