"""Scripts that live apart from the library and are not installed with it; run them from the repository root:

  python -m tools.convert_inception --cache_dir=DIR   # the FID Inception weights (needs torch); `make weights`
  python -m tools.convert_lpips --cache_dir=DIR       # the LPIPS-VGG16 weights; `make weights`
  python -m tools.config_docs [--write]               # the config reference, docs/config.md

They import the library (immiscible_jax); the library never imports them.
"""
