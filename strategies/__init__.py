"""Built-in strategies, written only against fedpeft's public API.

Importing this package registers every built-in strategy. Each module is also a
worked example of a plug-in: an outside package does exactly the same.
"""

from strategies import (
    fedex_lora,
    fedit,
    fedsa_lora,
    fedspine,
    ferret,
    ffa_lora,
    flexlora,
    flora,
    hetlora,
    lora_fair,
    lora_sb,
)

__all__ = ["fedex_lora", "fedit", "fedsa_lora", "fedspine", "ferret", "ffa_lora", "flexlora", "flora", "hetlora", "lora_fair", "lora_sb"]
