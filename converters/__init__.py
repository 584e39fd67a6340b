"""Format conversion (merge, quantize, dequantize). Not implemented yet: see the
README's roadmap; the package exists so the distribution's layout is stable."""
