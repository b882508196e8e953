"""The plain-Flax reference step of reference/anchors-h100.md: a straightforward flax.linen
model, `jax.jit` of the whole step, backbone under stop_gradient (bf16 when asked), head
trained with Adam in float32. Random weights and inputs. Prints one JSON line per config.

Copied from ../shared/reference/plain_flax_step.py (the models and the step unchanged) so that
`python -m xrayjax.bench --reference experiments/plain_flax_step.py` can import it and time it
beside the library's step in one process: `run` takes the image size and step count and
returns its record, and the full grid runs only as a script. The untimed set-up (inputs,
weights, Adam's state) is one jitted call drawn from an rbg key, not one compiled program per
eager operation (the step keeps its threefry dropout key). Added here, in the same plain
style: DenseNet121 and CheXNet's head (task "chexnet": global average pooling, Dense(4))."""
import json, time, functools
import jax, jax.numpy as jnp, flax.linen as nn, optax

CFG = {"vgg16": [2, 2, 3, 3, 3], "vgg19": [2, 2, 4, 4, 4]}

class VGG(nn.Module):
    arch: str; dtype: jnp.dtype = jnp.float32
    @nn.compact
    def __call__(self, x):
        for i, n in enumerate(CFG[self.arch]):
            for _ in range(n):
                x = nn.relu(nn.Conv(64 * 2 ** min(i, 3), (3, 3), dtype=self.dtype)(x))
            x = nn.max_pool(x, (2, 2), (2, 2))
        return x

class Bottleneck(nn.Module):
    f: int; s: int; proj: bool; dtype: jnp.dtype
    @nn.compact
    def __call__(self, x):
        conv = functools.partial(nn.Conv, use_bias=True, dtype=self.dtype)
        bn = functools.partial(nn.BatchNorm, use_running_average=True, epsilon=1.001e-5, dtype=self.dtype)
        r = bn()(conv(4 * self.f, (1, 1), (self.s, self.s))(x)) if self.proj else x
        y = nn.relu(bn()(conv(self.f, (1, 1), (self.s, self.s))(x)))
        y = nn.relu(bn()(conv(self.f, (3, 3))(y)))
        y = bn()(conv(4 * self.f, (1, 1))(y))
        return nn.relu(y + r)

class ResNet50(nn.Module):
    dtype: jnp.dtype = jnp.float32
    @nn.compact
    def __call__(self, x):
        x = jnp.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)))
        x = nn.Conv(64, (7, 7), (2, 2), padding="VALID", dtype=self.dtype)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=True, epsilon=1.001e-5, dtype=self.dtype)(x))
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        x = nn.max_pool(x, (3, 3), (2, 2))
        for i, n in enumerate([3, 4, 6, 3]):
            for j in range(n):
                x = Bottleneck(64 * 2 ** i, 2 if (j == 0 and i > 0) else 1, j == 0, self.dtype)(x)
        return x

class DenseNet121(nn.Module):
    dtype: jnp.dtype = jnp.float32
    @nn.compact
    def __call__(self, x):
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
        bn = functools.partial(nn.BatchNorm, use_running_average=True, epsilon=1.001e-5, dtype=self.dtype)
        x = jnp.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)))
        x = nn.relu(bn()(conv(64, (7, 7), (2, 2), padding="VALID")(x)))
        x = nn.max_pool(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), (3, 3), (2, 2))
        for i, n in enumerate([6, 12, 24, 16]):
            if i:
                x = conv(x.shape[-1] // 2, (1, 1))(nn.relu(bn()(x)))
                x = nn.avg_pool(x, (2, 2), (2, 2))
            for _ in range(n):
                y = nn.relu(bn()(conv(128, (1, 1))(nn.relu(bn()(x)))))
                x = jnp.concatenate([x, conv(32, (3, 3))(y)], axis=-1)
        return nn.relu(bn()(x))

class Head(nn.Module):
    task: str
    @nn.compact
    def __call__(self, f, train):
        f = f.astype(jnp.float32)
        if self.task == "task1":
            f = f.reshape(f.shape[0], -1)
            f = nn.Dropout(0.5, deterministic=not train)(f)
            f = nn.Dropout(0.5, deterministic=not train)(nn.relu(nn.Dense(256)(f)))
            return nn.Dense(1)(f)
        if self.task == "arch3":
            f = nn.BatchNorm(use_running_average=True)(f)
        f = f.mean(axis=(1, 2))
        if self.task == "chexnet":
            return nn.Dense(4)(f)
        f = nn.Dropout(0.5, deterministic=not train)(nn.relu(nn.Dense(512)(f)))
        if self.task != "arch3":
            f = nn.Dropout(0.5, deterministic=not train)(nn.relu(nn.Dense(512)(f)))
        return nn.Dense(4)(f)

def run(task, arch, batch, bf16, steps=30, image_size=224):
    dt = jnp.bfloat16 if bf16 else jnp.float32
    bb = ResNet50(dt) if arch == "resnet50" else DenseNet121(dt) if arch == "densenet121" else VGG(arch, dt)
    hd = Head(task)
    k = jax.random.PRNGKey(0)
    opt = optax.adam(1e-4)

    @jax.jit
    def setup(r):
        x = jax.random.normal(r, (batch, image_size, image_size, 3))
        bvars = bb.init(r, x[:1])
        hvars = hd.init({"params": r, "dropout": r}, bb.apply(bvars, x[:1]), False)
        y = jax.random.randint(r, (batch,), 0, 2 if task == "task1" else 4)
        return x, y, bvars, hvars, opt.init(hvars["params"])
    x, y, bvars, hvars, st = setup(jax.random.key(0, impl="rbg"))
    hp = hvars["params"]; hrest = {kk: v for kk, v in hvars.items() if kk != "params"}

    @jax.jit
    def step(hp, st, x, y, key):
        feats = jax.lax.stop_gradient(bb.apply(bvars, x.astype(dt)))
        def loss_fn(hp):
            logits = hd.apply({"params": hp, **hrest}, feats, True, rngs={"dropout": key})
            if task == "task1":
                return optax.sigmoid_binary_cross_entropy(logits[:, 0], y.astype(jnp.float32)).mean()
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        l, g = jax.value_and_grad(loss_fn)(hp)
        u, st = opt.update(g, st, hp)
        return optax.apply_updates(hp, u), st, l
    t0 = time.perf_counter()
    hp, st, l = step(hp, st, x, y, k); l.block_until_ready()
    compile_s = time.perf_counter() - t0
    for _ in range(4):
        hp, st, l = step(hp, st, x, y, k)
    l.block_until_ready(); t = time.perf_counter()
    for i in range(steps):
        hp, st, l = step(hp, st, x, y, k)
    l.block_until_ready(); d = time.perf_counter() - t
    record = dict(peer="flax-ref", task=task, arch=arch, batch=batch, bf16=bf16, img_s=round(batch * steps / d, 1), step_ms=round(d / steps * 1e3, 2), compile_s=round(compile_s, 1))
    print(json.dumps(record), flush=True)
    return record

if __name__ == "__main__":
    print(json.dumps(dict(jax=jax.__version__, devices=str(jax.devices()))), flush=True)
    for task, arch in [("task1", "vgg16"), ("arch1", "vgg16"), ("arch2", "vgg19"), ("arch3", "resnet50"),
                       ("chexnet", "densenet121")]:
        for bf16 in (False, True):
            for batch in (32, 256):
                run(task, arch, batch, bf16)
