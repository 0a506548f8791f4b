"""DeepSynth: teach document vision-language models to follow instructions about rendered pages."""

__version__ = "0.1.0"
