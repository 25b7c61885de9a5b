"""The curation job's configuration: inputs, models, actor pools, the raw : stylized mix, outputs."""

from __future__ import annotations

from dataclasses import dataclass

from stylear_core.config import ConfigError, option
from stylear_core.curation.clip_filter import ClipFilterConfig
from stylear_core.curation.sam import MaskerConfig
from stylear_core.curation.stylizer import StylizerConfig
from stylear_core.curation.tokenize import TokenizeConfig
from stylear_core.data.passes import ActorPoolConfig
from stylear_core.models.presets import ModelConfig
from stylear_core.stages import StageConfig


@dataclass
class InputConfig:
    """Where the raw pairs, the stylization requests and the style references come from."""

    raw_path: str = option(
        "", "raw pairs: parquet file/dir (id, prompt, image) or image folder + captions; '' = synthetic"
    )
    requests_path: str = option(
        "", "stylization requests parquet (id, prompt, style_ref, style_image[, seed]); '' = synthetic"
    )
    references_path: str = option(
        "", "style references parquet (id, image) for SAM; '' = the first style_image of each style_ref"
    )
    limit: int = option(0, "read at most this many rows of each input (0 = all)")
    synthetic_seed: int = option(0, "seed of the synthetic data set")
    synthetic_size: int = option(64, "side of the synthetic images in pixels")
    synthetic_raw: int = option(96, "synthetic raw pairs")
    synthetic_requests: int = option(32, "synthetic stylization requests")
    synthetic_styles: int = option(8, "synthetic styles the requests draw from (= style references)")


@dataclass
class MixConfig:
    """The raw : stylized ratio of the curated set.

    With raw pairs only (``stylize: false``, or no stylization requests) every readable raw pair is
    curated. When requests were given but none came out stylized (all failed or were filtered), the
    run stops with the reason rather than curating raw pairs only.
    """

    ratio: float = option(3.0, "raw pairs per stylized pair in curated/ (StyleAR: about 3)")
    seed: int = option(0, "seed of the reproducible selection")
    max_rounds: int = option(8, "redraws of the raw selection after unreadable raw rows are found")


@dataclass
class CurationConfig(StageConfig):
    """The curation job: inputs, models, actor pools and where the tables are written."""

    output_dir: str = option("runs/tiny/curate", "directory of the output tables and manifest")
    run_dir: str = option("runs/tiny", "run directory of the whole pipeline (holds the model cache)")
    cache_dir: str = option("", "where models built for the tiny preset are kept; '' = <run_dir>/.cache")
    model: ModelConfig = option(ModelConfig, "VQGAN / tokenizer / vocab (tiny or lumina7b) and image_size")
    inputs: InputConfig = option(InputConfig, "input data")
    stylizer: StylizerConfig = option(
        StylizerConfig, "SDXL + IP-Adapter stylizer (paths empty on tiny: built)"
    )
    clip_filter: ClipFilterConfig = option(ClipFilterConfig, "CLIP prompt-adherence filter")
    sam: MaskerConfig = option(MaskerConfig, "SAM salient-content removal on style references")
    tokenize: TokenizeConfig = option(TokenizeConfig, "VQ tokenization of curated records")
    stylize: bool = option(
        True,
        "stylize the requests and mix them with the raw pairs; false = curate the raw pairs alone (every "
        "readable one; no requests read or drawn, references only from inputs.references_path)",
    )
    mix: MixConfig = option(MixConfig, "raw : stylized mixing")
    stylize_pool: ActorPoolConfig = option(ActorPoolConfig(batch_size=4), "stylizer actors")
    clip_pool: ActorPoolConfig = option(ActorPoolConfig(batch_size=32), "CLIP filter actors")
    sam_pool: ActorPoolConfig = option(ActorPoolConfig(batch_size=4), "SAM actors")
    tokenize_pool: ActorPoolConfig = option(ActorPoolConfig(batch_size=32), "tokenizer actors")
    decode_batch_size: int = option(64, "rows per raw-image decode task (CPU tasks, no actors)")
    rows_per_file: int = option(
        1024, "rows gathered into one parquet file (at least; a pass's last file is smaller)"
    )
    driver_read_mb: int = option(
        256,
        "parquet inputs up to this size are read by the driver; larger ones by distributed Ray Data reads",
    )
    preference_fraction: float = option(
        0.0,
        "share of the requests held out of stylization for DPO preference sampling (preference_requests/)",
    )
    progress_bars: bool = option(True, "show Ray Data's progress bars")

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first unusable setting."""
        for name in ("stylize_pool", "clip_pool", "sam_pool", "tokenize_pool"):
            try:
                getattr(self, name).validate()
            except ConfigError as e:
                raise ConfigError(f"{name}: {e}") from None
        if not self.mix.ratio > 0:
            raise ConfigError(f"mix.ratio: must be positive, got {self.mix.ratio}")
        if not 0.0 <= self.preference_fraction < 1.0:
            raise ConfigError(f"preference_fraction: must be in [0, 1), got {self.preference_fraction}")
        for name in ("rows_per_file", "decode_batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")


__all__ = ["CurationConfig", "InputConfig", "MixConfig"]
