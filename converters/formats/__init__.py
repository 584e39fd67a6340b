"""The formats conversions read and write: PEFT method maths (``peft_math`` over
``peft_plan``, ``peft_resolve``, ``peft_deltas``, ``peft_blocked``, ``qlora``),
the bitsandbytes layout and quantizers (``bnb`` over ``bnb_layout``,
``bnb_quant``, ``bnb_cpu`` and ``bnb_native``), safetensors reading (``safetensors_io``) and shard writing
(``shards``). Conversions live one level up, in ``converters``."""
