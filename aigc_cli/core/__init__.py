"""The core: settings and their registry, errors and exit codes, the model spec, JSON and text rules, the tokenizer; imports nothing else of aigc and never torch."""
