"""What the media of one request may add up to, and the running tally that enforces it while they load.

Each item has its own caps (encoded bytes, pixels of one image, the video frame cap); a request of many items could
still decode gigabytes, so every item is also charged against a per-request budget before its pixels, samples or
frames are decoded (an image's and a video's size come from the header, an audio clip's length from its header).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loomserve.modalities.media import MediaError


@dataclass(frozen=True)
class MediaBudget:
    max_bytes: int = 128 << 20  # encoded bytes of all items (data URLs, downloads, files)
    max_pixels: int = 100_000_000  # decoded pixels of all images and sampled video frames
    max_audio_seconds: float = 600.0  # length of all audio clips
    max_video_frames: int = 512  # sampled frames of all videos
    deadline_s: float = 30.0  # fetching all items (each fetch also has --media-fetch-timeout of its own)


_UNITS = {"bytes": ("max_bytes", "bytes of media"), "pixels": ("max_pixels", "pixels of images and video frames"),
          "audio_seconds": ("max_audio_seconds", "seconds of audio"), "video_frames": ("max_video_frames",
                                                                                      "video frames")}


@dataclass
class MediaSpend:
    """One request's tally against its budget."""

    budget: MediaBudget = field(default_factory=MediaBudget)
    spent: dict[str, float] = field(default_factory=dict)

    def charge(self, unit: str, amount: float) -> None:
        """Add `amount` of `unit` ("bytes", "pixels", "audio_seconds", "video_frames"); MediaError past the budget."""
        limit_name, what = _UNITS[unit]
        limit = getattr(self.budget, limit_name)
        total = self.spent.get(unit, 0) + amount
        if total > limit:
            shown = f"{limit:,}" if isinstance(limit, int) else f"{limit:g}"
            raise MediaError(f"the media of this request add up to more than the server's limit of {shown} {what} "
                             "per request")
        self.spent[unit] = total
