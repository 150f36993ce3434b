"""``kl-ae bench``: autoencoders against classical codecs at matched bits per pixel, a
rate-distortion benchmark (:mod:`.benchmark`, with the codecs in :mod:`.codecs`). The benchmarks
of the trainer itself (speed, quality per minute) are scripts in the repository's bench/ folder."""
