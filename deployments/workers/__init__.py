"""The model workers: the Preprocessor (inputs, audio, T5/CLIP/VAE encode), the Denoisers (one unit per call,
placed by their request router) and the Postprocessor (VAE decode, ffmpeg, upload)."""
