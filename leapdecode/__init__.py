"""leapdecode: lossless speculative decoding for Llama-family models."""

from leapdecode.errors import LeapError
from leapdecode.sampling import SamplingParams

__all__ = ["Engine", "GenerationConfig", "LeapError", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name):
    # The engine pulls in torch and the model code; keep `import leapdecode` light for the CLI's --help.
    if name in ("Engine", "GenerationConfig"):
        from leapdecode import engine

        return getattr(engine, name)
    raise AttributeError(name)
