"""cnnjax: the convolutional networks of Dive into Deep Learning in JAX/Flax.

`cnnjax.models` holds the networks and their recipes, `cnnjax.layers` the book's
from-scratch pieces, `cnnjax.data` Fashion-MNIST through TFDS.
"""

from cnnjax.parallel import avoid_known_xla_bugs as _avoid_known_xla_bugs

_avoid_known_xla_bugs()
