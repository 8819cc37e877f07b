"""cnnjax: the convolutional networks of Dive into Deep Learning in JAX/Flax.

`cnnjax.models` holds the networks and their recipes, `cnnjax.layers` the book's
from-scratch pieces, `cnnjax.data` Fashion-MNIST through TFDS.
"""

from cnnjax.parallel import set_xla_cpu_flags as _set_xla_cpu_flags

_set_xla_cpu_flags()
