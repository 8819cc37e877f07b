"""Where the time of one whole training step goes, in JAX and in PyTorch, by kind of op.

JAX: `jax.profiler.trace` around the compiled train step that `fit` runs (batch
gather, scaling, resize, forward, backward, SGD update); each XLA:CPU thunk in the
trace is matched to its instruction in the compiled HLO and put in a category by
its opcode, its fused body and its source (`op_name` metadata: `jvp(...)` is the
forward pass, `transpose(jvp(...))` the backward pass).
PyTorch: `torch.profiler` around the notes' step (eager, NCHW, float32), self CPU
time of each aten op, put in the same categories by name.

Run from the repository root:
    python docs/bench/probes/step_profile.py --arch lenet_bn --batch-size 256 --steps 10
It prints one JSON line per framework: wall ms per step (unprofiled), and ms per
step by category. For JAX, a moment in which several thunks ran is shared equally
among them, so the categories add up to the time in which any op ran; for PyTorch
they are the ops' self times.
"""
import argparse
import collections
import glob
import gzip
import json
import re
import statistics
import tempfile
import time

CATEGORIES = ("conv forward", "conv input grad", "conv weight grad", "layout copies",
              "dense", "batch norm", "pooling", "other")


# ----------------------------------------------------------------------------- JAX
def parse_hlo(text: str):
    """Instructions of the entry computation, and the opcodes and op_names inside
    each called computation (fusion bodies), from `compiled.as_text()`."""
    computations, entry, current = {}, None, None
    for line in text.splitlines():
        header = re.match(r"^(ENTRY )?%(\S+) ", line)
        if header and line.rstrip().endswith("{"):
            current = header.group(2)
            computations[current] = []
            if header.group(1):
                entry = current
            continue
        m = re.match(r"^\s+(?:ROOT )?%(\S+) = (.*?) ([a-z][\w-]*)\((.*)$", line)
        if m and current:
            name, shape, opcode, rest = m.groups()
            calls = re.findall(r"calls=%([\w.-]+)", rest)
            op_name = re.search(r'op_name="([^"]*)"', rest)
            dims = re.search(r"dim_labels=(\S+?)[,}]", rest)
            computations[current].append(dict(
                name=name, shape=shape, opcode=opcode, calls=calls,
                op_name=op_name.group(1) if op_name else "",
                dim_labels=dims.group(1) if dims else ""))
    return computations, entry


def body(computations, instr, depth=0):
    """`instr` and every instruction of the computations it calls."""
    out = [instr]
    if depth < 4:
        for c in instr["calls"]:
            for inner in computations.get(c, []):
                out += body(computations, inner, depth + 1)
    return out


def jax_category(computations, instr, kernel_dims) -> str:
    parts = body(computations, instr)
    op_names = " ".join(p["op_name"] for p in parts)
    backward = "transpose(" in op_names
    convs = [p for p in parts if p["opcode"] == "convolution"]
    if convs:
        # A weight gradient's output is the kernel (its dims in some order); XLA often
        # drops the metadata of the fusion that computes it.
        dims = re.search(r"\[([\d,]*)\]", convs[0]["shape"]).group(1)
        if tuple(sorted(int(d) for d in dims.split(",") if d)) in kernel_dims:
            return "conv weight grad"
        return "conv input grad" if backward else "conv forward"
    if any(p["opcode"] == "dot" for p in parts):
        return "dense"
    if instr["name"].startswith(("transpose", "copy")) or instr["opcode"] in ("copy", "transpose"):
        return "layout copies"
    if "BatchNorm" in op_names:
        return "batch norm"
    if "Pool" in op_names or "reduce_window" in op_names or "max_pool" in op_names:
        return "pooling"
    return "other"


def profile_jax(arch, batch_size, steps, dataset):
    import jax

    from cnnjax.train import TrainConfig
    from cnnjax.trainer import Prepared

    config = TrainConfig.from_recipe(arch, batch_size=batch_size)
    run = Prepared.create(config, dataset, 1)
    computations, entry = parse_hlo(run.compiled_train.as_text())
    kernel_dims = {tuple(sorted(leaf.shape)) for leaf in jax.tree.leaves(run.state.params)
                   if leaf.ndim == 4}
    instructions = {i["name"]: i for i in computations[entry]}
    state, totals, batches = run.state, run.totals, run.epoch_batches(0)
    for _ in range(3):
        state, totals = run.train_step(state, totals, batches)
    jax.block_until_ready(totals)
    walls = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(steps):
            state, totals = run.train_step(state, totals, batches)
        jax.block_until_ready(totals)
        walls.append((time.perf_counter() - start) / steps)
    log_dir = tempfile.mkdtemp(prefix="step_profile_")
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        for _ in range(steps):
            state, totals = run.train_step(state, totals, batches)
        jax.block_until_ready(totals)
    trace_file = glob.glob(f"{log_dir}/**/perfetto_trace.json.gz", recursive=True)[0]
    events = json.load(gzip.open(trace_file))
    events = events["traceEvents"] if isinstance(events, dict) else events
    # A thunk's event marks its launch; convolutions finish asynchronously, so its
    # time runs from the launch to its "end: NAME" event. The executor runs
    # independent thunks at the same time: each moment is shared equally among the
    # thunks running then, so the categories add up to the time anything ran.
    starts, ends = collections.defaultdict(list), collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e["name"] in instructions:
            starts[e["name"]].append(e["ts"])
        elif e.get("ph") == "X" and e["name"].startswith("end: "):
            ends[e["name"][5:]].append(e["ts"] + e["dur"])
    boundaries = []
    for name, launched in starts.items():
        finished = sorted(ends[name])
        if len(finished) != len(launched):
            raise RuntimeError(f"{name}: {len(launched)} launches, {len(finished)} ends")
        for begin, end in zip(sorted(launched), finished):
            boundaries += [(begin, 1, name), (end, -1, name)]
    boundaries.sort()
    share, active, previous = collections.Counter(), collections.Counter(), None
    for ts, change, name in boundaries:
        if active and previous is not None:
            running = sum(active.values())
            for running_name, count in active.items():
                share[running_name] += (ts - previous) * count / running
        active[name] += change
        if not active[name]:
            del active[name]
        previous = ts
    by_category, by_op = collections.Counter(), collections.Counter()
    for name, microseconds in share.items():
        ms = microseconds / 1e3 / steps
        instr = instructions[name]
        category = jax_category(computations, instr, kernel_dims)
        by_category[category] += ms
        label = instr["op_name"].split("/")[-2:] if instr["op_name"] else [instr["name"]]
        by_op[(category, "/".join(label), instr["shape"].split("{")[0])] += ms
    top = [dict(category=c, op=o, shape=s, ms=round(ms, 2))
           for (c, o, s), ms in by_op.most_common(12)]
    return dict(framework="jax", jax_version=jax.__version__, arch=arch,
                batch_size=batch_size, resize=config.resize,
                wall_ms_per_step=round(1e3 * statistics.median(walls), 2),
                ms_per_step={c: round(by_category[c], 2) for c in CATEGORIES},
                op_sum_ms_per_step=round(sum(by_category.values()), 2), top_ops=top)


# ------------------------------------------------------------------------- PyTorch
def torch_category(name: str) -> str:
    n = name.lower()
    if "convolution_backward" in n:
        return "conv backward"
    if "conv" in n:
        return "conv forward"
    if "batch_norm" in n:
        return "batch norm"
    if "pool" in n:
        return "pooling"
    if n in ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul", "aten::bmm"):
        return "dense"
    if n in ("aten::copy_", "aten::contiguous", "aten::clone", "aten::to_dense"):
        return "layout copies"
    return "other"


def profile_torch(arch, batch_size, resize, lr, steps, images, labels):
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn

    from experiments import torch_models

    torch.manual_seed(0)
    model = torch_models.build(arch, resize=resize).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    images_u8 = torch.from_numpy(np.ascontiguousarray(images[..., 0])).unsqueeze(1)
    labels_i64 = torch.from_numpy(np.asarray(labels).astype(np.int64))
    generator = torch.Generator().manual_seed(0)

    def step():
        idx = torch.randint(images_u8.shape[0], (batch_size,), generator=generator)
        x = images_u8[idx].float() / 255.0
        if resize != x.shape[-1]:
            x = F.interpolate(x, size=(resize, resize), mode="bilinear", align_corners=False)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), labels_i64[idx])
        loss.backward()
        optimizer.step()
        return loss

    for _ in range(3):
        step().item()
    walls = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(steps):
            loss = step()
        loss.item()
        walls.append((time.perf_counter() - start) / steps)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            loss = step()
        loss.item()
    by_category, by_op = collections.Counter(), collections.Counter()
    for avg in prof.key_averages():
        ms = avg.self_cpu_time_total / 1e3 / steps
        by_category[torch_category(avg.key)] += ms
        by_op[(torch_category(avg.key), avg.key)] += ms
    top = [dict(category=c, op=o, ms=round(ms, 2)) for (c, o), ms in by_op.most_common(12)]
    categories = ("conv forward", "conv backward", "layout copies", "dense", "batch norm",
                  "pooling", "other")
    return dict(framework="torch", torch_version=torch.__version__,
                threads=torch.get_num_threads(), arch=arch, batch_size=batch_size,
                resize=resize, wall_ms_per_step=round(1e3 * statistics.median(walls), 2),
                ms_per_step={c: round(by_category[c], 2) for c in categories},
                op_sum_ms_per_step=round(sum(by_category.values()), 2), top_ops=top)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="lenet_bn")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()

    from cnnjax.train import TrainConfig
    from experiments.bench import load_data

    dataset, _ = load_data(args.data_dir)
    day = time.strftime("%Y-%m-%d", time.gmtime())
    result = profile_jax(args.arch, args.batch_size, args.steps, dataset)
    print(json.dumps(dict(date=day, **result)), flush=True)
    if not args.no_torch:
        config = TrainConfig.from_recipe(args.arch)
        result = profile_torch(args.arch, args.batch_size, config.resize, config.lr,
                               args.steps, dataset.train_images, dataset.train_labels)
        print(json.dumps(dict(date=day, **result)), flush=True)


if __name__ == "__main__":
    main()
