"""sppo: Self-Play Preference Optimization (arXiv 2405.00675) as an offline generate → rank → train pipeline."""

__version__ = "0.1.0"
