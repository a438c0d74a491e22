"""The bottom layer: what every other package may import (the error base classes). It imports nothing of Tessera."""
