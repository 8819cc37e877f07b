"""cnnjax: the convolutional networks of Dive into Deep Learning in JAX/Flax.

- `cnnjax.models`: the networks, named as in the book, and their registry;
- `cnnjax.layers`: the book's from-scratch pieces;
- `cnnjax.config`: `TrainConfig`, the one list of settings, and the recipes;
- `cnnjax.data`: Fashion-MNIST through TFDS;
- `cnnjax.steps`: the jitted train and eval steps; `cnnjax.train`: a whole run
  (`train_and_evaluate`);
- `cnnjax.cpu_kernels`: faster versions of the layers, chosen when a model is built;
- `cnnjax.runtime`: the XLA and device settings to apply before JAX starts.

Importing cnnjax changes nothing outside it.
"""
