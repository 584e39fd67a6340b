"""Tell what an artifact is from its JSON files and tensor headers alone.

:func:`inspect_path` recognises

- PEFT adapters (``adapter_config.json`` + ``adapter_model.safetensors``, or a
  legacy pickled ``adapter_model.bin`` that is listed but never unpickled here),
  every ``peft_type``, and named adapters in subfolders;
- bottleneck (and LoRA, prefix, prompt) adapters of the ``adapters`` library
  (``adapter_config.json`` with a nested ``config`` + ``adapter.safetensors`` or
  ``pytorch_adapter.bin``);
- Hugging Face checkpoints (``config.json`` + ``model.safetensors`` or shards
  with ``model.safetensors.index.json``), merged models (model card
  ``base_model_relation: merged``), bitsandbytes NF4/FP4/int8 checkpoints, and
  GPTQ/AWQ and other quantized checkpoints from ``quantization_config`` only;
- GGUF files (models and LoRA adapters), alone, in a directory, or split into
  ``<stem>-0000i-of-0000n.gguf`` parts;
- a loose directory of ``*.safetensors`` without any config, reported as
  ``kind="checkpoint"``, ``format="safetensors"`` with a warning, so that plain
  tensor dumps can still be stored and found.

Nothing here reads tensor data, with one exception: the few hundred bytes of
JSON that bitsandbytes stores *as* a uint8 tensor (``quant_state``), which carry
the original shape and block size. torch, transformers and peft are never
imported, so inspecting a 7B checkpoint takes milliseconds. GGUF headers are
parsed directly rather than with ``gguf.GGUFReader``, which needs tens of
seconds for a real tokenizer vocabulary.

Bad input raises ``NotFoundError`` (missing path), ``UnsafePathError`` (a
symlink or index entry escaping the directory) or ``InvalidArtifactError``
whose one-line message starts with the offending file.

Choices worth knowing:

- ``rank`` is the largest rank found in the tensors (the config's ``r`` and
  ``rank_pattern`` when there are no readable tensors); a disagreement between
  the two is a warning. For AdaLoRA the tensors hold ``init_r``; the ranks left
  after pruning are in ``details["effective_ranks"]``. LoKr stores small
  Kronecker factors whole, so only decomposed factors yield a tensor rank.
  OFT/BOFT, prompt-style methods and bottleneck adapters have no rank.
  ``details["module_ranks"]`` has the rank of every module.
- ``params`` counts tensor elements. For quantized checkpoints it counts
  logical weights (the original shape of packed 4-bit weights) and leaves out
  the quantization statistics (absmax, quant_map, SCB, ...).
- ``quant`` stays ``None`` for adapters: an adapter holds no quantized weights.
  When an older PEFT model card says the adapter was trained on a
  bitsandbytes-quantized base (QLoRA), ``details["trained_on_quant"]`` says
  ``nf4``/``fp4``/``int8``. PEFT 0.21 no longer writes that block.
- ``fingerprint`` is the base fingerprint for checkpoints (architecture,
  sizes, ``[out, in]`` of every 2-D weight and a digest of all that, which is
  the same for an fp32, bf16 or bitsandbytes copy of one model) and, for
  adapters, the expectation an adapter has of its base (module shapes, with
  ``None`` where the adapter cannot tell a dimension, e.g. IA3 vectors).
  Compare the two with :func:`fingerprint_matches`.

>>> info = inspect_path("out/my-lora")          # doctest: +SKIP
>>> info.method, info.rank, info.alpha          # doctest: +SKIP
('LORA', 8, 16.0)
"""

from __future__ import annotations

import os
from pathlib import Path

from adapterhub.artifact import Inspection
from adapterhub.inspect.checkpoint import CheckpointWeights, read_checkpoint_weights
from adapterhub.inspect.dispatch import inspect_tree
from adapterhub.inspect.files import FileTree
from adapterhub.inspect.fingerprint import checkpoint_fingerprint, fingerprint_matches
from adapterhub.inspect.patterns import find_pattern_key, fullmatch, get_pattern_key
from adapterhub.manifest import list_files
from adapterhub.modelcard import parse_front_matter, parse_qlora_block

__all__ = [
    "CheckpointWeights",
    "FileTree",
    "checkpoint_fingerprint",
    "find_pattern_key",
    "fingerprint_matches",
    "fullmatch",
    "get_pattern_key",
    "inspect_files",
    "inspect_path",
    "parse_front_matter",
    "parse_qlora_block",
    "read_checkpoint_weights",
]


def inspect_path(path: str | os.PathLike) -> Inspection:
    """Inspect an adapter, checkpoint or GGUF file/directory without loading tensors.

    Raises ``NotFoundError`` for a missing path, ``UnsafePathError`` for
    symlinks or index entries that escape the directory, and
    ``InvalidArtifactError`` (naming the file) for anything unreadable.
    """
    root = Path(path)
    listed = list_files(root)
    tree = FileTree(root, dict(listed), is_file=root.is_file())
    info = inspect_tree(tree)
    info.files = list(tree.files)
    info.size = tree.size
    return info


def inspect_files(files: dict[str, Path], root: Path, *, is_file: bool = False) -> Inspection:
    """Inspect an artifact given as ``relpath -> file`` (registry blobs are read in place).

    ``root`` names the artifact in messages. ``files`` and ``size`` are not filled in.
    """
    return inspect_tree(FileTree(root, dict(files), is_file=is_file))
