"""Format conversion, streaming one tensor at a time (``adapterhub.converters``).

Conversions (what a command runs):

- ``converters.merge``: merge a PEFT adapter into its base, optionally
  quantizing on the fly (planned by ``converters.merge_plan``);
- ``converters.quantize``: bitsandbytes quantize and dequantize of whole
  checkpoints;
- ``converters.output``: the staged output directory every conversion writes.

Formats (what the conversions read and write), in ``converters.formats``:

- PEFT method maths, public face ``peft_math``: parsing the adapter into a
  plan (``peft_plan``), binding it to a base (``peft_resolve``), per-method
  deltas (``peft_deltas``), blocked CPU arithmetic (``peft_blocked``), and
  QLoRA settings (``qlora``);
- the bitsandbytes layout and quantizers, public face ``bnb``
  (``bnb_layout``, ``bnb_quant``, ``bnb_cpu``: the CPU quantizers,
  byte-identical to bitsandbytes, and ``bnb_native``: their C kernel,
  converters/_c/bnb_kernels.c; ``quantize_cpu`` runs it without torch);
- safetensors reading (``safetensors_io``) and shard writing (``shards``).

Inputs are ``FileMap``s (relative path -> real path), so registry blobs are
read in place. ``adapterhub.convert`` resolves refs and records lineage. This
package never imports ``adapterhub.registry``.
"""
