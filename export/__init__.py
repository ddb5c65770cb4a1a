"""Hugging Face export and generation: `python -m launcher.export_hf`, `python -m launcher.generate`.

consolidate.py  find and consolidate a DeepSpeed checkpoint (any ZeRO stage) into one state dict
convert.py      our state dict and ModelConfig <-> HF weights and config (Llama, Qwen3, ours)
files.py        tokenizer, generation config, model card, the export marker
cli.py          the export command; generate.py the generation command
modeling_precond_llama.py  the remote-code model for qkv/row (copied into the export)
"""
