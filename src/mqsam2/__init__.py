"""mqsam2: importance-driven mixed-precision post-training quantization of SAM2 (Mix-QSAM2)."""

__version__ = "0.1.0"
