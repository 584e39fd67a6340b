"""Ollama ``Modelfile``s for GGUF models.

A Modelfile names the weights (``FROM ./model.gguf``) and, for a chat model,
the prompt ``TEMPLATE`` in Go's text/template language. Hugging Face chat
templates are Jinja, which does not translate in general; the common
families are recognised by their markers and given the equivalent Go
template and stop sequence. For any other template no TEMPLATE is written
and the Modelfile says so (the Jinja template is still in the GGUF's
``tokenizer.chat_template``).
"""

from __future__ import annotations

#: (markers that must all appear in the Jinja template, Go template, stop sequences)
_FAMILIES: list[tuple[tuple[str, ...], str, str, tuple[str, ...]]] = [
    (
        ("<|start_header_id|>", "<|eot_id|>"),
        "llama3",
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>\n"
        "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        ("<|eot_id|>",),
    ),
    (
        ("<|im_start|>", "<|im_end|>"),
        "chatml",
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
        ("<|im_end|>",),
    ),
    (
        ("<|user|>", "<|end|>"),
        "phi3",
        "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
        ("<|end|>",),
    ),
    (
        ("[INST]", "[/INST]"),
        "inst",
        '{{- range .Messages }}{{- if eq .Role "user" }}[INST] {{ .Content }} [/INST]'
        '{{- else if eq .Role "assistant" }} {{ .Content }}</s>{{- end }}{{- end }}',
        ("[INST]", "</s>"),
    ),
]


def template_family(jinja: str | None) -> str | None:
    """The family a Jinja chat template belongs to (llama3, chatml, phi3, inst), or None."""
    if not jinja:
        return None
    for markers, family, _, _ in _FAMILIES:
        if all(m in jinja for m in markers):
            return family
    return None


def modelfile_text(gguf_name: str, jinja: str | None) -> str:
    lines = ["# Ollama Modelfile written by adapterhub: `ollama create NAME -f Modelfile`", f"FROM ./{gguf_name}"]
    family = template_family(jinja)
    for _, fam, go, stops in _FAMILIES:
        if fam == family:
            lines.append(f'TEMPLATE """{go}"""')
            lines += [f'PARAMETER stop "{s}"' for s in stops]
            break
    else:
        if jinja:
            lines.append("# The model's chat template was not recognised; it is kept in the GGUF (tokenizer.chat_template).")
    return "\n".join(lines) + "\n"
