"""netmorph: change the architecture of a pretrained transformer LLM without losing what it learned.

`import netmorph.auto` registers the converted checkpoints' classes with transformers' Auto classes.
"""

__version__ = "0.2.0"
