"""Hugging Face interop: the released Keye-VL checkpoint format ↔ keye's Megatron-based modules."""
