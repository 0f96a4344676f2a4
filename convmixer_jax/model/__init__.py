"""ConvMixer's architecture (`convmixer.py`), its variants (`registry.py`), its eval-mode form
(`inference.py`) and its FLOPs (`flops.py`)."""
