"""Audio uploads in any container: what soundfile reads (WAV, FLAC, OGG, MP3) through `audio.decode_audio`, anything
else FFmpeg decodes (m4a/AAC, webm/Opus, mp4...) through PyAV, as OpenAI's audio endpoints accept them. PyAV is
imported only here, when such a file arrives."""

from __future__ import annotations

import io

import numpy as np

from loomserve.modalities.audio import decode_audio
from loomserve.modalities.budget import MediaSpend
from loomserve.modalities.media import MediaError


def decode_any_audio(data: bytes, spend: MediaSpend) -> tuple[np.ndarray, int]:
    """Encoded bytes -> (mono float32 samples, sampling rate), charged to `spend` (audio seconds)."""
    try:
        import soundfile
    except ImportError:  # FFmpeg reads every format soundfile does
        return _decode_with_av(data, spend)
    try:
        soundfile.info(io.BytesIO(data))
    except Exception:  # not a format libsndfile knows: let FFmpeg try
        return _decode_with_av(data, spend)
    return decode_audio(data, spend=spend)


def _decode_with_av(data: bytes, spend: MediaSpend) -> tuple[np.ndarray, int]:
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.audio:
                raise MediaError("cannot decode the audio: the file has no audio stream")
            stream = container.streams.audio[0]
            if container.duration is not None:  # from the header, before decoding (microseconds)
                spend.charge("audio_seconds", container.duration / 1e6)
            rate = stream.rate
            mono = av.AudioResampler(format="flt", layout="mono", rate=rate)
            chunks = [f.to_ndarray()[0] for frame in container.decode(stream) for f in mono.resample(frame)]
            chunks += [f.to_ndarray()[0] for f in mono.resample(None)]
    except MediaError:
        raise
    except Exception as exc:  # av.error.* for what is not media at all
        raise MediaError(f"cannot decode the audio: {exc}") from None
    if not chunks:
        raise MediaError("the audio clip is empty")
    return np.concatenate(chunks).astype(np.float32, copy=False), int(rate)
