"""PyTorch DiT state dicts <-> the JAX DiT, so a published checkpoint runs in JAX and a
JAX-trained model loads in PyTorch with strict=True.

Layout changes (everything else is a renaming, see `jax_path`):
    nn.Linear weight (out, in)              <-> nnx.Linear kernel (in, out)          transpose
    patch conv weight (out, in, p, p) OIHW  <-> nnx.Conv kernel (p, p, in, out) HWIO  transpose(2, 3, 1, 0)
    nn.Embedding weight                     <-> nnx.Embed embedding                   as is
    nn.LayerNorm weight (norm1, norm2, ...) <-> nnx.LayerNorm scale                   as is
    pos_embed (1, T, C) Parameter           <-> PositionEmbedding variable (not trained)
    null_context (1, context_dim) Parameter <-> nnx.Param                             as is
The attention keeps one fused qkv Linear on both sides (rows / columns Q|K|V), cross-attention
one fused kv (K|V).

The block design and context_dim are read off the keys and shapes (see `_inferred_config`).
"""
import re

import jax
import numpy as np
import torch
from flax import nnx

from fusedit.dit.models import block_of_state_dict

from .model import DiT_models, create_model

CONV_KEY = "x_embedder.proj.weight"
EMBEDDING_KEY = "y_embedder.embedding_table.weight"
POS_EMBED_KEY = "pos_embed"


def _is_layer_norm(modules):
    return bool(modules) and str(modules[-1]).startswith("norm")  # norm1, norm_cross, norm2


def jax_path(torch_key):
    """'blocks.3.adaLN_modulation.1.weight' -> ('blocks', 3, 'adaLN_modulation_1', 'kernel')."""
    key = torch_key.replace("t_embedder.mlp.", "t_embedder.mlp_").replace("adaLN_modulation.1.", "adaLN_modulation_1.")
    *modules, leaf = key.split(".")
    if leaf == "weight":
        leaf = "embedding" if torch_key == EMBEDDING_KEY else "scale" if _is_layer_norm(modules) else "kernel"
    return tuple(int(part) if part.isdigit() else part for part in modules) + (leaf,)


def torch_key(path):
    """The inverse of jax_path."""
    *modules, leaf = [str(part) for part in path]
    if leaf in ("kernel", "embedding", "scale"):
        leaf = "weight"
    key = ".".join(modules + [leaf])
    key = key.replace("t_embedder.mlp_", "t_embedder.mlp.").replace("adaLN_modulation_1.", "adaLN_modulation.1.")
    return key


def _is_linear_weight(key):
    return key.endswith(".weight") and key not in (CONV_KEY, EMBEDDING_KEY) and not _is_layer_norm(key.split(".")[:-1])


def to_jax_layout(key, value):
    if key == CONV_KEY:
        return value.transpose(2, 3, 1, 0)
    return value.T if _is_linear_weight(key) else value


def to_torch_layout(key, value):
    if key == CONV_KEY:
        return value.transpose(3, 2, 0, 1)
    return value.T if _is_linear_weight(key) else value


def _numpy(value):
    """A float32 numpy copy of a torch tensor or array-like (bf16/fp16 upcast exactly)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float32).numpy()
    return np.asarray(value, dtype=np.float32)


def flatten_tree(tree, prefix=()):
    """(path tuple, leaf) pairs of a nested dict, such as nnx.to_pure_dict(state)."""
    for name, value in tree.items():
        if isinstance(value, dict):
            yield from flatten_tree(value, prefix + (name,))
        else:
            yield prefix + (name,), value


def _inferred_config(name, state_dict, input_size, overrides):
    """Constructor arguments read off the weights' keys and shapes, overridable by keyword except
    block and context_dim, which must agree with the weights."""
    if name not in DiT_models:
        raise ValueError(f"unknown model config {name!r}; choose one of {', '.join(DiT_models)}")
    patch = int(name.rsplit("/", 1)[1])
    for key in (CONV_KEY, EMBEDDING_KEY, "final_layer.linear.weight"):
        if key not in state_dict:
            raise ValueError(f"state dict has no {key!r}; is it a DiT state dict (keys like "
                             f"{', '.join(list(state_dict)[:3])})?")
    in_channels = state_dict[CONV_KEY].shape[1]
    out_channels = state_dict["final_layer.linear.weight"].shape[0] // (patch * patch)
    dropout = overrides.get("class_dropout_prob", 0.1)
    context_embedder = state_dict.get("context_embedder.weight")
    config = dict(input_size=input_size, in_channels=in_channels, learn_sigma=out_channels == 2 * in_channels,
                  num_classes=state_dict[EMBEDDING_KEY].shape[0] - int(dropout > 0), block=block_of_state_dict(state_dict),
                  context_dim=None if context_embedder is None else context_embedder.shape[1])
    for key in ("block", "context_dim"):
        if key in overrides and overrides[key] != config[key]:
            raise ValueError(f"{key}={overrides[key]!r} was asked, but the state dict holds a DiT with {key}="
                             f"{config[key]!r} (block={config['block']!r}, context_dim={config['context_dim']!r})")
    config.update(overrides)
    return config


def from_torch_state_dict(name, state_dict, input_size=32, **kwargs):
    """A ready JAX DiT (fusedit.dit.jax.DiT) holding the weights of a PyTorch DiT state dict.

    name: a config of DiT_models ("DiT-XL/2", ...); state_dict: torch tensors or arrays
    keyed like fusedit.dit.models.DiT (published checkpoints are). in_channels,
    num_classes, learn_sigma, block and context_dim are read off the weights; kwargs
    (kernels=, depth=, ...) override the first three, and block= / context_dim=, if given,
    must agree with them. Parameters are float32. A ValueError names any missing,
    unexpected or mis-shaped key.
    """
    state_dict = {re.sub(r"^(module\.|_orig_mod\.)+", "", key): value for key, value in state_dict.items()}
    config = _inferred_config(name, state_dict, input_size, kwargs)
    abstract = nnx.eval_shape(lambda: create_model(name, rngs=nnx.Rngs(0), **config))
    graph, state = nnx.split(abstract)
    wanted = dict(flatten_tree(nnx.to_pure_dict(state)))
    keys = {torch_key(path): path for path in wanted}
    missing = sorted(set(keys) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(keys))
    if missing or unexpected:
        raise ValueError(f"state dict does not match {name} with {config}: missing keys {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")
    values = {}
    for key, path in keys.items():
        value = to_jax_layout(key, _numpy(state_dict[key]))
        if value.shape != wanted[path].shape:
            raise ValueError(f"{key}: shape {tuple(to_torch_layout(key, value).shape)} does not fit {name} "
                             f"(expected {tuple(to_torch_layout(key, np.empty(wanted[path].shape)).shape)})")
        values[path] = value
    nnx.replace_by_pure_dict(state, _nest(values))
    return nnx.merge(graph, state)


def _nest(flat):
    tree = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def to_torch_state_dict(model):
    """{torch key: float32 CPU torch.Tensor} that fusedit.dit.models.DiT loads with strict=True.

    model: a JAX DiT (or its nnx.State). Sharded arrays are gathered; bf16 upcast.
    """
    state = model if isinstance(model, nnx.State) else nnx.state(model)
    return {torch_key(path): torch_tensor(torch_key(path), value) for path, value in flatten_tree(nnx.to_pure_dict(state))}


def torch_tensor(key, value):
    """A JAX-layout array of parameter `key` as a float32 CPU tensor in torch's layout (a copy)."""
    array = np.asarray(jax.device_get(value), dtype=np.float32)
    return torch.from_numpy(np.array(to_torch_layout(key, array), order="C"))
