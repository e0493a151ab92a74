"""lm-eval task configs shipped with omniq (`omniq eval --tasks omniq-docstring-cloze`); see cloze.py."""
