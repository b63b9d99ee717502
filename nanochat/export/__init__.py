"""Moving models in and out of nanochat: the Hugging Face format (`hf`).

`configuration_nanochat.py` and `modeling_nanochat.py` here are the files every export
ships; they import only torch and transformers (never nanochat), so they run wherever
the export is loaded."""
