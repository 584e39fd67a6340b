"""The formats conversions read and write: PEFT method maths (``peft_math``),
the bitsandbytes layout (``bnb``) and streaming safetensors I/O
(``safetensors_io``). Conversions live one level up, in ``converters``."""
