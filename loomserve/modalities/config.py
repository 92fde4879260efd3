"""Settings of the multimodal front end and encoder cache (`EngineConfig.mm_config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loomserve.platform.json_args import json_object

MODALITIES = ("image", "video", "audio")
DEFAULT_LIMIT_PER_PROMPT = 999  # items of one modality in one prompt, unless --limit-mm-per-prompt says otherwise


@dataclass
class MultiModalConfig:
    limit_per_prompt: dict[str, int] = field(default_factory=dict)  # modality -> most items in one prompt
    allowed_media_domains: list[str] | None = None  # hosts (and their subdomains) http(s) media may come from
    allowed_local_media_path: str | None = None  # file:// media only under this folder
    media_fetch_timeout: float = 10.0  # seconds for one whole http(s) fetch, however the host paces its bytes
    max_media_bytes: int = 64 << 20  # encoded size of one item (data URL, download or file)
    max_image_pixels: int = 89_478_485  # width x height of an image or video frame (PIL's bomb threshold)
    encoder_cache_memory: int = 256 << 20  # bytes of encoder outputs kept for reuse across requests
    media_io_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)  # e.g. {"video": {"num_frames": 8}}
    processor_cache_bytes: int = 4 << 30  # processed items the front end keeps by their encoded bytes (0: none)

    def limit(self, modality: str) -> int:
        return self.limit_per_prompt.get(modality, DEFAULT_LIMIT_PER_PROMPT)


def build_mm_config(
    limit_mm_per_prompt: dict[str, int] | str | None,
    allowed_media_domains: list[str] | None,
    allowed_local_media_path: str | None,
    max_image_pixels: int,
    encoder_cache_memory: int,
    media_io_kwargs: dict[str, dict[str, Any]] | str | None,
    processor_cache_gb: float = 4,
) -> MultiModalConfig:
    """From EngineArgs' flat values; JSON strings (as the CLI passes them) are parsed."""
    limits = json_object(limit_mm_per_prompt, "limit_mm_per_prompt", '{"image": 4}')
    for modality, n in limits.items():
        if modality not in MODALITIES:
            raise ValueError(f"limit_mm_per_prompt: unknown modality {modality!r}; choose {', '.join(MODALITIES)}")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"limit_mm_per_prompt[{modality!r}] must be a non-negative integer, got {n!r}")
    if max_image_pixels < 1:
        raise ValueError(f"max_image_pixels must be positive, got {max_image_pixels}")
    if processor_cache_gb < 0:
        raise ValueError(f"mm_processor_cache_gb must be at least 0 (0 disables the cache), got {processor_cache_gb}")
    return MultiModalConfig(
        limit_per_prompt=limits,
        allowed_media_domains=list(allowed_media_domains) if allowed_media_domains else None,
        allowed_local_media_path=allowed_local_media_path,
        max_image_pixels=max_image_pixels,
        encoder_cache_memory=encoder_cache_memory,
        media_io_kwargs=json_object(media_io_kwargs, "media_io_kwargs", '{"video": {"num_frames": 8}}'),
        processor_cache_bytes=int(processor_cache_gb * (1 << 30)),
    )
