"""What each serving engine accepts: the data behind ``adapterhub check --target``.

Each rule names a test (implemented in :mod:`adapterhub.check.targets`), its
parameters, the severity of a failure, the conversion that makes the adapter
servable, and the source the rule was read from. When an engine changes,
change this table and its source line, not the code.

Rule ids are ``<engine>/<rule>`` and stable: CI configurations and JUnit
reports refer to them. ``fix`` is an adapterhub command; ``None`` means no
conversion helps (the engine cannot run this base model at all).
"""

from __future__ import annotations

from typing import Any

# Module names as Hugging Face checkpoints spell them, for the decoder LMs the engines serve.
_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
_MLP = ["gate_proj", "up_proj", "down_proj"]

# vLLM packs q/k/v into qkv_proj and gate/up into gate_up_proj (packed_modules_mapping of
# each model); an adapter may name either the packed or the unpacked modules.
_VLLM_LLAMA_LIKE = [*_ATTN, "qkv_proj", *_MLP, "gate_up_proj", "embed_tokens", "lm_head"]

TARGETS: dict[str, dict[str, Any]] = {
    "vllm": {
        "name": "vLLM",
        "rules": [
            {
                "id": "vllm/format",
                "title": "vLLM loads a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)",
                "test": "format",
                "params": {"formats": ["peft"], "fix_from": {"mlx": "convert --to peft", "gguf": None}},
                "severity": "error",
                "fix": "convert --to lora",
                "source": "vLLM docs, LoRA Adapters (LoRARequest takes a PEFT adapter path); "
                "vllm/lora/peft_helper.py reads adapter_config.json",
            },
            {
                "id": "vllm/method",
                "title": "vLLM serves LoRA adapters only",
                "test": "methods",
                "params": {"methods": ["LORA", "DORA"]},
                "severity": "error",
                "fix": "convert --to lora",
                "source": "vllm/lora/peft_helper.py: PEFTHelper holds r, lora_alpha and target_modules of a LoRA",
            },
            {
                "id": "vllm/dora",
                "title": "vLLM refuses DoRA adapters",
                "test": "no_dora",
                "severity": "error",
                "fix": "merge",
                "source": "vllm/lora/peft_helper.py PEFTHelper._validate_features: 'vLLM does not yet support DoRA.'",
            },
            {
                "id": "vllm/modules-to-save",
                "title": "vLLM refuses modules_to_save",
                "test": "no_modules_to_save",
                "severity": "error",
                "fix": "merge",
                "source": "vllm/lora/peft_helper.py PEFTHelper._validate_features: "
                "'vLLM only supports modules_to_save being None.'",
            },
            {
                "id": "vllm/max-lora-rank",
                "title": "the rank fits one of vLLM's max_lora_rank values",
                "test": "rank_in",
                "params": {"ranks": [1, 8, 16, 32, 64, 128, 256, 320, 512], "default": 16, "option": "--max-lora-rank"},
                "severity": "error",
                "fix": "merge",
                "source": "vllm/config/lora.py: MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512], default 16 "
                "(docs.vllm.ai/en/v0.14.0/api/vllm/config/lora/)",
            },
            {
                "id": "vllm/one-scale",
                "title": "one scale for every module (vLLM ignores rank_pattern and alpha_pattern)",
                "test": "one_scale",
                "params": {"rank_pattern_ok": False, "rslora_ok": True},
                "severity": "error",
                "fix": "merge",
                "source": "vllm/lora/peft_helper.py PEFTHelper.__post_init__: vllm_lora_scaling_factor = "
                "lora_alpha / r (or / sqrt(r) with use_rslora); no rank_pattern or alpha_pattern field",
            },
            {
                "id": "vllm/target-modules",
                "title": "every adapted module is one vLLM applies LoRA to for this architecture",
                "test": "module_names",
                "params": {
                    "modules": {
                        "llama": _VLLM_LLAMA_LIKE,
                        "mistral": _VLLM_LLAMA_LIKE,
                        "qwen2": _VLLM_LLAMA_LIKE,
                        "qwen3": _VLLM_LLAMA_LIKE,
                        "gemma": _VLLM_LLAMA_LIKE,
                        "gemma2": _VLLM_LLAMA_LIKE,
                        "granite": _VLLM_LLAMA_LIKE,
                        "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj", "embed_tokens", "lm_head"],
                    },
                },
                "severity": "error",
                "fix": "merge",
                "source": "vllm-project/vllm issue 55193 (an adapter whose modules match none vLLM applies LoRA to "
                "silently serves the base model); PR 37877 (the supported LoRA target modules of a Qwen3: down_proj, "
                "embed_tokens, gate_up_proj, lm_head, o_proj, qkv_proj); packed_modules_mapping in "
                "vllm/model_executor/models/llama.py",
            },
            {
                "id": "vllm/extra-vocab",
                "title": "no extra vocabulary (vLLM 0.12 removed lora_extra_vocab_size)",
                "test": "no_extra_vocab",
                "severity": "error",
                "fix": "merge",
                "source": "vllm/config/lora.py (v0.11): 'lora_extra_vocab_size ... (Deprecated) ... Will be removed "
                "in v0.12.0' (docs.vllm.ai/en/v0.11.0/api/vllm/config/lora.html)",
            },
        ],
    },
    "llama.cpp": {
        "name": "llama.cpp",
        "rules": [
            {
                "id": "llama.cpp/format",
                "title": "llama.cpp loads LoRA adapters as GGUF files (--lora FILE.gguf)",
                "test": "format",
                "params": {"formats": ["gguf"], "fix_from": {"mlx": "convert --to peft, then convert --to gguf"}},
                "severity": "error",
                "fix": "convert --to gguf",
                "source": "ggml-org/llama.cpp: llama-cli/llama-server --lora take a GGUF adapter written by "
                "convert_lora_to_gguf.py (general.type=adapter, adapter.type=lora)",
            },
            {
                "id": "llama.cpp/method",
                "title": "LoRA only (lora_A and lora_B tensors)",
                "test": "methods",
                "params": {"methods": ["LORA"]},
                "severity": "error",
                "fix": "convert --to lora",
                "source": "ggml-org/llama.cpp convert_lora_to_gguf.py get_tensors: any tensor other than lora_A/lora_B "
                "(or a norm) is 'Unexpected name ...: Not a lora_A or lora_B tensor'",
            },
            {
                "id": "llama.cpp/modules-to-save",
                "title": "no full weights saved in the adapter (modules_to_save, resized embeddings)",
                "test": "no_modules_to_save",
                "severity": "error",
                "fix": "merge",
                "source": "ggml-org/llama.cpp convert_lora_to_gguf.py: 'Embeddings is present in the adapter' exits "
                "(llama.cpp PR 9948)",
            },
            {
                "id": "llama.cpp/one-alpha",
                "title": "one alpha (a GGUF LoRA stores adapter.lora.alpha once; the rank comes from each tensor)",
                "test": "one_scale",
                "params": {"rank_pattern_ok": True, "rslora_ok": False},
                "severity": "error",
                "fix": "merge",
                "source": "ggml-org/llama.cpp convert_lora_to_gguf.py writes lparams['lora_alpha'] as the one "
                "adapter.lora.alpha; measured here (docs/DESIGN §6): rsLoRA and alpha patterns come out wrong",
            },
            {
                "id": "llama.cpp/architecture",
                "title": "llama.cpp converts this architecture, and every adapted module has a GGUF tensor",
                "test": "gguf_tensors",
                "params": {
                    "archs": {
                        "LlamaForCausalLM": "LLAMA",
                        "MistralForCausalLM": "LLAMA",
                        "MixtralForCausalLM": "LLAMA",
                        "Qwen2ForCausalLM": "QWEN2",
                        "Qwen3ForCausalLM": "QWEN3",
                        "GemmaForCausalLM": "GEMMA",
                        "Gemma2ForCausalLM": "GEMMA2",
                        "Gemma3ForCausalLM": "GEMMA3",
                        "Phi3ForCausalLM": "PHI3",
                        "GPT2LMHeadModel": "GPT2",
                        "StableLmForCausalLM": "STABLELM",
                        "Starcoder2ForCausalLM": "STARCODER2",
                        "GPTNeoXForCausalLM": "GPTNEOX",
                        "FalconForCausalLM": "FALCON",
                        "OlmoForCausalLM": "OLMO",
                        "GraniteForCausalLM": "GRANITE",
                    },
                },
                "severity": "error",
                "fix": None,
                "source": "ggml-org/llama.cpp convert_lora_to_gguf.py: ModelBase.from_model_architecture(arch) or "
                "'Model ... is not supported'; tensor names from the gguf package's get_tensor_name_map",
            },
        ],
    },
    "ollama": {
        "name": "Ollama",
        "rules": [
            {
                "id": "ollama/format",
                "title": "Ollama's ADAPTER takes a PEFT safetensors directory or a GGUF LoRA",
                "test": "format",
                "params": {"formats": ["peft", "gguf"], "fix_from": {"mlx": "convert --to peft"}},
                "severity": "error",
                "fix": "convert --to gguf",
                "source": "ollama/ollama docs/modelfile.md, ADAPTER: 'Safetensor adapter' and 'GGUF adapter'",
            },
            {
                "id": "ollama/architecture",
                "title": "a safetensors adapter needs a llama (Llama, Mistral, Mixtral) or gemma2 base",
                "test": "architectures",
                "params": {
                    "model_types": ["llama", "mistral", "mixtral", "gemma2"],
                    "formats": ["peft"],
                },
                "severity": "error",
                "fix": "convert --to gguf",
                "source": "ollama/ollama convert/convert.go ConvertAdapter: switch on the base's architecture, "
                "'llama' or 'gemma2', else 'unsupported architecture'",
            },
            {
                "id": "ollama/method",
                "title": "LoRA only",
                "test": "methods",
                "params": {"methods": ["LORA"]},
                "severity": "error",
                "fix": "convert --to lora",
                "source": "ollama/ollama convert/convert.go: AdapterParameters reads r and lora_alpha of a LoRA; "
                "docs/modelfile.md: 'a fine tuned LoRA adapter'",
            },
            {
                "id": "ollama/modules-to-save",
                "title": "no full weights saved in the adapter",
                "test": "no_modules_to_save",
                "severity": "error",
                "fix": "merge",
                "source": "ollama/ollama convert: adapter tensors are lora_a/lora_b pairs (adapter.type lora)",
            },
            {
                "id": "ollama/one-alpha",
                "title": "one alpha (adapter.lora.alpha)",
                "test": "one_scale",
                "params": {"rank_pattern_ok": True, "rslora_ok": False},
                "severity": "error",
                "fix": "merge",
                "source": "ollama/ollama convert/convert.go writes adapter.lora.alpha once, as llama.cpp's loader reads it",
            },
        ],
    },
    "mlx": {
        "name": "mlx-lm",
        "rules": [
            {
                "id": "mlx/format",
                "title": "mlx-lm loads its own adapters (adapters.safetensors, fine_tune_type)",
                "test": "format",
                "params": {"formats": ["mlx"], "fix_from": {"gguf": None}},
                "severity": "error",
                "fix": "convert --to mlx",
                "source": "ml-explore/mlx-lm mlx_lm/tuner/utils.py load_adapters (0.32.2): adapter_config.json with "
                "fine_tune_type, num_layers, lora_parameters, and adapters.safetensors",
            },
            {
                "id": "mlx/method",
                "title": "LoRA or DoRA",
                "test": "methods",
                "params": {"methods": ["LORA", "DORA"]},
                "severity": "error",
                "fix": "convert --to lora",
                "source": "ml-explore/mlx-lm load_adapters: fine_tune_type lora, dora or full",
            },
            {
                "id": "mlx/modules-to-save",
                "title": "no full weights saved in the adapter (mlx-lm loads lora_a, lora_b and m only)",
                "test": "no_modules_to_save",
                "severity": "error",
                "fix": "merge",
                "source": "ml-explore/mlx-lm load_adapters: adapter_leaves = {'lora_a', 'lora_b', 'm'}",
            },
            {
                "id": "mlx/architecture",
                "title": "mlx-lm has a model for the base's model_type",
                "test": "mlx_model_type",
                "params": {"remap": {"mistral": "llama", "iquestcoder": "llama", "xverse": "llama", "llava": "mistral3"}},
                "severity": "error",
                "fix": None,
                "source": "ml-explore/mlx-lm mlx_lm/utils.py _get_classes: MODEL_REMAPPING, then mlx_lm.models.<model_type> "
                "or 'Model type ... not supported'",
            },
            {
                "id": "mlx/layer-coverage",
                "title": "every adapted layer is one mlx-lm can wrap, within the blocks its config covers",
                "test": "mlx_layers",
                "severity": "error",
                "fix": "convert --to mlx",
                "source": "ml-explore/mlx-lm mlx_lm/tuner/utils.py linear_to_lora_layers: model.layers[-num_layers:], "
                "Linear/QuantizedLinear/SwitchLinear/Embedding only ('Can't convert layer of type ...'), "
                "'Requested N LoRA layers but the model only has M layers'",
            },
        ],
    },
    "tgi": {
        "name": "Text Generation Inference",
        "rules": [
            {
                "id": "tgi/format",
                "title": "TGI loads PEFT LoRA adapters (LORA_ADAPTERS)",
                "test": "format",
                "params": {"formats": ["peft"], "fix_from": {"mlx": "convert --to peft", "gguf": None}},
                "severity": "error",
                "fix": "convert --to lora",
                "source": "huggingface/text-generation-inference adapters/lora.py: LoraConfig.load uses "
                "peft.LoraConfig.from_pretrained",
            },
            {
                "id": "tgi/method",
                "title": "LoRA only, without DoRA",
                "test": "methods",
                "params": {"methods": ["LORA"]},
                "severity": "error",
                "fix": "convert --to lora",
                "source": "huggingface/text-generation-inference adapters/lora.py: LoraConfig keeps r, target_modules, "
                "fan_in_fan_out, lora_alpha, use_rslora (no use_dora: magnitude vectors are not read)",
            },
            {
                "id": "tgi/dora",
                "title": "TGI ignores DoRA magnitude vectors",
                "test": "no_dora",
                "severity": "error",
                "fix": "merge",
                "source": "huggingface/text-generation-inference adapters/lora.py LoraConfig (no use_dora field)",
            },
            {
                "id": "tgi/modules-to-save",
                "title": "TGI ignores modules_to_save",
                "test": "no_modules_to_save",
                "severity": "error",
                "fix": "merge",
                "source": "huggingface/text-generation-inference adapters/lora.py map_weights_for_model reads only "
                "<module>.lora_A.weight and lora_B.weight",
            },
            {
                "id": "tgi/one-scale",
                "title": "one scale for every module (TGI ignores rank_pattern and alpha_pattern)",
                "test": "one_scale",
                "params": {"rank_pattern_ok": False, "rslora_ok": True},
                "severity": "error",
                "fix": "merge",
                "source": "huggingface/text-generation-inference adapters/lora.py prepare_weights: "
                "get_scaling_factor(lora_alpha, r, uses_rslora) for every layer",
            },
            {
                "id": "tgi/target-modules",
                "title": "adapted modules are among TGI's adapter layers",
                "test": "module_names",
                "params": {"modules": {"*": [*_ATTN, *_MLP]}},
                "severity": "error",
                "fix": "merge",
                "source": "huggingface/text-generation-inference models/flash_causal_lm.py ADAPTER_LAYERS = q_proj, "
                "k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj",
            },
            {
                "id": "tgi/layer-coverage",
                "title": "each adapted module type is adapted in every block (else TGI drops it everywhere)",
                "test": "every_block",
                "severity": "error",
                "fix": "merge",
                "source": "huggingface/text-generation-inference adapters/lora.py prepare_weights: a layer type with "
                "no LoRA weight in one layer returns None for the whole type",
            },
        ],
    },
}

#: The ``--target`` names, in the order the CLI lists them.
TARGET_NAMES: tuple[str, ...] = tuple(TARGETS)

#: Rule id -> title, for reports.
TARGET_RULE_TITLES: dict[str, str] = {r["id"]: r["title"] for t in TARGETS.values() for r in t["rules"]}

#: Rule id -> where the rule was read from, shown in JSON reports.
TARGET_RULE_SOURCES: dict[str, str] = {r["id"]: r["source"] for t in TARGETS.values() for r in t["rules"]}
