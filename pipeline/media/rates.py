"""The model's frame and audio rates: StableAvatar was trained on 25 fps video and wav2vec2 features of 16 kHz audio.

One place for both, importable without torch (media validation in the Gateway uses them)."""

FPS = 25
SAMPLE_RATE = 16000
