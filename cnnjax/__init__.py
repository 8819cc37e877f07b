"""cnnjax: the convolutional networks of Dive into Deep Learning in JAX/Flax.

- `cnnjax.models`: the networks, named as in the book, and their registry;
- `cnnjax.scratch`: the book's from-scratch pieces;
- `cnnjax.config`: `TrainConfig`, the one list of settings, and the recipes;
- `cnnjax.data`: Fashion-MNIST through TFDS;
- `cnnjax.steps`: the train and eval steps; `cnnjax.prepared`: a run set up on the
  devices; `cnnjax.train`: a whole run (`train_and_evaluate`);
- `cnnjax.cpu_kernels`: faster versions of the layers, chosen when a model is built;
- `cnnjax.runtime`: the XLA and device settings to apply before JAX starts.

Importing cnnjax changes nothing outside it.
"""
