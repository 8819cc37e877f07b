"""Why the --quick rows of resnet18 and densenet have a far lower test accuracy than
train accuracy: the moving batch-norm statistics after 16 steps.

Trains the reproduce --quick setting (2 epochs, 2,048 training images, 16 steps at
batch 256), then scores the 1,000 test images twice: with the moving statistics
(train=False, what every report uses) and with each test batch's own statistics
(train=True, as during training).

Run from the repository root:
    python docs/runs/probes/quick_bn_stats.py resnet18 96
    python docs/runs/probes/quick_bn_stats.py densenet 64
"""
import json
import shutil
import sys
import tempfile
import time

import jax

from cnnjax.checkpoint import Checkpoints
from cnnjax.data import load_fashion_mnist, preprocess
from cnnjax.train import TrainConfig
from cnnjax.trainer import Prepared, fit, describe_device

arch, resize = sys.argv[1], int(sys.argv[2])
config = TrainConfig.from_recipe(arch, epochs=2, max_train=2048, max_test=1000, resize=resize)
data = load_fashion_mnist(None, max_train=2048, max_test=1000)
out = tempfile.mkdtemp()
metrics = fit(config, data, out, log=lambda line: None)
run = Prepared.create(config, data)
checkpoints = Checkpoints(f"{out}/checkpoints")
state, _, _ = checkpoints.restore(run.state, run.totals)
checkpoints.close()
shutil.rmtree(out)

images, labels = preprocess(data.test_images, resize), data.test_labels


def test_acc(batch_stats_of_test_batch: bool) -> float:
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    correct = 0
    for i in range(0, len(labels), 250):
        if batch_stats_of_test_batch:
            logits, _ = state.apply_fn(variables, images[i:i + 250], train=True,
                                       mutable=["batch_stats"],
                                       rngs={"dropout": jax.random.key(0)})
        else:
            logits = state.apply_fn(variables, images[i:i + 250], train=False)
        correct += int((logits.argmax(-1) == labels[i:i + 250]).sum())
    return correct / len(labels)


print(json.dumps({"date": time.strftime("%Y-%m-%d"), "device": describe_device(),
                  "arch": arch, "resize": resize, "steps": int(state.step),
                  "train_acc_last_epoch": metrics["epochs"][-1]["train_acc"],
                  "test_acc_moving_stats": test_acc(False),
                  "test_acc_test_batch_stats": test_acc(True)}))
