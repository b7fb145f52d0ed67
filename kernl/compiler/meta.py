"""Compiling a model that is not in memory: built on the meta device, its weights read from safetensors files.

The model is exported and rewritten on meta tensors (shapes only). The rewrite passes compute a few weights at
compile time (Q, K and V concatenated); while they run, RecordRecipes notes how each weight is made from the
model's own tensors (a torch function mode sees every torch.cat). LazyWeights then stands for the program's
weights: a mapping whose values are read when asked for, one at a time, from the checkpoint's files (a tensor,
or the pieces of a fused one), so a tensor-parallel bundle's rank files are written one tensor at a time:
peak memory is one rank's share plus one full tensor.

What still needs a real copy: nothing of the weights. The eager model cannot run on meta, so its outputs are not
compared with the bundle's (the manifest's checks say "skipped"); kernels are compiled and tuned on rank 0's
share of the weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from kernl.errors import KernlError

Recipe = tuple  # ("source", fqn) | ("cat", [Recipe, ...], dim) | ("zeros", shape)
_SAME = {torch.Tensor.detach, torch.Tensor.contiguous, torch.Tensor.clone, torch.detach, torch.clone}


def is_meta(model: torch.nn.Module) -> bool:
    """Whether model's weights are on the meta device (shapes only: compile it with weights_from=)."""
    param = next(iter(model.parameters()), None)
    return param is not None and param.device.type == "meta"


class RecordRecipes(TorchFunctionMode):
    """While active: how every tensor made from the given weights by cat (and detach, zeros) is made."""

    def __init__(self, weights: Mapping[str, torch.Tensor], sources: Mapping[str, str]) -> None:
        super().__init__()
        # id -> (the tensor, kept alive so its id is not reused; its recipe)
        self.known: dict[int, tuple[torch.Tensor, Recipe]] = {
            id(t): (t, ("source", sources[name])) for name, t in weights.items() if name in sources
        }

    def recipe(self, tensor: torch.Tensor) -> Recipe | None:
        found = self.known.get(id(tensor))
        return found[1] if found is not None and found[0] is tensor else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        recipe = None
        if func in _SAME and args and isinstance(args[0], torch.Tensor):
            recipe = self.recipe(args[0])
        elif func is torch.cat:
            parts = [self.recipe(t) for t in args[0]]
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            if parts and all(p is not None for p in parts):
                recipe = ("cat", parts, dim)
        elif func is torch.Tensor.new_zeros and isinstance(out, torch.Tensor):
            recipe = ("zeros", tuple(out.shape))
        if recipe is not None and isinstance(out, torch.Tensor):
            self.known[id(out)] = (out, recipe)
        return out


class Checkpoint:
    """The tensors of a folder of safetensors files (a save_pretrained directory, sharded or not), read one at a
    time; fqns tied to each other in the model (an LM head tied to the embedding) are found under any of them."""

    def __init__(self, path: str | Path, aliases: Mapping[str, list[str]] | None = None) -> None:
        from safetensors import safe_open

        root = Path(path)
        files = sorted(root.glob("*.safetensors")) if root.is_dir() else [root]
        if not files or not all(f.is_file() for f in files):
            raise KernlError(f"weights_from: no .safetensors file at {root}")
        self._open = safe_open
        self.where: dict[str, Path] = {}
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                self.where.update(dict.fromkeys(f.keys(), file))
        self.aliases = dict(aliases or {})

    def key(self, fqn: str) -> str | None:
        return next((k for k in (fqn, *self.aliases.get(fqn, [])) if k in self.where), None)

    def get(self, fqn: str) -> torch.Tensor:
        key = self.key(fqn)
        if key is None:
            raise KernlError(f"weights_from: the checkpoint has no tensor {fqn!r}")
        with self._open(str(self.where[key]), framework="pt", device="cpu") as f:
            return f.get_tensor(key)


class LazyWeights(Mapping):
    """The program's weights by placeholder name, each read (and made) when asked for: see the module docstring.

    shapes: the meta tensors the program was compiled for (each value read is checked against, and cast to,
    its shape and dtype); recipes: how each is made; buffers: the model's tensors that were real (buffers not
    saved in checkpoints, such as rotary frequencies).
    """

    def __init__(
        self, shapes: Mapping[str, torch.Tensor], recipes: Mapping[str, Recipe], buffers: Mapping[str, torch.Tensor]
    ) -> None:
        self.shapes, self.recipes, self.buffers = shapes, recipes, buffers
        self.checkpoint: Checkpoint | None = None
        self.aliases: dict[str, list[str]] = {}  # tied fqns (tied_names)

    def add(self, name: str, value: torch.Tensor) -> None:
        """A weight the compiler adds (zeros of value's shape and dtype; a rank's own value comes from its plan)."""
        self.shapes = {**self.shapes, name: value}
        self.recipes = {**self.recipes, name: ("zeros", tuple(value.shape))}

    def read_from(self, path: str | Path) -> None:
        """Read the weights from the safetensors files at path (a folder, or one file) from now on."""
        self.checkpoint = Checkpoint(path, self.aliases)

    def __getitem__(self, name: str) -> torch.Tensor:
        want = self.shapes[name]
        value = self._make(self.recipes[name], name)
        if tuple(value.shape) != tuple(want.shape):
            raise KernlError(f"weights_from: {name} is {list(value.shape)} in the checkpoint, the model's "
                             f"{list(want.shape)}")  # fmt: skip
        return value.to(want.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def __contains__(self, name: object) -> bool:
        return name in self.shapes

    def _make(self, recipe: Recipe, name: str) -> torch.Tensor:
        kind = recipe[0]
        if kind == "zeros":
            return torch.zeros(recipe[1], dtype=self.shapes[name].dtype)
        if kind == "cat":
            return torch.cat([self._make(r, name).to(self.shapes[name].dtype) for r in recipe[1]], recipe[2])
        fqn = recipe[1]
        if fqn in self.buffers and (self.checkpoint is None or self.checkpoint.key(fqn) is None):
            return self.buffers[fqn]
        if self.checkpoint is None:
            raise KernlError("the model is on the meta device: pass weights_from= (a folder of .safetensors files)")
        if self.checkpoint.key(fqn) is None:
            raise KernlError(
                f"weights_from: the checkpoint has no tensor {fqn!r} and the model holds it on the meta device (a "
                "buffer not saved in checkpoints: build the model with its buffers on the CPU)"
            )
        return self.checkpoint.get(fqn)


def tied_names(model: torch.nn.Module) -> dict[str, list[str]]:
    """fqn -> the other fqns of the same tensor (tied weights), for the checkpoint's lookups."""
    groups: dict[int, list[str]] = {}
    for fqn, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        groups.setdefault(id(t), []).append(fqn)
    return {fqn: [o for o in names if o != fqn] for names in groups.values() for fqn in names if len(names) > 1}


def real_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's buffers that hold values, by fqn: those not on meta, and the non-persistent ones (not in
    checkpoints: rotary frequencies) of modules rebuilt on the CPU from the model's config, as HF builds them."""
    found = {fqn: b for fqn, b in model.named_buffers(remove_duplicate=False) if b.device.type != "meta"}
    config = getattr(model, "config", None)
    for prefix, module in model.named_modules(remove_duplicate=False):
        names = getattr(module, "_non_persistent_buffers_set", ())
        missing = [n for n in names if f"{prefix}.{n}".lstrip(".") not in found]
        if not missing or config is None:
            continue
        try:
            with torch.device("cpu"):
                fresh = type(module)(config=getattr(module, "config", config))
        except Exception:  # noqa: BLE001 - not rebuilt from a config: its buffers must come from the checkpoint
            continue
        for n in missing:
            b, want = getattr(fresh, n, None), getattr(module, n, None)
            if isinstance(b, torch.Tensor) and isinstance(want, torch.Tensor) and b.shape == want.shape:
                found[f"{prefix}.{n}".lstrip(".")] = b.to(want.dtype)
    return found


@contextlib.contextmanager
def recording(weights: dict[str, torch.Tensor], sources: Mapping[str, str]) -> Iterator[RecordRecipes]:
    """Record the recipes of the weights the rewrite passes add to weights (see RecordRecipes)."""
    mode = RecordRecipes(weights, sources)
    with mode:
        yield mode


def lazy_weights(weights: Mapping[str, torch.Tensor], recorder: RecordRecipes, model: torch.nn.Module) -> LazyWeights:
    """The rewritten program's weights (meta tensors by placeholder name) of model as LazyWeights."""
    recipes = {}
    for name, t in weights.items():
        recipe = recorder.recipe(t)
        if recipe is None:
            raise KernlError(f"{name}: a weight made at compile time in a way kernl cannot redo from a checkpoint")
        recipes[name] = recipe
    lazy = LazyWeights(dict(weights), recipes, real_buffers(model))
    lazy.aliases = tied_names(model)
    return lazy


def read_weights_from(weights: Mapping[str, torch.Tensor], path: str | Path | None) -> bool:
    """Point a lowered program's LazyWeights at path; True when the weights are lazy (the model was on meta).
    KernlError when a meta model has no path, or a path is given for a model that holds its weights."""
    lazy = isinstance(weights, LazyWeights)
    if lazy and path is None:
        raise KernlError("the model is on the meta device: pass weights_from= (a folder of .safetensors files)")
    if not lazy and path is not None:
        raise KernlError("weights_from: only for a model built on the meta device (this one holds its weights)")
    if lazy:
        weights.read_from(path)
    return lazy


def check_weights_source(model: torch.nn.Module, path: str | Path | None) -> None:
    """Before any work: a model on meta needs weights_from, and weights_from needs a model on meta."""
    if is_meta(model) and path is None:
        raise KernlError("the model is on the meta device: pass weights_from= (a folder of .safetensors files)")
    if path is not None and not is_meta(model):
        raise KernlError("weights_from: only for a model built on the meta device (this one holds its weights)")
