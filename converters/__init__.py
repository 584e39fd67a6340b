"""Format conversion, streaming one tensor at a time.

- ``converters.merge``: merge a PEFT adapter into its base (PEFT-exact maths
  in ``converters.deltas``), optionally quantizing on the fly.
- ``converters.bnb``: bitsandbytes NF4/FP4/int8 quantize and dequantize, in
  the layout transformers saves.
- ``converters.safetensors_io``: the streaming reader and writer they share.

Inputs are ``FileMap``s (relative path -> real path), so registry blobs are
read in place. ``adapterhub.convert`` resolves refs and records lineage.
"""
