"""mmdiag: measure and fix SGLang's multimodal-input path under tensor parallelism."""
__version__ = "0.1.0"
