"""Partner models: build a tiny Llama and its tokenizer from the envs' text, or load a local Hugging Face causal LM
(optionally LoRA-wrapped); the policy a causal LM defines over actions (log-probabilities, entropies); a `Partner`
(name, model, tokenizer, optimizer, value head) that acts, saves and loads; its weights and hidden states as tensors.

    build.py        resolve_device, build_tokenizer, build_tiny_model, load_pretrained, with_checkpointing, with_lora,
                    build_ancestor
    directories.py  what a model directory on disk may hold: mixtures told apart, custom code refused (no torch)
    policy.py       log-probabilities and entropies of actions given prompts (acting and learning share them)
    partner.py      Partner: act (constrained or generated), save, load; hidden_states on probe prompts
    weights.py      a partner's dense weights (LoRA folded in, tied tensors once) and loading weights back

May import: config, errors.
"""
