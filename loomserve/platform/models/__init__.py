"""Model families over packed tokens: decoders, encoders, vision and audio towers; what each can do
(`interfaces.py`) and the one registry from a checkpoint's architecture to its implementation (`registry.py`)."""
