"""What every Pallas kernel here shares: input checks, TPU block rules, and the two
guards that let one kernel run unchanged on a CPU (interpreter) and a TPU pod slice.

1. TPU (Mosaic) tiling: the last two dims of every block must be divisible by (8, 128)
   or equal the array's own dims, and only float32/bfloat16 are supported. Pallas'
   interpreter does not enforce this, so `pallas_call` below checks every BlockSpec
   before calling: a kernel that passes the CPU tests also lowers on a TPU.
2. Sharding: a Mosaic kernel cannot be partitioned automatically by XLA. `batch_sharded`
   runs an op through `jax.shard_map` over the batch dim whenever a multi-device mesh is
   set (`jax.set_mesh`), and `pallas_call` refuses to run under automatic sharding, so a
   kernel that escapes the shard_map fails on the CPU too instead of only on the pod.
3. VMEM: a kernel's blocks live in a TPU core's VMEM, each input and output block twice
   (the next one is copied in while this one computes), within XLA's scoped limit per
   kernel: 16 MiB by default on TPU v4 (all of its VMEM) and v5e. The interpreter has no
   such limit, so `pallas_call` refuses blocks that cannot fit it, and the ops size their
   blocks to leave room for their float32 intermediates too (`VMEM_BUDGET_BYTES`).
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
SUBLANE, LANE = 8, 128
SCOPED_VMEM_BYTES = 16 * 2**20
# what the ops' default blocks are sized to: double-buffered blocks plus the float32
# intermediates a kernel holds (Mosaic keeps them in VMEM too), with a quarter of the limit
# left for Mosaic's own scratch (register spills)
VMEM_BUDGET_BYTES = SCOPED_VMEM_BYTES * 3 // 4


def interpret_mode():
    """Mosaic kernels compile on a TPU only; elsewhere Pallas interprets them (correct, slow)."""
    return jax.default_backend() != "tpu"


def check_arrays(op, **arrays):
    """Every array floating float32/bfloat16 and of one dtype; a ValueError names the culprit."""
    first_name, first = next(iter(arrays.items()))
    for name, array in arrays.items():
        if not hasattr(array, "dtype") or not hasattr(array, "shape"):
            raise TypeError(f"{op}: {name} must be a JAX array, got {type(array).__name__}")
        dtype = jnp.dtype(array.dtype)
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{op}: {name} has dtype {dtype}; the Pallas TPU kernels support float32 and bfloat16 "
                             "(use kernels='xla' for other dtypes)")
        if dtype != jnp.dtype(first.dtype):
            raise ValueError(f"{op}: {name} is {dtype} but {first_name} is {jnp.dtype(first.dtype)}; pass one dtype")


def check_shape(op, name, array, shape):
    """shape: a tuple of ints or None (any size); raises a ValueError naming the mismatch."""
    if len(array.shape) != len(shape) or any(want is not None and got != want for got, want in zip(array.shape, shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{op}: {name} must have shape {want}, got {tuple(array.shape)}")


def check_block_size(op, name, value, multiple):
    if not isinstance(value, int) or value <= 0 or value % multiple:
        raise ValueError(f"{op}: {name}={value!r} must be a positive multiple of {multiple} (TPU tiling)")


def token_tiling(length, target):
    """(block, padded length) of a row kernel's token axis: the largest multiple of 8 that
    divides `length` and is <= target (no padding); else the whole length, when it fits in
    one block (always a legal TPU block); else equal blocks, multiples of 8 and <= target,
    over the length padded up to them. 1,026 tokens (in-context blocks at 512 px) run as 5
    blocks of 208, not one of 1,026, whose buffers (19-55 MB at C=1152) would overflow a
    TPU's VMEM. Row kernels reduce over the token axis in their backward, so a block must
    not straddle the array's end: the caller pads with rows whose cotangents are 0.
    """
    for size in range(target - target % SUBLANE, 0, -SUBLANE):
        if length % size == 0:
            return size, length
    return even_blocks(length, target)


def lane_block(length, target):
    """Largest multiple of 128 that divides `length` and is <= target, else the whole length."""
    for size in range(target - target % LANE, 0, -LANE):
        if length % size == 0:
            return size
    return length


def vmem_bytes(shape, dtype):
    """Bytes an array of `shape` takes in VMEM, which holds tiles of 8 x 128 32-bit words:
    the last dim rounds up to a multiple of 128, the one before it to a multiple of 8 rows
    (16 for bfloat16, two to a word). None entries (squeezed dims) count as 1."""
    dims = [1] * 2 + [1 if size is None else size for size in shape]
    itemsize = jnp.dtype(dtype).itemsize
    rows_per_tile = SUBLANE * 4 // itemsize
    *outer, rows, lanes = dims
    return math.prod(outer) * -(-rows // rows_per_tile) * rows_per_tile * -(-lanes // LANE) * LANE * itemsize


def padded_block(length, target):
    """(block, padded length): the whole length when it fits in one block, else `target`
    blocks over the length rounded up (the caller pads and masks the tail). For a lane dim,
    whose blocks must be multiples of 128; a row dim takes even_blocks."""
    if length <= target:
        return length, length
    return target, -(-length // target) * target


def even_blocks(length, target):
    """(block, padded length) of a row (sublane) dim: the whole length when it fits in one
    block, else the fewest blocks of at most `target` (a multiple of 8), equal multiples
    of 8, over the length padded up to them: 258 tokens at 128 run as 3 blocks of 88 over
    264, where blocks of 128 would pad them to 384 and compute 45% more rows."""
    if length <= target:
        return length, length
    return split_evenly(length, -(-length // target))


def split_evenly(length, blocks):
    """(block, padded length): `length` cut into `blocks` equal blocks rounded up to a
    multiple of 8, the padded length covering it with the fewest of them."""
    block = -(-length // blocks)
    block += -block % SUBLANE
    return block, -(-length // block) * block


def tpu_block_problem(block_shape, array_shape, dtype):
    """Why a block would not lower on a TPU (a string), or None when it would.

    None entries of block_shape are squeezed dims of size 1. The last dim must be a
    multiple of 128 or the array's own size, the second-to-last a multiple of 8 or the
    array's own size.
    """
    if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
        return f"dtype {jnp.dtype(dtype)} is not float32/bfloat16"
    if len(block_shape) != len(array_shape):
        return f"block {tuple(block_shape)} has rank {len(block_shape)} but the array has rank {len(array_shape)}"
    sizes = [1 if size is None else size for size in block_shape]
    for axis, (size, full, multiple) in enumerate(zip(sizes[-2:][::-1], array_shape[-2:][::-1], (LANE, SUBLANE))):
        if size != full and size % multiple:
            which = "last" if axis == 0 else "second-to-last"
            return (f"{which} block dim {size} is neither a multiple of {multiple} nor the array's "
                    f"size {full} (block {tuple(block_shape)}, array {tuple(array_shape)})")
    return None


def _check_blocks(name, specs, shapes):
    for index, (spec, shape) in enumerate(zip(specs, shapes)):
        problem = tpu_block_problem(spec.block_shape, shape.shape, shape.dtype)
        if problem:
            raise ValueError(f"{name}: operand {index} would not lower on a TPU: {problem}")


def _check_semantics(name, grid, out_specs, semantics):
    """Refuse a "parallel" grid axis along which an output block is revisited: Mosaic would
    split it across cores, which then race on that block (the interpreter runs the grid in
    order and shows nothing). Moving one program id from 0 to 1 must move every output block
    that such an axis writes."""
    for axis, (size, kind) in enumerate(zip(grid, semantics)):
        if size < 2 or kind != "parallel":
            continue
        origin, moved = [0] * len(grid), [0] * len(grid)
        moved[axis] = 1
        for index, spec in enumerate(out_specs):
            if [int(i) for i in spec.index_map(*origin)] == [int(i) for i in spec.index_map(*moved)]:
                raise ValueError(f"{name}: grid axis {axis} revisits output {index}'s block (it accumulates) but is "
                                 f"marked parallel; mark it arbitrary")


def _check_vmem(name, specs, shapes, scratch_shapes):
    sizes = [(vmem_bytes(spec.block_shape, shape.dtype), spec.block_shape, shape.dtype)
             for spec, shape in zip(specs, shapes)]
    total = 2 * sum(size for size, *_ in sizes) + sum(vmem_bytes(s.shape, s.dtype) for s in scratch_shapes)
    if total > SCOPED_VMEM_BYTES:
        largest = ", ".join(f"{tuple(block)} {jnp.dtype(dtype)}"
                            for _, block, dtype in sorted(sizes, key=lambda entry: -entry[0])[:3])
        raise ValueError(f"{name}: its blocks would take {total / 2**20:.1f} MiB of a TPU's VMEM (each in and out "
                         f"block twice), over the {SCOPED_VMEM_BYTES // 2**20} MiB a kernel gets by default on TPU "
                         f"v4/v5e; the largest: {largest}. Smaller block sizes would fit, where the op takes them; a "
                         "dim that no tile size divides (one not a multiple of 128) or that a kernel holds whole "
                         "(attention's other side) can be too long for any (use kernels='xla')")


def check_not_auto_sharded(name):
    """Refuse a Pallas kernel traced under automatic sharding (it lowers on CPU, not on TPU)."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1 and not mesh.are_all_axes_manual:
        raise RuntimeError(
            f"{name}: a Pallas kernel was called under an automatically sharded mesh {dict(mesh.shape)}; "
            "Mosaic kernels cannot be partitioned by XLA. Call it through the fusedit.kernels.pallas ops, "
            "which run it per shard inside jax.shard_map."
        )


def pallas_call(kernel, *, name, grid, in_specs, out_specs, out_shape, scratch_shapes=(), semantics=None):
    """pl.pallas_call with the TPU block rules and the sharding guard checked first.

    `semantics` ("parallel" | "arbitrary" per grid axis) tells Mosaic which axes it may
    split across cores; an axis that accumulates into a revisited output block must be
    "arbitrary" (sequential), and a "parallel" one that does is refused here.
    """
    semantics = tuple(semantics or ("parallel",) * len(grid))
    output_specs = tuple(out_specs) if isinstance(out_specs, (tuple, list)) else (out_specs,)
    output_shapes = tuple(out_shape) if isinstance(out_shape, (tuple, list)) else (out_shape,)
    _check_semantics(name, grid, output_specs, semantics)
    call = pl.pallas_call(
        kernel,
        name=name,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=scratch_shapes,
        interpret=interpret_mode(),
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
    )

    def checked(*arrays):
        check_not_auto_sharded(name)
        _check_blocks(name, in_specs, arrays)
        _check_blocks(name, output_specs, output_shapes)
        _check_vmem(name, list(in_specs) + list(output_specs), list(arrays) + list(output_shapes), scratch_shapes)
        return call(*arrays)

    return checked


def batch_sharded(op, function, *arrays, batched):
    """function(*arrays), run per shard through jax.shard_map when a multi-device mesh is set.

    `batched[i]` says whether arrays[i] is split along its dim 0 (over every automatic
    axis of the mesh) or replicated (gathered whole onto each shard, e.g. a weight).
    Outputs are split along dim 0. Without a mesh, or on one device, function is called
    directly. A batch the shards do not split (one image guided on 4 chips: a batch of 2)
    is filled up with copies of its last element, whose outputs are dropped: their
    cotangents are 0, so they add nothing to any gradient, a replicated weight's included.
    """
    mesh = jax.sharding.get_abstract_mesh()
    axes = tuple(axis for axis, kind in zip(mesh.axis_names, mesh.axis_types)
                 if kind != jax.sharding.AxisType.Manual) if not mesh.empty else ()
    shards = functools.reduce(lambda total, axis: total * mesh.shape[axis], axes, 1)
    if shards == 1:
        return function(*arrays)
    batch = next((array.shape[0] for array, split in zip(arrays, batched) if split), 0)
    extra = -batch % shards
    if extra:
        arrays = tuple(jnp.concatenate([array, jnp.repeat(array[-1:], extra, axis=0)]) if split else array
                       for array, split in zip(arrays, batched))
    batch_spec = PartitionSpec(axes)
    in_specs = tuple(batch_spec if split else PartitionSpec() for split in batched)
    outputs = jax.shard_map(function, mesh=mesh, in_specs=in_specs, out_specs=batch_spec, check_vma=False)(*arrays)
    return jax.tree.map(lambda output: output[:batch], outputs) if extra else outputs
