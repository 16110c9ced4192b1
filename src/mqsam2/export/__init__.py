"""Deployable export: bit-packed integer weights plus everything needed to rebuild the quantized SAM2."""

from mqsam2.export.format import export_model, load_export, read_header
from mqsam2.export.pack import pack_codes, packed_nbytes, unpack_codes

__all__ = ["export_model", "load_export", "pack_codes", "packed_nbytes", "read_header", "unpack_codes"]
