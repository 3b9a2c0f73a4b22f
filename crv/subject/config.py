"""Configuration of the `subject` stage (`subject` section): which model is verified."""

from __future__ import annotations

from dataclasses import dataclass, field

from crv.options import Choice, check_choices


class Source(Choice):
    """Where the subject comes from (see `SubjectConfig.source`)."""

    auto = "auto"
    hf = "hf"
    gguf = "gguf"
    pip_gguf = "pip_gguf"


class Dtype(Choice):
    """Weight dtype of the exported subject."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


@dataclass
class SubjectConfig:
    """The subject model: where it comes from and how it is exported."""

    name: str = "crv-tiny"
    """"crv-tiny" (the embedded default), "crv-tiny-bugs" (crv-tiny with planted rules), a hub
    name, a local HF directory, or a .gguf path."""

    retrain: bool = False
    """crv-tiny(-bugs) only: retrain it from the seed instead of copying the shipped checkpoint."""

    gguf_file: str | None = None
    """GGUF file name inside the `name` directory/repo, or inside the `pip_packages`."""

    source: Source = Source.auto
    """auto | hf | gguf | pip_gguf. auto: pip_gguf if pip_packages, gguf if a GGUF is named."""

    pip_packages: list[str] = field(default_factory=list)
    """pip_gguf: installed packages holding the GGUF ("name" or "name==version"), parts in order."""

    sha256: str | None = None
    """Required sha256 of the (concatenated) GGUF file; a mismatch stops the export."""

    dtype: Dtype = Dtype.float32
    """Weight dtype of the exported subject: float32 | bfloat16 | float16 (GGUF is dequantised)."""

    trust_remote_code: bool = False
    """Allow a hub model's own Python code during export (the artifact never needs it)."""

    def __post_init__(self) -> None:
        check_choices(self, "subject")
