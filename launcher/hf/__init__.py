"""Hugging Face export: consolidate a DeepSpeed checkpoint, convert it, write the files.

checkpoint.py  find and consolidate a checkpoint (any ZeRO stage)
convert.py     our state dict and ModelConfig <-> HF weights and config (Llama, Qwen3, ours)
files.py       tokenizer, generation config, model card, export marker, the staged folder they go in
modeling_precond_llama.py  the remote-code model for qkv/row (copied into the export)
"""
