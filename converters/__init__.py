"""Format conversion, streaming one tensor at a time (``adapterhub.converters``).

- ``converters.merge``: merge a PEFT adapter into its base, optionally
  quantizing on the fly.
- ``converters.formats``: what the conversions read and write: PEFT method
  maths (``peft_math``), the bitsandbytes layout (``bnb``), streaming
  safetensors I/O (``safetensors_io``).

Inputs are ``FileMap``s (relative path -> real path), so registry blobs are
read in place. ``adapterhub.convert`` resolves refs and records lineage. This
package never imports ``adapterhub.registry``.
"""
