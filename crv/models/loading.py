"""Loading subject models: the subject artifact is a plain Hugging Face directory (fp32
safetensors, config, tokenizer) that every later stage loads with `load_subject`, offline
and without remote code. Turning a model's source into that directory is
`crv.subject.sources`.
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)


def load_subject(
    model_dir: str | Path, device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a subject artifact (a local HF directory) in eval mode; safetensors, no remote code."""
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype="auto",
        local_files_only=True,
        trust_remote_code=False,
        use_safetensors=True,
    )
    return model.to(device).eval(), load_subject_tokenizer(model_dir)


def load_subject_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a subject artifact alone (no weights loaded); no remote code."""
    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
