"""aigc: text generation with GPT-2 from the command line."""

__version__ = "0.1.0"
