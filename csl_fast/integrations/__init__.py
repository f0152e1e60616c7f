"""Integrations with training frameworks (optional dependencies, imported on demand).

- :mod:`csl_fast.integrations.lightning`: ``CSLCallback`` for PyTorch Lightning.
- :mod:`csl_fast.integrations.huggingface`: ``CSLTrainer`` for the Hugging Face Trainer.

Importing a submodule without its framework installed raises ``ImportError`` naming the
package to install.
"""
